"""SDXL (fp16), SD3.5 Medium (bf16) and Flux.1 dev (bf16 weights, distilled guidance) and
schnell (fp8 e4m3fn weights) merged end to end in a real ComfyUI 0.3.75: SDXL kohya LoRAs with
both text encoders; SD3.5 and Flux LoRAs in diffusers/ai-toolkit names (separate q, k, v onto
the fused qkv and linear1) and kohya / OneTrainer names (SD3.5's with both text encoders);
merged, saved, and loaded with the core loaders.

The models are random, at full width with the blocks ComfyUI's detection counts; for Flux,
CLIP-L's hidden states stand in for T5-XXL's (see comfy_families)."""

import os
from pathlib import Path

import pytest
import torch
from comfy_families import build_flux, build_sd35, build_sdxl, write_lora
from comfy_harness import SETUP_HINT, ComfyServer, comfy_installed, loader_warnings
from safetensors import safe_open
from safetensors.torch import load_file

pytestmark = pytest.mark.comfyui

FLUX_KINDS = {"dev": True, "schnell": False}
PROMPT_A, PROMPT_B = "a photo of sks robot", "a zwx style painting"
LORAS = {"flux_a": ("flux-diffusers", 1, 4), "flux_b": ("flux-kohya", 2, 8), "sdxl_a": ("sdxl-kohya", 3, 4),
         "sdxl_b": ("sdxl-unet", 4, 8), "sd3_a": ("sd3-diffusers", 5, 4), "sd3_b": ("sd3-kohya", 6, 8)}  # name: (format, seed, rank)


@pytest.fixture(scope="module")
def family_server(tmp_path_factory):
    if not comfy_installed():
        pytest.fail(SETUP_HINT, pytrace=False)
    cache = os.environ.get("ITERIS_SD_CACHE")
    folder = Path(cache) / "comfyui" if cache else tmp_path_factory.mktemp("family_models")
    server = ComfyServer(tmp_path_factory.mktemp("family_base"))
    for kind, guidance in FLUX_KINDS.items():
        files = build_flux(folder, guidance)
        server.add_model("diffusion_models", files["model"], f"flux_{kind}.safetensors")
    for family, build in (("sdxl", build_sdxl), ("sd3", build_sd35)):
        files = build(folder)
        server.add_model("diffusion_models", files["model"], f"{family}.safetensors")
    for name in ("clip_l", "clip_g"):
        server.add_model("text_encoders", files[name], f"{name}.safetensors")
    for name, (fmt, seed, rank) in LORAS.items():
        write_lora(server.models_dir / "loras" / f"{name}.safetensors", fmt, seed=seed, rank=rank)
    with server:
        yield server


def _loaders(kind: str) -> dict:
    if kind in ("sdxl", "sd3"):
        clip = {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "clip_l.safetensors", "clip_name2": "clip_g.safetensors", "type": kind}}
    else:
        clip = {"class_type": "CLIPLoader", "inputs": {"clip_name": "clip_l.safetensors", "type": "stable_diffusion"}}
    name = kind if kind in ("sdxl", "sd3") else f"flux_{kind}"
    return {"unet": {"class_type": "UNETLoader", "inputs": {"unet_name": f"{name}.safetensors", "weight_dtype": "default"}}, "clip": clip}


def _sample(g: dict, name: str, model: list, clip: list, kind: str, seed: int = 3) -> None:
    """CLIPTextEncode -> KSampler (2 steps, cfg 1, as Flux is run) -> SaveLatent ``name``."""
    latent = "EmptyLatentImage" if kind == "sdxl" else "EmptySD3LatentImage"  # 4 or 16 channels
    g |= {
        f"{name}_pos": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT_A, "clip": clip}},
        f"{name}_latent": {"class_type": latent, "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        f"{name}_k": {"class_type": "KSampler", "inputs": {
            "model": model, "positive": [f"{name}_pos", 0], "negative": [f"{name}_pos", 0], "latent_image": [f"{name}_latent", 0],
            "seed": seed, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        f"{name}_save": {"class_type": "SaveLatent", "inputs": {"samples": [f"{name}_k", 0], "filename_prefix": name}},
    }


def _entries(g: dict, a: str, b: str) -> None:
    g["a"] = {"class_type": "IterIS_LoraEntry", "inputs": {"lora_name": f"{a}.safetensors", "strength": 1.0, "prompts": PROMPT_A}}
    g["b"] = {"class_type": "IterIS_LoraEntry", "inputs": {
        "lora_name": f"{b}.safetensors", "strength": 0.8, "prompts": PROMPT_B, "previous": ["a", 0]}}


def _merge(g: dict, name: str, method: str, last_entry: str, filename: str, cfg: float) -> None:
    """IterIS_Merge of the entries up to ``last_entry`` -> IterIS_SaveLora ``filename`` (fp32)."""
    g[name] = {"class_type": "IterIS_Merge", "inputs": {
        "model": ["unet", 0], "clip": ["clip", 0], "loras": [last_entry, 0], "method": method, "iterations": 1,
        "rank": 0, "sampler": "euler", "scheduler": "simple", "steps": 2, "timesteps": 1, "resolution": 64, "cfg": cfg,
        "calibration_seed": 0}}
    g[f"{name}_save"] = {"class_type": "IterIS_SaveLora",
                         "inputs": {"lora": [name, 2], "filename": filename, "dtype": "fp32", "overwrite": True}}


def _latent(server: ComfyServer, entry: dict, name: str) -> torch.Tensor:
    (path,) = [server.output_dir / i.get("subfolder", "") / i["filename"] for i in entry["outputs"][f"{name}_save"]["latents"]]
    return load_file(str(path))["latent_tensor"]


def _delta(sd: dict, name: str) -> torch.Tensor:
    """up @ down * alpha / r of a kohya layer (scale 1 without alpha)."""
    up, down = sd[f"{name}.lora_up.weight"].float(), sd[f"{name}.lora_down.weight"].float()
    return up @ down * (float(sd[f"{name}.alpha"]) / down.shape[0] if f"{name}.alpha" in sd else 1.0)


def _merge_save_and_load(server: ComfyServer, kind: str, a: str, b: str) -> dict:
    """Merge a + b (iteris) and a alone (linear, which must equal a), save both, sample with
    the merge node's outputs, then with each saved file, a itself and the base through the
    core LoraLoader. Returns the files' tensors, metadata and the latents."""
    g = _loaders(kind)
    _entries(g, a, b)
    # a file name per family: ComfyUI's LoraLoader keeps the last file it read by its path
    saved = {"iteris": f"iteris_{kind}", "linear": f"linear_{kind}"}
    cfg = 1.0 if kind in ("sdxl", "sd3") else 0.0  # Flux: the node's default, which must be the family's 1.0
    _merge(g, "iteris", "iteris", "b", saved["iteris"], cfg)
    _merge(g, "linear", "linear", "a", saved["linear"], cfg)
    _sample(g, "merged", ["iteris", 0], ["iteris", 1], kind)
    mark = server.log_mark()
    first = server.run(g, timeout=1500)
    assert loader_warnings(server.log_text(since=mark)) == []
    summary = first["outputs"]["iteris"]["text"][0]
    assert summary.startswith("iteris: error per LoRA") and "calibrated at 64 px, 2 steps, cfg 1;" in summary

    g = _loaders(kind)
    for name, lora in (("loaded", saved["iteris"]), ("lin", saved["linear"]), ("orig", a)):
        g[f"{name}_l"] = {"class_type": "LoraLoader", "inputs": {"model": ["unet", 0], "clip": ["clip", 0], "lora_name": f"{lora}.safetensors",
                                                                "strength_model": 1.0, "strength_clip": 1.0}}
        _sample(g, name, [f"{name}_l", 0], [f"{name}_l", 1], kind)
    _sample(g, "base", ["unet", 0], ["clip", 0], kind)
    mark = server.log_mark()
    second = server.run(g, timeout=900)
    assert loader_warnings(server.log_text(since=mark)) == []
    loras = server.models_dir / "loras"
    with safe_open(str(loras / f"{saved['iteris']}.safetensors"), "pt") as f:
        meta = f.metadata()
    latents = {n: _latent(server, second, n) for n in ("loaded", "lin", "orig", "base")} | {"merged": _latent(server, first, "merged")}
    return {"merged": load_file(str(loras / f"{saved['iteris']}.safetensors")), "meta": meta,
            "linear": load_file(str(loras / f"{saved['linear']}.safetensors")),
            "a": load_file(str(loras / f"{a}.safetensors")), "latents": latents}


def _assert_loads_as_merged(latents: dict) -> None:
    """The saved merge acts as the merge node's MODEL and CLIP; the saved linear file as LoRA a:
    equal to 1% of what the LoRAs change in the picture."""
    change = float((latents["loaded"] - latents["base"]).abs().max())
    assert change > 1e-3, f"the merge hardly changes the picture ({change:.2e})"
    torch.testing.assert_close(latents["loaded"], latents["merged"], rtol=0, atol=change / 100)
    a_change = float((latents["orig"] - latents["base"]).abs().max())
    torch.testing.assert_close(latents["lin"], latents["orig"], rtol=0, atol=a_change / 100)


def _assert_fused_exact(out: dict, fused: dict[str, list[str]]) -> None:
    """No dense layer in the merge, and each fused layer of the linear file (kohya name ->
    lora a's separate layers, in row order) is exactly a's slices stacked, as ComfyUI adds them."""
    assert not any(k.endswith((".diff", ".diff_b")) for k in out["merged"])
    a = out["a"]
    for name, parts in fused.items():
        assert f"{name}.lora_up.weight" in out["merged"]
        want = torch.cat([a[f"{p}.lora_B.weight"].float() @ a[f"{p}.lora_A.weight"].float() for p in parts])
        torch.testing.assert_close(_delta(out["linear"], name), want, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("kind", list(FLUX_KINDS))
def test_flux_merge_saves_an_exact_low_rank_lora_comfyui_loads(family_server, kind):
    out = _merge_save_and_load(family_server, kind, "flux_a", "flux_b")
    assert out["meta"]["ss_base_model_version"] == "flux1"
    assert "lora_unet_single_blocks_0_linear1.lora_up.weight" in out["merged"]
    attn = "transformer.transformer_blocks.0.attn."
    _assert_fused_exact(out, {"lora_unet_double_blocks_0_img_attn_qkv": [attn + p for p in ("to_q", "to_k", "to_v")],
                              "lora_unet_double_blocks_0_txt_attn_qkv": [attn + p for p in ("add_q_proj", "add_k_proj", "add_v_proj")]})
    _assert_loads_as_merged(out["latents"])


def test_sd35_merge_saves_an_exact_low_rank_lora_comfyui_loads(family_server):
    out = _merge_save_and_load(family_server, "sd3", "sd3_a", "sd3_b")
    assert out["meta"]["ss_base_model_version"] == "sd3"
    attn = "transformer.transformer_blocks.0.attn."
    _assert_fused_exact(out, {"lora_unet_joint_blocks_0_x_block_attn_qkv": [attn + p for p in ("to_q", "to_k", "to_v")],
                              "lora_unet_joint_blocks_0_context_block_attn_qkv": [attn + p for p in ("add_q_proj", "add_k_proj", "add_v_proj")]})
    assert any(k.startswith("lora_te1_") for k in out["merged"]) and any(k.startswith("lora_te2_") for k in out["merged"])
    _assert_loads_as_merged(out["latents"])


def test_sdxl_merge_with_both_text_encoders_saves_a_lora_comfyui_loads(family_server):
    out = _merge_save_and_load(family_server, "sdxl", "sdxl_a", "sdxl_b")
    assert out["meta"]["ss_base_model_version"] == "sdxl_base_v1-0"
    # kohya's own names come back, for the UNet (diffusers-style) and both text encoders
    layers = {k[: -len(".lora_up.weight")] for k in out["a"] if k.endswith(".lora_up.weight")}
    assert {k[: -len(".lora_up.weight")] for k in out["linear"] if k.endswith(".lora_up.weight")} == layers
    assert any(n.startswith("lora_te1_") for n in layers) and any(n.startswith("lora_te2_") for n in layers)
    assert layers <= {k[: -len(".lora_up.weight")] for k in out["merged"] if k.endswith(".lora_up.weight")}
    for name in layers:
        torch.testing.assert_close(_delta(out["linear"], name), _delta(out["a"], name), rtol=1e-4, atol=1e-7)
    _assert_loads_as_merged(out["latents"])
