"""LoHa (LyCORIS Hadamard product), rebuilt to its exact dense delta.

    dW = (w1a @ w1b) * (w2a @ w2b) * alpha / r,  w1a, w2a (out, r), w1b, w2b (r, in)
"""

from __future__ import annotations

from torch import Tensor

from .errors import require, shape_errors
from .locon import tucker

LOHA_SLOTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")


def loha_delta(
    path: str, name: str, keys: dict[str, str], part: dict[str, Tensor], alpha: float | None
) -> Tensor:
    """LoHa: dW = (w1a @ w1b) * (w2a @ w2b) * alpha / r, r = w1b.shape[0] (scale 1 without alpha).

    With Tucker cores t1, t2 (r, r, kh, kw), each factor is `tucker(t, wa, wb)` with
    wa (r, out), wb (r, in). A conv LoHa without Tucker stores w1b as (r, in*kh*kw); its
    kernel size is not in the file, so its delta stays 2-D (out, in*kh*kw), in the order
    of the base weight flattened by ``W.reshape(out, -1)``.
    """
    require(path, name, "LoHa", part, LOHA_SLOTS[:4])
    f = {s: t.float() for s, t in part.items() if s.startswith("hada_")}
    if "hada_t1" in f or "hada_t2" in f:
        require(path, name, "LoHa", part, LOHA_SLOTS[4:])
    with shape_errors(path, name, "LoHa", keys, part):
        if "hada_t1" in f:
            w1 = tucker(f["hada_t1"], f["hada_w1_a"], f["hada_w1_b"])
            w2 = tucker(f["hada_t2"], f["hada_w2_a"], f["hada_w2_b"])
        else:
            w1 = f["hada_w1_a"] @ f["hada_w1_b"]
            w2 = f["hada_w2_a"] @ f["hada_w2_b"]
        if w1.shape != w2.shape:  # elementwise product would broadcast silently
            raise RuntimeError("Hadamard factors differ in shape")
    rank = f["hada_w1_b"].shape[0]
    return w1 * w2 * (alpha / rank if alpha is not None else 1.0)
