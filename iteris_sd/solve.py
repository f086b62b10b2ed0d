"""The IterIS closed-form solve of one layer, its adaptive weights and residuals.

Notation (see docs/iteris-math in the README): for concept i at one layer,
dW_i = B_i A_i (d_out x d_in, scale folded into A_i), G_i = X_i^T X_i,
C_i = X_i^T X~_i, H_i = X~_i^T X~_i. The solve minimises

    sum_i c_i || X~_i W^T - X_i dW_i^T ||_F^2   (+ Frobenius-scaled ridge)

with the closed form

    W* = [sum_i c_i dW_i (C_i + a ||C_i||_F I)] [sum_i c_i (H_i + a ||H_i||_F I)]^-1.

Because W* = sum_i B_i Z_i, it is returned as Z = [Z_1; ...; Z_N] (R x d_in, R = sum r_i)
beside the fixed U = [B_1 ... B_N]: an exact LoRA of rank sum r_i.
All arithmetic is float64.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from .stats import ConceptStats

Factors = tuple[Tensor, Tensor]

# Above this condition number estimate a Cholesky solve is not trusted.
MAX_CONDITION = 1e12


class IllConditionedWarning(UserWarning):
    """A layer's system was singular or badly conditioned; a pseudo-inverse was used."""


@dataclass(frozen=True)
class LayerProblem:
    """Everything one layer's solve needs. ``factors[i]`` is None where LoRA i does not
    touch the layer (its delta is zero there: that concept asks for the base behaviour)."""

    name: str
    base_weight: Tensor  # W0 flattened, (d_out, d_in)
    factors: list[Factors | None]
    stats: list[ConceptStats]

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
        energy = float(((M @ st.gram.double()) * M).sum())
        weights.append(float((M * M).sum()) / energy if energy > 0 else 0.0)
    return weights


def solve_layer(problem: LayerProblem, weights: list[float], reg: float) -> Tensor:
    """Z (R, d_in) with U @ Z = W*, the closed form above with a1 = a2 = reg."""
    d_in = problem.base_weight.shape[1]
    eye = torch.eye(d_in, dtype=torch.float64)
    D = torch.zeros(d_in, d_in, dtype=torch.float64)
    rhs = []
    for f, st, c in zip(problem.factors, problem.stats, weights):
        _, C, H = st.solve_inputs()
        _check_finite(problem.name, H)
        D += c * (H + reg * torch.linalg.matrix_norm(H) * eye)
        if f is not None:
            # (c_i A_i (C_i + a||C_i|| I))^T = c_i (C_i^T + a||C_i|| I) A_i^T
            A = f[1].double()
            rhs.append(c * (C.T @ A.T + reg * torch.linalg.matrix_norm(C) * A.T))
    Zt = solve_spd(D, torch.cat(rhs, dim=1), problem.name)
    return Zt.T.contiguous().float()


def regmean_layer(problem: LayerProblem, alpha: float = 0.9) -> Tensor:
    """RegMean (Jin et al., ICLR 2023) on the reference inputs, X~ = X, one shot:

        W = [sum_i dW_i G'_i] [sum_i G'_i]^-1,   G' = alpha G + (1 - alpha) diag(G),

    the off-diagonal shrinkage being RegMean's own regulariser. Returns Z as solve_layer."""
    D = torch.zeros_like(problem.stats[0].gram, dtype=torch.float64)
    rhs = []
    for f, st in zip(problem.factors, problem.stats):
        G = st.gram.double()
        _check_finite(problem.name, G)
        G = alpha * G + (1 - alpha) * torch.diag(G.diagonal())
        D += G
        if f is not None:
            rhs.append(G @ f[1].double().T)
    return solve_spd(D, torch.cat(rhs, dim=1), problem.name).T.contiguous().float()


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


def concept_residuals(problem: LayerProblem, U: Tensor, Z: Tensor) -> tuple[list[float], list[float]]:
    """For a merged delta W = U Z (any method's): residual_i = ||X~_i W^T - X_i dW_i^T||_F^2 and reference_i = ||X_i dW_i^T||_F^2.

    Expanded through the statistics and evaluated in the small rank space:
    tr(W H W^T) - 2 tr(W C^T dW^T) + tr(dW G dW^T).
    """
    U, Z = U.double(), Z.double()
    UtU = U.T @ U
    residuals, references = [], []
    for f, st in zip(problem.factors, problem.stats):
        G, C, H = st.solve_inputs()
        res = float((UtU * (Z @ H @ Z.T)).sum())
        ref = 0.0
        if f is not None:
            B, A = f[0].double(), f[1].double()
            res -= 2 * float(((B.T @ U) * (A @ C @ Z.T)).sum())
            ref = float(((B.T @ B) * (A @ G @ A.T)).sum())
            res += ref
        residuals.append(max(res, 0.0))
        references.append(max(ref, 0.0))
    return residuals, references


def _check_finite(name: str, t: Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        raise FloatingPointError(
            f"layer {name}: calibration inputs contain NaN/Inf (the model overflowed; "
            "try dtype fp32 or bf16 for calibration)"
        )
