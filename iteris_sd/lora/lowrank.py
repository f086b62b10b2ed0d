"""Factored (low-rank) matrices: balancing, truncation and factoring a dense matrix.

A matrix M (d_out, d_in) is held as U (d_out, R) @ Z (R, d_in). All SVD work is done in
float64 and the factors come back float32 and *balanced*: the rank-1 components
U[:, j] Z[j, :] have ||U[:, j]|| == ||Z[j, :]||, so neither side is tiny or huge when the
result is stored as fp16/bf16.
"""

from __future__ import annotations

import torch
from torch import Tensor


def balance(U: Tensor, Z: Tensor) -> tuple[Tensor, Tensor]:
    """Rescale each component so ||U[:, j]|| == ||Z[j, :]||, leaving U @ Z unchanged.

    U: (d_out, R), Z: (R, d_in). Component j becomes (c_j U[:, j], Z[j, :] / c_j) with
    c_j = sqrt(||Z[j, :]|| / ||U[:, j]||). A component whose product is zero (either side
    zero) comes back as zeros on both sides. Returns tensors of the input dtype.
    """
    _check_pair(U, Z)
    u, z = U.double(), Z.double()
    nu, nz = u.norm(dim=0), z.norm(dim=1)
    live = (nu > 0) & (nz > 0)
    c = torch.where(live, (nz / torch.where(live, nu, 1.0)).sqrt(), 0.0)  # (R,)
    inv = torch.where(live, 1.0 / torch.where(live, c, 1.0), 0.0)
    return (u * c).to(U.dtype), (z * inv[:, None]).to(Z.dtype)


def truncate(U: Tensor, Z: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """Best rank-``rank`` approximation (Frobenius) of U @ Z, without forming it.

    U: (d_out, R), Z: (R, d_in). With U = Qu Ru and Z^T = Qz Rz (thin QR), U @ Z =
    Qu (Ru Rz^T) Qz^T, so the SVD of the small core Ru Rz^T = P S Q^T gives
    U @ Z = (Qu P) S (Qz Q)^T. Keeps the top k = min(rank, ...) singular values, dropping
    numerically zero ones (at least one component is always returned), and returns
    float32 factors (Qu P_k sqrt(S_k), sqrt(S_k) (Qz Q_k)^T) with the retained energy
    sum(s_k^2) / sum(s^2) (1.0 for a zero matrix).

    If rank >= R nothing needs cutting: the inputs come back balanced, with zero
    components removed, and energy 1.0.
    """
    _check_rank(rank)
    _check_pair(U, Z)
    if rank >= U.shape[1]:
        u, z = balance(U.float(), Z.float())
        live = u.norm(dim=0) > 0
        if not bool(live.any()):
            return u.new_zeros(u.shape[0], 1), z.new_zeros(1, z.shape[1]), 1.0
        return u[:, live], z[live], 1.0
    Qu, Ru = torch.linalg.qr(U.double())  # (d_out, m1), (m1, R)
    Qz, Rz = torch.linalg.qr(Z.double().T)  # (d_in, m2), (m2, R)
    P, S, Qh = torch.linalg.svd(Ru @ Rz.T, full_matrices=False)
    return _from_svd(Qu @ P, S, Qh @ Qz.T, rank)


def dense_to_factors(delta: Tensor, rank: int | None) -> tuple[Tensor, Tensor, float]:
    """Factor a dense (d_out, d_in) matrix by SVD: delta ~= U (d_out, k) @ Z (k, d_in).

    delta = P S Q^T; keeps the top k singular values, k = ``rank`` (None: exact, every
    s > 1e-6 * max(s), at least one). Returns balanced float32 factors
    (P_k sqrt(S_k), sqrt(S_k) Q_k^T) and the retained energy sum(s_k^2) / sum(s^2).
    """
    if delta.dim() != 2:
        raise ValueError(f"delta must be 2-D (d_out, d_in), got shape {tuple(delta.shape)}")
    if rank is not None:
        _check_rank(rank)
    P, S, Qh = torch.linalg.svd(delta.double(), full_matrices=False)
    if rank is None:
        top = S.max() if S.numel() else S.new_zeros(())
        rank = max(int((S > 1e-6 * top).sum()), 1)
    return _from_svd(P, S, Qh, rank)


def _from_svd(P: Tensor, S: Tensor, Qh: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """Top-``rank`` balanced factors of P diag(S) Qh (S descending) and the energy kept.

    Singular values at round-off level (<= max(shape) * eps64 * s_max) are dropped too;
    at least one component (possibly zero) is kept.
    """
    d_out, d_in = P.shape[0], Qh.shape[1]
    if S.numel() == 0:
        return P.new_zeros(d_out, 1).float(), Qh.new_zeros(1, d_in).float(), 1.0
    total = float((S * S).sum())
    tol = max(d_out, d_in) * torch.finfo(torch.float64).eps * float(S[0])
    k = max(1, min(rank, int((S > tol).sum())))
    root = S[:k].sqrt()
    energy = float((S[:k] ** 2).sum()) / total if total > 0 else 1.0
    return (P[:, :k] * root).float(), (root[:, None] * Qh[:k]).float(), min(energy, 1.0)


def _check_rank(rank: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")


def _check_pair(U: Tensor, Z: Tensor) -> None:
    if U.dim() != 2 or Z.dim() != 2 or U.shape[1] != Z.shape[0]:
        raise ValueError(
            f"factors must be U (d_out, R) and Z (R, d_in), got {tuple(U.shape)} and {tuple(Z.shape)}"
        )
