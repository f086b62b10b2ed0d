"""Kohya/BFL Flux.1 LoRA names on a diffusers Flux transformer.

BFL's layout (which kohya's sd-scripts names its Flux LoRAs after, ``lora_unet_double_blocks_0_
img_attn_qkv``) fuses what diffusers splits: a double block's image and text q, k, v, and a single
block's ``linear1`` (q, k, v and the MLP's input); and its final modulation is (shift, scale) where
diffusers has (scale, shift). A LoRA layer on such a module is still exact on each diffusers module
it covers: the same down-projection, with the module's rows of the up-projection (same rank).

`bfl_pieces` says, per BFL module path, which rows of its delta make each diffusers module's rows.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from .layer import LoraLayer

Pieces = dict[str, list[tuple[int, int]]]  # diffusers module path -> (start, stop) delta rows, in the module's row order

_TOP = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
        "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
        "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
        "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
        "time_text_embed.text_embedder.linear_2": "vector_in.out_layer"}
_DOUBLE = {"norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin", "attn.to_out.0": "img_attn.proj",
           "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
           "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2"}
_DOUBLE_FUSED = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                 "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
_SINGLE = {"proj_out": "linear2", "norm.linear": "modulation.lin"}
_SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}


def bfl_pieces(transformer: nn.Module) -> dict[str, Pieces]:
    """BFL module path -> its pieces on the modules of a diffusers FluxTransformer2DModel
    (module paths as ``named_modules`` gives them), from the model's own shapes."""
    modules = dict(transformer.named_modules())

    def rows(path: str) -> int:
        return int(modules[path].weight.shape[0])

    def whole(path: str) -> Pieces:
        return {path: [(0, rows(path))]}

    def stacked(paths: list[str]) -> Pieces:
        out, start = {}, 0
        for path in paths:
            out[path] = [(start, start + rows(path))]
            start += rows(path)
        return out

    out = {bfl: whole(path) for path, bfl in _TOP.items() if path in modules}
    if "norm_out.linear" in modules:  # BFL: (shift, scale); diffusers: (scale, shift)
        half = rows("norm_out.linear") // 2
        out["final_layer.adaLN_modulation.1"] = {"norm_out.linear": [(half, 2 * half), (0, half)]}
    for blocks, bfl_blocks, parts, fused in (("transformer_blocks", "double_blocks", _DOUBLE, _DOUBLE_FUSED),
                                             ("single_transformer_blocks", "single_blocks", _SINGLE, _SINGLE_FUSED)):
        for i in range(len(getattr(transformer, blocks, ()))):
            ours, theirs = f"{blocks}.{i}.", f"{bfl_blocks}.{i}."
            out.update({theirs + bfl: whole(ours + path) for path, bfl in parts.items()})
            out.update({theirs + bfl: stacked([ours + p for p in paths]) for bfl, paths in fused.items()})
    return out


def piece_of(layer: LoraLayer, ranges: list[tuple[int, int]], name: str) -> LoraLayer:
    """The part of ``layer`` whose delta is the given rows of its delta, as layer ``name``:
    exact (the up-projection's rows, or the dense delta's); a DoRA layer's norm spans the whole
    fused weight, so it is refused."""
    if layer.dora_scale is not None:
        raise ValueError(f"{layer.name}: a DoRA layer on a fused Flux module cannot be split onto diffusers' "
                         "separate modules; merge this file with the ComfyUI nodes")
    rows = torch.cat([torch.arange(start, stop) for start, stop in ranges])
    if layer.dense is not None:
        return replace(layer, name=name, dense=layer.dense[rows])
    return replace(layer, name=name, up=layer.up[rows])
