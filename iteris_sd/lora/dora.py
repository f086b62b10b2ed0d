"""DoRA: a LoRA delta renormalised per channel by a learned magnitude m.

    W' = m * (W0 + dW) / ||W0 + dW||,  delta = strength * (W' - W0)

m is per output channel (d_out,) or per input channel (1, d_in); the norm runs along its axis.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import LoraFormatError


def dora_delta(W0: Tensor, dW: Tensor, magnitude: Tensor, strength: float) -> Tensor:
    """DoRA: W' = magnitude * (W0 + dW) / ||W0 + dW||, norm along the axis magnitude spans."""
    W = W0 + dW
    flat = W.reshape(W.shape[0], -1)
    if magnitude.shape[0] == W.shape[0] and magnitude.numel() == W.shape[0]:
        norm = flat.norm(dim=1).reshape(W.shape[0], *[1] * (W.dim() - 1))
    else:  # per input channel, as PEFT stores it for linear layers: shape (1, d_in)
        norm = W.transpose(0, 1).reshape(W.shape[1], -1).norm(dim=1)
        norm = norm.reshape(W.shape[1], *[1] * (W.dim() - 1)).transpose(0, 1)
    W_dora = W * (magnitude.reshape(norm.shape) / (norm + torch.finfo(W.dtype).eps))
    return strength * (W_dora - W0)


def peft_magnitude(path: str, key: str, magnitude: Tensor, d_out: int) -> Tensor:
    """PEFT's DoRA magnitude as (d_out,): it is per output channel, but a conv stores it
    as (1, d_out, 1, 1), which would read as per input channel."""
    if magnitude.numel() != d_out:
        raise LoraFormatError(
            f"{path}: key '{key}' has shape {tuple(magnitude.shape)} but its layer has {d_out} "
            "output channels; the file is damaged"
        )
    return magnitude.reshape(d_out)
