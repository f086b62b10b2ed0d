"""SSR-Merge (arXiv 2606.10617, ICML 2026): the LoRAs' own subspaces, a small router solved.

Per layer, with A = [A_1; ...; A_N] (R x d_in, R = sum r_i) and U = [B_1 ... B_N] kept,
the merge is W = U Rt A: only the R x R router Rt is solved, by least squares on each
LoRA's own inputs (X~ = X, as RegMean). LoRA i's delta is U P_i A, P_i the selector of
its block, so with the projected Grams Q_i = A G_i A^T (R x R):

    min_Rt sum_i || X_i A^T (Rt - P_i)^T ||_F^2 + lam || Rt - I ||_F^2
    =>  Rt = [sum_i P_i Q_i + lam I] [sum_i Q_i + lam I]^-1,

lam = ridge * tr(sum_i Q_i) / R, a small numerical ridge toward I (the sum, as stacked:
where no input reaches a direction of A the LoRAs keep their full strength). The systems
are R wide whatever d_in is, so no d_in x d_in matrix is formed for token samples.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..progress import ProgressFn, no_progress
from .backend import Backend, Deltas
from .chunks import solve_on_references
from .solve import LayerProblem, check_finite, solve_device, solve_spd

if TYPE_CHECKING:
    from .calibration import CalibrationStats

SSR_RIDGE = 1e-4


def ssr(backend: Backend, cal: CalibrationStats, progress: ProgressFn = no_progress) -> Deltas:
    """SSR-Merge on every layer, chunk by chunk."""
    return solve_on_references(backend, cal, lambda p: ssr_layer(p, device=cal.solve_device), progress)


def ssr_layer(problem: LayerProblem, ridge: float = SSR_RIDGE, device=None) -> Tensor:
    """Z = Rt A (R, d_in), float32 on the CPU, so that U @ Z is the merged delta."""
    dev = solve_device(problem, device)
    A = problem.stacked_down().to(device=dev, dtype=torch.float64)
    R = A.shape[0]
    total = torch.zeros(R, R, dtype=torch.float64, device=dev)
    own = torch.zeros(R, R, dtype=torch.float64, device=dev)  # sum_i P_i Q_i
    row = 0
    for f, st in zip(problem.factors, problem.stats):
        Q = projected_gram(st, A, dev)
        check_finite(problem.name, Q)
        total += Q
        if f is not None:
            r = f[1].shape[0]
            own[row:row + r] += Q[row:row + r]
            row += r
    lam = ridge * float(total.diagonal().sum()) / R
    eye = torch.eye(R, dtype=torch.float64, device=dev)
    if lam <= 0:  # no input reached the layer: the sum
        return A.float().cpu()
    # Rt (T + lam I) = O + lam I, T symmetric  =>  Rt^T = (T + lam I)^-1 (O + lam I)^T
    router = solve_spd(total + lam * eye, (own + lam * eye).T, problem.name).T
    return (router @ A).contiguous().float().cpu()


def projected_gram(st, A: Tensor, dev) -> Tensor:
    """Q = A G A^T for one concept's reference statistics (from the kept rows for a sample)."""
    if st.form == "sample":
        X, _, _, s = st.rows64(dev)
        P = X @ A.T
        return s * (P.T @ P)
    return A @ st.gram64(dev) @ A.T
