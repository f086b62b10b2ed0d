"""Read LoRA files into canonical `LoraLayer`s.

Read (safetensors only): kohya and LyCORIS (LoCon, Tucker, LoHa, LoKr, full ``.diff``,
DoRA) and diffusers / PEFT files. Every layer gets its kohya name, e.g.
``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight`` ->
``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``.
LoHa and LoKr are rebuilt to their exact dense delta at read time.

Pickle-based files (.pt .pth .ckpt .bin) are refused unopened: loading them can run code.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import safetensors
import torch
from torch import Tensor

from .dora import peft_magnitude
from .errors import LoraFormatError
from .layer import LoraFile, LoraLayer
from .locon import check_low_rank
from .loha import LOHA_SLOTS, loha_delta
from .lokr import LOKR_SLOTS, lokr_delta

# LoraFormatError lives in errors.py, since the adapter modules raise it too
__all__ = ["PICKLE_SUFFIXES", "LoraFormatError", "file_sha256", "read_lora"]

PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")

# kohya / LyCORIS: "<layer name>.<suffix>", the layer name has no dots
_KOHYA_KEY = re.compile(r"(lora_(?:unet|transformer|te|te1|te2|te3)_[^.]+)\.(.+)")
_KOHYA_SLOTS = {
    "lora_down.weight": "down",
    "lora_up.weight": "up",
    "lora_mid.weight": "mid",
    "alpha": "alpha",
    "diff": "diff",
    "dora_scale": "dora_scale",
    **{s: s for s in LOHA_SLOTS + LOKR_SLOTS},
}
_PLAIN_LORA_SLOTS = {"down", "up", "alpha", "dora_scale"}  # anything else is LyCORIS-only

# diffusers / PEFT: "<component>.<dotted module path>.<suffix>"
_COMPONENT_PREFIXES = {"unet": "lora_unet_", "transformer": "lora_transformer_", "text_encoder": "lora_te_",
                       "text_encoder_2": "lora_te2_", "text_encoder_3": "lora_te3_"}
_PROCESSOR_KEY = re.compile(r"(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight")
_MODULE_SUFFIXES = [  # (pattern on the key without its component prefix, slot, format)
    (re.compile(r"(.+)\.lora_A(?:\.[^.]+)?\.weight"), "down", "peft"),  # optional adapter name
    (re.compile(r"(.+)\.lora_B(?:\.[^.]+)?\.weight"), "up", "peft"),
    (re.compile(r"(.+)\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?"), "dora_scale", "peft"),
    (re.compile(r"(.+)\.lora(?:_linear_layer|_layer)?\.down\.weight"), "down", "diffusers"),
    (re.compile(r"(.+)\.lora(?:_linear_layer|_layer)?\.up\.weight"), "up", "diffusers"),
    (re.compile(r"(.+)\.lora_down\.weight"), "down", "diffusers"),
    (re.compile(r"(.+)\.lora_up\.weight"), "up", "diffusers"),
    (re.compile(r"(.+)\.alpha"), "alpha", "diffusers"),
    (re.compile(r"(.+)\.dora_scale"), "dora_scale", "diffusers"),
]
_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' JSON of each PEFT LoraConfig


class _Key(NamedTuple):
    """What one tensor key of a LoRA file stands for."""

    layer: str  # kohya layer name
    slot: str  # up, down, mid, alpha, diff, dora_scale, hada_*, lokr_*, or "bias"
    fmt: str  # kohya, lycoris, diffusers, peft
    component: str = ""  # diffusers/PEFT only: unet, text_encoder, text_encoder_2
    module: str = ""  # diffusers/PEFT only: dotted module path


def read_lora(path: str | os.PathLike, strength: float = 1.0, name: str | None = None) -> LoraFile:
    """Read a safetensors LoRA file into canonical layers, each at ``strength``."""
    path = os.fspath(path)
    if path.lower().endswith(PICKLE_SUFFIXES):
        raise LoraFormatError(
            f"{path}: refusing a pickle-based {Path(path).suffix} file, since such files can "
            "execute code when loaded; in a trusted environment load it with torch.load and save "
            "its tensors with safetensors.torch.save_file, then pass the .safetensors file"
        )
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file; check the path")
    if os.path.isdir(path):
        raise LoraFormatError(f"{path}: is a folder; pass the .safetensors file inside it")
    strength = float(strength)
    if not math.isfinite(strength):
        raise ValueError(f"{path}: strength {strength} is not a finite number")

    _check_safetensors_header(path)
    tensors, metadata = _load_tensors(path)
    keys = {k: _parse_key(k) for k in tensors}
    groups = _group_by_layer(path, keys)
    adapter_config = _adapter_config(path, metadata)

    layers: dict[str, LoraLayer] = {}
    formats: Counter[str] = Counter()
    for layer_name, slot_keys in groups.items():
        layer = _build_layer(path, layer_name, slot_keys, tensors, strength)
        if layer is None:
            continue
        parsed = [keys[k] for k in slot_keys.values()]
        module = next((p for p in parsed if p.component), None)
        if adapter_config and module and layer.alpha is None and layer.dense is None:
            alpha = _peft_alpha(adapter_config, module.component, module.module, layer.rank)
            layer = replace(layer, alpha=alpha)
        layers[layer_name] = layer
        formats[_layer_format({p.fmt for p in parsed})] += 1
    if not layers:
        raise LoraFormatError(f"{path}: contains no LoRA layers; is it a LoRA file at all?")
    return LoraFile(
        path=path,
        name=name or Path(path).stem,
        sha256=file_sha256(path),
        layers=layers,
        strength=strength,
        metadata=metadata,
        format=formats.most_common(1)[0][0],
    )


def _not_safetensors(path: str, reason: str) -> LoraFormatError:
    return LoraFormatError(f"{path}: not a valid safetensors file ({reason})")


def _check_safetensors_header(path: str) -> None:
    """Check the header against the file size: u64 little-endian n, n bytes of JSON, data."""
    size = os.path.getsize(path)
    if size == 0:
        raise _not_safetensors(path, "the file is empty")
    if size < 8:
        raise _not_safetensors(path, f"only {size} bytes, shorter than the 8-byte header length")
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if 8 + header_len > size:
            raise _not_safetensors(
                path, f"the header claims {header_len} bytes but the file has {size}; truncated?"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except ValueError:
        raise _not_safetensors(path, "the header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _not_safetensors(path, "the header is not a JSON object")
    try:
        data_end = max(
            (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0
        )
    except (TypeError, KeyError, IndexError, ValueError):
        raise _not_safetensors(path, "a tensor entry in the header has no valid data_offsets") from None
    data_len = size - 8 - header_len
    if data_end > data_len:
        raise _not_safetensors(
            path, f"the tensors need {data_end} bytes of data but {data_len} follow the header; truncated"
        )


def _load_tensors(path: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """All tensors (each checked finite) and the file's string metadata."""
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own SafetensorError for any damage
        raise _not_safetensors(path, str(e).splitlines()[0] if str(e) else type(e).__name__) from e
    for key, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise LoraFormatError(
                f"{path}: key '{key}' contains NaN/Inf; the file is damaged or was saved "
                "from a diverged training run"
            )
    return tensors, metadata


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _parse_key(key: str) -> _Key | None:
    """The layer and slot a key stands for, or None if it is not a known LoRA key."""
    m = _KOHYA_KEY.fullmatch(key)
    if m:
        layer, suffix = m.groups()
        if suffix in ("diff_b", "bias") or suffix.startswith("bias_"):
            return _Key(layer, "bias", "lycoris")
        slot = _KOHYA_SLOTS.get(suffix)
        if slot is None:
            return None
        return _Key(layer, slot, "kohya" if slot in _PLAIN_LORA_SLOTS else "lycoris")

    component, rest = next(
        ((c, key[len(c) + 1 :]) for c in _COMPONENT_PREFIXES if key.startswith(c + ".")), ("", key)
    )
    m = _PROCESSOR_KEY.fullmatch(rest)
    if m:  # old attention processors; saved without "unet." by early diffusers versions
        path, proj, slot = m.groups()
        module = f"{path}.{proj}.0" if proj == "to_out" else f"{path}.{proj}"
        return _module_key(component or "unet", module, slot, "diffusers")
    if not component:
        return None
    if rest.endswith((".bias", ".diff_b")):
        return _module_key(component, rest, "bias", "diffusers")
    for pattern, slot, fmt in _MODULE_SUFFIXES:
        m = pattern.fullmatch(rest)
        if m:
            return _module_key(component, m.group(1), slot, fmt)
    return None


def _module_key(component: str, module: str, slot: str, fmt: str) -> _Key:
    layer = _COMPONENT_PREFIXES[component] + module.replace(".", "_")
    return _Key(layer, slot, fmt, component, module)


def _group_by_layer(path: str, keys: dict[str, _Key | None]) -> dict[str, dict[str, str]]:
    """layer name -> slot -> key, refusing bias deltas, unknown keys and duplicates."""
    unknown = [k for k, parsed in keys.items() if parsed is None]
    if unknown:
        raise LoraFormatError(
            f"{path}: {len(unknown)} key(s) are not LoRA weights this tool knows, e.g. {unknown[:5]}; "
            "supported are kohya/LyCORIS 'lora_unet_*', 'lora_transformer_*', 'lora_te*_*' and diffusers/PEFT "
            "'unet.*', 'transformer.*', 'text_encoder*.*' keys"
        )
    groups: dict[str, dict[str, str]] = {}
    for key, parsed in keys.items():
        if parsed.slot == "bias":
            raise LoraFormatError(
                f"{path}: key '{key}' is a bias delta, and biases cannot be merged by this tool; "
                "use a LoRA trained without bias weights"
            )
        slots = groups.setdefault(parsed.layer, {})
        if parsed.slot in slots:
            raise LoraFormatError(
                f"{path}: keys '{slots[parsed.slot]}' and '{key}' both give the {parsed.slot} of "
                f"layer '{parsed.layer}'; the file mixes two copies of one layer"
            )
        slots[parsed.slot] = key
    return groups


def _layer_format(fmts: set[str]) -> str:
    for fmt in ("lycoris", "peft", "diffusers"):
        if fmt in fmts:
            return fmt
    return "kohya"


def _kind(slot: str) -> str | None:
    """Which representation a slot belongs to; None for alpha and dora_scale."""
    if slot in ("up", "down", "mid"):
        return "low rank"
    if slot == "diff":
        return "diff"
    if slot.startswith("hada_"):
        return "LoHa"
    if slot.startswith("lokr_"):
        return "LoKr"
    return None


def _build_layer(
    path: str, name: str, slot_keys: dict[str, str], tensors: dict[str, Tensor], strength: float
) -> LoraLayer | None:
    """One canonical layer from its tensors; None for a layer holding only an alpha."""
    part = {slot: tensors[key] for slot, key in slot_keys.items()}
    alpha = _alpha(path, slot_keys["alpha"], part["alpha"]) if "alpha" in part else None
    dora_scale = part.get("dora_scale")
    kinds = sorted({k for k in map(_kind, part) if k})
    if len(kinds) > 1:
        raise LoraFormatError(
            f"{path}: layer '{name}' mixes {' and '.join(kinds)} weights; the file is damaged"
        )
    if not kinds:
        if dora_scale is not None:
            raise LoraFormatError(
                f"{path}: key '{slot_keys['dora_scale']}' is a DoRA magnitude but layer '{name}' "
                "has no LoRA weights; the file is incomplete"
            )
        return None  # a stray alpha changes nothing
    kind = kinds[0]
    if kind == "low rank":
        check_low_rank(path, name, slot_keys, part)
        if dora_scale is not None and "lora_magnitude_vector" in slot_keys["dora_scale"]:
            dora_scale = peft_magnitude(path, slot_keys["dora_scale"], dora_scale, part["up"].shape[0])
        return LoraLayer(
            name, up=part["up"], down=part["down"], mid=part.get("mid"), alpha=alpha,
            strength=strength, dora_scale=dora_scale,
        )  # fmt: skip
    if kind == "diff":
        dense = part["diff"]
    elif kind == "LoHa":
        dense = loha_delta(path, name, slot_keys, part, alpha)
    else:
        dense = lokr_delta(path, name, slot_keys, part, alpha)
    return LoraLayer(name, dense=dense, strength=strength, dora_scale=dora_scale)


def _alpha(path: str, key: str, t: Tensor) -> float:
    if t.numel() != 1:
        raise LoraFormatError(
            f"{path}: key '{key}' should hold one number (alpha) but has shape {tuple(t.shape)}"
        )
    return float(t.reshape(()).item())


def _adapter_config(path: str, metadata: dict[str, str]) -> dict:
    """diffusers' flattened PEFT configs ("unet.lora_alpha": 8, ...), or {} if absent."""
    raw = metadata.get(_ADAPTER_METADATA_KEY)
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except ValueError:
        raise LoraFormatError(f"{path}: metadata '{_ADAPTER_METADATA_KEY}' is not valid JSON") from None
    return config if isinstance(config, dict) else {}


def _peft_alpha(config: dict, component: str, module: str, rank: int) -> float | None:
    """The alpha (scale = alpha / r) PEFT gives a module, from its LoraConfig.

    ``alpha_pattern`` keys are regexes matched at the end of the module path, as PEFT
    does; rsLoRA's scale lora_alpha / sqrt(r) becomes alpha = lora_alpha * sqrt(r).
    """
    alpha = config.get(f"{component}.lora_alpha")
    if alpha is None:
        return None
    for pattern, value in (config.get(f"{component}.alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = value
            break
    if config.get(f"{component}.use_rslora"):
        alpha = alpha * math.sqrt(rank)
    return float(alpha)
