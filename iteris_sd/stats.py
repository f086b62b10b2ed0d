"""Streamed per-layer statistics: the only thing the solver needs from a calibration run.

For one layer and one concept i, with X (n, d_in) the layer's inputs in the model carrying
LoRA i alone and X~ (n, d_in) the inputs of the merged model on the same data, row for row:

    gram   = X^T X      (d_in, d_in)   used by the adaptive weights and the residuals
    cross  = X^T X~     (d_in, d_in)
    gram_merged = X~^T X~

They are sums over prompts, timesteps and tokens, accumulated as the passes run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class ConvGeometry:
    """What is needed to unfold a Conv2d's input into patches (rows of d_in = C_in*kh*kw)."""

    kernel_size: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)


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


@dataclass
class ConceptStats:
    """The Gram statistics of one layer for one concept (see the module docstring).

    ``cross`` and ``gram_merged`` are None until the merged model has been captured: the
    first solve uses X~ = X, so both equal ``gram`` then.
    """

    gram: Tensor
    cross: Tensor | None = None
    gram_merged: Tensor | None = None
    rows: int = 0

    @classmethod
    def zeros(cls, d_in: int, dtype=torch.float32, device="cpu") -> "ConceptStats":
        return cls(torch.zeros(d_in, d_in, dtype=dtype, device=device))

    def add_reference(self, X: Tensor) -> None:
        """gram += X^T X for a batch of rows X (n, d_in) of the LoRA-i model."""
        X = X.to(self.gram.dtype)
        self.gram.addmm_(X.T, X)
        self.rows += X.shape[0]

    def add_pair(self, X: Tensor, X_merged: Tensor) -> None:
        """cross += X^T X~, gram_merged += X~^T X~ for rows paired one to one."""
        if self.cross is None:
            self.cross = torch.zeros_like(self.gram)
            self.gram_merged = torch.zeros_like(self.gram)
        X, Xm = X.to(self.gram.dtype), X_merged.to(self.gram.dtype)
        self.cross.addmm_(X.T, Xm)
        self.gram_merged.addmm_(Xm.T, Xm)

    def reset_merged(self) -> None:
        """Forget the merged-model statistics before the next capture of X~."""
        self.cross = None
        self.gram_merged = None

    def solve_inputs(self) -> tuple[Tensor, Tensor, Tensor]:
        """(G, C, H) in float64, with C = H = G before the merged model was captured."""
        G = self.gram.double()
        if self.cross is None:
            return G, G, G
        return G, self.cross.double(), self.gram_merged.double()
