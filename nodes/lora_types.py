"""What two IterIS nodes share: the ITERIS_LORA_LIST type and reading a LORA_MODEL's layers."""

from __future__ import annotations

from comfy_api.latest import io

LoraList = io.Custom("ITERIS_LORA_LIST")


def named_layers(lora: dict) -> dict:
    """A LORA_MODEL as {kohya name: (up, down, alpha)}: a merge's own names and its text-encoder
    part; any other LORA_MODEL (core training nodes) with ComfyUI's lora_unet_ names; a
    missing alpha means alpha = rank (scale 1)."""
    names = getattr(lora, "names", {})
    layers = {}
    for part in (lora, getattr(lora, "text_encoder", {})):
        for key in part:
            if key.endswith(".lora_up.weight"):
                prefix = key[: -len(".lora_up.weight")]
                down = part[f"{prefix}.lora_down.weight"]
                alpha = part.get(f"{prefix}.alpha")
                layers[names.get(prefix) or _kohya_name(prefix)] = (
                    part[key], down, float(alpha) if alpha is not None else float(down.shape[0]))
    return layers


def _kohya_name(prefix: str) -> str:
    """ComfyUI's own name for a diffusion-model module: lora_unet_ + its path with underscores."""
    if prefix.startswith("diffusion_model."):
        return "lora_unet_" + prefix[len("diffusion_model."):].replace(".", "_")
    return prefix
