"""What base model a LoRA file looks made for, from its layer names and delta shapes: the
hint of every "this file does not fit this model" message."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

_FLUX = re.compile(r"double_blocks|single_blocks|single_transformer_blocks")
# SD3 / Flux transformer blocks sit at the top level; a UNet's follow "attentions_<j>_"
_SD3 = re.compile(r"joint_blocks|(?<![0-9]_)transformer_blocks_\d+_")
_SDXL = re.compile(
    r"lora_te[12]_|text_encoder_2|add_embedding|label_emb|transformer_blocks_[1-9]"
    r"|up_blocks_0_attentions|output_blocks_[0-2]_1_(?:transformer|proj|norm)"
)
_SD12_UNET = re.compile(
    r"input_blocks_(?:[12]_1|1[01])_|output_blocks_(?:9|1[01])_|down_blocks_3_|up_blocks_3_"
    r"|down_blocks_0_attentions"
)
_SD_UNET = re.compile(r"(?:down|up)_blocks_\d|mid_block_|(?:input|output)_blocks_\d|middle_block_")
_TE_LAYER = re.compile(r"lora_te_text_model_encoder_layers_(\d+)_")
_CROSS_ATTENTION_FAMILY = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}
_TE_WIDTH_FAMILY = {768: "SD1.x", 1024: "SD2.x"}


def guess_family(names: Iterable[str], shapes: Mapping[str, tuple[int, ...]] | None = None) -> str:
    """The base model a LoRA's layer names (and, if given, delta shapes by name) look made
    for: "SDXL", "SD1.x", "SD2.x", "SD1.x or SD2.x", "Flux", "SD3", or "unknown"."""
    names = [name.lower() for name in names]
    text = "\n".join(names)
    for pattern, family in ((_FLUX, "Flux"), (_SD3, "SD3"), (_SDXL, "SDXL")):
        if any(pattern.search(name) for name in names):
            return family
    by_shape = _family_from_shapes({k.lower(): v for k, v in (shapes or {}).items()})
    if by_shape:
        return by_shape
    te_layers = [int(m.group(1)) for m in _TE_LAYER.finditer(text)]
    if te_layers and max(te_layers) >= 12:
        return "SD2.x"
    if te_layers and max(te_layers) == 11:
        return "SD1.x"
    if _SD12_UNET.search(text):
        return "SD1.x or SD2.x"
    if _SD_UNET.search(text):
        return "SD1.x, SD2.x or SDXL"
    return "unknown"


def _family_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """The family told by a cross-attention key/value input width (768, 1024, 2048) or an
    SD1/SD2 text encoder width; None when no such layer is there."""
    for name, shape in shapes.items():
        if re.search(r"attn2_to_[kv]$", name) and len(shape) >= 2 and shape[1] in _CROSS_ATTENTION_FAMILY:
            return _CROSS_ATTENTION_FAMILY[shape[1]]
    for name, shape in shapes.items():
        if name.startswith("lora_te_") and name.endswith("q_proj") and len(shape) >= 2:
            family = _TE_WIDTH_FAMILY.get(shape[1])
            if family:
                return family
    return None
