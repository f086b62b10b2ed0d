"""The IterIS driver: capture, solve every layer, re-capture with the merge applied, repeat.

The plain fixed-point iteration of the official code oscillates on a diffusion UNet, so each
step is damped, Z <- (1 - beta) Z + beta Z*, and the iterate with the lowest measured
calibration error is kept. Every iterate is measured on statistics captured with that
iterate applied, so "error at iteration t" is a property of the model, not of the solver.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .backend import Backend, Deltas
from .progress import ProgressFn, no_progress
from .solve import LayerProblem, adaptive_weights, concept_residuals, solve_layer
from .stats import ConceptStats, layer_rows


@dataclass(frozen=True)
class IterISConfig:
    """iterations: re-solves after the first solve (0 = one-shot, RegMean with IterIS's
    weights and ridge); damping: beta, 1 = undamped; regularization: a1 = a2."""

    iterations: int = 5
    damping: float = 0.5
    regularization: float = 1e-2
    keep_best: bool = True
    adaptive: bool = True
    stats_dtype: torch.dtype = torch.float32


@dataclass(frozen=True)
class IterationRecord:
    """The measured state of the merge after ``iteration`` solves."""

    iteration: int
    errors: list[float]  # per concept: sqrt(sum_layers residual / sum_layers reference)
    objective: float  # mean of errors: what keep_best minimises


@dataclass
class MergeOutcome:
    deltas: Deltas
    history: list[IterationRecord] = field(default_factory=list)
    chosen_iteration: int = 0


class CalibrationStats:
    """Per-layer, per-concept statistics for a merge, filled by backend captures."""

    def __init__(self, backend: Backend, concept_deltas: list[Deltas], dtype=torch.float32):
        self.concept_deltas = concept_deltas
        self.layers = sorted({m for d in concept_deltas for m in d})
        self.targets = {m: backend.target(m) for m in self.layers}
        self.stats = {
            m: [ConceptStats.zeros(self.targets[m].weight.shape[1], dtype) for _ in concept_deltas]
            for m in self.layers
        }

    def problems(self) -> dict[str, LayerProblem]:
        return {
            m: LayerProblem(
                name=m,
                base_weight=self.targets[m].weight,
                factors=[d.get(m) for d in self.concept_deltas],
                stats=self.stats[m],
            )
            for m in self.layers
        }

    def reset_merged(self) -> None:
        """Back to X~ = X, as before the merged model was ever captured."""
        for per_concept in self.stats.values():
            for st in per_concept:
                st.reset_merged()

    def capture(self, backend: Backend, merged: Deltas | None, progress: ProgressFn) -> None:
        """Reference statistics (merged None, done once) or the paired ones for ``merged``."""
        for i, ref in enumerate(self.concept_deltas):
            if merged is not None:  # X~ of an earlier merge must not mix into this one
                for m in self.layers:
                    self.stats[m][i].reset_merged()

            def sink(module, X, X_merged, i=i):
                conv = self.targets[module].conv
                st = self.stats[module][i]
                if X_merged is None:
                    st.add_reference(layer_rows(X, conv))
                else:
                    st.add_pair(layer_rows(X, conv), layer_rows(X_merged, conv))

            backend.capture(i, ref, merged, self.layers, sink, progress)


def calibration_errors(problems: dict[str, LayerProblem], merged: Deltas) -> list[float]:
    """Per concept: sqrt(sum over layers of ||X~ W^T - X dW_i^T||^2 / ||X dW_i^T||^2).

    0 means every layer reproduces LoRA i's effect; 1 is what a merge of zero would score
    when X~ = X. Layers the merge leaves out count with W = 0.
    """
    n = len(next(iter(problems.values())).factors)
    res, ref = [0.0] * n, [0.0] * n
    for m, p in problems.items():
        U, Z = merged.get(m, (p.up[:, :0], p.stacked_down()[:0]))
        r, q = concept_residuals(p, U, Z)
        res = [a + b for a, b in zip(res, r)]
        ref = [a + b for a, b in zip(ref, q)]
    return [math.sqrt(a / b) if b > 0 else 0.0 for a, b in zip(res, ref)]


def merge_iteris(
    backend: Backend,
    concept_deltas: list[Deltas],
    config: IterISConfig = IterISConfig(),
    progress: ProgressFn = no_progress,
) -> MergeOutcome:
    """Merge the concepts' deltas with damped IterIS; returns the kept iterate and history."""
    cal = CalibrationStats(backend, concept_deltas, config.stats_dtype)
    cal.capture(backend, None, progress)
    return run_iteris(backend, cal, config, progress)


def run_iteris(backend: Backend, cal: CalibrationStats, config: IterISConfig, progress: ProgressFn) -> MergeOutcome:
    """The iteration over reference statistics already captured in ``cal``.

    Iterate t is measured on X~ captured with iterate t applied; t = 0 is the first solve
    (X~ = X). There are ``iterations`` damped re-solves, so iterations + 1 measurements."""
    cal.reset_merged()  # the first solve is from X~ = X, whatever was measured before
    problems = cal.problems()
    n = len(cal.concept_deltas)
    weights = {m: adaptive_weights(p) if config.adaptive else [1.0] * n for m, p in problems.items()}
    ups = {m: p.up for m, p in problems.items()}
    Z = _solve_all(problems, weights, config.regularization, progress)
    if config.iterations == 0:
        return MergeOutcome({m: (ups[m], Z[m]) for m in problems})
    outcome, best = MergeOutcome({}), None
    for t in range(config.iterations + 1):
        current = {m: (ups[m], Z[m]) for m in problems}
        cal.capture(backend, current, progress)
        errors = calibration_errors(problems, current)
        record = IterationRecord(t, errors, sum(errors) / n)
        outcome.history.append(record)
        progress("iterate", t + 1, config.iterations + 1)
        if best is None or not config.keep_best or record.objective < best[0].objective:
            best = (record, current)
        if t < config.iterations:
            Z_star = _solve_all(problems, weights, config.regularization, progress)
            Z = {m: (1 - config.damping) * Z[m] + config.damping * Z_star[m] for m in problems}
    outcome.deltas, outcome.chosen_iteration = best[1], best[0].iteration
    return outcome


def _solve_all(problems: dict[str, LayerProblem], weights: dict[str, list[float]], reg: float,
               progress: ProgressFn) -> dict:
    out = {}
    for k, (m, p) in enumerate(problems.items()):
        out[m] = solve_layer(p, weights[m], reg)
        progress("solve", k + 1, len(problems))
    return out
