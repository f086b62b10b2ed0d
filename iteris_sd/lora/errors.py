"""The error of an unreadable LoRA file, and the checks the adapter rebuilds share.

Every message is one line that names the file, the layer and, where it helps, its keys.
"""

from __future__ import annotations

import contextlib

from torch import Tensor


class LoraFormatError(ValueError):
    """A LoRA file that cannot be read: wrong container, damaged, or unsupported content."""


def require(path: str, name: str, kind: str, part: dict[str, Tensor], slots: tuple[str, ...]) -> None:
    missing = [s for s in slots if s not in part]
    if missing:
        raise LoraFormatError(
            f"{path}: {kind} layer '{name}' lacks key '{name}.{missing[0]}'; the file is incomplete"
        )


@contextlib.contextmanager
def shape_errors(path: str, name: str, kind: str, keys: dict[str, str], part: dict[str, Tensor]):
    """Turn a shape error while rebuilding a delta into one line naming the layer's keys."""
    try:
        yield
    except RuntimeError as e:
        shapes = ", ".join(f"'{keys[s]}' {tuple(t.shape)}" for s, t in part.items())
        raise LoraFormatError(
            f"{path}: {kind} factors of layer '{name}' have incompatible shapes ({shapes}); "
            "the file is damaged"
        ) from e
