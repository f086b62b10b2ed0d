"""Which module of a diffusers model (SD1.x, SD2.x, SDXL, SD3, Flux) each LoRA layer name targets.

Every reader yields kohya-style layer names (`lora.LoraLayer.name`). A `KeyMap`, built from
the real modules of a loaded model, says which names it accepts for each `nn.Linear` /
`nn.Conv2d` (module id ``"<component>.<named_modules path>"``), and which name to write
back in a kohya file:

- UNet: ``lora_unet_`` + the diffusers path or the original LDM/SGM path (dots to
  underscores); kohya writes diffusers names for SD1.x/SD2.x and LDM names for SDXL.
- SD3 / Flux transformer: ``lora_transformer_`` + the diffusers path (OneTrainer's names,
  which ComfyUI loads; diffusers-format ``transformer.`` keys read as these). Flux also takes
  kohya's BFL-style names (``lora_unet_double_blocks_0_img_attn_qkv``), whose layers on fused
  modules are split exactly onto diffusers' separate ones (`iteris_sd.lora.flux`).
- Text encoders: ``lora_te_text_model_...`` (SD1.x/SD2.x), ``lora_te1_`` / ``lora_te2_``
  (SDXL, SD3; ``lora_te_`` is accepted for the first, as diffusers-format files say
  ``text_encoder.``), ``lora_te3_`` for T5 (SD3's third text encoder, Flux's second, whose
  diffusers name ``text_encoder_2.`` is read as ``lora_te2_``). Both the
  ``text_model.``-nested and the flattened CLIPTextModel layouts of transformers are handled.

`KeyMap.match` pairs a `LoraFile`'s layers with modules and refuses, in one line, files
whose names or shapes do not fit the model, saying what base model the file looks made for.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from math import prod
from typing import Any

from torch import nn

from .flux import Pieces, bfl_pieces, piece_of
from .guess import guess_family
from .layer import LoraFile, LoraLayer

FAMILIES = ("sd1", "sd2", "sdxl", "sd3", "flux")
FAMILY_LABELS = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL", "sd3": "SD3", "flux": "Flux"}

# name prefixes per component: the first is written, all are accepted
_PREFIXES = {
    "sd1": {"unet": ("lora_unet_",), "text_encoder": ("lora_te_",)},
    "sd2": {"unet": ("lora_unet_",), "text_encoder": ("lora_te_",)},
    "sdxl": {
        "unet": ("lora_unet_",),
        "text_encoder": ("lora_te1_", "lora_te_"),
        "text_encoder_2": ("lora_te2_",),
    },
    "sd3": {
        "transformer": ("lora_transformer_",),
        "text_encoder": ("lora_te1_", "lora_te_"),
        "text_encoder_2": ("lora_te2_",),
        "text_encoder_3": ("lora_te3_",),
    },
    "flux": {
        "transformer": ("lora_transformer_",),
        "text_encoder": ("lora_te1_", "lora_te_"),
        "text_encoder_2": ("lora_te3_", "lora_te2_"),
    },
}

_UNET_TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}

_RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}

_MID_BLOCK = {("resnets", 0): "middle_block.0", ("attentions", 0): "middle_block.1", ("resnets", 1): "middle_block.2"}


class KeyMismatchError(ValueError):
    """A LoRA file's layer names do not fit the model's modules."""


class ShapeMismatchError(KeyMismatchError):
    """A LoRA layer's name fits a module but its delta's shape does not."""


# --- diffusers -> LDM UNet paths -------------------------------------------------------


def diffusers_to_ldm_unet(
    path: str, layers_per_block: int | list[int], up_block_has_attention: list[bool]
) -> str | None:
    """The LDM/SGM (``input_blocks``/``middle_block``/``output_blocks``) path of a
    diffusers UNet2DConditionModel module or parameter path, or None if it has none.

    ``layers_per_block`` counts resnets per down block; ``up_block_has_attention`` has one
    entry per up block (and so gives the number of blocks).
    """
    n_blocks = len(up_block_has_attention)
    down_layers = [layers_per_block] * n_blocks if isinstance(layers_per_block, int) else list(layers_per_block)
    if len(down_layers) != n_blocks:
        raise ValueError(
            f"layers_per_block {layers_per_block} has {len(down_layers)} entries but "
            f"up_block_has_attention has {n_blocks}; give one per block"
        )
    for diffusers, ldm in _UNET_TOP_LEVEL.items():
        if path == diffusers or path.startswith(diffusers + "."):
            return ldm + path[len(diffusers):]
    parts = path.split(".")
    if len(parts) < 2:
        return None
    if parts[0] == "mid_block":
        return _mid_block_to_ldm(parts[1:])
    if len(parts) < 4 or not (parts[1].isdigit() and parts[3].isdigit()):
        return None
    block, kind, layer, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
    if parts[0] == "down_blocks" and block < n_blocks:
        return _down_block_to_ldm(block, kind, layer, rest, down_layers)
    if parts[0] == "up_blocks" and block < n_blocks:
        up_layers = [n + 1 for n in reversed(down_layers)]
        return _up_block_to_ldm(block, kind, layer, rest, up_layers, up_block_has_attention[block])
    return None


def _join(head: str, rest: list[str]) -> str:
    return ".".join([head, *rest])


def _resnet_to_ldm(head: str, rest: list[str]) -> str | None:
    """A resnet's sub-path under its LDM block ``head``; None for an unknown part."""
    if not rest:
        return head
    part = _RESNET_PARTS.get(rest[0])
    return None if part is None else _join(f"{head}.{part}", rest[1:])


def _down_block_to_ldm(block: int, kind: str, layer: int, rest: list[str], down_layers: list[int]) -> str | None:
    start = 1 + sum(n + 1 for n in down_layers[:block])
    n_layers = down_layers[block]
    if kind == "resnets" and layer < n_layers:
        return _resnet_to_ldm(f"input_blocks.{start + layer}.0", rest)
    if kind == "attentions" and layer < n_layers:
        return _join(f"input_blocks.{start + layer}.1", rest)
    if kind == "downsamplers" and layer == 0 and rest[:1] == ["conv"]:
        return _join(f"input_blocks.{start + n_layers}.0.op", rest[1:])
    return None


def _up_block_to_ldm(
    block: int, kind: str, layer: int, rest: list[str], up_layers: list[int], has_attention: bool
) -> str | None:
    start = sum(up_layers[:block])
    n_layers = up_layers[block]
    if kind == "resnets" and layer < n_layers:
        return _resnet_to_ldm(f"output_blocks.{start + layer}.0", rest)
    if kind == "attentions" and layer < n_layers:
        return _join(f"output_blocks.{start + layer}.1", rest)
    if kind == "upsamplers" and layer == 0 and rest[:1] == ["conv"]:
        slot = 2 if has_attention else 1
        return _join(f"output_blocks.{start + n_layers - 1}.{slot}.conv", rest[1:])
    return None


def _mid_block_to_ldm(parts: list[str]) -> str | None:
    if len(parts) < 2 or not parts[1].isdigit():
        return None
    head = _MID_BLOCK.get((parts[0], int(parts[1])))
    if head is None:
        return None
    rest = parts[2:]
    return _resnet_to_ldm(head, rest) if parts[0] == "resnets" else _join(head, rest)


def unet_layout(unet: nn.Module) -> tuple[list[int], list[bool]]:
    """(resnets per down block, whether each up block has attentions) of a diffusers UNet."""
    down_layers = [len(block.resnets) for block in unet.down_blocks]
    up_has_attention = [len(getattr(block, "attentions", None) or ()) > 0 for block in unet.up_blocks]
    expected = [n + 1 for n in reversed(down_layers)]
    found = [len(block.resnets) for block in unet.up_blocks]
    if found != expected:
        raise ValueError(
            f"unet: up blocks have {found} resnets but down blocks {down_layers} imply {expected}; "
            "only Stable Diffusion UNet layouts can be mapped"
        )
    return down_layers, up_has_attention


# --- the key map ---------------------------------------------------------------------


def detect_family(unet_config: Any) -> str:
    """"flux", "sd3", "sdxl", "sd2" or "sd1" from a diffusers UNet or transformer config
    (dict or config object); a ValueError for any other model, not a silent "sd1"."""
    kind = _config_value(unet_config, "_class_name")
    if kind == "FluxTransformer2DModel" or _config_value(unet_config, "guidance_embeds") is not None:
        return "flux"
    if kind == "SD3Transformer2DModel" or _config_value(unet_config, "caption_projection_dim") is not None:
        return "sd3"
    addition = _config_value(unet_config, "addition_embed_type")
    if addition == "text_time":
        return "sdxl"
    cross = _config_value(unet_config, "cross_attention_dim")
    if isinstance(cross, (list, tuple)):
        cross = cross[0] if cross else None
    if cross is None:
        raise ValueError(f"{kind or 'this model'} is not an SD1.x, SD2.x or SDXL UNet nor an SD3 or Flux transformer, "
                         "the models the diffusers backend merges; merge other families with the ComfyUI nodes")
    return "sd2" if cross == 1024 else "sd1"


def _config_value(config: Any, key: str) -> Any:
    if isinstance(config, Mapping):
        return config.get(key)
    return getattr(config, key, None)


@dataclass(frozen=True, eq=False)
class KeyMap:
    """Kohya-style LoRA layer names <-> targetable modules of one loaded model."""

    family: str  # one of FAMILIES
    lookup: dict[str, str]  # every accepted layer name -> module id
    output_name: dict[str, str]  # module id -> the name to write in a kohya file
    modules: dict[str, nn.Module]  # module id -> nn.Linear / nn.Conv2d
    # layer names whose delta spans several modules (kohya/BFL Flux names on diffusers' split
    # modules, `flux.bfl_pieces`): name -> module id -> the delta's rows that make the module's
    pieces: dict[str, Pieces] = field(default_factory=dict)

    def match(self, lora: LoraFile) -> dict[str, LoraLayer]:
        """module id -> layer for every layer of ``lora`` (a layer on a fused module split
        into its exact pieces); raises KeyMismatchError if any layer names no module (or two
        name the same one) and ShapeMismatchError if a delta's shape does not fit its module's weight."""
        shapes = {name: delta_shape(layer) for name, layer in lora.layers.items()}
        targets: list[tuple[str, str, LoraLayer]] = []  # (module id, the file's layer name, its layer there)
        unmatched: list[str] = []
        for name, layer in lora.layers.items():
            if name in self.lookup:
                targets.append((self.lookup[name], name, layer))
            elif name in self.pieces:
                targets += self._split(lora.path, name, layer, shapes[name])
            else:
                unmatched.append(name)
        if unmatched:
            raise KeyMismatchError(self._unmatched_message(lora, unmatched, shapes))
        matched: dict[str, LoraLayer] = {}
        owner: dict[str, str] = {}
        for module_id, name, layer in targets:
            if module_id in owner:
                raise KeyMismatchError(
                    f"{lora.path}: layers {owner[module_id]} and {name} both target {module_id}; "
                    "keep only one of them in the file"
                )
            owner[module_id] = name
            matched[module_id] = layer
            weight_shape = tuple(self.modules[module_id].weight.shape)
            shape = delta_shape(layer)
            if not delta_fits(shape, weight_shape):
                raise ShapeMismatchError(
                    f"{lora.path}: layer {name} has a delta of shape {shapes[name]} but "
                    f"{module_id} has a weight of shape {weight_shape}; the file looks made for "
                    f"{guess_family(lora.layers, shapes)}, this model is {FAMILY_LABELS[self.family]}"
                )
        return matched

    def _split(self, path: str, name: str, layer: LoraLayer, shape: tuple[int, ...]) -> list[tuple[str, str, LoraLayer]]:
        """(module id, name, piece) for each module a fused layer's delta spans."""
        pieces = self.pieces[name]
        rows = max(stop for ranges in pieces.values() for _, stop in ranges)
        if shape[0] != rows:
            raise ShapeMismatchError(f"{path}: layer {name} has a delta of shape {shape} but the modules it spans "
                                     f"({', '.join(pieces)}) have {rows} rows together")
        try:
            return [(module_id, name, piece_of(layer, ranges, name)) for module_id, ranges in pieces.items()]
        except ValueError as e:
            raise KeyMismatchError(f"{path}: {e}") from None

    def _unmatched_message(self, lora: LoraFile, unmatched: list[str], shapes: dict) -> str:
        total = len(lora.layers)
        more = f" (and {len(unmatched) - 10} more)" if len(unmatched) > 10 else ""
        return (
            f"{lora.path}: {len(unmatched)} of {total} layers match no module of this "
            f"{FAMILY_LABELS[self.family]} model ({total - len(unmatched)} matched); unmatched: "
            f"{', '.join(unmatched[:10])}{more}; the file looks made for {guess_family(lora.layers, shapes)}"
        )


def build_keymap(components: Mapping[str, nn.Module], family: str) -> KeyMap:
    """The KeyMap of a model given as {"unet": ..., "text_encoder": ...[, "text_encoder_2": ...]}."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; use one of {', '.join(FAMILIES)}")
    prefixes = _PREFIXES[family]
    lookup: dict[str, str] = {}
    output_name: dict[str, str] = {}
    modules: dict[str, nn.Module] = {}
    for component, model in components.items():
        if component not in prefixes:
            raise ValueError(
                f"unknown component {component!r} for a {FAMILY_LABELS[family]} model; "
                f"use {', '.join(prefixes)}"
            )
        for path, names, module in _component_names(component, model, family):
            module_id = f"{component}.{path}"
            modules[module_id] = module
            output_name[module_id] = names[0]
            for name in names:
                claimed = lookup.setdefault(name, module_id)
                if claimed != module_id:
                    raise ValueError(
                        f"layer name {name} is claimed by both {claimed} and {module_id}; "
                        "the model's module names are ambiguous for LoRA keys"
                    )
    pieces: dict[str, Pieces] = {}
    if family == "flux" and "transformer" in components:  # kohya's BFL-style names, on fused modules
        for bfl, parts in bfl_pieces(components["transformer"]).items():
            pieces["lora_unet_" + _underscored(bfl)] = {f"transformer.{path}": rows for path, rows in parts.items()}
    return KeyMap(family=family, lookup=lookup, output_name=output_name, modules=modules, pieces=pieces)


def targetable_modules(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    """(path, module) for every nn.Linear / nn.Conv2d (subclasses too) of ``model``."""
    for path, module in model.named_modules():
        if path and isinstance(module, (nn.Linear, nn.Conv2d)):
            yield path, module


def _component_names(component: str, model: nn.Module, family: str) -> Iterable[tuple[str, list[str], nn.Module]]:
    """(path, accepted names with the output name first, module) per targetable module."""
    prefixes = _PREFIXES[family][component]
    if component == "transformer":
        for path, module in targetable_modules(model):
            yield path, [prefixes[0] + _underscored(path)], module
        return
    if component == "unet":
        down_layers, up_has_attention = unet_layout(model)
        for path, module in targetable_modules(model):
            diffusers_name = prefixes[0] + _underscored(path)
            ldm = diffusers_to_ldm_unet(path, down_layers, up_has_attention)
            names = [diffusers_name] if ldm is None else [diffusers_name, prefixes[0] + _underscored(ldm)]
            if family == "sdxl":
                names.reverse()
            yield path, names, module
        return
    if getattr(getattr(model, "config", None), "model_type", "") == "t5":
        for path, module in targetable_modules(model):
            yield path, [p + _underscored(path) for p in prefixes], module
        return
    nested = any(name == "text_model" for name, _ in model.named_children())
    for path, module in targetable_modules(model):
        canonical = path if nested or path.startswith("text_projection") else f"text_model.{path}"
        flattened = canonical.removeprefix("text_model.")
        names = [p + _underscored(c) for p in prefixes for c in dict.fromkeys((canonical, flattened))]
        yield path, names, module


def _underscored(path: str) -> str:
    return path.replace(".", "_")


# --- shapes ----------------------------------------------------------------------------


def delta_shape(layer: LoraLayer) -> tuple[int, ...]:
    """The shape of ``layer.dense_delta()`` without building it."""
    if layer.dense is not None:
        return tuple(layer.dense.shape)
    if layer.mid is not None:
        return (layer.up.shape[0], layer.down.shape[1], *layer.mid.shape[2:])
    return (layer.up.shape[0], *layer.down.shape[1:])


def delta_fits(delta: tuple[int, ...], weight: tuple[int, ...]) -> bool:
    """Whether a delta of shape ``delta`` can be added to a weight of shape ``weight``:
    equal, or equal once flattened to (d_out, d_in) (a 1x1 conv vs a 2-D delta, either
    way, and a conv delta stored flattened as (o, i*kh*kw), as LoHa does)."""
    if tuple(delta) == tuple(weight):
        return True
    if len(delta) < 2 or len(weight) < 2 or 4 not in (len(delta), len(weight)):
        return False
    return (delta[0], prod(delta[1:])) == (weight[0], prod(weight[1:]))
