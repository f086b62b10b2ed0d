"""LoKr (LyCORIS Kronecker product), rebuilt to its exact dense delta.

    dW = kron(w1, w2) * scale,  w1 (a, b), w2 (c, d[, kh, kw]) -> (a*c, b*d[, kh, kw])
"""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import require, shape_errors
from .locon import tucker

LOKR_SLOTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def lokr_delta(
    path: str, name: str, keys: dict[str, str], part: dict[str, Tensor], alpha: float | None
) -> Tensor:
    """LoKr: dW = kron(w1, w2) * scale.

    w1 = lokr_w1 (a, b) or lokr_w1_a @ lokr_w1_b; w2 = lokr_w2 (c, d[, kh, kw]),
    lokr_w2_a @ lokr_w2_b, or with Tucker `tucker(lokr_t2, lokr_w2_a, lokr_w2_b)`.
    A 4-D w2 makes w1 (a, b, 1, 1), so dW is (a*c, b*d, kh, kw). scale = alpha / dim
    when a factored pair is present (dim = its inner size) and alpha is given, else 1.
    As for LoHa, a factored conv w2 without Tucker gives a 2-D (out, in*kh*kw) delta.
    """
    f = {s: t.float() for s, t in part.items() if s.startswith("lokr_")}
    dim = None
    with shape_errors(path, name, "LoKr", keys, part):
        if "lokr_w1" in f:
            w1 = f["lokr_w1"]
        else:
            require(path, name, "LoKr", part, ("lokr_w1_a", "lokr_w1_b"))
            w1, dim = f["lokr_w1_a"] @ f["lokr_w1_b"], f["lokr_w1_b"].shape[0]
        if "lokr_w2" in f:
            w2 = f["lokr_w2"]
        else:
            require(path, name, "LoKr", part, ("lokr_w2_a", "lokr_w2_b"))
            dim = f["lokr_w2_b"].shape[0]
            if "lokr_t2" in f:
                w2 = tucker(f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"])
            else:
                w2 = f["lokr_w2_a"] @ f["lokr_w2_b"]
        if w1.dim() != 2:
            raise RuntimeError("w1 must be a matrix")
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        delta = torch.kron(w1.contiguous(), w2.contiguous())  # kron fails on einsum's strides
    return delta * (alpha / dim if alpha is not None and dim is not None else 1.0)
