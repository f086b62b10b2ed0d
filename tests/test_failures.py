"""Failure behaviour: what a user sees for every bad input, fault and interruption.

Each test backs a row of the failure table (docs/failures.md), through the Python API
(`read_lora`, `merge_loras`, `write_merged`, `run_recipe`) and the CLI (`main`, in process,
or as a real subprocess where a signal or a fresh interpreter matters). The rule checked
throughout: bad input gets one line naming the file, key, field or value (CLI: exit code 2,
exactly one line on stderr, no traceback); nothing on disk is damaged; no partial or
temporary file is left behind; the same inputs give the same bytes.

The model is the embedded tiny SD1 base (built once and cached, no LoRA training); every
LoRA here is a small synthetic file written by `lora_file`.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

from iteris_sd.app import cli
from iteris_sd.app.cli import main
from iteris_sd.app.pipeline import (
    ZeroDeltaWarning,
    merge_loras,
    run_recipe,
    write_merged,
)
from iteris_sd.app.recipe import load_recipe
from iteris_sd.backends.calibration import CalibrationSettings
from iteris_sd.backends.diffusers import DiffusersBackend
from iteris_sd.backends.load import load_backend
from iteris_sd.lora.keymap import KeyMismatchError, ShapeMismatchError
from iteris_sd.lora.read import LoraFormatError, read_lora
from iteris_sd.merge.methods import METHOD_NAMES
from iteris_sd.merge.options import MergeOptions
from iteris_sd.merge.solve import IllConditionedWarning
from iteris_sd.progress import MergeCancelled

REPO = Path(__file__).resolve().parents[1]
SETTINGS = CalibrationSettings(steps=2, timesteps=1, resolution=16)
ONE_ITERATION = MergeOptions(iterations=1)
# modules of the tiny SD1 model
K = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"  # cross-attention, input 64
Q = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
CONV = "unet.down_blocks.0.resnets.0.conv1"  # 3x3 conv
TIME = "unet.time_embedding.linear_1"  # its inputs span only the captured timesteps
TE = "text_encoder.encoder.layers.0.self_attn.q_proj"
TE2 = "text_encoder.encoder.layers.1.mlp.fc1"


@pytest.fixture(autouse=True)
def bars_apart(monkeypatch):
    """The CLI's progress bars draw on a stream of their own, so that stderr holds exactly the
    lines the CLI prints (a terminal shows the bars, then clears them: they use leave=False)."""
    import io

    from tqdm import tqdm

    sink = io.StringIO()
    original = cli.TqdmProgress.__init__

    def init(self):
        original(self)
        self._tqdm = lambda *args, **kwargs: tqdm(*args, **{**kwargs, "file": sink})

    monkeypatch.setattr(cli.TqdmProgress, "__init__", init)
    yield sink


@pytest.fixture(scope="module")
def base():
    """The tiny SD1 base folder only (cached under $ITERIS_SD_CACHE; ~5 s to build once)."""
    from iteris_demo.tiny import ensure_tiny_assets

    return ensure_tiny_assets(0)[0]


@pytest.fixture(scope="module")
def keymap(base):
    km = load_backend(str(base), [["x"]], SETTINGS, device="cpu").keymap
    assert {K, Q, CONV, TIME, TE, TE2} <= set(km.modules)
    return km


def backend_for(base, prompts: list[list[str]], settings: CalibrationSettings = SETTINGS) -> DiffusersBackend:
    """A fresh backend (its calibration trajectories are cached per backend)."""
    return load_backend(str(base), prompts, settings, device="cpu")


def lora_file(path, keymap, modules, rank=2, seed=0, scale=0.1, alpha="rank", dtype=torch.float32) -> Path:
    """A kohya LoRA on ``modules`` of the tiny model; alpha "rank" (scale 1), a number, or None."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for m in modules:
        w = keymap.modules[m].weight
        name = keymap.output_name[m]
        up = torch.randn(w.shape[0], rank, *([1, 1] if w.dim() == 4 else []), generator=g) * scale
        down = torch.randn(rank, *w.shape[1:], generator=g) * scale
        tensors[f"{name}.lora_up.weight"] = up.to(dtype)
        tensors[f"{name}.lora_down.weight"] = down.to(dtype)
        if alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(float(rank if alpha == "rank" else alpha))
    safetensors.torch.save_file(tensors, str(path))
    return Path(path)


def write_recipe(folder: Path, base, loras, output, extra: str = "", steps: int = 2) -> Path:
    """A small recipe: ``loras`` are (path, prompts) or (path, prompts, extra lines of the table);
    ``extra`` top-level lines replace the defaults of the same fields."""
    defaults = {"dtype": '"fp32"', "device": '"cpu"', "iterations": "1"}
    given = {line.split("=")[0].strip() for line in extra.splitlines() if "=" in line}
    lines = [f"base = {json.dumps(str(base))}", f"output = {json.dumps(str(output))}", extra]
    lines += [f"{k} = {v}" for k, v in defaults.items() if k not in given]
    lines += ["[calibration]", "resolution = 16", f"steps = {steps}", "timesteps = 1"]
    for path, prompts, *more in loras:
        lines += ["[[lora]]", f"path = {json.dumps(str(path), ensure_ascii=False)}",
                  f"prompts = {json.dumps(prompts, ensure_ascii=False)}", *more]
    path = folder / "r.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """``merge`` with these arguments: (exit code, stdout, stderr) of this call alone."""
    capsys.readouterr()
    code = main(["merge", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def visible_lines(err: str) -> list[str]:
    return [line for line in err.split("\n") if line.strip()]


def one_line(err: str, prefix: str = "iteris-sd: error: ") -> str:
    """The CLI's stderr after a failure: exactly one line, no traceback."""
    assert "Traceback" not in err
    lines = visible_lines(err)
    assert len(lines) == 1 and lines[0].startswith(prefix), err
    return lines[0]


def folder_is(folder: Path, names: set[str]) -> None:
    """Exactly these files: no partial output, no temporary file."""
    assert {p.name for p in folder.iterdir()} == names


def hooks_left(backend: DiffusersBackend) -> list[str]:
    models = [("unet", backend.model)] + [(f"te{i}", te) for i, te in enumerate(backend.text_encoders)]
    return [f"{label}.{name}" for label, model in models for name, m in model.named_modules()
            if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks]


def finite(deltas) -> bool:
    return all(bool(torch.isfinite(U).all()) and bool(torch.isfinite(Z).all()) for U, Z in deltas.values())


# ----------------------------------------------------------------------------- damaged files


def _good_bytes(tmp_path, keymap) -> bytes:
    return lora_file(tmp_path / "good.safetensors", keymap, [K, Q]).read_bytes()


DAMAGED = {
    "empty file": (lambda good: b"", "the file is empty"),
    "cut inside the length": (lambda good: good[:5], "8-byte header length"),
    "cut inside the header": (lambda good: good[:40], "truncated"),
    "cut inside the data": (lambda good: good[:-10], "truncated"),
    "header not JSON": (lambda good: (16).to_bytes(8, "little") + b"{not json at all" + bytes(32), "not valid JSON"),
    "plain text": (lambda good: b"this is not a LoRA at all\n" * 20, "not a valid safetensors file"),
    "a PNG image": (lambda good: b"\x89PNG\r\n\x1a\n" + bytes(200), "not a valid safetensors file"),
    "random bytes": (lambda good: random.Random(0).randbytes(4096), "not a valid safetensors file"),
    "no tensors": (lambda good: safetensors.torch.save({}), "contains no LoRA layers"),
}


@pytest.mark.parametrize("kind", list(DAMAGED))
def test_damaged_or_foreign_file_is_refused(kind, tmp_path, base, keymap, capsys):
    make, expected = DAMAGED[kind]
    bad = tmp_path / "bad lora.safetensors"
    bad.write_bytes(make(_good_bytes(tmp_path, keymap)))
    before = bad.read_bytes()
    with pytest.raises(LoraFormatError) as info:
        read_lora(bad)
    message = str(info.value)
    assert str(bad) in message and expected in message and "\n" not in message
    out = tmp_path / "out.safetensors"
    code, _, err = run_cli(capsys, write_recipe(tmp_path, base, [(bad, ["a photo"])], out))
    line = one_line(err)
    assert code == 2 and str(bad) in line and expected in line
    assert not out.exists() and bad.read_bytes() == before


def test_damaged_base_model_is_one_line(tmp_path, base, keymap, capsys):
    lora = lora_file(tmp_path / "a.safetensors", keymap, [K])
    copy = tmp_path / "base"
    shutil.copytree(base, copy)
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    single = tmp_path / "model.safetensors"
    single.write_bytes(b"garbage" * 100)
    for model in (copy, single):
        out = tmp_path / "out.safetensors"
        code, _, err = run_cli(capsys, write_recipe(tmp_path, model, [(lora, ["a photo"])], out))
        line = one_line(err)
        assert code == 2 and str(model) in line and "could not load the base model" in line
        assert not out.exists()


# ----------------------------------------------------------------------------- pickle files


class _Payload:
    """Unpickling this creates ``marker``: proof that a file was unpickled."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _armed_pickle(path: Path, marker: Path, container: str) -> None:
    payload = {"lora_unet_x.lora_up.weight": _Payload(marker)}
    if container == "torch.save":
        torch.save(payload, str(path))
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))


@pytest.mark.parametrize("container", ["pickle", "torch.save"])
@pytest.mark.parametrize("suffix", [".pt", ".ckpt", ".bin", ".pth", ".safetensors"])
def test_pickle_lora_is_refused_and_never_unpickled(suffix, container, tmp_path, base, capsys):
    # the payload is armed: loading a copy of it the usual way does create its marker
    control = tmp_path / "control_marker"
    _armed_pickle(tmp_path / "control.pt", control, container)
    if container == "torch.save":
        torch.load(str(tmp_path / "control.pt"), weights_only=False)
    else:
        pickle.loads((tmp_path / "control.pt").read_bytes())
    assert control.exists()

    marker = tmp_path / "marker"
    evil = tmp_path / f"evil{suffix}"
    _armed_pickle(evil, marker, container)
    expected = "not a valid safetensors file" if suffix == ".safetensors" else "safetensors.torch.save_file"
    with pytest.raises(LoraFormatError, match="execute code" if suffix != ".safetensors" else "safetensors") as info:
        read_lora(evil)
    assert str(evil) in str(info.value) and expected in str(info.value)
    out = tmp_path / "out.safetensors"
    code, _, err = run_cli(capsys, write_recipe(tmp_path, base, [(evil, ["a photo"])], out))
    line = one_line(err)
    assert code == 2 and str(evil) in line and expected in line
    assert not marker.exists() and not out.exists()


def test_pickle_base_checkpoint_is_refused_and_never_unpickled(tmp_path, keymap, capsys):
    marker = tmp_path / "marker"
    evil = tmp_path / "model.ckpt"
    _armed_pickle(evil, marker, "torch.save")
    lora = lora_file(tmp_path / "a.safetensors", keymap, [K])
    code, _, err = run_cli(capsys, write_recipe(tmp_path, evil, [(lora, ["a photo"])], tmp_path / "o.safetensors"))
    line = one_line(err)
    assert code == 2 and str(evil) in line and "only .safetensors checkpoints" in line
    assert not marker.exists()


# ----------------------------------------------------------------------------- keys and shapes


def _save(path: Path, shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]) -> Path:
    """A kohya file with zero-free random factors: {layer name: (up shape, down shape)}."""
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, (up, down) in shapes.items():
        tensors[f"{name}.lora_up.weight"] = torch.randn(*up, generator=g)
        tensors[f"{name}.lora_down.weight"] = torch.randn(*down, generator=g)
        tensors[f"{name}.alpha"] = torch.tensor(1.0)
    safetensors.torch.save_file(tensors, str(path))
    return path


SDXL_LAYERS = {  # real SDXL names and shapes (rank 1)
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": ((640, 1), (1, 2048)),
    "lora_unet_output_blocks_0_1_transformer_blocks_1_attn1_to_q": ((1280, 1), (1, 1280)),
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": ((768, 1), (1, 768)),
    "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": ((1280, 1), (1, 1280)),
}
SD15_LAYERS = {  # real SD1.5 names and shapes
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": ((320, 1), (1, 768)),
    "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn1_to_q": ((320, 1), (1, 320)),
    "lora_te_text_model_encoder_layers_11_self_attn_q_proj": ((768, 1), (1, 768)),
}


def test_sdxl_lora_on_sd1_base_says_counts_names_and_family(tmp_path, base, capsys):
    lora = _save(tmp_path / "xl_style.safetensors", SDXL_LAYERS)
    with pytest.raises(KeyMismatchError) as info:
        merge_loras(backend_for(base, [["a photo"]]), [read_lora(lora)])
    message = str(info.value)
    assert message.startswith(f"{lora}: 4 of 4 layers match no module of this SD1.x model (0 matched)")
    assert all(name in message for name in SDXL_LAYERS) and "looks made for SDXL" in message
    out = tmp_path / "out.safetensors"
    code, _, err = run_cli(capsys, write_recipe(tmp_path, base, [(lora, ["a photo"])], out))
    assert code == 2 and one_line(err) == f"iteris-sd: error: {message}" and not out.exists()


def _tiny_sdxl_backend() -> DiffusersBackend:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from iteris_demo.tiny import tiny_tokenizer

    torch.manual_seed(0)
    tok = tiny_tokenizer()
    common = dict(vocab_size=len(tok), intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    te1 = CLIPTextModel(CLIPTextConfig(hidden_size=16, **common))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=16, projection_dim=8, **common))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8, transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 8,
    )
    settings = CalibrationSettings(steps=2, timesteps=1, resolution=16, sampler="euler")
    return DiffusersBackend(unet.eval(), [te1.eval(), te2.eval()], [tok, tok],
                            {"_class_name": "EulerDiscreteScheduler"}, [["a photo"]], settings)


def test_sd15_lora_on_sdxl_base_says_counts_names_and_family(tmp_path):
    backend = _tiny_sdxl_backend()
    assert backend.family == "sdxl"
    lora = _save(tmp_path / "sd15_style.safetensors", SD15_LAYERS)
    with pytest.raises(KeyMismatchError) as info:
        merge_loras(backend, [read_lora(lora)])
    message = str(info.value)
    assert message.startswith(f"{lora}: 3 of 3 layers match no module of this SDXL model (0 matched)")
    assert all(name in message for name in SD15_LAYERS) and "looks made for SD1.x" in message
    assert not hooks_left(backend)


def test_partly_matching_lora_lists_what_did_not_match(tmp_path, base, keymap):
    shapes = {keymap.output_name[m]: ((keymap.modules[m].weight.shape[0], 1), (1, keymap.modules[m].weight.shape[1]))
              for m in (K, TE)}
    shapes["lora_unet_down_blocks_3_resnets_1_time_emb_proj"] = ((1280, 1), (1, 1280))
    lora = _save(tmp_path / "partial.safetensors", shapes)
    flux = _save(tmp_path / "flux.safetensors", {"lora_unet_double_blocks_0_img_attn_qkv": ((9216, 1), (1, 3072))})
    backend = backend_for(base, [["a photo"]])
    with pytest.raises(KeyMismatchError) as info:
        merge_loras(backend, [read_lora(lora)])
    assert str(info.value).startswith(f"{lora}: 1 of 3 layers match no module of this SD1.x model (2 matched); "
                                      "unmatched: lora_unet_down_blocks_3_resnets_1_time_emb_proj;")
    with pytest.raises(KeyMismatchError, match="0 matched.*looks made for Flux"):
        merge_loras(backend, [read_lora(flux)])


def test_shape_mismatch_names_layer_and_both_shapes(tmp_path, base, keymap, capsys):
    name = keymap.output_name[K]
    d_out, d_in = keymap.modules[K].weight.shape
    lora = _save(tmp_path / "wide.safetensors", {name: ((d_out, 2), (2, 768))})
    with pytest.raises(ShapeMismatchError) as info:
        merge_loras(backend_for(base, [["a photo"]]), [read_lora(lora)])
    message = str(info.value)
    assert name in message and f"({d_out}, 768)" in message and f"({d_out}, {d_in})" in message
    code, _, err = run_cli(capsys, write_recipe(tmp_path, base, [(lora, ["a photo"])], tmp_path / "o.safetensors"))
    assert code == 2 and one_line(err) == f"iteris-sd: error: {message}"


# ----------------------------------------------------------------------------- tensor values


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nan_or_inf_is_refused_naming_file_and_key(value, dtype, tmp_path, base, keymap, capsys):
    path = lora_file(tmp_path / "diverged.safetensors", keymap, [K, Q], dtype=dtype)
    tensors = safetensors.torch.load_file(str(path))
    key = f"{keymap.output_name[Q]}.lora_down.weight"
    tensors[key][1, 3] = value
    safetensors.torch.save_file(tensors, str(path))
    with pytest.raises(LoraFormatError) as info:
        read_lora(path)
    assert str(info.value) == (f"{path}: key '{key}' contains NaN/Inf; the file is damaged or was saved "
                               "from a diverged training run")
    code, _, err = run_cli(capsys, write_recipe(tmp_path, base, [(path, ["a photo"])], tmp_path / "o.safetensors"))
    assert code == 2 and one_line(err) == f"iteris-sd: error: {info.value}"


def test_rank_zero_is_refused(tmp_path, base, keymap, capsys):
    name = keymap.output_name[K]
    d_out, d_in = keymap.modules[K].weight.shape
    path = tmp_path / "rank0.safetensors"
    safetensors.torch.save_file({f"{name}.lora_up.weight": torch.zeros(d_out, 0),
                                 f"{name}.lora_down.weight": torch.zeros(0, d_in)}, str(path))
    with pytest.raises(LoraFormatError, match=f"key '{name}.lora_down.weight' has rank 0"):
        read_lora(path)
    code, _, err = run_cli(capsys, write_recipe(tmp_path, base, [(path, ["a photo"])], tmp_path / "o.safetensors"))
    assert code == 2 and "has rank 0" in one_line(err) and str(path) in err


ALL_METHODS = list(METHOD_NAMES)


def test_all_zero_lora_merges_with_a_warning_and_no_nan(tmp_path, base, keymap, capsys):
    good = read_lora(lora_file(tmp_path / "good.safetensors", keymap, [K, Q, CONV, TE], seed=1))
    zero = read_lora(lora_file(tmp_path / "zero.safetensors", keymap, [K, TE], scale=0.0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = merge_loras(backend_for(base, [["a photo"], ["zwx style"]]), [good, zero], ALL_METHODS, ONE_ITERATION)
    zero_warnings = [str(w.message) for w in caught if issubclass(w.category, ZeroDeltaWarning)]
    assert len(zero_warnings) == 1 and zero_warnings[0].startswith(f"{zero.path}: every weight change")
    for result in report.results.values():
        assert finite(result.deltas) and all(0 <= e < 10 for e in result.calibration), result.name
    # nothing but zeros: still finite, and the written file is all zeros
    backend = backend_for(base, [["a photo"], ["zwx style"]])
    with pytest.warns(ZeroDeltaWarning):
        report = merge_loras(backend, [zero, zero], ["iteris", "regmean"], ONE_ITERATION)
    out = tmp_path / "merged.safetensors"
    write_merged(str(out), backend, report.results["iteris"].deltas, inputs=[zero, zero], recipe={}, dtype="fp32")
    assert all(not bool(layer.dense_delta().any()) for layer in read_lora(out).layers.values())
    # the CLI: merged and written, with the warning as one line
    recipe = write_recipe(tmp_path, base, [(good.path, ["a photo"]), (zero.path, ["zwx style"])],
                          tmp_path / "cli.safetensors")
    code, _, err = run_cli(capsys, recipe)
    assert code == 0 and (tmp_path / "cli.safetensors").is_file()
    assert visible_lines(err) == [f"iteris-sd: warning: {zero_warnings[0]}"]


def test_alpha_zero_scales_to_zero_and_missing_alpha_to_one(tmp_path, base, keymap):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no division by zero anywhere
        silent = read_lora(lora_file(tmp_path / "alpha0.safetensors", keymap, [K, CONV], alpha=0.0))
        plain = read_lora(lora_file(tmp_path / "no_alpha.safetensors", keymap, [K, Q], alpha=None, seed=3))
        assert all(layer.scale == 0.0 and layer.alpha == 0.0 for layer in silent.layers.values())
        assert all(layer.scale == 1.0 and layer.alpha is None for layer in plain.layers.values())
        with pytest.warns(ZeroDeltaWarning, match="alpha = 0"):
            report = merge_loras(backend_for(base, [["a photo"], ["zwx style"]]), [silent, plain],
                                 ["iteris", "stack", "svd"], ONE_ITERATION)
    for result in report.results.values():
        assert finite(result.deltas) and all(0 <= e < 10 for e in result.calibration)
    stack = report.results["stack"].deltas
    torch.testing.assert_close(stack[CONV][0] @ stack[CONV][1], torch.zeros_like(stack[CONV][0] @ stack[CONV][1]))
    layer = plain.layers[keymap.output_name[Q]]
    torch.testing.assert_close(stack[Q][0] @ stack[Q][1], layer.up.float() @ layer.down.float())  # scale 1


def test_mixed_ranks_and_dtypes_merge_as_their_exact_values(tmp_path, base, keymap):
    specs = [(1, torch.float16, [K, Q, TE]), (3, torch.bfloat16, [K, CONV]), (5, torch.float32, [Q, CONV, TE2])]
    mixed, upcast = [], []
    for k, (rank, dtype, modules) in enumerate(specs):
        path = lora_file(tmp_path / f"m{k}.safetensors", keymap, modules, rank=rank, seed=k, dtype=dtype)
        mixed.append(read_lora(path))
        tensors = {n: t.float() for n, t in safetensors.torch.load_file(str(path)).items()}
        safetensors.torch.save_file(tensors, str(tmp_path / f"f{k}.safetensors"))
        upcast.append(read_lora(tmp_path / f"f{k}.safetensors"))
    assert {mixed[k].layers[keymap.output_name[specs[k][2][0]]].up.dtype for k in range(3)} == {
        torch.float16, torch.bfloat16, torch.float32}
    prompts = [["a photo"], ["zwx style"], ["qpr toy"]]
    a = merge_loras(backend_for(base, prompts), mixed, ["iteris", "ties"], ONE_ITERATION)
    b = merge_loras(backend_for(base, prompts), upcast, ["iteris", "ties"], ONE_ITERATION)
    for method in ("iteris", "ties"):
        for m, (U, Z) in a.results[method].deltas.items():
            assert torch.equal(U, b.results[method].deltas[m][0]) and torch.equal(Z, b.results[method].deltas[m][1])
    ranks = {m: U.shape[1] for m, (U, _) in a.results["iteris"].deltas.items()}
    assert ranks == {K: 1 + 3, Q: 1 + 5, TE: 1, CONV: 3 + 5, TE2: 5}


def test_text_encoder_only_and_unet_only_loras(tmp_path, base, keymap):
    te_only = read_lora(lora_file(tmp_path / "te.safetensors", keymap, [TE, TE2], rank=2, seed=1))
    unet_only = read_lora(lora_file(tmp_path / "unet.safetensors", keymap, [K, Q, CONV], rank=3, seed=2))
    assert all(n.startswith("lora_te_") for n in te_only.layers)
    assert all(n.startswith("lora_unet_") for n in unet_only.layers)
    backend = backend_for(base, [["a photo"], ["zwx style"]])
    report = merge_loras(backend, [te_only, unet_only], ["iteris"], ONE_ITERATION)
    result = report.results["iteris"]
    assert finite(result.deltas) and all(0 <= e < 1 for e in result.calibration)
    assert {m: U.shape[1] for m, (U, _) in result.deltas.items()} == {TE: 2, TE2: 2, K: 3, Q: 3, CONV: 3}
    out = tmp_path / "merged.safetensors"
    write_merged(str(out), backend, result.deltas, inputs=[te_only, unet_only], recipe={}, dtype="fp16")
    assert set(read_lora(out).layers) == set(te_only.layers) | set(unet_only.layers)


def test_single_lora_comes_back_as_itself(tmp_path, base, keymap):
    lora = read_lora(lora_file(tmp_path / "only.safetensors", keymap, [K, Q, CONV, TE], rank=3, seed=4))
    report = merge_loras(backend_for(base, [["a photo of sks"]]), [lora], ["iteris", "regmean"], ONE_ITERATION)
    for result in report.results.values():
        assert result.calibration[0] < 1e-3
        for m, (U, Z) in result.deltas.items():
            expected = lora.layers[keymap.output_name[m]].dense_delta()
            torch.testing.assert_close(U @ Z, expected.reshape(expected.shape[0], -1), rtol=1e-3, atol=1e-5)


def test_ten_loras(tmp_path, base, keymap):
    pool = [K, Q, CONV, TE, TE2, TIME]
    loras, touched = [], {}
    for k in range(10):
        modules = [pool[k % len(pool)], pool[(k + 1) % len(pool)]]
        loras.append(read_lora(lora_file(tmp_path / f"l{k}.safetensors", keymap, modules, rank=1, seed=k)))
        for m in modules:
            touched[m] = touched.get(m, 0) + 1
    prompts = [[f"concept {k}"] for k in range(10)]
    backend = backend_for(base, prompts)
    report = merge_loras(backend, loras, ["iteris", "linear"], ONE_ITERATION)
    result = report.results["iteris"]
    assert len(result.calibration) == 10 and len(report.history) == 2
    assert finite(result.deltas) and all(0 <= e < 10 for e in result.calibration)
    assert {m: U.shape[1] for m, (U, _) in result.deltas.items()} == touched
    out = tmp_path / "merged.safetensors"
    write_merged(str(out), backend, result.deltas, inputs=loras, recipe={}, dtype="fp16")
    assert len(json.loads(read_lora(out).metadata["merged_from"])) == 10


# ----------------------------------------------------------------------------- prompts


def test_empty_prompt_list_and_empty_prompt(tmp_path, base, keymap, capsys):
    path = lora_file(tmp_path / "a.safetensors", keymap, [K])
    lora = read_lora(path)
    with pytest.raises(ValueError, match=f"^{path}: LoRA 0 has no calibration prompts"):
        merge_loras(backend_for(base, [[]]), [lora])
    with pytest.raises(ValueError, match=f"^{path}: calibration prompt 1 of LoRA 0 is '  '"):
        merge_loras(backend_for(base, [["a photo", "  "]]), [lora])
    with pytest.raises(ValueError, match="^2 LoRAs but calibration prompts for 1"):
        merge_loras(backend_for(base, [["a photo"]]), [lora, lora])
    with pytest.raises(ValueError, match="no LoRAs to merge"):
        merge_loras(backend_for(base, []), [])
    out = tmp_path / "o.safetensors"
    code, _, err = run_cli(capsys, write_recipe(tmp_path, base, [(path, [])], out))
    assert code == 2 and "lora[0].prompts: expected at least 1 entry" in one_line(err)
    code, _, err = run_cli(capsys, write_recipe(tmp_path, base, [(path, ["a photo", ""])], out))
    assert code == 2 and "lora[0].prompts[1]: expected a non-empty prompt" in one_line(err)
    assert not out.exists()


def test_prompt_longer_than_the_context_warns_and_is_truncated(tmp_path, base, keymap, capsys):
    long_a = "a photo of sks " * 12 + "in the rain"
    long_b = "a photo of sks " * 12 + "at night, very dark"
    backend = backend_for(base, [[long_a]])
    with pytest.warns(UserWarning, match="longer than the text encoder's 77 tokens"):
        ids_a = backend.token_ids([long_a])[0]
    with pytest.warns(UserWarning):
        ids_b = backend.token_ids([long_b])[0]
    assert ids_a.shape == (2, 77) and torch.equal(ids_a, ids_b)  # only the first 77 tokens count
    path = lora_file(tmp_path / "a.safetensors", keymap, [K, TE])
    out = tmp_path / "o.safetensors"
    code, stdout, err = run_cli(capsys, write_recipe(tmp_path, base, [(path, [long_a, "a photo"])], out))
    assert code == 0 and out.is_file() and "wrote" in stdout
    lines = visible_lines(err)
    assert len(lines) == 1 and lines[0].startswith("iteris-sd: warning: prompt 'a photo of sks")
    assert "longer than the text encoder's 77 tokens" in lines[0]


def _tokenizer_without_model_max_length():
    """The tiny model's tokenizer as a tokenizer_config.json without model_max_length loads."""
    from transformers import CLIPTokenizer

    from iteris_demo.tiny import tiny_tokenizer

    tok = CLIPTokenizer(vocab=tiny_tokenizer().get_vocab(), merges=[])
    assert tok.model_max_length > 1e29  # transformers' VERY_LARGE_INTEGER
    return tok


def test_tokenizer_without_model_max_length_pads_to_the_text_encoders_positions(base):
    from iteris_sd.backends.diffusers import context_length

    backend = backend_for(base, [["a photo"]])
    expected = backend.token_ids(["a photo of sks"])[0]
    backend.tokenizers[0] = _tokenizer_without_model_max_length()
    assert backend.text_encoders[0].config.max_position_embeddings == 77
    assert torch.equal(backend.token_ids(["a photo of sks"])[0], expected)  # (2, 77), not an OverflowError
    # a length the encoder cannot take is replaced too; a shorter one is kept
    assert context_length(_TokenizerOfLength(1000), backend.text_encoders[0]) == 77
    assert context_length(_TokenizerOfLength(64), backend.text_encoders[0]) == 64
    with pytest.raises(ValueError, match=r"^tokenizer CLIPTokenizer: model_max_length is 1e\+30, i.e. not set .* set model_max_length"):
        context_length(_tokenizer_without_model_max_length(), object())


class _TokenizerOfLength:
    """Only what context_length reads of a tokenizer."""

    def __init__(self, model_max_length):
        self.model_max_length = model_max_length


def test_seeds_fold_into_torchs_range_drawing_as_before():
    from iteris_sd.seeds import fold_seed

    top = 2**64 - 1
    assert [fold_seed(s) for s in (0, 7, top, top + 1, top + 1009, -1)] == [0, 7, top, 0, 1008, top]
    g = torch.Generator()
    for s in (-1, -(2**63), 5, top, top + 20_011):
        g.manual_seed(fold_seed(s))  # never an overflow
    for s in (-1, -(2**63), 5, top):  # every seed torch accepted already draws what it drew
        assert torch.equal(torch.randn(3, generator=g.manual_seed(s)), torch.randn(3, generator=g.manual_seed(fold_seed(s))))


def test_largest_seed_merges_and_gives_the_same_merge_again(tmp_path, base, keymap):
    """calibration_seed goes up to 2^64 - 1 (the ComfyUI widget); the offsets added to it (per
    concept, held-out scoring, DARE's per-layer seed) are folded into torch's range."""
    top = 2**64 - 1
    loras = [read_lora(lora_file(tmp_path / f"{k}.safetensors", keymap, [K, CONV], seed=k)) for k in range(2)]
    runs = []
    for _ in range(2):
        backend = load_backend(str(base), [["a photo"], ["zwx style"]], SETTINGS, seed=top, device="cpu")
        runs.append(merge_loras(backend, loras, ["iteris", "dare"], MergeOptions(iterations=0, seed=top)))
        reference = runs[-1].references[1]
        assert backend.noise_fidelity(["zwx style"], top + 10_007, reference, {"same": reference})["same"] < 1e-3
    for name in ("iteris", "dare"):
        a, b = (r.results[name].deltas for r in runs)
        assert finite(a) and a.keys() == b.keys()
        assert all(torch.equal(x, y) for m in a for x, y in zip(a[m], b[m]))


def test_non_ascii_prompts_paths_and_names(tmp_path, base, keymap, capsys):
    path = lora_file(tmp_path / "lora_café_日本.safetensors", keymap, [K, TE])
    prompts = ["café au lait, 日本語のプロンプト ☕", "Ünïcödé — naïve façade"]
    out = tmp_path / "merged_ключ.safetensors"
    recipe = write_recipe(tmp_path, base, [(path, prompts, 'name = "ключ"')], out)
    code, _, err = run_cli(capsys, recipe)
    assert code == 0 and not visible_lines(err)
    merged = read_lora(out)
    assert json.loads(merged.metadata["iteris_recipe"])["lora"][0]["prompts"] == prompts
    assert json.loads(merged.metadata["merged_from"])[0]["name"] == "ключ"


# ----------------------------------------------------------------------------- recipe errors


RECIPE_ERRORS = {
    "unknown field": ("iteration = 3", [], "iteration: unknown field (did you mean 'iterations'?)"),
    "unknown lora field": ("", [], "lora[0].strenght: unknown field (did you mean 'strength'?)"),
    "wrong type": ('damping = "high"', [], "damping: expected a number, got 'high' (a string)"),
    "wrong type in a table": ("", [], "lora[0].prompts: expected an array of strings, got 'a photo' (a string)"),
    "negative iterations": ("iterations = -1", [], "iterations: must be >= 0, got -1"),
    "missing LoRA file": ("", [], "lora[0].path: file not found: "),
    "missing base": ("", [], "base: file or folder not found: "),
    "negative flag": ("", ["--iterations", "-3"], "--iterations: must be >= 0, got -3"),
    "wrong flag type": ("", ["--seed", "abc"], "--seed: expected an integer, got 'abc'"),
    "unknown flag value": ("", ["--method", "magic"], "--method: expected one of iteris, regmean"),
}


@pytest.mark.parametrize("case", list(RECIPE_ERRORS))
def test_recipe_errors_name_the_field_and_value(case, tmp_path, base, keymap, capsys):
    extra, flags, expected = RECIPE_ERRORS[case]
    lora = lora_file(tmp_path / "a.safetensors", keymap, [K])
    entry = (lora, ["a photo"])
    if case == "unknown lora field":
        entry = (lora, ["a photo"], "strenght = 0.5")
    if case == "missing LoRA file":
        entry = (tmp_path / "gone.safetensors", ["a photo"])
    recipe = write_recipe(tmp_path, tmp_path / "nowhere" if case == "missing base" else base, [entry],
                          tmp_path / "o.safetensors", extra)
    if case == "wrong type in a table":
        recipe.write_text(recipe.read_text().replace('prompts = ["a photo"]', 'prompts = "a photo"'))
    code, _, err = run_cli(capsys, recipe, *flags)
    line = one_line(err)
    assert code == 2 and expected in line, line
    if not flags:
        assert line.startswith(f"iteris-sd: error: {recipe}: ")  # the recipe file is named
    if case.startswith("missing"):
        assert str(tmp_path / ("gone.safetensors" if "LoRA" in case else "nowhere")) in line
    folder_is(tmp_path, {"a.safetensors", "r.toml"})


@pytest.mark.parametrize("field, value, expected", [
    ("iterations", -1, "must be >= 0, got -1"), ("damping", 0.0, "must be in (0.0, 1.0], got 0.0"),
    ("damping", 1.5, "must be in (0.0, 1.0], got 1.5"), ("regularization", -1e-3, "must be >= 0.0, got -0.001"),
    ("rank", 0, "must be >= 1, got 0"), ("density", 0.0, "must be in (0.0, 1.0], got 0.0"),
    ("seed", -1, "must be >= 0, got -1"), ("chunk_layers", 0, "must be >= 1, got 0"), ("tokens", 0, "must be >= 1, got 0"),
    ("ridge_target", "stack", "expected one of average, sum, auto; got 'stack'"),
    ("regularization", "high", "expected 'auto' or a number, got 'high'"),
])
def test_bad_merge_options_fail_before_any_work(field, value, expected):
    """The Python API's MergeOptions checks its fields with the recipe's rules when made, not
    after a calibration pass."""
    with pytest.raises(ValueError) as e:
        MergeOptions(**{field: value})
    assert str(e.value) == f"MergeOptions.{field}: {expected}"


def test_missing_recipe_file(tmp_path, capsys):
    code, _, err = run_cli(capsys, tmp_path / "absent.toml")
    assert code == 2 and one_line(err) == f"iteris-sd: error: {tmp_path / 'absent.toml'}: recipe file not found"


# ----------------------------------------------------------------------------- outputs


@pytest.fixture(scope="module")
def merged(base, keymap, tmp_path_factory):
    """A finished merge to write: (backend, loras, deltas)."""
    folder = tmp_path_factory.mktemp("merged")
    loras = [read_lora(lora_file(folder / f"{k}.safetensors", keymap, [K, CONV], seed=k)) for k in range(2)]
    backend = backend_for(base, [["a photo"], ["zwx style"]])
    report = merge_loras(backend, loras, ["stack"])
    return backend, loras, report.results["stack"].deltas


def test_output_in_a_missing_folder_is_an_error_and_not_created(tmp_path, base, keymap, merged, capsys):
    lora = lora_file(tmp_path / "a.safetensors", keymap, [K])
    out = tmp_path / "no" / "such" / "folder" / "o.safetensors"
    code, _, err = run_cli(capsys, write_recipe(tmp_path, base, [(lora, ["a photo"])], out))
    assert code == 2 and f"output: folder does not exist: {out.parent}" in one_line(err)
    backend, loras, deltas = merged
    with pytest.raises(FileNotFoundError, match="does not exist; create it first"):
        write_merged(str(out), backend, deltas, inputs=loras, recipe={})
    assert not (tmp_path / "no").exists()


def test_existing_output_is_kept_unless_overwrite_is_asked(tmp_path, base, keymap, merged, capsys):
    lora = lora_file(tmp_path / "a.safetensors", keymap, [K, Q])
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"precious")
    recipe = write_recipe(tmp_path, base, [(lora, ["a photo"])], out)
    start = time.perf_counter()
    code, _, err = run_cli(capsys, recipe)
    assert code == 2 and "already exists; set overwrite = true" in one_line(err)
    assert time.perf_counter() - start < 2  # refused before any model is loaded
    assert out.read_bytes() == b"precious"
    backend, loras, deltas = merged
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_merged(str(out), backend, deltas, inputs=loras, recipe={})
    assert out.read_bytes() == b"precious"
    code, _, _ = run_cli(capsys, recipe, "--overwrite", "true")
    assert code == 0 and set(read_lora(out).layers) == set(read_lora(lora).layers)
    folder_is(tmp_path, {"a.safetensors", "o.safetensors", "r.toml"})


def test_output_that_is_an_input_is_refused_even_with_overwrite(tmp_path, base, keymap, capsys):
    lora = lora_file(tmp_path / "a.safetensors", keymap, [K])
    before = lora.read_bytes()
    recipe = write_recipe(tmp_path, base, [(lora, ["a photo"])], lora, "overwrite = true")
    code, _, err = run_cli(capsys, recipe)
    assert code == 2 and "output is the same file as lora[0].path" in one_line(err)
    assert lora.read_bytes() == before


def _fail_save_file(written: list):
    def save_file(tensors, filename, metadata=None):
        written.append(filename)
        with open(filename, "wb") as f:
            f.write(b"\x00" * 64)  # part of the file reaches the disk, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    return save_file


def _fail_replace(src, dst):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("previous", [False, True])
@pytest.mark.parametrize("where", ["save_file", "os.replace"])
def test_full_disk_while_saving_leaves_nothing_behind(where, previous, tmp_path, merged, monkeypatch):
    backend, loras, deltas = merged
    out = tmp_path / "merged.safetensors"
    if previous:
        write_merged(str(out), backend, deltas, inputs=loras, recipe={"old": True})
    before = out.read_bytes() if previous else None
    written = []
    if where == "save_file":
        monkeypatch.setattr(safetensors.torch, "save_file", _fail_save_file(written))
    else:
        monkeypatch.setattr(os, "replace", _fail_replace)
    with pytest.raises(OSError) as info:
        write_merged(str(out), backend, deltas, inputs=loras, recipe={"new": True}, overwrite=previous)
    assert info.value.errno == errno.ENOSPC
    kept = "the existing file is unchanged" if previous else "no file was written"
    assert info.value.strerror == f"{out}: could not write the file (No space left on device); {kept}"
    folder_is(tmp_path, {"merged.safetensors"} if previous else set())
    if previous:
        assert out.read_bytes() == before
    if written:
        assert not os.path.exists(written[0])  # the temporary file is gone


def test_full_disk_in_the_cli_exits_1_with_one_line(tmp_path, base, keymap, monkeypatch, capsys):
    lora = lora_file(tmp_path / "a.safetensors", keymap, [K, Q])
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"previous merge")
    monkeypatch.setattr(safetensors.torch, "save_file", _fail_save_file([]))
    code, _, err = run_cli(capsys, write_recipe(tmp_path, base, [(lora, ["a photo"])], out), "--overwrite", "true")
    assert code == 1
    assert one_line(err) == (f"iteris-sd: error: {out}: could not write the file (No space left on device); "
                             "the existing file is unchanged")
    assert out.read_bytes() == b"previous merge"
    folder_is(tmp_path, {"a.safetensors", "o.safetensors", "r.toml"})


# ----------------------------------------------------------------------------- interruption


def _interrupt_at(phase: str, exc: BaseException):
    calls = []

    def progress(name, done, total, detail=None):
        calls.append(name)
        if name.startswith(phase):
            raise exc

    return progress, calls


@pytest.mark.parametrize("phase", ["trajectory", "capture", "solve", "iterate"])
def test_interrupted_merge_leaves_no_hooks_and_the_model_as_it_was(phase, tmp_path, base, keymap):
    loras = [read_lora(lora_file(tmp_path / f"{k}.safetensors", keymap, [K, Q, CONV, TE], seed=k)) for k in range(2)]
    prompts = [["a photo"], ["zwx style"]]
    backend = backend_for(base, prompts)
    weights = {k: v.clone() for m in [backend.model, *backend.text_encoders] for k, v in m.state_dict().items()}
    progress, calls = _interrupt_at(phase, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        merge_loras(backend, loras, ["iteris"], ONE_ITERATION, progress)
    assert calls[-1].startswith(phase)
    assert hooks_left(backend) == []
    after = {k: v for m in [backend.model, *backend.text_encoders] for k, v in m.state_dict().items()}
    assert all(torch.equal(weights[k], after[k]) for k in weights)
    if phase == "capture":  # the same backend still merges exactly as a fresh one does
        again = merge_loras(backend, loras, ["iteris"], ONE_ITERATION).results["iteris"].deltas
        fresh = merge_loras(backend_for(base, prompts), loras, ["iteris"], ONE_ITERATION).results["iteris"].deltas
        assert all(torch.equal(again[m][1], fresh[m][1]) for m in fresh)


def test_cancelled_run_recipe_writes_nothing(tmp_path, base, keymap):
    lora = lora_file(tmp_path / "a.safetensors", keymap, [K, Q])
    out = tmp_path / "o.safetensors"
    recipe = load_recipe(write_recipe(tmp_path, base, [(lora, ["a photo"])], out))
    progress, _ = _interrupt_at("iterate", MergeCancelled())
    with pytest.raises(MergeCancelled):
        run_recipe(recipe, progress)
    folder_is(tmp_path, {"a.safetensors", "r.toml"})


def test_ctrl_c_in_the_cli_exits_130_and_writes_nothing(tmp_path, base, keymap, monkeypatch, capsys):
    lora = lora_file(tmp_path / "a.safetensors", keymap, [K, Q])
    out = tmp_path / "o.safetensors"
    progress, calls = _interrupt_at("iterate", KeyboardInterrupt())
    original = cli.TqdmProgress.__call__

    def call(self, *args, **kwargs):
        original(self, *args, **kwargs)
        progress(*args, **kwargs)

    monkeypatch.setattr(cli.TqdmProgress, "__call__", call)
    code, stdout, err = run_cli(capsys, write_recipe(tmp_path, base, [(lora, ["a photo"])], out))
    assert code == 130 and calls[-1] == "iterate" and stdout == ""
    assert one_line(err, "iteris-sd: interrupted") == "iteris-sd: interrupted; nothing was written"
    folder_is(tmp_path, {"a.safetensors", "r.toml"})


def _subprocess_env(hash_seed: str = "0") -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), PYTHONHASHSEED=hash_seed)


@pytest.mark.slow
def test_sigint_to_the_cli_process_exits_130_and_writes_nothing(tmp_path, base, keymap):
    lora = lora_file(tmp_path / "a.safetensors", keymap, [K, Q, CONV])
    out = tmp_path / "o.safetensors"
    recipe = write_recipe(tmp_path, base, [(lora, ["a photo"])], out, "iterations = 5000", steps=400)  # minutes of work: SIGINT always lands mid-merge
    proc = subprocess.Popen([sys.executable, "-m", "iteris_sd", "merge", str(recipe)], cwd=tmp_path,
                            env=_subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = b""
    deadline = time.monotonic() + 120
    try:
        while not re.search(rb"trajectory concept 1: .* [1-9][0-9]*/400", seen):  # the merge is running
            assert time.monotonic() < deadline and proc.poll() is None, seen.decode(errors="replace")
            if select.select([proc.stderr], [], [], 1.0)[0]:
                seen += os.read(proc.stderr.fileno(), 65536)
        proc.send_signal(signal.SIGINT)
        stdout, rest = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = (seen + rest).decode()
    assert proc.returncode == 130, err
    # progress bars redrawn with \r and blanked on close, then exactly one line
    assert err.rsplit("\r", 1)[-1] == "iteris-sd: interrupted; nothing was written\n"
    assert err.count("iteris-sd:") == 1 and err.count("\n") == 1
    assert "Traceback" not in err
    assert stdout == b""
    folder_is(tmp_path, {"a.safetensors", "r.toml"})


# ----------------------------------------------------------------------------- ill-conditioned


def test_singular_layer_gives_a_finite_result_and_a_warning_naming_it(tmp_path, base, keymap, capsys):
    loras = [read_lora(lora_file(tmp_path / f"{k}.safetensors", keymap, [TIME, K], seed=k)) for k in range(2)]
    backend = backend_for(base, [["a photo"], ["zwx style"]])
    with pytest.warns(IllConditionedWarning) as caught:
        report = merge_loras(backend, loras, ["iteris", "regmean"], MergeOptions(iterations=1, regularization=0.0))
    assert any(str(w.message).startswith(f"layer {TIME}: the least-squares system is singular") for w in caught)
    for result in report.results.values():
        assert finite(result.deltas) and all(0 <= e < 10 for e in result.calibration)
    out = tmp_path / "merged.safetensors"
    write_merged(str(out), backend, report.results["iteris"].deltas, inputs=loras, recipe={})
    assert set(read_lora(out).layers) == set(loras[0].layers)
    # the CLI says it in one warning line per layer and still writes the merge
    recipe = write_recipe(tmp_path, base, [(loras[0].path, ["a photo"]), (loras[1].path, ["zwx style"])],
                          tmp_path / "cli.safetensors", "regularization = 0.0")
    code, _, err = run_cli(capsys, recipe)
    assert code == 0 and (tmp_path / "cli.safetensors").is_file()
    lines = visible_lines(err)
    assert any(line.startswith(f"iteris-sd: warning: layer {TIME}: the least-squares system is singular")
               for line in lines)
    assert all(line.startswith("iteris-sd: warning: layer ") for line in lines)


# ----------------------------------------------------------------------------- determinism


def _tensors_and_metadata(path: Path):
    with safetensors.safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118


def _assert_identical(a: Path, b: Path) -> None:
    ta, ma = _tensors_and_metadata(a)
    tb, mb = _tensors_and_metadata(b)
    assert ta.keys() == tb.keys()
    for key in ta:  # byte for byte, not merely close
        a_bytes, b_bytes = (t.reshape(-1).view(torch.uint8) for t in (ta[key], tb[key]))
        assert ta[key].dtype == tb[key].dtype and a_bytes.equal(b_bytes), key
    assert ma == mb  # no time-dependent metadata at all: no timestamp, no host, no run id
    assert a.read_bytes() == b.read_bytes()  # and so the whole file, header order included


def _determinism_recipe(tmp_path, base, keymap) -> tuple[Path, Path]:
    loras = [(lora_file(tmp_path / f"{k}.safetensors", keymap, [K, Q, CONV, TE], seed=k), [p])
             for k, p in enumerate(["a photo", "zwx style"])]
    out = tmp_path / "merged.safetensors"
    return write_recipe(tmp_path, base, loras, out, 'compare = ["dare"]\ndtype = "fp16"'), out


def test_same_inputs_give_the_same_bytes(tmp_path, base, keymap, capsys):
    recipe, out = _determinism_recipe(tmp_path, base, keymap)
    assert run_cli(capsys, recipe)[0] == 0
    first = out.rename(tmp_path / "first.safetensors")
    assert run_cli(capsys, recipe)[0] == 0
    _assert_identical(first, out)
    meta = read_lora(out).metadata
    assert set(meta) == {"ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version",
                         "ss_network_args", "merged_from", "iteris_recipe"}


@pytest.mark.slow
def test_same_inputs_give_the_same_bytes_across_processes(tmp_path, base, keymap):
    recipe, out = _determinism_recipe(tmp_path, base, keymap)
    outputs = []
    for seed in ("1", "2"):  # a fresh interpreter, another hash seed
        done = subprocess.run([sys.executable, "-m", "iteris_sd", "merge", str(recipe)], cwd=tmp_path,
                              env=_subprocess_env(seed), capture_output=True, timeout=300, check=False)
        assert done.returncode == 0, done.stderr.decode()
        outputs.append(out.rename(tmp_path / f"run{seed}.safetensors"))
    _assert_identical(*outputs)


def test_an_unset_resolution_is_the_models_native_size(base):
    """A recipe without calibration.resolution samples at the UNet's own size (the tiny model's
    32 px), not 512 px (64 times the latent pixels, a merge of minutes instead of seconds)."""
    from iteris_demo.tiny import RESOLUTION
    from iteris_sd.backends.diffusers import native_resolution

    unset = backend_for(base, [["a photo"]], CalibrationSettings(steps=2, timesteps=1))
    assert unset.settings.resolution == RESOLUTION == unset.model.config.sample_size * unset.vae_scale_factor
    assert backend_for(base, [["a photo"]]).settings.resolution == 16  # a set one is kept

    class NoSize:
        config = {}

    with pytest.raises(ValueError, match=r"^the model's config has no sample_size \(None\); set calibration.resolution"):
        native_resolution(NoSize(), 8)
