"""End to end on the embedded tiny SD1 model: CLI merge, the written file in diffusers,
and the behaviour of the stabilised iteration. Slow-ish (tens of seconds in all)."""

import json
from pathlib import Path

import pytest
import torch

from iteris_sd.app.cli import main
from iteris_sd.lora.read import read_lora

pytestmark = pytest.mark.slow


def write_recipe(path: Path, base: Path, loras: list[Path], output: Path, extra: str = "") -> Path:
    from iteris_demo.tiny import CONCEPTS

    text = f'base = "{base}"\noutput = "{output}"\ndtype = "fp32"\n{extra}\n'
    text += "[calibration]\nresolution = 32\nsteps = 4\ntimesteps = 2\n"
    for lora, concept in zip(loras, CONCEPTS):
        text += f'[[lora]]\npath = "{lora}"\nprompts = {json.dumps(list(concept.prompts[:2]))}\n'
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def cli_merge(tiny_assets, tmp_path_factory):
    base, loras = tiny_assets
    folder = tmp_path_factory.mktemp("merge")
    out = folder / "merged.safetensors"
    recipe = write_recipe(folder / "r.toml", base, loras, out, 'iterations = 2\ncompare = ["regmean", "stack"]')
    code = main(["merge", str(recipe)])
    return code, out, base, loras


def test_cli_writes_a_lora_with_metadata(cli_merge, capsys):
    code, out, _, loras = cli_merge
    assert code == 0 and out.is_file()
    merged = read_lora(out)
    meta = merged.metadata
    assert meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_network_module"] == "networks.lora"
    sources = json.loads(meta["merged_from"])
    assert [s["sha256"] for s in sources] == [read_lora(p).sha256 for p in loras]
    recipe = json.loads(meta["iteris_recipe"])
    assert recipe["method"] == "iteris" and recipe["iterations"] == 2
    assert set(recipe["calibration_error"]) == {"lora_sks", "lora_zwx"}
    # Every layer any input touched is in the output, with rank = the sum of the input ranks.
    inputs = [read_lora(p) for p in loras]
    names = set().union(*[f.layers for f in inputs])
    assert set(merged.layers) == names
    for name, layer in merged.layers.items():
        assert layer.rank == sum(f.layers[name].rank for f in inputs if name in f.layers)
        assert layer.scale == pytest.approx(1.0)


def test_written_file_loads_in_diffusers_with_every_key_used(cli_merge):
    from diffusers import StableDiffusionPipeline

    _, out, base, _ = cli_merge
    pipe = StableDiffusionPipeline.from_pretrained(base)
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    before.update({f"te.{n}": p.detach().clone() for n, p in pipe.text_encoder.named_parameters()})
    pipe.load_lora_weights(str(out), adapter_name="merged")
    pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=1.0)
    pipe.unload_lora_weights()
    merged = read_lora(out)
    changed = 0
    from iteris_sd.lora.keymap import build_keymap

    keymap = build_keymap({"unet": pipe.unet, "text_encoder": pipe.text_encoder}, "sd1")
    for module_id, layer in keymap.match(merged).items():
        component, path = module_id.split(".", 1)
        module = keymap.modules[module_id]
        key = f"{path}.weight" if component == "unet" else f"te.{path}.weight"
        expected = before[key] + layer.dense_delta().reshape(before[key].shape)
        torch.testing.assert_close(module.weight.detach(), expected, rtol=1e-4, atol=1e-5)
        changed += 1
    assert changed == len(merged.layers)  # no key was dropped or left unloaded


def test_cli_refuses_to_overwrite_and_says_so_in_one_line(cli_merge, tmp_path, capsys):
    _, out, base, loras = cli_merge
    recipe = write_recipe(tmp_path / "r.toml", base, loras, out, "iterations = 0")
    before = out.read_bytes()
    assert main(["merge", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exists" in err[0] and str(out.name) in err[0]
    assert out.read_bytes() == before


def test_cli_bad_recipe_value_exits_2_naming_the_field(tiny_assets, tmp_path, capsys):
    base, loras = tiny_assets
    recipe = write_recipe(tmp_path / "r.toml", base, loras, tmp_path / "o.safetensors", "iterations = -1")
    assert main(["merge", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "iterations" in err and "-1" in err and len(err.strip().splitlines()) == 1


def test_flag_overrides_recipe(tiny_assets, tmp_path, capsys):
    base, loras = tiny_assets
    out = tmp_path / "o.safetensors"
    recipe = write_recipe(tmp_path / "r.toml", base, loras, out, "iterations = 3")
    assert main(["merge", str(recipe), "--method", "linear", "--rank", "2", "--dtype", "bf16"]) == 0
    merged = read_lora(out)
    assert json.loads(merged.metadata["iteris_recipe"])["method"] == "linear"
    assert max(layer.rank for layer in merged.layers.values()) <= 2
    assert next(iter(merged.layers.values())).up.dtype == torch.bfloat16
