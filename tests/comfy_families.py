"""Random-weight Flux.1 models that ComfyUI 0.3.75 detects as Flux (dev) and FluxSchnell, and
LoRAs for them in the formats people share. Nothing here imports ``comfy``: models are built by
a subprocess of the venv python with ComfyUI's tree on ``sys.path`` (as in comfy_harness).

- ``build_flux(folder, guidance)``: ``flux_<kind>.safetensors`` (the diffusion model at Flux.1's
  full width: hidden 3072, 24 heads, one double and one single block, bf16 for dev, fp8 e4m3fn
  for schnell, as people run them) and ``clip_l.safetensors`` (a full-size CLIP-L). T5-XXL
  (4.7B parameters, 19 GB in float32 on a CPU) does not fit the test machine: the model's
  ``txt_in`` takes CLIP-L's 768-wide hidden states instead of T5's 4096, and the CLIP is loaded
  with CLIPLoader type ``stable_diffusion``. Every other layer has Flux.1's shape.
- ``write_flux_lora(path, fmt, seed, rank)``: ai-toolkit/diffusers ``transformer.`` names (separate
  q, k, v onto ComfyUI's fused qkv and linear1) or kohya ``lora_unet_double_blocks_`` /
  ``single_blocks_`` names.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from comfy_harness import COMFY_DIR, PYTHON, ComfyError, _tail, require_comfy

HIDDEN = 3072
MLP = 4 * HIDDEN
FLUX_VERSION = 1  # bump when the built files change, so cached ones are rebuilt

_BUILD_FLUX = r"""
import json, os, sys
cfg = json.loads(sys.argv[1])
sys.path.insert(0, cfg["comfy_dir"])
import comfy.cli_args
comfy.cli_args.args.cpu = True
import torch
import comfy.model_detection, comfy.ops
from comfy.clip_model import CLIPTextModel
from comfy.ldm.flux.model import Flux
import safetensors.torch

ops = comfy.ops.disable_weight_init
torch.manual_seed(cfg["seed"])

def init_weights(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Embedding):
            torch.nn.init.normal_(m.weight, std=0.02)
        for base in (torch.nn.Linear, torch.nn.Conv2d, torch.nn.LayerNorm):
            if isinstance(m, base) and m.weight is not None:
                base.reset_parameters(m)
    for name, p in model.named_parameters():
        if name.endswith("scale"):  # RMSNorm scales
            torch.nn.init.ones_(p)
    return model

def save(sd, path, dtype):
    tmp = path + ".tmp"
    safetensors.torch.save_file({k: v.to(dtype).contiguous() for k, v in sd.items()}, tmp)
    os.replace(tmp, path)

with torch.no_grad():
    flux = init_weights(Flux(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=768,
                             hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=1, depth_single_blocks=1,
                             axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True,
                             guidance_embed=cfg["guidance"], dtype=torch.float32, device="cpu", operations=ops))
    sd = flux.state_dict()
    detected = type(comfy.model_detection.model_config_from_unet(sd, "")).__name__
    want = "Flux" if cfg["guidance"] else "FluxSchnell"
    if detected != want:
        sys.exit(f"built model is detected as {detected}, not {want}")
    save(sd, cfg["model"], getattr(torch, cfg["dtype"]))
    del flux, sd
    with open(os.path.join(cfg["comfy_dir"], "comfy", "sd1_clip_config.json")) as f:
        clip = init_weights(CLIPTextModel(json.load(f), dtype=torch.float32, device="cpu", operations=ops))
    save(clip.state_dict(), cfg["clip"], torch.float16)
    print(json.dumps({"detected": detected}))
"""


def build_flux(folder: str | os.PathLike, guidance: bool, seed: int = 0, timeout: float = 900) -> dict[str, Path]:
    """Write (if missing) a random Flux dev (``guidance``) or schnell model and a CLIP-L to
    ``folder``; returns {"model": path, "clip": path}. The build checks ComfyUI's detection."""
    require_comfy()
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    kind = "dev" if guidance else "schnell"
    files = {"model": folder / f"flux_{kind}-v{FLUX_VERSION}.safetensors", "clip": folder / f"clip_l-s{seed}.safetensors"}
    if all(p.is_file() for p in files.values()):
        return files
    cfg = {"comfy_dir": str(COMFY_DIR.resolve()), "seed": seed, "guidance": guidance,
           "dtype": "bfloat16" if guidance else "float8_e4m3fn", "model": str(files["model"]), "clip": str(files["clip"])}
    proc = subprocess.run([str(PYTHON), "-c", _BUILD_FLUX, json.dumps(cfg)], capture_output=True, text=True,
                          timeout=timeout, cwd=str(COMFY_DIR), check=False)
    if proc.returncode != 0 or not all(p.is_file() for p in files.values()):
        raise ComfyError(f"building Flux {kind} failed (exit {proc.returncode}):\n{_tail(proc.stdout + proc.stderr)}")
    return files


# --------------------------------------------------------------------------------------------
# LoRAs: the layers each format targets, as (name, (d_out, d_in))

def _diffusers_layers() -> dict[str, tuple[int, int]]:
    d = "transformer.transformer_blocks.0."
    s = "transformer.single_transformer_blocks.0."
    layers = {d + f"attn.{p}": (HIDDEN, HIDDEN) for p in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")}
    layers |= {d + "attn.to_out.0": (HIDDEN, HIDDEN), d + "ff.net.0.proj": (MLP, HIDDEN)}
    layers |= {s + f"attn.{p}": (HIDDEN, HIDDEN) for p in ("to_q", "to_k", "to_v")}
    layers |= {s + "proj_mlp": (MLP, HIDDEN), s + "proj_out": (HIDDEN, HIDDEN + MLP)}
    return layers


def _kohya_layers() -> dict[str, tuple[int, int]]:
    d, s = "lora_unet_double_blocks_0_", "lora_unet_single_blocks_0_"
    layers = {d + f"{side}_attn_qkv": (3 * HIDDEN, HIDDEN) for side in ("img", "txt")}
    layers |= {d + "img_attn_proj": (HIDDEN, HIDDEN), d + "txt_mlp_0": (MLP, HIDDEN)}
    layers |= {s + "linear1": (3 * HIDDEN + MLP, HIDDEN), s + "linear2": (HIDDEN, HIDDEN + MLP)}
    return layers


def write_flux_lora(path: str | os.PathLike, fmt: str, seed: int, rank: int, std: float = 0.02) -> list[str]:
    """A Flux LoRA in ``fmt`` "diffusers" (ai-toolkit: ``<name>.lora_A.weight`` (r, in) and
    ``.lora_B.weight`` (out, r), no alpha) or "kohya" (``lora_down``/``lora_up``/``alpha``);
    returns its layer names. Written atomically."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    layers = _diffusers_layers() if fmt == "diffusers" else _kohya_layers()
    down_key, up_key = ("lora_A", "lora_B") if fmt == "diffusers" else ("lora_down", "lora_up")
    tensors = {}
    for name, (d_out, d_in) in layers.items():
        tensors[f"{name}.{down_key}.weight"] = (torch.randn(rank, d_in, generator=gen) * std).to(torch.bfloat16)
        tensors[f"{name}.{up_key}.weight"] = (torch.randn(d_out, rank, generator=gen) * std).to(torch.bfloat16)
        if fmt == "kohya":
            tensors[f"{name}.alpha"] = torch.tensor(float(rank), dtype=torch.bfloat16)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)
    return list(layers)
