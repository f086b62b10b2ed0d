"""Random-weight models that ComfyUI 0.3.75 detects as SDXL, SD3, Flux (dev) and FluxSchnell, and
LoRAs for them in the formats people share. Nothing here imports ``comfy``: models are built by
a subprocess of the venv python with ComfyUI's tree on ``sys.path`` (as in comfy_harness).

- ``build_sdxl(folder)``: an SDXL UNet at full width with the input blocks ComfyUI's detection
  counts ([0, 0, 2, 2, 10, 10] transformer blocks) and one transformer block per middle and
  output level (detection does not count those; ~1.3B parameters, fp16), with full-size CLIP-L
  and OpenCLIP bigG text encoders. ``build_sd35(folder)``: SD3.5 Medium's MMDiT in
  full (ComfyUI reads the depth off the width: 24 blocks of 1536, dual attention in blocks 0 to
  12, RMS q/k norms; ~2.2B parameters, bf16), with the same two text encoders and no T5.
- ``build_flux(folder, guidance)``: the diffusion model at Flux.1's full width (hidden 3072, 24
  heads) with one double and one single block, bf16 for dev, fp8 e4m3fn for schnell, as people
  run them, and a full-size CLIP-L. T5-XXL (4.7B parameters, 19 GB in float32 on a CPU) does
  not fit the test machine: the model's ``txt_in`` takes CLIP-L's 768-wide hidden states
  instead of T5's 4096, and the CLIP is loaded with CLIPLoader type ``stable_diffusion``.
  Every other layer has Flux.1's shape.
- ``write_lora(path, fmt, seed, rank)``: Flux LoRAs with ai-toolkit/diffusers ``transformer.``
  names (separate q, k, v onto ComfyUI's fused qkv and linear1) or kohya
  ``lora_unet_double_blocks_`` / ``single_blocks_`` names; SDXL kohya LoRAs with and without
  ``lora_te1_`` / ``lora_te2_`` text-encoder layers; SD3.5 LoRAs with diffusers names or
  OneTrainer's ``lora_transformer_`` names and both text encoders.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from comfy_harness import COMFY_DIR, INIT_WEIGHTS, PYTHON, ComfyError, _tail, require_comfy

HIDDEN = 3072
MLP = 4 * HIDDEN
FAMILIES_VERSION = 2  # bump when the built files change, so cached ones are rebuilt

_BUILD = r"""
import json, os, sys
cfg = json.loads(sys.argv[1])
sys.path.insert(0, cfg["comfy_dir"])
import comfy.cli_args
comfy.cli_args.args.cpu = True
import torch
import comfy.model_detection, comfy.ops
from comfy.clip_model import CLIPTextModel
from comfy.ldm.flux.model import Flux
from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
import safetensors.torch

ops = comfy.ops.disable_weight_init
torch.manual_seed(cfg["seed"])

""" + INIT_WEIGHTS + r"""

def save(sd, path, dtype):
    tmp = path + ".tmp"
    safetensors.torch.save_file({k: v.to(dtype).contiguous() for k, v in sd.items()}, tmp)
    os.replace(tmp, path)

def check(sd, want):
    detected = type(comfy.model_detection.model_config_from_unet(sd, "")).__name__
    if detected != want:
        sys.exit(f"built model is detected as {detected}, not {want}")

def clip(config_name):
    torch.manual_seed(cfg["seed"])  # the same CLIP-L for every family
    with open(os.path.join(cfg["comfy_dir"], "comfy", config_name)) as f:
        return init_weights(CLIPTextModel(json.load(f), dtype=torch.float32, device="cpu", operations=ops)).state_dict()

with torch.no_grad():
    if cfg["family"] == "flux":
        model = Flux(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=768,
                     hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=1, depth_single_blocks=1,
                     axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True,
                     guidance_embed=cfg["guidance"], dtype=torch.float32, device="cpu", operations=ops)
        want = "Flux" if cfg["guidance"] else "FluxSchnell"
    elif cfg["family"] == "sdxl":  # SDXL's input blocks as detected ([0, 0, 2, 2, 10, 10]); one block per middle/output transformer
        model = UNetModel(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2],
                          channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 10, 10],
                          transformer_depth_output=[0, 0, 0, 1, 1, 1, 1, 1, 1], transformer_depth_middle=1,
                          num_head_channels=64, use_spatial_transformer=True, context_dim=2048,
                          use_linear_in_transformer=True, legacy=False, adm_in_channels=2816, num_classes="sequential",
                          dtype=torch.float32, device="cpu", operations=ops)
        want = "SDXL"
    elif cfg["family"] == "sd3":  # SD3.5 Medium: ComfyUI reads the depth off the width (64 x depth), so all 24 blocks
        model = MMDiT(input_size=None, patch_size=2, in_channels=16, out_channels=16, depth=24, adm_in_channels=2048,
                      context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 1536}},
                      num_patches=384 * 384, pos_embed_max_size=384, qk_norm="rms", x_block_self_attn_layers=list(range(13)),
                      dtype=torch.float32, device="cpu", operations=ops)
        want = "SD3"
    sd = init_weights(model).state_dict()
    check(sd, want)
    save(sd, cfg["model"], getattr(torch, cfg["dtype"]))
    del model, sd
    for name, config in cfg["clips"].items():
        save(clip(config), cfg[name], torch.float16)
    print(json.dumps({"detected": want}))
"""


def _build(folder, family: str, files: dict[str, str], clips: dict[str, str], timeout: float, **cfg) -> dict[str, Path]:
    """Run the build script for ``family`` unless every file of ``files`` is in ``folder``."""
    require_comfy()
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    paths = {k: folder / name for k, name in files.items()}
    if all(p.is_file() for p in paths.values()):
        return paths
    missing = {k: config for k, config in clips.items() if not paths[k].is_file()}  # text encoders are shared
    cfg |= {"comfy_dir": str(COMFY_DIR.resolve()), "family": family, "clips": missing} | {k: str(p) for k, p in paths.items()}
    proc = subprocess.run([str(PYTHON), "-c", _BUILD, json.dumps(cfg)], capture_output=True, text=True,
                          timeout=timeout, cwd=str(COMFY_DIR), check=False)
    if proc.returncode != 0 or not all(p.is_file() for p in paths.values()):
        raise ComfyError(f"building {family} failed (exit {proc.returncode}):\n{_tail(proc.stdout + proc.stderr)}")
    return paths


def build_flux(folder: str | os.PathLike, guidance: bool, seed: int = 0, timeout: float = 900) -> dict[str, Path]:
    """Write (if missing) a random Flux dev (``guidance``) or schnell model and a CLIP-L to
    ``folder``; returns {"model": path, "clip": path}. The build checks ComfyUI's detection."""
    kind = "dev" if guidance else "schnell"
    files = {"model": f"flux_{kind}-v{FAMILIES_VERSION}.safetensors", "clip": f"clip_l-s{seed}-v{FAMILIES_VERSION}.safetensors"}
    return _build(folder, "flux", files, {"clip": "sd1_clip_config.json"}, timeout, seed=seed, guidance=guidance,
                  dtype="bfloat16" if guidance else "float8_e4m3fn")


def _build_with_clip_l_and_g(folder, family: str, model: str, seed: int, dtype: str, timeout: float) -> dict[str, Path]:
    files = {"model": f"{model}-s{seed}-v{FAMILIES_VERSION}.safetensors",
             "clip_l": f"clip_l-s{seed}-v{FAMILIES_VERSION}.safetensors", "clip_g": f"clip_g-s{seed}-v{FAMILIES_VERSION}.safetensors"}
    return _build(folder, family, files, {"clip_l": "sd1_clip_config.json", "clip_g": "clip_config_bigg.json"}, timeout,
                  seed=seed, dtype=dtype)


def build_sdxl(folder: str | os.PathLike, seed: int = 0, timeout: float = 1200) -> dict[str, Path]:
    """Write (if missing) a random SDXL UNet (fp16, detected as SDXL) and its two text encoders
    (CLIP-L and OpenCLIP bigG, full size, fp16) to ``folder``; returns {"model", "clip_l", "clip_g"}."""
    return _build_with_clip_l_and_g(folder, "sdxl", "sdxl_unet", seed, "float16", timeout)


def build_sd35(folder: str | os.PathLike, seed: int = 0, timeout: float = 1200) -> dict[str, Path]:
    """Write (if missing) a random SD3.5 Medium MMDiT (bf16, detected as SD3) and the same two
    text encoders as build_sdxl; returns {"model", "clip_l", "clip_g"}."""
    return _build_with_clip_l_and_g(folder, "sd3", "sd35m", seed, "bfloat16", timeout)


# --------------------------------------------------------------------------------------------
# LoRAs: the layers each format targets, as (name, (d_out, d_in))

def _flux_diffusers_layers() -> dict[str, tuple[int, int]]:
    d = "transformer.transformer_blocks.0."
    s = "transformer.single_transformer_blocks.0."
    layers = {d + f"attn.{p}": (HIDDEN, HIDDEN) for p in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")}
    layers |= {d + "attn.to_out.0": (HIDDEN, HIDDEN), d + "ff.net.0.proj": (MLP, HIDDEN)}
    layers |= {s + f"attn.{p}": (HIDDEN, HIDDEN) for p in ("to_q", "to_k", "to_v")}
    layers |= {s + "proj_mlp": (MLP, HIDDEN), s + "proj_out": (HIDDEN, HIDDEN + MLP)}
    return layers


def _flux_kohya_layers() -> dict[str, tuple[int, int]]:
    d, s = "lora_unet_double_blocks_0_", "lora_unet_single_blocks_0_"
    layers = {d + f"{side}_attn_qkv": (3 * HIDDEN, HIDDEN) for side in ("img", "txt")}
    layers |= {d + "img_attn_proj": (HIDDEN, HIDDEN), d + "txt_mlp_0": (MLP, HIDDEN)}
    layers |= {s + "linear1": (3 * HIDDEN + MLP, HIDDEN), s + "linear2": (HIDDEN, HIDDEN + MLP)}
    return layers


def _sdxl_layers(text_encoders: bool) -> dict[str, tuple[int, int]]:
    """kohya (diffusers-style) names across SDXL's levels, its 2048-wide cross-attention and
    both text encoders."""
    layers = {}
    for block, c in (("down_blocks_1_attentions_0_transformer_blocks_1", 640), ("down_blocks_2_attentions_1_transformer_blocks_9", 1280),
                     ("mid_block_attentions_0_transformer_blocks_0", 1280), ("up_blocks_0_attentions_2_transformer_blocks_0", 1280)):
        n = f"lora_unet_{block}_"
        layers |= {n + f"attn1_{p}": (c, c) for p in ("to_q", "to_k", "to_v", "to_out_0")}
        layers |= {n + "attn2_to_k": (c, 2048), n + "attn2_to_v": (c, 2048), n + "ff_net_0_proj": (8 * c, c), n + "ff_net_2": (c, 4 * c)}
    layers["lora_unet_down_blocks_1_attentions_1_proj_in"] = (640, 640)
    if text_encoders:
        for te, layer, c in (("te1", 0, 768), ("te1", 11, 768), ("te2", 0, 1280), ("te2", 31, 1280)):
            n = f"lora_{te}_text_model_encoder_layers_{layer}_"
            layers |= {n + f"self_attn_{p}_proj": (c, c) for p in ("q", "k", "v", "out")}
            layers |= {n + "mlp_fc1": (4 * c, c), n + "mlp_fc2": (c, 4 * c)}
    return layers


def _sd3_layers(kohya: bool) -> dict[str, tuple[int, int]]:
    """SD3.5 Medium (width 1536): diffusers ``transformer.`` names (separate q, k, v onto the
    fused qkv, the context stream, the dual attention of block 0) or OneTrainer's kohya
    ``lora_transformer_`` names with both text encoders."""
    w = 1536
    if not kohya:
        b = "transformer.transformer_blocks.0."
        layers = {b + f"attn.{p}": (w, w) for p in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")}
        layers |= {b + "attn2.to_q": (w, w), b + "ff.net.0.proj": (4 * w, w), b + "ff.net.2": (w, 4 * w),
                   "transformer.transformer_blocks.20.attn.to_v": (w, w)}
        return layers
    b = "lora_transformer_transformer_blocks_5_"
    layers = {b + f"attn_{p}": (w, w) for p in ("to_q", "to_k", "to_v", "add_k_proj")} | {b + "ff_context_net_0_proj": (4 * w, w)}
    for te, c in (("te1", 768), ("te2", 1280)):
        layers |= {f"lora_{te}_text_model_encoder_layers_3_self_attn_q_proj": (c, c), f"lora_{te}_text_model_encoder_layers_3_mlp_fc1": (4 * c, c)}
    return layers


def write_lora(path: str | os.PathLike, fmt: str, seed: int, rank: int, std: float = 0.02) -> list[str]:
    """A LoRA in ``fmt``: "flux-diffusers" (ai-toolkit: ``transformer.`` names,
    ``<name>.lora_A.weight`` (r, in) and ``.lora_B.weight`` (out, r), no alpha), "flux-kohya"
    (``lora_unet_double_blocks_`` / ``single_blocks_``), "sdxl-kohya" (UNet and both text
    encoders), "sdxl-unet" (UNet only), "sd3-diffusers" or "sd3-kohya"; kohya ones with ``lora_down``/``lora_up`` and
    ``alpha`` = r / 2. Returns its layer names; written atomically."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    layers = {"flux-diffusers": _flux_diffusers_layers, "flux-kohya": _flux_kohya_layers, "sdxl-kohya": lambda: _sdxl_layers(True),
              "sdxl-unet": lambda: _sdxl_layers(False), "sd3-diffusers": lambda: _sd3_layers(False),
              "sd3-kohya": lambda: _sd3_layers(True)}[fmt]()
    kohya = not fmt.endswith("-diffusers")
    down_key, up_key = ("lora_down", "lora_up") if kohya else ("lora_A", "lora_B")
    tensors = {}
    for name, (d_out, d_in) in layers.items():
        tensors[f"{name}.{down_key}.weight"] = (torch.randn(rank, d_in, generator=gen) * std).to(torch.bfloat16)
        tensors[f"{name}.{up_key}.weight"] = (torch.randn(d_out, rank, generator=gen) * std).to(torch.bfloat16)
        if kohya:
            tensors[f"{name}.alpha"] = torch.tensor(rank / 2, dtype=torch.bfloat16)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)
    return list(layers)
