"""The canonical in-memory form of a LoRA: one `LoraLayer` per targeted layer.

Every file format is read into this form (`read.read_lora`), and every merge method
works on the flattened factors it yields:

    dW = B @ A,   B: (d_out, r),  A: (r, d_in)

where d_in = C_in * kh * kw for a conv layer (its input unfolded into patches) and the
scale (strength * alpha / r) is already folded into A.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from .dora import dora_delta
from .lowrank import dense_to_factors


@dataclass(frozen=True)
class LoraLayer:
    """One layer of a LoRA file, as stored, before any merging.

    Exactly one representation is set:
    - low rank: ``up`` (d_out, r[, 1, 1]), ``down`` (r, d_in) or (r, C_in, kh, kw), optional
      Tucker core ``mid`` (r, r, kh, kw) (then ``down`` is (r, C_in, 1, 1));
    - dense: ``dense`` shaped like the base weight (LyCORIS ``.diff``, LoHa and LoKr are
      rebuilt to this exactly at read time).
    ``dora_scale`` marks a DoRA layer, whose delta depends on the base weight.
    """

    name: str  # normalised kohya-style layer name, e.g. "lora_unet_down_blocks_0_..._to_q"
    up: Tensor | None = None
    down: Tensor | None = None
    mid: Tensor | None = None
    dense: Tensor | None = None
    alpha: float | None = None  # None: scale 1.0 (kohya and ComfyUI semantics)
    strength: float = 1.0
    dora_scale: Tensor | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0]) if self.down is not None else 0

    @property
    def scale(self) -> float:
        """strength * alpha / r, with a missing alpha meaning alpha = r (scale 1)."""
        if self.dense is not None or self.alpha is None:
            return float(self.strength)
        return float(self.strength) * float(self.alpha) / self.rank

    def dense_delta(self, base_weight: Tensor | None = None) -> Tensor:
        """The exact weight change, shaped like the base weight (float32).

        ``base_weight`` is needed only for DoRA, whose delta is
        m * (W0 + dW) / ||W0 + dW|| - W0, scaled by strength.
        """
        # DoRA applies strength to the final difference, so build its inner delta at strength 1
        inner = replace(self, strength=1.0) if self.dora_scale is not None else self
        if inner.dense is not None:
            delta = inner.dense.float() * inner.strength
        else:
            B, A = _lowrank_factors(inner)
            delta = (B @ A).reshape(B.shape[0], *_down_in_shape(inner))
        if self.dora_scale is None:
            return delta
        if base_weight is None:
            raise ValueError(f"{self.name}: a DoRA layer needs the base weight to build its delta")
        return dora_delta(base_weight.float(), delta, self.dora_scale.float(), self.strength)

    def factors(self, base_weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Flattened factors (B (d_out, r), A (r, d_in)) with B @ A = dense_delta, float32.

        A dense or DoRA delta is factored exactly by SVD (round-off singular values dropped).
        """
        if self.dense is None and self.dora_scale is None:
            return _lowrank_factors(self)
        d = self.dense_delta(base_weight)
        U, Z, _ = dense_to_factors(d.reshape(d.shape[0], -1), None)
        return U, Z


def _down_in_shape(layer: LoraLayer) -> tuple[int, ...]:
    """The base weight's shape after d_out: (d_in,) or (C_in, kh, kw)."""
    if layer.mid is not None:
        return (layer.down.shape[1], *layer.mid.shape[2:])
    return tuple(layer.down.shape[1:])


def _lowrank_factors(layer: LoraLayer) -> tuple[Tensor, Tensor]:
    B = layer.up.float().reshape(layer.up.shape[0], -1)
    r = layer.down.shape[0]
    if layer.mid is None:
        A = layer.down.float().reshape(r, -1)
    else:
        # Tucker: dW[o, i, h, w] = sum_ab up[o, a] mid[a, b, h, w] down[b, i]
        down = layer.down.float().reshape(r, -1)  # (r, C_in)
        A = torch.einsum("abhw,bi->aihw", layer.mid.float(), down).reshape(layer.mid.shape[0], -1)
    return B, A * layer.scale


@dataclass
class LoraFile:
    """A LoRA file read into canonical layers, with what identifies it in merge metadata."""

    path: str
    name: str
    sha256: str
    layers: dict[str, LoraLayer]
    strength: float = 1.0
    metadata: dict[str, str] = field(default_factory=dict)
    format: str = "kohya"  # what the reader recognised: kohya, peft, diffusers, lycoris-*
