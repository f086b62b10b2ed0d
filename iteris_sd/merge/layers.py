"""A targeted layer as the merge sees it: its input as rows, and a low-rank delta's output.

Linear layers take rows of d_in features; a Conv2d's input is unfolded into patches so the
same least-squares algebra applies (d_in = C_in * kh * kw).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

Factors = tuple[Tensor, Tensor]  # (U (d_out, R), Z (R, d_in)): the weight change U @ Z


@dataclass(frozen=True)
class ConvGeometry:
    """What is needed to unfold a Conv2d's input into patches (rows of d_in = C_in*kh*kw)."""

    kernel_size: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)

    @classmethod
    def of(cls, module: nn.Module, name: str = "") -> ConvGeometry | None:
        """A Conv2d's geometry; None for a linear layer. Any other convolution (Conv1d, Conv3d,
        a grouped Conv2d) is a ValueError naming ``name``: its input does not unfold this way."""
        if isinstance(module, nn.Conv2d) and module.groups == 1:
            return cls(tuple(module.kernel_size), tuple(module.stride), tuple(module.padding), tuple(module.dilation))
        if isinstance(module, nn.modules.conv._ConvNd):
            groups = f" with groups={module.groups}" if module.groups > 1 else ""
            raise ValueError(f"layer {name or type(module).__name__} is a {type(module).__name__}{groups}: the merge "
                             "handles Linear and ungrouped Conv2d layers; remove this layer's keys from the LoRA")
        return None


def layer_rows(x: Tensor, conv: ConvGeometry | None) -> Tensor:
    """A layer's input as a matrix of rows (n, d_in).

    Linear: (..., d_in) -> (n, d_in). Conv2d: (b, C, H, W) -> the unfolded patches
    (b * L, C * kh * kw), in the order of `weight.reshape(d_out, -1)`, so that
    conv(x, W) == rows @ W.reshape(d_out, -1).T for each output position.
    """
    if conv is None:
        return x.reshape(-1, x.shape[-1])
    if conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding == (0, 0):
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    patches = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])



def apply_delta(factors: Factors, x: Tensor, conv: ConvGeometry | None) -> Tensor:
    """The low-rank delta's output for the layer input x, in x's dtype: x Z^T U^T, or for a
    conv (``conv`` its geometry) a conv with Z's kernel, then U as a 1x1 conv. Factors are
    flat, U (d_out, R) and Z (R, d_in)."""
    U, Z = (f.to(device=x.device, dtype=x.dtype) for f in factors)  # no-op once prepared
    if conv is None:
        return F.linear(F.linear(x, Z), U)
    Z = Z.reshape(Z.shape[0], x.shape[1], *conv.kernel_size)
    return F.conv2d(F.conv2d(x, Z, None, conv.stride, conv.padding, conv.dilation), U[:, :, None, None])
