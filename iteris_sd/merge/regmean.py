"""RegMean (Jin et al., ICLR 2023): the one-shot data-driven merge IterIS is compared with.

On the reference inputs only (X~ = X), per layer:

    W = [sum_i dW_i G'_i] [sum_i G'_i]^-1,   G' = alpha G + (1 - alpha) diag(G),

the off-diagonal shrinkage being RegMean's own regulariser.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..progress import ProgressFn, no_progress
from .backend import Backend, Deltas
from .chunks import solve_on_references
from .solve import (
    LayerProblem,
    check_finite,
    choose_form,
    solve_device,
    solve_spd,
    woodbury_solve,
)

if TYPE_CHECKING:
    from .calibration import CalibrationStats


def regmean(backend: Backend, cal: CalibrationStats, progress: ProgressFn = no_progress) -> Deltas:
    """RegMean on every layer, chunk by chunk."""
    return solve_on_references(backend, cal, lambda p: regmean_layer(p, device=cal.solve_device), progress)


def regmean_layer(problem: LayerProblem, alpha: float = 0.9, device=None) -> Tensor:
    """RegMean (Jin et al., ICLR 2023) on the reference inputs, X~ = X, one shot:

        W = [sum_i dW_i G'_i] [sum_i G'_i]^-1,   G' = alpha G + (1 - alpha) diag(G),

    the off-diagonal shrinkage being RegMean's own regulariser. Returns Z as solve_layer
    (token-sampled statistics: by Woodbury with the diagonal when that is cheaper)."""
    dev = solve_device(problem, device)
    if choose_form(problem, 1.0) == "dual":
        Z = _regmean_dual(problem, alpha, dev)
        if Z is not None:
            return Z.T.contiguous().float().cpu()
    d_in = problem.base_weight.shape[1]
    D = torch.zeros(d_in, d_in, dtype=torch.float64, device=dev)
    rhs = []
    for f, st in zip(problem.factors, problem.stats):
        G = st.gram64(dev)
        check_finite(problem.name, G)
        diag = G.diagonal().clone()
        G.mul_(alpha)
        G.diagonal().add_((1 - alpha) * diag)
        D += G
        if f is not None:
            rhs.append(G @ f[1].to(device=dev, dtype=torch.float64).T)
        del G
    return solve_spd(D, torch.cat(rhs, dim=1), problem.name).T.contiguous().float().cpu()


def _regmean_dual(problem: LayerProblem, alpha: float, dev) -> Tensor | None:
    Ys, rhs, diag = [], [], None
    for f, st in zip(problem.factors, problem.stats):
        X, _, _, s = st.rows64(dev)
        check_finite(problem.name, X)
        d = s * (X * X).sum(dim=0)
        diag = d if diag is None else diag + d
        Ys.append(math.sqrt(alpha * s) * X)
        if f is not None:
            A = f[1].to(device=dev, dtype=torch.float64)
            rhs.append(alpha * s * (X.T @ (X @ A.T)) + (1 - alpha) * d[:, None] * A.T)
    lam = (1 - alpha) * diag
    if float(lam.min()) <= 1e-12 * float(lam.max()):  # a feature no row reaches: dense solve
        return None
    return woodbury_solve(torch.cat(Ys), lam, torch.cat(rhs, dim=1), problem.name)
