"""Write merged LoRAs as kohya safetensors files, atomically and byte-reproducibly.

Per layer: ``<name>.lora_up.weight`` (out, r[, 1, 1]), ``<name>.lora_down.weight``
(r, in[, kh, kw]) and ``<name>.alpha``, so that dW = up @ down * alpha / r.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import uuid

import safetensors.torch
import torch
from torch import Tensor

from .layer import LoraFile

TENSOR_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}  # what write_kohya writes
DTYPES = tuple(TENSOR_DTYPES)
DEFAULT_DTYPE = "fp16"
_KOHYA_NAME = re.compile(r"lora_(?:unet|transformer|te|te1|te2|te3)_[^.\s]+")


def write_kohya(
    path: str | os.PathLike,
    layers: dict[str, tuple[Tensor, Tensor, float]],
    metadata: dict[str, str],
    dtype: str = DEFAULT_DTYPE,
    overwrite: bool = False,
) -> None:
    """Write ``{name: (up, down, alpha)}`` as a kohya LoRA, atomically.

    up (out, r) or (out, r, 1, 1), down (r, in) or (r, in, kh, kw); a 2-D up with a 4-D
    down is written as (out, r, 1, 1). Keys: ``<name>.lora_up.weight``,
    ``<name>.lora_down.weight``, ``<name>.alpha`` (0-dim float32, so alpha / r stays exact).
    """
    path = os.fspath(path)
    if dtype not in TENSOR_DTYPES:
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
        tensors.update(_kohya_tensors(path, name, up, down, alpha, TENSOR_DTYPES[dtype]))
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
