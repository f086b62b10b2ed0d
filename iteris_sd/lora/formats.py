"""Read LoRA files into canonical `LoraLayer`s; write merged LoRAs in kohya format.

Read (safetensors only): kohya and LyCORIS (LoCon, Tucker, LoHa, LoKr, full ``.diff``,
DoRA) and diffusers / PEFT files. Every layer gets its kohya name, e.g.
``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight`` ->
``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``.
LoHa and LoKr are rebuilt to their exact dense delta at read time.

Pickle-based files (.pt .pth .ckpt .bin) are refused unopened: loading them can run code.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import uuid
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import safetensors
import safetensors.torch
import torch
from torch import Tensor

from .layer import LoraFile, LoraLayer


class LoraFormatError(ValueError):
    """A LoRA file that cannot be read: wrong container, damaged, or unsupported content."""


PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")

# kohya / LyCORIS: "<layer name>.<suffix>", the layer name has no dots
_KOHYA_KEY = re.compile(r"(lora_(?:unet|te|te1|te2)_[^.]+)\.(.+)")
_LOHA_SLOTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
_LOKR_SLOTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
_KOHYA_SLOTS = {
    "lora_down.weight": "down",
    "lora_up.weight": "up",
    "lora_mid.weight": "mid",
    "alpha": "alpha",
    "diff": "diff",
    "dora_scale": "dora_scale",
    **{s: s for s in _LOHA_SLOTS + _LOKR_SLOTS},
}
_PLAIN_LORA_SLOTS = {"down", "up", "alpha", "dora_scale"}  # anything else is LyCORIS-only

# diffusers / PEFT: "<component>.<dotted module path>.<suffix>"
_COMPONENT_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
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


# ----------------------------------------------------------------------------- reading


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
            "supported are kohya/LyCORIS 'lora_unet_*', 'lora_te*_*' and diffusers/PEFT "
            "'unet.*', 'text_encoder.*', 'text_encoder_2.*' keys"
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
        _check_low_rank(path, name, slot_keys, part)
        if dora_scale is not None and "lora_magnitude_vector" in slot_keys["dora_scale"]:
            dora_scale = _peft_magnitude(path, slot_keys["dora_scale"], dora_scale, part["up"].shape[0])
        return LoraLayer(
            name, up=part["up"], down=part["down"], mid=part.get("mid"), alpha=alpha,
            strength=strength, dora_scale=dora_scale,
        )  # fmt: skip
    if kind == "diff":
        dense = part["diff"]
    elif kind == "LoHa":
        dense = _loha_delta(path, name, slot_keys, part, alpha)
    else:
        dense = _lokr_delta(path, name, slot_keys, part, alpha)
    return LoraLayer(name, dense=dense, strength=strength, dora_scale=dora_scale)


def _peft_magnitude(path: str, key: str, magnitude: Tensor, d_out: int) -> Tensor:
    """PEFT's DoRA magnitude as (d_out,): it is per output channel, but a conv stores it
    as (1, d_out, 1, 1), which would read as per input channel."""
    if magnitude.numel() != d_out:
        raise LoraFormatError(
            f"{path}: key '{key}' has shape {tuple(magnitude.shape)} but its layer has {d_out} "
            "output channels; the file is damaged"
        )
    return magnitude.reshape(d_out)


def _alpha(path: str, key: str, t: Tensor) -> float:
    if t.numel() != 1:
        raise LoraFormatError(
            f"{path}: key '{key}' should hold one number (alpha) but has shape {tuple(t.shape)}"
        )
    return float(t.reshape(()).item())


def _check_low_rank(path: str, name: str, keys: dict[str, str], part: dict[str, Tensor]) -> None:
    """up (out, r[, 1, 1]), down (r, in[, kh, kw]); with Tucker mid (r, r, kh, kw)."""
    missing = [s for s in ("up", "down") if s not in part]
    if missing:
        present = next(s for s in ("up", "down", "mid") if s in part)
        raise LoraFormatError(
            f"{path}: key '{keys[present]}' is a LoRA {present} weight but layer '{name}' has no "
            f"{missing[0]} weight; the file is incomplete or damaged"
        )
    up, down, mid = part["up"], part["down"], part.get("mid")

    def shapes(*slots: str) -> str:
        return " and ".join(f"'{keys[s]}' {tuple(part[s].shape)}" for s in slots)

    if up.dim() not in (2, 4) or down.dim() not in (2, 4) or up.shape[2:] not in ((), (1, 1)):
        raise LoraFormatError(
            f"{path}: {shapes('up', 'down')} are not (out, r[, 1, 1]) and (r, in[, kh, kw])"
        )
    if down.shape[0] == 0:
        raise LoraFormatError(f"{path}: key '{keys['down']}' has rank 0; the file is damaged")
    if mid is None:
        if up.shape[1] != down.shape[0]:
            raise LoraFormatError(
                f"{path}: ranks differ between {shapes('up', 'down')}; the file is damaged"
            )
    elif mid.dim() != 4 or (up.shape[1], down.shape[0]) != tuple(mid.shape[:2]):
        raise LoraFormatError(
            f"{path}: Tucker shapes {shapes('up', 'mid', 'down')} do not chain; the file is damaged"
        )


def _require(path: str, name: str, kind: str, part: dict[str, Tensor], slots: tuple[str, ...]) -> None:
    missing = [s for s in slots if s not in part]
    if missing:
        raise LoraFormatError(
            f"{path}: {kind} layer '{name}' lacks key '{name}.{missing[0]}'; the file is incomplete"
        )


@contextlib.contextmanager
def _shape_errors(path: str, name: str, kind: str, keys: dict[str, str], part: dict[str, Tensor]):
    """Turn a shape error while rebuilding a delta into one line naming the layer's keys."""
    try:
        yield
    except RuntimeError as e:
        shapes = ", ".join(f"'{keys[s]}' {tuple(t.shape)}" for s, t in part.items())
        raise LoraFormatError(
            f"{path}: {kind} factors of layer '{name}' have incompatible shapes ({shapes}); "
            "the file is damaged"
        ) from e


def _tucker(core: Tensor, w_out: Tensor, w_in: Tensor) -> Tensor:
    """W = core x_1 w_out^T x_2 w_in^T: W[p, q, h, w] = sum_ij core[i, j, h, w] w_out[i, p] w_in[j, q].

    core (r, r, kh, kw), w_out (r, out), w_in (r, in) -> (out, in, kh, kw).
    """
    return torch.einsum("ijhw,ip,jq->pqhw", core, w_out, w_in)


def _loha_delta(
    path: str, name: str, keys: dict[str, str], part: dict[str, Tensor], alpha: float | None
) -> Tensor:
    """LoHa: dW = (w1a @ w1b) * (w2a @ w2b) * alpha / r, r = w1b.shape[0] (scale 1 without alpha).

    With Tucker cores t1, t2 (r, r, kh, kw), each factor is `_tucker(t, wa, wb)` with
    wa (r, out), wb (r, in). A conv LoHa without Tucker stores w1b as (r, in*kh*kw); its
    kernel size is not in the file, so its delta stays 2-D (out, in*kh*kw), in the order
    of the base weight flattened by ``W.reshape(out, -1)``.
    """
    _require(path, name, "LoHa", part, _LOHA_SLOTS[:4])
    f = {s: t.float() for s, t in part.items() if s.startswith("hada_")}
    if "hada_t1" in f or "hada_t2" in f:
        _require(path, name, "LoHa", part, _LOHA_SLOTS[4:])
    with _shape_errors(path, name, "LoHa", keys, part):
        if "hada_t1" in f:
            w1 = _tucker(f["hada_t1"], f["hada_w1_a"], f["hada_w1_b"])
            w2 = _tucker(f["hada_t2"], f["hada_w2_a"], f["hada_w2_b"])
        else:
            w1 = f["hada_w1_a"] @ f["hada_w1_b"]
            w2 = f["hada_w2_a"] @ f["hada_w2_b"]
        if w1.shape != w2.shape:  # elementwise product would broadcast silently
            raise RuntimeError("Hadamard factors differ in shape")
    rank = f["hada_w1_b"].shape[0]
    return w1 * w2 * (alpha / rank if alpha is not None else 1.0)


def _lokr_delta(
    path: str, name: str, keys: dict[str, str], part: dict[str, Tensor], alpha: float | None
) -> Tensor:
    """LoKr: dW = kron(w1, w2) * scale.

    w1 = lokr_w1 (a, b) or lokr_w1_a @ lokr_w1_b; w2 = lokr_w2 (c, d[, kh, kw]),
    lokr_w2_a @ lokr_w2_b, or with Tucker `_tucker(lokr_t2, lokr_w2_a, lokr_w2_b)`.
    A 4-D w2 makes w1 (a, b, 1, 1), so dW is (a*c, b*d, kh, kw). scale = alpha / dim
    when a factored pair is present (dim = its inner size) and alpha is given, else 1.
    As for LoHa, a factored conv w2 without Tucker gives a 2-D (out, in*kh*kw) delta.
    """
    f = {s: t.float() for s, t in part.items() if s.startswith("lokr_")}
    dim = None
    with _shape_errors(path, name, "LoKr", keys, part):
        if "lokr_w1" in f:
            w1 = f["lokr_w1"]
        else:
            _require(path, name, "LoKr", part, ("lokr_w1_a", "lokr_w1_b"))
            w1, dim = f["lokr_w1_a"] @ f["lokr_w1_b"], f["lokr_w1_b"].shape[0]
        if "lokr_w2" in f:
            w2 = f["lokr_w2"]
        else:
            _require(path, name, "LoKr", part, ("lokr_w2_a", "lokr_w2_b"))
            dim = f["lokr_w2_b"].shape[0]
            if "lokr_t2" in f:
                w2 = _tucker(f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"])
            else:
                w2 = f["lokr_w2_a"] @ f["lokr_w2_b"]
        if w1.dim() != 2:
            raise RuntimeError("w1 must be a matrix")
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        delta = torch.kron(w1.contiguous(), w2.contiguous())  # kron fails on einsum's strides
    return delta * (alpha / dim if alpha is not None and dim is not None else 1.0)


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


# ----------------------------------------------------------------------------- writing

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_KOHYA_NAME = re.compile(r"lora_(?:unet|te|te1|te2)_[^.\s]+")


def write_kohya(
    path: str | os.PathLike,
    layers: dict[str, tuple[Tensor, Tensor, float]],
    metadata: dict[str, str],
    dtype: str = "fp16",
    overwrite: bool = False,
) -> None:
    """Write ``{name: (up, down, alpha)}`` as a kohya LoRA, atomically.

    up (out, r) or (out, r, 1, 1), down (r, in) or (r, in, kh, kw); a 2-D up with a 4-D
    down is written as (out, r, 1, 1). Keys: ``<name>.lora_up.weight``,
    ``<name>.lora_down.weight``, ``<name>.alpha`` (0-dim float32, so alpha / r stays exact).
    """
    path = os.fspath(path)
    if dtype not in _DTYPES:
        raise ValueError(f"{path}: dtype {dtype!r} is not supported; use 'fp16', 'bf16' or 'fp32'")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{path}: the folder {folder} does not exist; create it first")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    if not layers:
        raise ValueError(f"{path}: no layers to write")
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"{path}: metadata '{key}' must map a string to a string, got {value!r}")
    tensors: dict[str, Tensor] = {}
    for name, (up, down, alpha) in layers.items():
        tensors.update(_kohya_tensors(path, name, up, down, alpha, _DTYPES[dtype]))
    _save_atomically(path, tensors, dict(metadata))


def _kohya_tensors(
    path: str, name: str, up: Tensor, down: Tensor, alpha: float, dtype: torch.dtype
) -> dict[str, Tensor]:
    """The three tensors of one kohya layer, checked, contiguous, in ``dtype``."""
    if not _KOHYA_NAME.fullmatch(name):
        raise ValueError(f"{path}: layer name '{name}' is not a kohya name like 'lora_unet_..._to_q'")
    if (
        down.dim() not in (2, 4)
        or up.dim() not in (2, 4)
        or up.shape[2:] not in ((), (1, 1))
        or up.shape[1] != down.shape[0]
    ):
        raise ValueError(
            f"{path}: layer '{name}': up {tuple(up.shape)} and down {tuple(down.shape)} are not "
            "(out, r[, 1, 1]) and (r, in[, kh, kw])"
        )
    up = up.reshape(up.shape[0], up.shape[1], *((1, 1) if down.dim() == 4 else ()))
    alpha = float(alpha)
    if not math.isfinite(alpha):
        raise ValueError(f"{path}: layer '{name}': alpha is {alpha}; refusing to write it")
    out = {}
    for part, t in (("lora_up.weight", up), ("lora_down.weight", down)):
        if not torch.isfinite(t).all():
            raise ValueError(f"{path}: layer '{name}': {part} contains NaN/Inf; refusing to write it")
        # copy=True: views of one storage would make safetensors refuse to save
        t = t.detach().to("cpu", dtype, copy=True).contiguous()
        if not torch.isfinite(t).all():
            raise ValueError(
                f"{path}: layer '{name}': {part} overflows {dtype}; write with dtype 'bf16' or 'fp32'"
            )
        out[f"{name}.{part}"] = t
    out[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return out


def _save_atomically(path: str, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """Save to a unique temporary file beside ``path``, fsync, then rename over it.

    On any failure, KeyboardInterrupt included, the temporary file is removed and an
    existing ``path`` is left as it was.
    """
    folder, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{base}.{uuid.uuid4().hex}.tmp")
    existed = os.path.exists(path)
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as e:
        raise _write_error(path, e, existed) from e
    try:
        safetensors.torch.save_file(tensors, tmp, metadata=metadata)
        # safetensors writes 0600; give the file the permissions a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb+") as f:
            _sort_header_metadata(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError):  # disk full, permissions: one line naming the file
            raise _write_error(path, e, existed) from e
        raise
    if os.name == "posix":  # make the rename itself durable
        with contextlib.suppress(OSError):
            fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _write_error(path: str, e: OSError, existed: bool) -> OSError:
    """The error of a failed save, naming the file and saying that nothing was damaged."""
    kept = "the existing file is unchanged" if existed else "no file was written"
    message = f"{path}: could not write the file ({e.strerror or e}); {kept}"
    return OSError(e.errno, message) if e.errno else OSError(message)


def _sort_header_metadata(f) -> None:
    """Rewrite a safetensors header in place with its metadata sorted by key.

    safetensors writes ``__metadata__`` in hash order, which changes from run to run; sorted,
    the same tensors and metadata always give the same bytes (and so the same file hash).
    """
    f.seek(0)
    size = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(size))
    metadata = header.get("__metadata__")
    if not metadata:
        return
    header["__metadata__"] = dict(sorted(metadata.items()))
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(raw) <= size:  # same content, so same length; pad as safetensors does, with spaces
        f.seek(8)
        f.write(raw.ljust(size, b" "))


def kohya_metadata(
    *,
    base_model_version: str,
    network_dim: int,
    network_alpha: float,
    inputs: list[LoraFile],
    recipe: dict,
    conv: bool = False,
) -> dict[str, str]:
    """kohya ``ss_*`` metadata for a merged LoRA, plus where it came from (all strings).

    ``base_model_version``: e.g. "sd_v1", "sd_v2", "sdxl_base_v1-0". ``conv``: the LoRA
    has conv layers, recorded as conv_dim / conv_alpha in ``ss_network_args``.
    """
    alpha = _number(network_alpha)
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(int(network_dim)),
        "ss_network_alpha": alpha,
        "ss_base_model_version": base_model_version,
        "merged_from": json.dumps(
            [
                {"name": f.name, "sha256": f.sha256, "strength": f.strength, "format": f.format}
                for f in inputs
            ]
        ),
        "iteris_recipe": json.dumps(recipe, sort_keys=True, default=str),
    }
    if conv:  # kohya keeps network args as strings
        metadata["ss_network_args"] = json.dumps({"conv_dim": str(int(network_dim)), "conv_alpha": alpha})
    return metadata


def _number(x: float) -> str:
    """16 -> "16", 0.5 -> "0.5": what kohya writes and both int() and float() readers expect."""
    x = float(x)
    return str(int(x)) if x.is_integer() else repr(x)
