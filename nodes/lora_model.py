"""The merged LORA_MODEL, and reading any LORA_MODEL's layers. Imports no ComfyUI module.

A LORA_MODEL is a dict of ``diffusion_model.<module>.lora_up.weight`` / ``.lora_down.weight``
/ ``.alpha`` tensors: the keys ComfyUI's core "Load LoRA Model" applies to a MODEL (any other
key it logs as not loaded). What the Save node needs beside them (the text-encoder part, the
kohya layer names, the merge metadata) therefore cannot be keys. It rides on the tensors
themselves, as the attribute ``iteris_merge`` of every value: a copy of the dict (``dict(x)``,
``x.copy()``, ``{**x}``, ``copy.copy``, ``copy.deepcopy``, pickling) keeps its tensors, and
with them the extras; a tensor made anew (scaled, cast) does not carry them, as it no longer
is the merge. The dict is also a `MergedLora` carrying them, for a merge with no UNet layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

ATTRIBUTE = "iteris_merge"


@dataclass(frozen=True, eq=False)
class MergeExtras:
    """What a merged LORA_MODEL carries beside its UNet tensors."""

    text_encoder: dict[str, Tensor] = field(default_factory=dict)  # lora_up / lora_down / alpha keys, as the UNet's
    names: dict[str, str] = field(default_factory=dict)  # key prefix -> kohya layer name
    metadata: dict[str, str] = field(default_factory=dict)


class MergedLora(dict):
    """A LORA_MODEL made by the Merge node; ``extras`` is also on each of its tensors."""

    extras: MergeExtras


def merged_lora(unet: dict[str, Tensor], extras: MergeExtras) -> MergedLora:
    """The LORA_MODEL of ``unet`` (its state dict), every tensor carrying ``extras``."""
    lora = MergedLora(unet)
    lora.extras = extras
    for t in unet.values():
        setattr(t, ATTRIBUTE, extras)
    return lora


def merge_extras(lora: dict) -> MergeExtras | None:
    """The extras of a merged LORA_MODEL or of a copy of it; None for any other LORA_MODEL."""
    found = getattr(lora, "extras", None)
    if isinstance(found, MergeExtras):
        return found
    for t in lora.values():
        found = getattr(t, ATTRIBUTE, None)
        if isinstance(found, MergeExtras):
            return found
    return None


def named_layers(lora: dict) -> dict:
    """A LORA_MODEL as {kohya name: (up, down, alpha)}: a merge's own names and its text-encoder
    part; any other LORA_MODEL (core training nodes) with ComfyUI's lora_unet_ names; a
    missing alpha means alpha = rank (scale 1)."""
    extras = merge_extras(lora) or MergeExtras()
    layers = {}
    for part in (lora, extras.text_encoder):
        for key in part:
            if key.endswith(".lora_up.weight"):
                prefix = key[: -len(".lora_up.weight")]
                down = part[f"{prefix}.lora_down.weight"]
                alpha = part.get(f"{prefix}.alpha")
                layers[extras.names.get(prefix) or _kohya_name(prefix)] = (
                    part[key], down, float(alpha) if alpha is not None else float(down.shape[0]))
    return layers


def _kohya_name(prefix: str) -> str:
    """ComfyUI's own name for a diffusion-model module: lora_unet_ + its path with underscores."""
    if prefix.startswith("diffusion_model."):
        return "lora_unet_" + prefix[len("diffusion_model."):].replace(".", "_")
    return prefix
