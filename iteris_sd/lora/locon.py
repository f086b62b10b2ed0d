"""LoRA / LoCon: the low-rank layout's shape check, and the Tucker core of LoCon conv layers.

    dW = up @ down * alpha / r,  up (out, r[, 1, 1]), down (r, in[, kh, kw])
    Tucker: W[p, q, h, w] = sum_ij core[i, j, h, w] w_out[i, p] w_in[j, q]
"""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import LoraFormatError


def check_low_rank(path: str, name: str, keys: dict[str, str], part: dict[str, Tensor]) -> None:
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


def tucker(core: Tensor, w_out: Tensor, w_in: Tensor) -> Tensor:
    """W = core x_1 w_out^T x_2 w_in^T: W[p, q, h, w] = sum_ij core[i, j, h, w] w_out[i, p] w_in[j, q].

    core (r, r, kh, kw), w_out (r, out), w_in (r, in) -> (out, in, kh, kw).
    """
    return torch.einsum("ijhw,ip,jq->pqhw", core, w_out, w_in)
