"""Flux.1 dev (bf16 weights, distilled guidance) and schnell (fp8 e4m3fn weights) merged end to
end in a real ComfyUI 0.3.75: LoRAs in ai-toolkit/diffusers names (separate q, k, v onto the
fused qkv and linear1) and kohya names, merged, saved, and loaded with the core loader.

The models are random, at Flux.1's full width with one double and one single block; CLIP-L's
hidden states stand in for T5-XXL's (see comfy_families)."""

import os
from pathlib import Path

import pytest
import torch
from comfy_families import build_flux, write_flux_lora
from comfy_harness import ComfyServer, comfy_installed, loader_warnings, SETUP_HINT
from safetensors import safe_open
from safetensors.torch import load_file

pytestmark = pytest.mark.comfyui

KINDS = {"dev": True, "schnell": False}
PROMPT_A, PROMPT_B = "a photo of sks robot", "a zwx style painting"


@pytest.fixture(scope="module")
def flux_server(tmp_path_factory):
    if not comfy_installed():
        pytest.fail(SETUP_HINT, pytrace=False)
    cache = os.environ.get("ITERIS_SD_CACHE")
    folder = Path(cache) / "comfyui" if cache else tmp_path_factory.mktemp("flux_models")
    server = ComfyServer(tmp_path_factory.mktemp("flux_base"))
    for kind, guidance in KINDS.items():
        files = build_flux(folder, guidance)
        server.add_model("diffusion_models", files["model"], f"flux_{kind}.safetensors")
        server.add_model("text_encoders", files["clip"], "clip_l.safetensors")
    loras = server.models_dir / "loras"
    write_flux_lora(loras / "flux_a_diffusers.safetensors", "diffusers", seed=1, rank=4)
    write_flux_lora(loras / "flux_b_kohya.safetensors", "kohya", seed=2, rank=8)
    with server:
        yield server


def _loaders(kind: str) -> dict:
    return {"unet": {"class_type": "UNETLoader", "inputs": {"unet_name": f"flux_{kind}.safetensors", "weight_dtype": "default"}},
            "clip": {"class_type": "CLIPLoader", "inputs": {"clip_name": "clip_l.safetensors", "type": "stable_diffusion"}}}


def _sample(g: dict, name: str, model: list, seed: int = 3) -> None:
    """KSampler (2 steps, cfg 1 as Flux is run) from ``model`` -> SaveLatent ``name``."""
    g |= {
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT_A, "clip": ["clip", 0]}},
        "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        f"{name}_k": {"class_type": "KSampler", "inputs": {
            "model": model, "positive": ["pos", 0], "negative": ["pos", 0], "latent_image": ["latent", 0], "seed": seed,
            "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        f"{name}_save": {"class_type": "SaveLatent", "inputs": {"samples": [f"{name}_k", 0], "filename_prefix": name}},
    }


def _merge(g: dict, name: str, method: str, entries: list[str]) -> None:
    """IterIS_Merge of the entry nodes' LoRAs -> IterIS_SaveLora ``name`` (fp32)."""
    g[name] = {"class_type": "IterIS_Merge", "inputs": {
        "model": ["unet", 0], "clip": ["clip", 0], "loras": [entries[-1], 0], "method": method, "iterations": 1,
        "rank": 0, "sampler": "euler", "scheduler": "simple", "steps": 2, "timesteps": 1, "resolution": 64, "cfg": 1.0,
        "calibration_seed": 0}}
    g[f"{name}_save"] = {"class_type": "IterIS_SaveLora",
                         "inputs": {"lora": [name, 2], "filename": name, "dtype": "fp32", "overwrite": True}}


def _latent(server: ComfyServer, entry: dict, node: str) -> torch.Tensor:
    (path,) = [server.output_dir / i.get("subfolder", "") / i["filename"] for i in entry["outputs"][node]["latents"]]
    return load_file(str(path))["latent_tensor"]


@pytest.mark.parametrize("kind", list(KINDS))
def test_flux_merge_saves_an_exact_low_rank_lora_comfyui_loads(flux_server, kind):
    server = flux_server
    g = _loaders(kind)
    g["a"] = {"class_type": "IterIS_LoraEntry", "inputs": {"lora_name": "flux_a_diffusers.safetensors", "strength": 1.0, "prompts": PROMPT_A}}
    g["b"] = {"class_type": "IterIS_LoraEntry", "inputs": {
        "lora_name": "flux_b_kohya.safetensors", "strength": 0.8, "prompts": PROMPT_B, "previous": ["a", 0]}}
    _merge(g, f"iteris_{kind}", "iteris", ["a", "b"])
    _merge(g, f"linear_a_{kind}", "linear", ["a"])  # A alone: the saved file must act as A does
    _sample(g, "merged", [f"iteris_{kind}", 0])
    mark = server.log_mark()
    first = server.run(g, timeout=1500)
    assert loader_warnings(server.log_text(since=mark)) == []
    assert first["outputs"][f"iteris_{kind}"]["text"][0].startswith("iteris: error per LoRA")

    loras = server.models_dir / "loras"
    saved = loras / f"iteris_{kind}.safetensors"
    with safe_open(str(saved), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert meta["ss_base_model_version"] == "flux1"
    assert not any(k.endswith((".diff", ".diff_b")) for k in keys)  # fused qkv stays low rank
    qkv = "lora_unet_double_blocks_0_img_attn_qkv"
    assert {f"{qkv}.lora_up.weight", f"{qkv}.lora_down.weight", "lora_unet_single_blocks_0_linear1.lora_up.weight"} <= keys

    # A's separate q, k, v, as ComfyUI adds them onto the fused weight, are exactly the linear file's qkv
    a = load_file(str(loras / "flux_a_diffusers.safetensors"))
    lin = load_file(str(loras / f"linear_a_{kind}.safetensors"))
    prefix = "transformer.transformer_blocks.0.attn."
    want = torch.cat([a[f"{prefix}{p}.lora_B.weight"].float() @ a[f"{prefix}{p}.lora_A.weight"].float() for p in ("to_q", "to_k", "to_v")])
    got = lin[f"{qkv}.lora_up.weight"] @ lin[f"{qkv}.lora_down.weight"] * (lin[f"{qkv}.alpha"] / lin[f"{qkv}.lora_down.weight"].shape[0] if f"{qkv}.alpha" in lin else 1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)

    # the core loader: the saved merge acts as the merge node's MODEL; the saved A as A itself
    g = _loaders(kind)
    for name, lora in (("loaded", f"iteris_{kind}.safetensors"), ("lin", f"linear_a_{kind}.safetensors"),
                       ("orig", "flux_a_diffusers.safetensors")):
        g[f"{name}_l"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["unet", 0], "lora_name": lora, "strength_model": 1.0}}
        _sample(g, name, [f"{name}_l", 0])
    _sample(g, "base", ["unet", 0])
    mark = server.log_mark()
    second = server.run(g, timeout=900)
    assert loader_warnings(server.log_text(since=mark)) == []
    latents = {n: _latent(server, second, f"{n}_save") for n in ("loaded", "lin", "orig", "base")}
    merged = _latent(server, first, "merged_save")
    torch.testing.assert_close(latents["loaded"], merged, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(latents["lin"], latents["orig"], rtol=1e-3, atol=1e-3)
    assert (latents["loaded"] - latents["base"]).abs().max() > 1e-2  # the merge changes the picture
