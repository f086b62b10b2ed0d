"""The IterIS closed-form solve of one layer, its adaptive weights and residuals.

Notation (docs/method.md): for concept i at one layer,
dW_i = B_i A_i (d_out x d_in, scale folded into A_i), G_i = X_i^T X_i,
C_i = X_i^T X~_i, H_i = X~_i^T X~_i. The solve minimises

    sum_i c_i || X~_i W^T - X_i dW_i^T ||_F^2   (+ Frobenius-scaled ridge)

with the closed form (the paper's ridge, ``ridge_target="average"``)

    W* = [sum_i c_i dW_i (C_i + a ||C_i||_F I)] [sum_i c_i (H_i + a ||H_i||_F I)]^-1,

which pulls W toward each dW_i: along input directions the calibration never reaches, W*
is the c-weighted average of the deltas, each LoRA at about 1/N strength. With
``ridge_target="sum"`` the ridge a L ||W - sum_j dW_j||^2, L = sum_i c_i ||H_i||_F, pulls
toward the sum instead (there, every LoRA at full strength, as when stacked):

    W* = [sum_i c_i dW_i C_i + a L sum_j dW_j] [sum_i c_i H_i + a L I]^-1.

Because W* = sum_i B_i Z_i, it is returned as Z = [Z_1; ...; Z_N] (R x d_in, R = sum r_i)
beside the fixed U = [B_1 ... B_N]: an exact LoRA of rank sum r_i.
All arithmetic is float64.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from .stats import Stats

Factors = tuple[Tensor, Tensor]

# Above this condition number estimate a Cholesky solve is not trusted.
MAX_CONDITION = 1e12
RIDGE_TARGETS = ("average", "sum")


class IllConditionedWarning(UserWarning):
    """A layer's system was singular or badly conditioned; a pseudo-inverse was used."""


@dataclass(frozen=True)
class LayerProblem:
    """Everything one layer's solve needs. ``factors[i]`` is None where LoRA i does not
    touch the layer (its delta is zero there: that concept asks for the base behaviour)."""

    name: str
    base_weight: Tensor  # W0 flattened, (d_out, d_in)
    factors: list[Factors | None]
    stats: list[Stats]

    @property
    def up(self) -> Tensor:
        """U = [B_1 ... B_N] over the LoRAs present, (d_out, R)."""
        return torch.cat([f[0] for f in self.factors if f is not None], dim=1)

    def stacked_down(self) -> Tensor:
        """[A_1; ...; A_N] over the LoRAs present, (R, d_in): U @ this = sum_i dW_i."""
        return torch.cat([f[1] for f in self.factors if f is not None], dim=0)


def adaptive_weights(problem: LayerProblem) -> list[float]:
    """c_i = ||W0 + dW_i||_F^2 / ||X_i (W0 + dW_i)^T||_F^2, the latter as tr(M G_i M^T).

    A concept whose inputs never reached the layer (G_i = 0) gets weight 0.
    """
    W0 = problem.base_weight.double()
    weights = []
    for f, st in zip(problem.factors, problem.stats):
        M = W0 if f is None else W0 + f[0].double() @ f[1].double()
        energy = st.energy(M)
        weights.append(float((M * M).sum()) / energy if energy > 0 else 0.0)
    return weights


def solve_device(problem: LayerProblem, device=None) -> torch.device:
    """Where a layer is solved: ``device`` if given, else where its statistics are (float64
    is not available on mps, so there the CPU)."""
    if device is None:
        device = next((st.device for st in problem.stats if st.has_reference), torch.device("cpu"))
    device = torch.device(device)
    return torch.device("cpu") if device.type == "mps" else device


def choose_form(problem: LayerProblem, reg: float) -> str:
    """"dual" when every concept's statistics are token samples, the ridge is positive and
    the k x k system is cheaper than the d_in x d_in one; else "primal"."""
    if reg <= 0 or not problem.stats or any(st.form != "sample" for st in problem.stats):
        return "primal"
    K = sum(st.kept for st in problem.stats)
    R = sum(f[0].shape[1] for f in problem.factors if f is not None)
    return "dual" if dual_is_cheaper(problem.base_weight.shape[1], K, R) else "primal"


def dual_is_cheaper(d_in: int, rows: int, rank: int) -> bool:
    """The cost rule: the (rows x rows) Woodbury system against the (d_in x d_in) one,
    with ``rows`` kept token rows over all concepts and ``rank`` = sum r_i (flop counts)."""
    primal = 2 * rows * d_in * d_in + d_in**3 / 3 + d_in * d_in * rank
    dual = rows * rows * d_in + rows**3 / 3 + 3 * rows * d_in * rank
    return dual < primal


def solve_layer(problem: LayerProblem, weights: list[float], reg: float, form: str = "auto",
                device=None, ridge_target: str = "average") -> Tensor:
    """Z (R, d_in) with U @ Z = W*, the closed form above with a1 = a2 = reg and the ridge
    pulling toward ``ridge_target`` ("average" or "sum" of the deltas).

    ``form``: "primal" solves the d_in x d_in system; "dual" the (sum of kept rows)^2 one
    by the Woodbury identity (token-sampled statistics and reg > 0 only); "auto" the cheaper.
    Float64 on ``device`` (default: the statistics' device); Z is returned float32 on the CPU.
    """
    if ridge_target not in RIDGE_TARGETS:
        raise ValueError(f"ridge_target must be one of {', '.join(RIDGE_TARGETS)}, got {ridge_target!r}")
    if form == "auto":
        form = choose_form(problem, reg)
    dev = solve_device(problem, device)
    if form == "dual":
        Zt = _solve_dual(problem, weights, reg, dev, ridge_target)
    else:
        Zt = _solve_primal(problem, weights, reg, dev, ridge_target)
    return Zt.T.contiguous().float().cpu()


def _with_prior(data: list[Tensor], downs: list[Tensor], own_ridge: list[float], total_ridge: float,
                ridge_target: str) -> Tensor:
    """The right-hand side [.., data_j + p_j A_j^T, ..]: p_j = a c_j ||C_j|| pulls toward the
    average, p_j = a L (the whole ridge of the left-hand side) toward the sum."""
    prior = own_ridge if ridge_target == "average" else [total_ridge] * len(data)
    return torch.cat([d + p * At for d, At, p in zip(data, downs, prior)], dim=1)


def _solve_primal(problem: LayerProblem, weights: list[float], reg: float, dev: torch.device,
                  ridge_target: str = "average") -> Tensor:
    # Arithmetic as D += c (H + a||H|| I), done in place (one d_in x d_in temporary at a time).
    D = None
    data, downs, own_ridge, total_ridge, reached = [], [], [], 0.0, False
    for f, st, c in zip(problem.factors, problem.stats, weights):
        T = st.merged_gram64(dev)
        norm = torch.linalg.matrix_norm(T)
        check_finite(problem.name, norm)  # a NaN or Inf anywhere in T makes its norm one
        reached = reached or float(norm) > 0
        T.diagonal().add_(reg * norm)
        total_ridge += c * reg * float(norm)
        T.mul_(c)
        if D is None:
            D = T
        else:
            D.add_(T)
        del T
        if f is not None:
            # (c_i A_i C_i)^T = c_i C_i^T A_i^T, and the ridge's share of C_i
            C = st.cross64(dev)
            A = f[1].to(device=dev, dtype=torch.float64)
            data.append(c * (C.T @ A.T))
            downs.append(A.T)
            own_ridge.append(c * reg * float(torch.linalg.matrix_norm(C)))
            del C
    if not reached:
        return unreached_target(problem, weights, ridge_target).to(dev).T
    return solve_spd(D, _with_prior(data, downs, own_ridge, total_ridge, ridge_target), problem.name)


def unreached_target(problem: LayerProblem, weights: list[float], ridge_target: str) -> Tensor:
    """Z (R, d_in, float64) where no calibration input reaches the layer (every H_i = 0): the
    objective is flat there, so W* is what the ridge pulls toward, its target itself:

        "sum":      W* = sum_i dW_i
        "average":  W* = sum_i c_i dW_i / sum_i c_i   (over all N concepts; equal c_i when
                    the adaptive weights are undefined, all 0: W* = sum_i dW_i / N)
    """
    downs = [f[1].double() for f in problem.factors if f is not None]
    if ridge_target == "sum":
        return torch.cat(downs)
    total = sum(weights)
    share = weights if total > 0 and math.isfinite(total) else [1.0] * len(weights)
    total = sum(share)
    present = [c / total for f, c in zip(problem.factors, share) if f is not None]
    return torch.cat([c * A for c, A in zip(present, downs)])


def _solve_dual(problem: LayerProblem, weights: list[float], reg: float, dev: torch.device,
                ridge_target: str = "average") -> Tensor:
    """The same W* from token samples: D = Y^T Y + lam I with Y the stacked sqrt(c_i s_i) X~_i
    and lam = reg sum_i c_i ||H_i||_F, solved by Woodbury in the space of the kept rows."""
    Ys, data, downs, own_ridge, lam = [], [], [], [], 0.0
    for f, st, c in zip(problem.factors, problem.stats, weights):
        _, Xp, Xm, s = st.rows64(dev)
        check_finite(problem.name, Xm)
        Km = Xm @ Xm.T
        lam += c * reg * s * float(torch.linalg.matrix_norm(Km))  # ||X~^T X~||_F = ||X~ X~^T||_F
        Ys.append(math.sqrt(c * s) * Xm)
        if f is not None:
            A = f[1].to(device=dev, dtype=torch.float64)
            # ||X^T X~||_F^2 = tr(X X^T X~ X~^T)
            norm_c = s * math.sqrt(max(float(((Xp @ Xp.T) * Km).sum()), 0.0))
            data.append(c * s * (Xm.T @ (Xp @ A.T)))
            downs.append(A.T)
            own_ridge.append(c * reg * norm_c)
    if lam <= 0:
        return _solve_primal(problem, weights, reg, dev, ridge_target)
    R = _with_prior(data, downs, own_ridge, lam, ridge_target)
    lam_vec = torch.full((R.shape[0],), lam, dtype=torch.float64, device=dev)
    return woodbury_solve(torch.cat(Ys), lam_vec, R, problem.name)


def woodbury_solve(Y: Tensor, lam: Tensor, rhs: Tensor, name: str) -> Tensor:
    """(Y^T Y + diag(lam))^-1 rhs for Y (K, d), lam (d,) > 0, in O(K^2 d) with a K x K system:

        (Y^T Y + L)^-1 = L^-1 - L^-1 Y^T (I + Y L^-1 Y^T)^-1 Y L^-1.
    """
    inv = 1.0 / lam
    YL = Y * inv  # Y L^-1
    S = Y @ YL.T
    S.diagonal().add_(1.0)
    inner = solve_spd(S, YL @ rhs, name)
    return inv[:, None] * rhs - YL.T @ inner


def solve_spd(D: Tensor, rhs: Tensor, name: str) -> Tensor:
    """D^-1 rhs for a symmetric positive semi-definite D, always finite.

    Cholesky when D is well conditioned; otherwise an eigenvalue pseudo-inverse (dropping
    eigenvalues below 1e-12 of the largest) and an IllConditionedWarning naming the layer.
    """
    L, info = torch.linalg.cholesky_ex(D)
    if int(info) == 0:
        diag = L.diagonal()
        if bool(torch.isfinite(L).all()) and float((diag.max() / diag.min()) ** 2) < MAX_CONDITION:
            return torch.cholesky_solve(rhs, L)
    warnings.warn(
        f"layer {name}: the least-squares system is singular or badly conditioned; "
        "solved with a pseudo-inverse (raise `regularization` if this repeats)",
        IllConditionedWarning,
        stacklevel=2,
    )
    evals, evecs = torch.linalg.eigh((D + D.T) / 2)
    top = float(evals.max()) if evals.numel() else 0.0
    if top <= 0:
        return torch.zeros_like(rhs)
    inv = torch.where(evals > top * 1e-12, 1.0 / evals, torch.zeros_like(evals))
    return evecs @ (inv[:, None] * (evecs.T @ rhs))


def concept_residuals(problem: LayerProblem, U: Tensor, Z: Tensor, device=None) -> tuple[list[float], list[float]]:
    """For a merged delta W = U Z (any method's): residual_i = ||X~_i W^T - X_i dW_i^T||_F^2 and reference_i = ||X_i dW_i^T||_F^2.

    Expanded through the statistics and evaluated in the small rank space:
    tr(W H W^T) - 2 tr(W C^T dW^T) + tr(dW G dW^T); from the kept rows for token samples.
    """
    dev = solve_device(problem, device)
    U, Z = U.to(device=dev, dtype=torch.float64), Z.to(device=dev, dtype=torch.float64)
    UtU = U.T @ U
    residuals, references = [], []
    for f, st in zip(problem.factors, problem.stats):
        B = A = None
        if f is not None:
            B, A = f[0].to(device=dev, dtype=torch.float64), f[1].to(device=dev, dtype=torch.float64)
        if st.form == "sample":
            X, Xp, Xm, s = st.rows64(dev)
            P = Xm @ Z.T
            res = s * float((UtU * (P.T @ P)).sum())
            ref = 0.0
            if f is not None:
                Q, Qp = X @ A.T, Xp @ A.T
                res -= 2 * s * float(((B.T @ U) * (Qp.T @ P)).sum())
                ref = s * float(((B.T @ B) * (Q.T @ Q)).sum())
                res += ref
        else:
            H = st.merged_gram64(dev)
            res = float((UtU * (Z @ H @ Z.T)).sum())
            del H
            ref = 0.0
            if f is not None:
                C = st.cross64(dev)
                res -= 2 * float(((B.T @ U) * (A @ C @ Z.T)).sum())
                del C
                G = st.gram64(dev)
                ref = float(((B.T @ B) * (A @ G @ A.T)).sum())
                del G
                res += ref
        residuals.append(max(res, 0.0))
        references.append(max(ref, 0.0))
    return residuals, references


def check_finite(name: str, t: Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        raise FloatingPointError(
            f"layer {name}: calibration inputs contain NaN/Inf (the model overflowed; "
            "try dtype fp32 or bf16 for calibration)"
        )
