"""Weight-only merges of N LoRAs at one layer (no data needed).

Each LoRA i gives ``factors[i] = (B_i, A_i)`` with B_i (d_out, r_i), A_i (r_i, d_in) and
dW_i = B_i @ A_i, or None when it does not touch the layer (dW_i = 0). Every method works
on the weight changes dW_i (never on B and A separately, which would create cross terms
B_1 A_2) and returns a `LayerMerge`: U (d_out, R) @ Z (R, d_in) = merged delta.

- stack, linear, concat: exact, rank sum(r_i), energy 1.0.
- svd: weighted sum, truncated SVD to ``rank``.
- ties, dare: built on the dense tau_i = w_i dW_i, then SVD to ``rank``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..lora.lowrank import _check_rank, dense_to_factors, truncate
from ..seeds import fold_seed

Factors = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class LayerMerge:
    """A merged layer delta in factored form: delta = U @ Z.

    U: (d_out, R), Z: (R, d_in), float32. ``energy`` is the fraction of the squared
    Frobenius norm kept by an SVD truncation, sum(kept s^2) / sum(s^2); 1.0 when exact.
    """

    U: Tensor
    Z: Tensor
    energy: float = 1.0

    @property
    def rank(self) -> int:
        return int(self.U.shape[1])

    def delta(self) -> Tensor:
        """The dense merged delta U @ Z, (d_out, d_in)."""
        return self.U @ self.Z


def stack(factors: list[Factors | None]) -> LayerMerge:
    """Sum of the deltas, as chaining LoRA loaders applies them: sum_i B_i A_i.

    U = [B_1 ... B_N] (d_out, sum r_i), Z = [A_1; ...; A_N] (sum r_i, d_in) over the
    present entries. Exact.
    """
    _check_factors(factors)
    present = [f for f in factors if f is not None]
    U = torch.cat([B.float() for B, _ in present], dim=1)
    Z = torch.cat([A.float() for _, A in present], dim=0)
    return LayerMerge(U, Z)


def linear(factors: list[Factors | None], weights: Sequence[float] | None = None) -> LayerMerge:
    """Weighted average sum_i w_i B_i A_i, exact at rank sum r_i.

    Default w_i = 1/N for every LoRA, N = len(factors) (absent LoRAs count as zero
    deltas). Same as ``concat(factors, ratios=weights)`` apart from the default.
    """
    _check_factors(factors)
    if weights is None:
        weights = [1.0 / len(factors)] * len(factors)
    return _weighted_lowrank(factors, _check_weights(weights, len(factors), "weights"))


def concat(factors: list[Factors | None], ratios: Sequence[float] | None = None) -> LayerMerge:
    """kohya's "concat" merge: sum_i ratio_i B_i A_i written as one exact LoRA of rank sum r_i.

    Each LoRA keeps its own rank-r_i block, scaled by sqrt(|ratio_i|) on both sides (sign
    on U). Default ratios 1: the result then equals `stack`.
    """
    _check_factors(factors)
    if ratios is None:
        ratios = [1.0] * len(factors)
    return _weighted_lowrank(factors, _check_weights(ratios, len(factors), "ratios"))


def svd(factors: list[Factors | None], rank: int, weights: Sequence[float] | None = None) -> LayerMerge:
    """Truncated SVD of the weighted sum: best rank-``rank`` approximation of sum_i w_i dW_i.

    Default w_i = 1 (a plain sum, as kohya's svd_merge_lora). Computed on the factors
    (QR + small SVD), equal to the SVD of the dense sum.
    """
    _check_rank(rank)
    _check_factors(factors)
    w = _check_weights([1.0] * len(factors) if weights is None else weights, len(factors), "weights")
    merged = _weighted_lowrank(factors, w)
    U, Z, energy = truncate(merged.U, merged.Z, rank)
    return LayerMerge(U, Z, energy)


def ties(
    factors: list[Factors | None],
    rank: int,
    density: float = 0.5,
    weights: Sequence[float] | None = None,
) -> LayerMerge:
    """TIES-merging of tau_i = w_i dW_i (default w_i = 1), then SVD to ``rank``.

    1. trim: keep the k = ceil(density * numel) largest-magnitude entries of each tau_i
       (ties broken by flat index, lowest first), zero the rest;
    2. elect: gamma = sign(sum_i trimmed_i), per entry;
    3. disjoint mean: average of the trimmed entries that are nonzero and have sign
       gamma (0 where none does, including where the sum is exactly 0).
    """
    _check_rank(rank)
    _check_density(density)
    taus = _dense_taus(factors, weights)
    trimmed = torch.stack([_trim(t, density) for t in taus])  # (n, d_out, d_in)
    elected = torch.sign(trimmed.sum(dim=0))
    agree = (trimmed != 0) & (torch.sign(trimmed) == elected)
    total = (trimmed * agree).sum(dim=0)
    count = agree.sum(dim=0).clamp(min=1)
    U, Z, energy = dense_to_factors(total / count, rank)
    return LayerMerge(U, Z, energy)


def dare(
    factors: list[Factors | None],
    rank: int,
    density: float = 0.5,
    weights: Sequence[float] | None = None,
    seed: int = 0,
) -> LayerMerge:
    """DARE (drop and rescale) of tau_i = w_i dW_i (default w_i = 1), then SVD to ``rank``.

    merged = sum_i (m_i * tau_i) / density with m_i ~ Bernoulli(density) per entry, drawn
    from one CPU torch.Generator seeded with ``seed`` for the present LoRAs in order (so
    independent per LoRA, reproducible, device independent). E[merged] = sum_i tau_i.
    The same seed gives the same masks for every layer of the same shape: derive a
    per-layer seed if that matters.
    """
    _check_rank(rank)
    _check_density(density)
    taus = _dense_taus(factors, weights)
    gen = torch.Generator(device="cpu").manual_seed(fold_seed(seed))
    merged = torch.zeros_like(taus[0])
    for tau in taus:
        keep = torch.rand(tau.shape, generator=gen) < density
        merged += tau * keep.to(tau.device) / density
    U, Z, energy = dense_to_factors(merged, rank)
    return LayerMerge(U, Z, energy)


def _weighted_lowrank(factors: list[Factors | None], weights: list[float]) -> LayerMerge:
    """Exact factors of sum_i w_i B_i A_i: blocks (sign(w) sqrt|w| B_i, sqrt|w| A_i).

    Entries with w_i == 0 are dropped; if nothing is left, one zero component.
    """
    Us, Zs = [], []
    for f, w in zip(factors, weights):
        if f is None or w == 0:
            continue
        root = math.sqrt(abs(w))
        Us.append(f[0].float() * math.copysign(root, w))
        Zs.append(f[1].float() * root)
    if not Us:
        d_out, d_in = _check_factors(factors)
        B = next(f[0] for f in factors if f is not None)
        return LayerMerge(B.new_zeros(d_out, 1).float(), B.new_zeros(1, d_in).float())
    return LayerMerge(torch.cat(Us, dim=1), torch.cat(Zs, dim=0))


def _dense_taus(factors: list[Factors | None], weights: Sequence[float] | None) -> list[Tensor]:
    """tau_i = w_i B_i A_i (d_out, d_in), float32, for the present entries in order."""
    _check_factors(factors)
    w = _check_weights([1.0] * len(factors) if weights is None else weights, len(factors), "weights")
    return [wi * (f[0].float() @ f[1].float()) for f, wi in zip(factors, w) if f is not None]


def _trim(tau: Tensor, density: float) -> Tensor:
    """Keep the k = ceil(density * numel) largest |entries|, ties to the lowest flat index."""
    flat = tau.flatten()
    # round first so that e.g. 0.7 * 10 = 7.000000000000001 keeps 7 entries, not 8
    k = min(flat.numel(), math.ceil(round(density * flat.numel(), 6)))
    order = torch.sort(flat.abs(), descending=True, stable=True).indices[:k]
    out = torch.zeros_like(flat)
    out[order] = flat[order]
    return out.reshape(tau.shape)


def _check_factors(factors: list[Factors | None]) -> tuple[int, int]:
    """Validate the entries; returns the common (d_out, d_in)."""
    if not factors or all(f is None for f in factors):
        raise ValueError(f"need at least one LoRA with factors at this layer, got {factors!r}")
    shape: tuple[int, int] | None = None
    for i, f in enumerate(factors):
        if f is None:
            continue
        B, A = f
        if B.dim() != 2 or A.dim() != 2 or B.shape[1] != A.shape[0]:
            raise ValueError(
                f"LoRA {i}: factors must be B (d_out, r) and A (r, d_in), "
                f"got {tuple(B.shape)} and {tuple(A.shape)}"
            )
        this = (int(B.shape[0]), int(A.shape[1]))
        if shape is None:
            shape = this
        elif this != shape:
            raise ValueError(f"LoRA {i}: delta shape {this} does not match {shape} of the earlier LoRAs")
    return shape


def _check_weights(weights: Sequence[float], n: int, name: str) -> list[float]:
    if len(weights) != n:
        raise ValueError(f"{name} must have one entry per LoRA ({n}), got {len(weights)}: {list(weights)!r}")
    out = [float(w) for w in weights]
    if not all(math.isfinite(w) for w in out):
        raise ValueError(f"{name} must be finite, got {out!r}")
    return out


def _check_density(density: float) -> None:
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density!r}")
