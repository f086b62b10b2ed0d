"""Tests of the recipe schema: parsing, every error class, overrides, introspection."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from iteris_sd.app.recipe import (
    REQUIRED,
    LoraSpec,
    Recipe,
    RecipeError,
    apply_overrides,
    example_recipe,
    load_recipe,
    parse_recipe,
    recipe_fields,
    recipe_to_dict,
)
from iteris_sd.backends.calibration import CalibrationSettings
from iteris_sd.merge.iterate import IterISConfig
from iteris_sd.merge.options import MergeOptions


@pytest.fixture
def files(tmp_path: Path) -> Path:
    """A recipe folder with a base checkpoint, two LoRAs and an output folder."""
    (tmp_path / "base.safetensors").write_bytes(b"x")
    (tmp_path / "a.safetensors").write_bytes(b"x")
    (tmp_path / "b.safetensors").write_bytes(b"x")
    (tmp_path / "out").mkdir()
    return tmp_path


def minimal(tmp: Path) -> dict:
    return {
        "base": str(tmp / "base.safetensors"),
        "output": str(tmp / "out" / "merged.safetensors"),
        "lora": [
            {"path": str(tmp / "a.safetensors"), "prompts": ["a cat"]},
            {"path": str(tmp / "b.safetensors"), "prompts": ["a dog", "  a fox  "]},
        ],
    }


def error(data: dict, **kw) -> str:
    with pytest.raises(RecipeError) as info:
        parse_recipe(data, **kw)
    message = str(info.value)
    assert "\n" not in message
    return message


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------- valid


def test_minimal_recipe_gets_defaults(files):
    r = parse_recipe(minimal(files))
    assert r.method == "iteris" and r.iterations == 2 and r.rank is None
    assert r.dtype == "fp16" and r.device == "auto" and r.seed == 0 and not r.overwrite
    assert r.damping == 0.5 and r.regularization == 1e-3 == IterISConfig().regularization == MergeOptions().regularization and r.density == 0.5
    assert r.compare == [] and r.base_config is None
    assert r.ridge_target == IterISConfig().ridge_target == MergeOptions().ridge_target
    assert r.calibration == CalibrationSettings()
    c = r.calibration
    assert (c.steps, c.resolution, c.cfg, c.sampler, c.timesteps, c.negative_prompt, c.seeds) \
        == (8, 0, 0.0, "ddim", 4, "", 1)  # 0: the family's cfg
    assert r.lora[0] == LoraSpec(path=str(files / "a.safetensors"), prompts=["a cat"])
    assert r.lora[0].strength == 1.0 and r.lora[0].name is None
    assert r.lora[0].held_out_prompts == []
    assert r.lora[1].prompts == ["a dog", "a fox"]  # stripped


def test_defaults_are_not_shared():
    a, b = CalibrationSettings(), CalibrationSettings()
    assert a == b and a is not b
    l1 = LoraSpec(path="x", prompts=["p"])
    l1.held_out_prompts.append("q")
    assert LoraSpec(path="x", prompts=["p"]).held_out_prompts == []


def test_full_recipe_and_dict_round_trip(files):
    data = minimal(files)
    data.update(method="ties", iterations=0, rank=16, dtype="bf16", device="cuda:1", seed=7,
                overwrite=True, damping=1, regularization=0, compare=["linear", "iteris"],
                density=0.3, base_config=str(files))
    data["calibration"] = {"steps": 10, "resolution": 768, "cfg": 1, "sampler": "euler",
                           "timesteps": 10, "negative_prompt": "blurry", "seeds": 2}
    data["lora"][0].update(strength=-0.5, name=" cat ", held_out_prompts=["a lion"])
    r = parse_recipe(data)
    assert r.damping == 1.0 and isinstance(r.damping, float)  # int accepted as float
    assert isinstance(r.calibration.cfg, float) and r.regularization == 0.0
    assert r.lora[0].name == "cat" and r.lora[0].strength == -0.5
    d = recipe_to_dict(r)
    assert json.loads(json.dumps(d)) == d
    assert d["calibration"]["sampler"] == "euler" and d["lora"][0]["name"] == "cat"
    assert parse_recipe(d) == r
    assert parse_recipe(recipe_to_dict(parse_recipe(minimal(files)))).rank is None


def test_more_than_five_prompts_allowed(files):
    data = minimal(files)
    data["lora"][0]["prompts"] = [f"prompt {i}" for i in range(12)]
    assert len(parse_recipe(data).lora[0].prompts) == 12


def test_relative_paths_resolved_against_base_dir(files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path.parent)  # somewhere else: cwd must not matter
    data = {
        "base": "base.safetensors",
        "output": "out/m.safetensors",
        "base_config": ".",
        "lora": [{"path": "./a.safetensors", "prompts": ["p"]},
                 {"path": "sub/../b.safetensors", "prompts": ["q"]}],
    }
    (files / "sub").mkdir()
    r = parse_recipe(data, base_dir=files)
    assert r.base == str(files / "base.safetensors")
    assert r.output == str(files / "out" / "m.safetensors")
    assert r.base_config == str(files)
    assert [s.path for s in r.lora] == [str(files / "a.safetensors"),
                                        str(files / "b.safetensors")]


def test_load_recipe_resolves_next_to_the_file(files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path.parent)
    path = write(files / "r.toml", """
base = "base.safetensors"
output = "out/m.safetensors"
[[lora]]
path = "a.safetensors"
prompts = ["p"]
""")
    r = load_recipe(path)
    assert r.base == str(files / "base.safetensors")
    assert r.lora[0].path == str(files / "a.safetensors")


def test_existing_output_is_not_an_error(files):
    data = minimal(files)
    (files / "out" / "merged.safetensors").write_bytes(b"old")
    assert parse_recipe(data).output.endswith("merged.safetensors")


def test_base_may_be_a_diffusers_folder(files):
    data = minimal(files)
    (files / "sd15").mkdir()
    data["base"] = str(files / "sd15")
    assert parse_recipe(data).base == str(files / "sd15")


# ---------------------------------------------------------------------------- errors


def test_unknown_top_level_field_suggests(files):
    data = minimal(files) | {"iteration": 3}
    msg = error(data)
    assert "iteration: unknown field" in msg and "did you mean 'iterations'" in msg


def test_unknown_field_without_suggestion_lists_fields(files):
    msg = error(minimal(files) | {"zzz": 1})
    assert "zzz: unknown field" in msg and "iterations" in msg


def test_unknown_field_in_lora(files):
    data = minimal(files)
    data["lora"][1]["promts"] = ["x"]
    msg = error(data)
    assert "lora[1].promts: unknown field" in msg and "did you mean 'prompts'" in msg


def test_unknown_field_in_calibration(files):
    data = minimal(files) | {"calibration": {"step": 4}}
    msg = error(data)
    assert "calibration.step: unknown field" in msg and "did you mean 'steps'" in msg


def test_error_messages_start_with_source(files):
    msg = error(minimal(files) | {"iterations": -1}, source="my.toml")
    assert msg.startswith("my.toml: iterations:")


@pytest.mark.parametrize("key, value, expected", [
    ("iterations", "5", "iterations: expected an integer, got '5' (a string)"),
    ("iterations", 2.5, "iterations: expected an integer, got 2.5"),
    ("iterations", True, "iterations: expected an integer, got true (a boolean)"),
    ("rank", False, "rank: expected an integer, got false"),
    ("damping", True, "damping: expected a number, got true"),
    ("damping", "high", "damping: expected a number, got 'high'"),
    ("damping", float("nan"), "damping: expected a finite number, got nan"),
    ("overwrite", 1, "overwrite: expected true or false, got 1"),
    ("method", 3, "method: expected a string, got 3"),
    ("compare", "linear", "compare: expected an array of strings, got 'linear'"),
    ("compare", ["linear", 2], "compare[1]: expected a string, got 2"),
])
def test_wrong_types(files, key, value, expected):
    assert expected in error(minimal(files) | {key: value})


def test_wrong_types_nested(files):
    msg = error(minimal(files) | {"calibration": {"steps": "8"}})
    assert "calibration.steps: expected an integer, got '8'" in msg
    data = minimal(files)
    data["lora"][0]["strength"] = "1"
    assert "lora[0].strength: expected a number, got '1'" in error(data)
    data = minimal(files)
    data["lora"][0]["prompts"] = "a cat"
    msg = error(data)
    assert "lora[0].prompts: expected an array of strings" in msg and "prompts = ['a cat']" in msg
    assert "calibration: expected a table" in error(minimal(files) | {"calibration": 3})


@pytest.mark.parametrize("key, value, expected", [
    ("iterations", -1, "iterations: must be >= 0, got -1"),
    ("rank", 0, "rank: must be >= 1, got 0"),
    ("damping", 0, "damping: must be in (0.0, 1.0], got 0"),
    ("damping", 1.5, "damping: must be in (0.0, 1.0], got 1.5"),
    ("density", 0.0, "density: must be in (0.0, 1.0], got 0.0"),
    ("regularization", -1e-3, "regularization: must be >= 0.0, got -0.001"),
    ("seed", -1, "seed: must be >= 0, got -1"),
    ("method", "avg", "method: expected one of iteris, regmean, ssr, stack"),
    ("ridge_target", "stack", "ridge_target: expected one of average, sum, auto; got 'stack'"),
    ("compare", ["linear", "tie"], "compare[1]: expected one of iteris"),
    ("compare", ["ties", "ties"], "compare[1]: 'ties' is repeated"),
    ("dtype", "fp8", "dtype: expected one of fp16, bf16, fp32; got 'fp8'"),
    ("device", "gpu", "device: expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'; got 'gpu'"),
    ("device", "cuda:x", "device: expected"),
])
def test_ranges_and_choices(files, key, value, expected):
    assert expected in error(minimal(files) | {key: value})


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12", "mps"])
def test_devices_accepted(files, device):
    assert parse_recipe(minimal(files) | {"device": device}).device == device


@pytest.mark.parametrize("cal, expected", [
    ({"steps": 0}, "calibration.steps: must be >= 1, got 0"),
    ({"resolution": 500}, "calibration.resolution: must be a multiple of 8, got 500"),
    ({"resolution": 8}, "calibration.resolution: must be >= 16 (or 0), got 8"),
    ({"cfg": 0.5}, "calibration.cfg: must be >= 1.0 (or 0), got 0.5"),
    ({"sampler": "pndm"}, "calibration.sampler: expected one of ddim, euler, dpmpp_2m"),
    ({"timesteps": 0}, "calibration.timesteps: must be >= 1, got 0"),
    ({"steps": 3}, "calibration.timesteps: must be between 1 and calibration.steps (3), got 4"),
    ({"seeds": 0}, "calibration.seeds: must be >= 1, got 0"),
])
def test_calibration_ranges(files, cal, expected):
    assert expected in error(minimal(files) | {"calibration": cal})


def test_empty_prompts_list(files):
    data = minimal(files)
    data["lora"][1]["prompts"] = []
    assert "lora[1].prompts: expected at least 1 entry" in error(data)


def test_blank_prompt(files):
    data = minimal(files)
    data["lora"][1]["prompts"] = ["ok", "   "]
    assert "lora[1].prompts[1]: expected a non-empty prompt, got '   '" in error(data)
    data = minimal(files)
    data["lora"][0]["held_out_prompts"] = [""]
    assert "lora[0].held_out_prompts[0]: expected a non-empty prompt" in error(data)


def test_held_out_prompt_must_not_be_a_calibration_prompt(files):
    data = minimal(files)
    data["lora"][0]["held_out_prompts"] = [" a cat"]
    msg = error(data)
    assert "lora[0].held_out_prompts[0]: 'a cat' is also a calibration prompt" in msg


def test_missing_required_fields(files):
    data = minimal(files)
    del data["lora"][0]["prompts"]
    assert "lora[0].prompts: missing required field" in error(data)
    data = minimal(files)
    del data["base"]
    assert "base: missing required field" in error(data)
    data = minimal(files)
    del data["output"]
    assert "output: missing required field" in error(data)


def test_missing_or_empty_lora_table(files):
    data = minimal(files)
    del data["lora"]
    assert "lora: missing; add at least one [[lora]] table" in error(data)
    assert "lora: expected at least 1 [[lora]] table" in error(minimal(files) | {"lora": []})
    msg = error(minimal(files) | {"lora": {"path": "x", "prompts": ["p"]}})
    assert "lora: expected an array of tables: write [[lora]]" in msg
    assert "lora[0]: expected a table, got 'x'" in error(minimal(files) | {"lora": ["x"]})


def test_duplicate_lora_names(files):
    data = minimal(files)
    data["lora"][0]["name"] = "same"
    data["lora"][1]["name"] = "same"
    assert "lora[1].name: 'same' is already the name of lora[0]" in error(data)
    data["lora"][1]["name"] = " "
    assert "lora[1].name: expected a non-empty string" in error(data)


def test_missing_base_file(files):
    data = minimal(files) | {"base": str(files / "nope.safetensors")}
    msg = error(data)
    assert msg == f"<recipe>: base: file or folder not found: {files / 'nope.safetensors'}"


def test_missing_lora_file(files):
    data = minimal(files)
    data["lora"][1]["path"] = str(files / "missing.safetensors")
    msg = error(data, source="r.toml")
    assert msg == f"r.toml: lora[1].path: file not found: {files / 'missing.safetensors'}"
    data["lora"][1]["path"] = str(files / "out")
    assert "lora[1].path: expected a file, got a folder" in error(data)


def test_output_folder_missing(files):
    target = files / "nowhere" / "m.safetensors"
    msg = error(minimal(files) | {"output": str(target)})
    assert f"output: folder does not exist: {files / 'nowhere'}" in msg


def test_output_must_be_safetensors(files):
    msg = error(minimal(files) | {"output": str(files / "out" / "m.ckpt")})
    assert "output: expected a path ending in .safetensors" in msg


def test_base_config_must_be_a_folder(files):
    msg = error(minimal(files) | {"base_config": str(files / "cfg")})
    assert f"base_config: folder not found: {files / 'cfg'}" in msg


def test_toml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path / "bad.toml", 'base = "x"\niterations = = 3\n')
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: TOML syntax error") and "line 2" in msg


def test_load_recipe_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "none.toml")
    with pytest.raises(RecipeError, match="got a folder"):
        load_recipe(tmp_path)


def test_load_recipe_errors_name_the_file(files):
    path = write(files / "r.toml", 'base = "base.safetensors"\noutput = "out/m.safetensors"\n'
                                   'iterations = -2\n[[lora]]\npath = "a.safetensors"\n'
                                   'prompts = ["p"]\n')
    with pytest.raises(RecipeError, match=re.escape(f"{path}: iterations: must be >= 0, got -2")):
        load_recipe(path)


def test_non_utf8_recipe(tmp_path):
    path = tmp_path / "r.toml"
    path.write_bytes(b'base = "\xff"\n')
    with pytest.raises(RecipeError, match="r.toml"):
        load_recipe(path)


# ---------------------------------------------------------------------------- overrides


def test_overrides_from_strings(files):
    r = parse_recipe(minimal(files))
    new = apply_overrides(r, {"iterations": "3", "calibration.steps": "12",
                              "calibration.sampler": "euler", "rank": "32", "damping": "1",
                              "overwrite": "true", "compare": "linear, ties",
                              "calibration.negative_prompt": "ugly"})
    assert new.iterations == 3 and new.calibration.steps == 12
    assert new.calibration.sampler == "euler" and new.rank == 32
    assert new.damping == 1.0 and new.overwrite is True
    assert new.compare == ["linear", "ties"] and new.calibration.negative_prompt == "ugly"
    assert r.iterations == 2 and r.calibration.steps == 8 and r.rank is None  # unchanged
    assert new.lora == r.lora


def test_override_rank_none_and_typed_values(files):
    r = parse_recipe(minimal(files) | {"rank": 8})
    assert apply_overrides(r, {"rank": "none"}).rank is None
    assert apply_overrides(r, {"rank": "None"}).rank is None
    assert apply_overrides(r, {"rank": 4, "seed": 3}).rank == 4
    assert apply_overrides(r, {"--calibration.timesteps": "2"}).calibration.timesteps == 2
    new = apply_overrides(r, {"calibration.negative-prompt": "x", "base-config": ""})
    assert new.calibration.negative_prompt == "x" and new.base_config is None


@pytest.mark.parametrize("overrides, expected", [
    ({"iterations": "abc"}, "--iterations: expected an integer, got 'abc'"),
    ({"iterations": "-1"}, "--iterations: must be >= 0, got -1"),
    ({"damping": "x"}, "--damping: expected a number, got 'x'"),
    ({"damping": "0"}, "--damping: must be in (0.0, 1.0], got 0.0"),
    ({"overwrite": "maybe"}, "--overwrite: expected true or false, got 'maybe'"),
    ({"calibration.steps": "two"}, "--calibration.steps: expected an integer, got 'two'"),
    ({"calibration.timesteps": "9"},
     "--calibration.timesteps: must be between 1 and calibration.steps (8), got 9"),
    ({"method": "avg"}, "--method: expected one of iteris"),
    ({"compare": "linear,nope"}, "--compare[1]: expected one of iteris"),
    ({"iteratons": "3"}, "--iteratons: unknown recipe field (did you mean --iterations?)"),
    ({"calibration.step": "3"}, "did you mean --calibration.steps?"),
    ({"lora[0].strength": "2"}, "--lora[0].strength: [[lora]] entries can't be overridden"),
    ({"rank": True}, "--rank: expected an integer, got true"),
])
def test_override_errors(files, overrides, expected):
    r = parse_recipe(minimal(files))
    with pytest.raises(RecipeError) as info:
        apply_overrides(r, overrides)
    assert expected in str(info.value)


def test_override_paths_resolve_against_cwd(files, monkeypatch):
    r = parse_recipe(minimal(files))
    monkeypatch.chdir(files / "out")
    new = apply_overrides(r, {"output": "other.safetensors"})
    assert new.output == str(files / "out" / "other.safetensors")
    with pytest.raises(RecipeError, match=r"^--output: folder does not exist: "):
        apply_overrides(r, {"output": "x/y.safetensors"})
    with pytest.raises(RecipeError, match=r"^--base: file or folder not found: "):
        apply_overrides(r, {"base": "nope"})
    assert apply_overrides(r, {"base_config": str(files)}).base_config == str(files)
    assert apply_overrides(r, {"base_config": "none"}).base_config is None


# ---------------------------------------------------------------------------- introspection


def test_recipe_fields_cover_everything():
    rows = recipe_fields()
    names = [row.name for row in rows]
    assert names[:3] == ["base", "output", "method"]
    for name in ["rank", "compare", "base_config", "calibration.steps", "calibration.seeds",
                 "lora[].path", "lora[].prompts", "lora[].held_out_prompts"]:
        assert name in names
    assert len(names) == len(set(names)) == 20 + 7 + 5
    by_name = {row.name: row for row in rows}
    assert by_name["base"].default is REQUIRED and str(REQUIRED) == "(required)"
    assert by_name["rank"][1:3] == ("int | None", None)
    assert by_name["calibration.steps"][1:3] == ("int", 8)
    assert by_name["compare"][1:3] == ("list[str]", [])
    assert by_name["lora[].prompts"].default is REQUIRED
    for name, typ, default, help_text in rows:
        assert help_text and "\n" not in help_text, name


def test_every_field_has_help():
    import dataclasses
    for cls in (Recipe, CalibrationSettings, LoraSpec):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name}"


def test_example_recipe_parses_and_shows_every_field(tmp_path):
    (tmp_path / "models" / "stable-diffusion-v1-5").mkdir(parents=True)
    (tmp_path / "models" / "v1-5-pruned-emaonly.safetensors").write_bytes(b"x")
    (tmp_path / "loras").mkdir()
    (tmp_path / "loras" / "style_watercolor.safetensors").write_bytes(b"x")
    (tmp_path / "loras" / "character_alice.safetensors").write_bytes(b"x")
    (tmp_path / "out").mkdir()
    path = write(tmp_path / "recipe.toml", example_recipe())
    r = load_recipe(path)
    assert len(r.lora) == 2 and r.lora[0].held_out_prompts
    assert r.output == str(tmp_path / "out" / "merged.safetensors")
    for row in recipe_fields():
        key = row.name.rsplit(".", 1)[-1]
        assert re.search(rf"^#? ?{re.escape(key)} = ", example_recipe(), re.M), row.name
    # the commented-out fields parse too
    uncommented = re.sub(r"^# (rank|base_config) = ", r"\1 = ", example_recipe(), flags=re.M)
    r2 = load_recipe(write(tmp_path / "recipe2.toml", uncommented))
    assert r2.rank == 64 and r2.base_config == str(tmp_path / "models" / "stable-diffusion-v1-5")


def test_path_types_are_str(files):
    r = parse_recipe(minimal(files), base_dir=files)
    assert all(isinstance(v, str) for v in (r.base, r.output, r.lora[0].path))
    assert os.path.isabs(r.base)


def test_regularization_takes_auto_or_a_number_in_the_file_and_on_the_command_line(files):
    r = parse_recipe(minimal(files) | {"regularization": "auto", "ridge_target": "auto"})
    assert r.regularization == "auto" and r.ridge_target == "auto"
    assert parse_recipe(minimal(files) | {"regularization": 1}).regularization == 1.0
    assert apply_overrides(r, {"regularization": "0.01", "ridge_target": "sum"}).regularization == 0.01
    assert apply_overrides(r, {"regularization": "auto"}).regularization == "auto"
    assert "regularization: expected 'auto' or a number, got 'much'" in error(minimal(files) | {"regularization": "much"})
    assert "regularization: must be >= 0.0, got -1.0" in error(minimal(files) | {"regularization": -1})
    with pytest.raises(RecipeError, match="--regularization: expected 'auto' or a number, got 'lots'"):
        apply_overrides(r, {"regularization": "lots"})
