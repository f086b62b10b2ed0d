"""The automatic ridge: each layer's regularisation chosen by 2-fold cross-validation over
its calibration pictures, from the statistics the merge already has.

The concepts' reference statistics are split into two folds of calibration pictures
(G_i = G_i0 + G_i1: by prompt, else by seed, else by timestep; `iteris_sd.merge.stats`).
IterIS's first solve (X~ = X, solve.py) on fold f alone is, for the ridge a L_f ||W - W_t||^2,

    W_f(a) = W_t + E_f (D_f + a L_f I)^-1,   D_f = sum_i c_i G_if,   L_f = sum_i c_i ||G_if||_F,
    E_f = sum_i c_i dW_i G_if - W_t D_f,

with W_t the ridge target: the sum of the deltas, or their average weighted c_i ||G_i||_F
(the paper's). Everything lies in span(U), U = [B_1 ... B_N]: W_t = U T, E_f = U M_f. Its
error on the other fold g, sum_i c_i ||X_ig (W_f(a) - dW_i)^T||^2, is W_t's own error there plus,
with V = W_f(a) - W_t = U N,

    e_fg(a) = tr(V D_g V^T) - 2 tr(V E_g^T) = tr(U^T U (N D_g N^T - 2 N M_g^T)),
    N = M_f Q diag(1 / (l + a L_f)) Q^T,   D_f = Q diag(l) Q^T,

so one eigendecomposition per fold prices every ridge of the grid, each at O(R d_in^2)
(R = sum r_i). The layer keeps the (a, target) with the least error over both directions: a large a where
the folds disagree (the statistics do not carry over to new pictures), a small one where
they agree. A layer that cannot be cross-validated (one picture seen in one call, or a token-sampled
layer too wide for d_in x d_in matrices) gets `FALLBACK`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .solve import RIDGE_TARGETS, LayerProblem, choose_form, solve_device

# a = 1e-7 ... 10, half a decade apart
RIDGE_GRID = tuple(10 ** (k / 2) for k in range(-14, 3))
AUTO = "auto"


@dataclass(frozen=True)
class RidgeChoice:
    """A layer's ridge: a (relative to the Frobenius norms, as `solve_layer`'s reg) and
    its target; ``validated`` False for the fallback of a layer that could not be split."""

    a: float
    target: str
    validated: bool = True


# The shipped fixed default before the automatic ridge, for layers that cannot be cross-validated.
FALLBACK = RidgeChoice(0.1, "sum", validated=False)


def choose_ridge(problem: LayerProblem, weights: list[float], targets: tuple[str, ...] = RIDGE_TARGETS,
                 grid: tuple[float, ...] = RIDGE_GRID, device=None) -> RidgeChoice:
    """The (a, target) of ``grid`` x ``targets`` with the least 2-fold cross-validation
    error of the layer's first solve (module docstring); `FALLBACK` when the layer's
    statistics cannot be split."""
    curves = cross_validation_errors(problem, weights, targets, grid, device)
    if curves is None:
        return FALLBACK
    best = None
    for target, errors in curves.items():
        for a, e in reversed(list(zip(grid, errors))):  # on a tie, the larger ridge: the data cannot tell
            if math.isfinite(e) and (best is None or e < best[0]):
                best = (e, a, target)
    return FALLBACK if best is None else RidgeChoice(best[1], best[2])


def cross_validation_errors(problem: LayerProblem, weights: list[float], targets: tuple[str, ...] = RIDGE_TARGETS,
                            grid: tuple[float, ...] = RIDGE_GRID, device=None) -> dict[str, list[float]] | None:
    """target -> [the error of fold 0's solve on fold 1 plus fold 1's on fold 0, for a in grid];
    None when a concept that reached the layer has no split statistics (one picture in one
    call), none reached it, or the layer is token-sampled and solved in the dual form."""
    if any(st.form == "sample" for st in problem.stats) and choose_form(problem, 1.0) == "dual":
        return None  # a layer too wide for its d_in x d_in statistics: no d_in^2 fold Grams either
    dev = solve_device(problem, device)
    folds = []
    for st in problem.stats:
        split = None if st.rows == 0 else st.fold_grams64(dev)
        if st.rows and split is None:
            return None
        folds.append(split)
    if all(f is None for f in folds):
        return None
    present = [(i, f[0].to(device=dev, dtype=torch.float64), f[1].to(device=dev, dtype=torch.float64))
               for i, f in enumerate(problem.factors) if f is not None]
    U = torch.cat([B for _, B, _ in present], dim=1)
    UtU = U.T @ U
    d_in = problem.base_weight.shape[1]
    D, L, own = [], [], []  # per fold: D_f, L_f, and [c_i A_i G_if] over the present concepts
    for f in (0, 1):
        Df = torch.zeros(d_in, d_in, dtype=torch.float64, device=dev)
        Lf = 0.0
        for c, split in zip(weights, folds):
            if split is not None:
                Df.add_(split[f], alpha=c)
                Lf += c * float(torch.linalg.matrix_norm(split[f]))
        D.append(Df)
        L.append(Lf)
        own.append(torch.cat([weights[i] * (A @ folds[i][f]) if folds[i] is not None else torch.zeros_like(A)
                              for i, _, A in present]))
    eig = [torch.linalg.eigh(Df) for Df in D]
    curves = {}
    for target in targets:
        T = ridge_target_down(present, weights, folds, target)
        M = [own[f] - T @ D[f] for f in (0, 1)]
        MQ = [M[f] @ eig[f].eigenvectors for f in (0, 1)]
        base = target_error(present, weights, folds, UtU, T)
        errors = []
        for a in grid:
            total = base
            for f, g in ((0, 1), (1, 0)):
                values, Q = eig[f]
                if L[f] > 0:
                    N = (MQ[f] / (values.clamp_min(0) + a * L[f])) @ Q.T
                    total += float((UtU * (N @ D[g] @ N.T - 2 * N @ M[g].T)).sum())
            errors.append(total)
        curves[target] = errors
    return curves


def target_error(present: list[tuple[int, Tensor, Tensor]], weights: list[float], folds: list, UtU: Tensor,
                 T: Tensor) -> float:
    """W_t's own error on both folds, sum_f sum_i c_i tr((W_t - dW_i) G_if (W_t - dW_i)^T), with
    W_t - dW_i = U (T - S_i) and S_i = A_i in concept i's rows (zero for an absent concept)."""
    own_rows, start = {}, 0  # concept i -> (its rows of T, A_i)
    for i, _, A in present:
        own_rows[i] = (slice(start, start + A.shape[0]), A)
        start += A.shape[0]
    total = 0.0
    for i, (c, split) in enumerate(zip(weights, folds)):
        if split is None:
            continue
        Ti = T.clone()
        if i in own_rows:
            rows, A = own_rows[i]
            Ti[rows] -= A
        total += c * float((UtU * (Ti @ (split[0] + split[1]) @ Ti.T)).sum())
    return total


def ridge_target_down(present: list[tuple[int, Tensor, Tensor]], weights: list[float], folds: list, target: str) -> Tensor:
    """T (R, d_in) with U T = W_t: the stacked A_i for the sum, or w_i A_i with
    w_i = c_i ||G_i||_F / sum_j c_j ||G_j||_F (over every concept) for the average."""
    if target == "sum":
        return torch.cat([A for _, _, A in present])
    norms = [0.0 if f is None else c * float(torch.linalg.matrix_norm(f[0] + f[1])) for c, f in zip(weights, folds)]
    total = sum(norms)
    return torch.cat([(norms[i] / total if total > 0 else 0.0) * A for i, _, A in present])


def describe_ridges(choices: dict[str, RidgeChoice]) -> str:
    """One line: the distribution of the chosen ridges over layers."""
    if not choices:
        return "ridge: no layers"
    validated = [c for c in choices.values() if c.validated]
    parts = []
    if validated:
        logs = sorted(math.log10(c.a) for c in validated)
        median = 10 ** logs[len(logs) // 2]
        toward_sum = sum(c.target == "sum" for c in validated)
        parts.append(f"a = {10 ** logs[0]:.0e} .. {10 ** logs[-1]:.0e} (median {median:.0e}) over {len(validated)} "
                     f"layers, toward the sum on {toward_sum} and the average on {len(validated) - toward_sum}")
    fallback = len(choices) - len(validated)
    if fallback:
        parts.append(f"{fallback} layer{'s' * (fallback != 1)} not cross-validated (one calibration picture, or "
                     f"token-sampled and wide): the fixed a = {FALLBACK.a:g} toward the {FALLBACK.target}")
    return "ridge chosen by cross-validation: " + "; ".join(parts)
