"""Per-layer, per-concept calibration statistics of a merge, and the passes that fill them.

A `CalibrationStats` holds, for the layers being worked on, each concept's statistics
(`iteris_sd.merge.stats`): the reference ones, X from the model carrying LoRA i alone,
and the paired ones, X~ from the merged model on the same data. The backend's capture
calls feed them through a sink, timed in `Timings`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from ..progress import ProgressFn
from .backend import Backend, Deltas
from .chunks import run_chunks
from .layers import layer_rows
from .plan import LayerSpec, Plan, make_plan
from .solve import LayerProblem, adaptive_weights
from .stats import ConceptStats, SampledStats, Stats, sample_seed


@dataclass
class Timings:
    """Seconds spent, for the scale measurements: ``capture`` is the whole of the backend's
    capture calls, ``statistics`` the part of it spent in the sinks (so forward passes =
    capture - statistics), ``solve`` the solves, adaptive weights and residuals."""

    capture: float = 0.0
    statistics: float = 0.0
    solve: float = 0.0

    @property
    def forward(self) -> float:
        return self.capture - self.statistics


def row_folds(folds: int | Tensor | None, batch: int, rows: int) -> Tensor | None:
    """The fold of each of a call's ``rows`` (bool, True = fold 1) from the backend's
    ``folds``: one fold for the whole call (an int), or one per batch element ((batch,)
    tensor, each element's rows contiguous, as `layer_rows` lays them out)."""
    if folds is None:
        return None
    if isinstance(folds, int):
        return torch.full((rows,), bool(folds), dtype=torch.bool)
    folds = torch.as_tensor(folds, dtype=torch.bool).cpu()
    if folds.numel() != batch or rows % batch:
        return None  # (a layer that flattened its batch: all its rows in fold 0)
    return folds.repeat_interleave(rows // batch)


class CalibrationStats:
    """Per-layer, per-concept statistics for a merge, filled by backend captures, chunk by
    chunk as ``plan`` (an `iteris_sd.merge.plan.Plan`) says; without a plan, one chunk of every
    layer in Gram form with no budget: the plain merge.

    Statistics exist only for the layers being worked on (and, when the plan keeps them,
    the reference statistics of every layer). The chunk loop, and what happens when a
    chunk runs out of memory, is `iteris_sd.merge.chunks.run_chunks`."""

    def __init__(self, backend: Backend, concept_deltas: list[Deltas], dtype=torch.float32, plan: Plan | None = None,
                 seed: int = 0, track_folds: bool = False):
        self.concept_deltas = concept_deltas
        self.layers = sorted({m for d in concept_deltas for m in d})
        self.targets = {m: backend.target(m) for m in self.layers}
        self.dtype = dtype
        self.seed = seed
        self.track_folds = track_folds  # split the reference statistics into two folds (the automatic ridge)
        if plan is None:
            specs = [LayerSpec(m, t.weight.shape[1], t.weight.shape[0],
                               sum(d[m][0].shape[1] for d in concept_deltas if m in d))
                     for m, t in self.targets.items()]
            plan = make_plan(specs, len(concept_deltas), None)
        planned = sorted(m for chunk in plan.chunks for m in chunk)
        if planned != self.layers:
            raise ValueError(f"the memory plan covers {len(planned)} layers, the LoRAs {len(self.layers)}: "
                             "make the plan for these LoRAs (plan_merge)")
        self.plan = plan
        self.stats: dict[str, list[Stats]] = {}
        self.timings = Timings()
        self.timing_sync = None  # e.g. torch.cuda.synchronize, for honest timings on a GPU
        self._referenced: set[str] = set()  # layers whose reference statistics are complete
        self._weights: dict[str, list[float]] = {}  # adaptive weights, from the reference statistics

    # ----- statistics objects
    def _new_stats(self, m: str, i: int) -> Stats:
        d_in = self.targets[m].weight.shape[1]
        k = self.plan.tokens.get(m)
        if k:
            return SampledStats(d_in, k, sample_seed(self.seed, m, i), self.dtype, track_folds=self.track_folds)
        return ConceptStats.lazy(d_in, self.dtype, self.track_folds)

    def _ensure(self, layers) -> None:
        for m in layers:
            if m not in self.stats:
                self.stats[m] = [self._new_stats(m, i) for i in range(len(self.concept_deltas))]

    def problems(self, layers=None) -> dict[str, LayerProblem]:
        layers = self.layers if layers is None else layers
        self._ensure(layers)
        return {
            m: LayerProblem(
                name=m,
                base_weight=self.targets[m].weight,
                factors=[d.get(m) for d in self.concept_deltas],
                stats=self.stats[m],
            )
            for m in layers
        }

    def ups(self) -> dict[str, Tensor]:
        """U = [B_1 ... B_N] of every layer."""
        return {m: torch.cat([d[m][0] for d in self.concept_deltas if m in d], dim=1) for m in self.layers}

    def reset_merged(self) -> None:
        """Back to X~ = X, as before the merged model was ever captured."""
        for per_concept in self.stats.values():
            for st in per_concept:
                st.reset_merged()

    @property
    def solve_device(self):
        return self.plan.solve_device

    # ----- captures
    def _capture(self, backend: Backend, layers: list[str], merged: Deltas | None, progress: ProgressFn,
                 reference_too: bool = False) -> None:
        """One pass per concept capturing ``layers``: the reference statistics when merged
        is None (replacing any), else the paired ones (and the reference ones from the same
        pass when ``reference_too``)."""
        self._ensure(layers)
        for i, ref in enumerate(self.concept_deltas):
            for m in layers:  # X~ of an earlier merge must not mix into this one
                st = self.stats[m][i]
                if merged is None or reference_too:
                    st.reset_reference()
                else:
                    st.reset_merged()

            def sink(module, X, X_merged, folds=None, i=i):
                sync = self.timing_sync
                if sync is not None:
                    sync()
                t0 = time.perf_counter()
                conv = self.targets[module].conv
                st = self.stats[module][i]
                if X_merged is None:
                    rows = layer_rows(X.detach(), conv)
                    st.add_reference(rows, row_folds(folds, X.shape[0], rows.shape[0]) if self.track_folds else None)
                else:
                    st.add_pair(layer_rows(X.detach(), conv), layer_rows(X_merged.detach(), conv), reference=reference_too)
                if sync is not None:
                    sync()
                self.timings.statistics += time.perf_counter() - t0

            t0 = time.perf_counter()
            backend.capture(i, ref, merged, layers, sink, progress)
            self.timings.capture += time.perf_counter() - t0
        if merged is None or reference_too:
            self._referenced.update(layers)

    def capture_references(self, backend: Backend, progress: ProgressFn) -> None:
        """When the plan keeps reference statistics: capture them for every chunk now.
        (Otherwise each chunk's are captured when first needed.)"""
        def work(chunk):
            if self.plan.keep_reference:  # (it may stop being kept after running out of memory)
                self._reference_chunk(backend, chunk, progress)
            return {}

        if self.plan.keep_reference:
            run_chunks(self, work, progress)

    def _reference_chunk(self, backend, chunk, progress) -> dict[str, LayerProblem]:
        missing = [m for m in chunk if m not in self._referenced]
        if missing:
            self._capture(backend, missing, None, progress)
        for m in chunk:
            for st in self.stats[m]:
                st.reset_merged()
        return self.problems(chunk)

    def reference_problems(self, backend: Backend, chunk: list[str], progress: ProgressFn) -> dict[str, LayerProblem]:
        """The chunk's problems with X~ = X, capturing its reference statistics if needed."""
        return self._reference_chunk(backend, chunk, progress)

    def paired_problems(self, backend: Backend, chunk: list[str], merged: Deltas,
                        progress: ProgressFn) -> dict[str, LayerProblem]:
        """The chunk's problems with X~ captured from ``merged`` (applied to every layer)."""
        keep = self.plan.keep_reference
        if keep:
            missing = [m for m in chunk if m not in self._referenced]
            if missing:
                self._capture(backend, missing, None, progress)
        self._capture(backend, chunk, merged, progress, reference_too=not keep)
        return self.problems(chunk)

    def weights(self, problem: LayerProblem, adaptive: bool) -> list[float]:
        """The layer's IterIS weights c_i, computed once from its reference statistics."""
        if not adaptive:
            return [1.0] * len(self.concept_deltas)
        if problem.name not in self._weights:
            t0 = time.perf_counter()
            self._weights[problem.name] = adaptive_weights(problem)
            self.timings.solve += time.perf_counter() - t0
        return self._weights[problem.name]

    def release(self, chunk: list[str], everything: bool = False) -> None:
        """Free a chunk's paired statistics, and its reference ones unless the plan keeps them."""
        for m in chunk:
            if m not in self.stats:
                continue
            if self.plan.keep_reference and not everything:
                for st in self.stats[m]:
                    st.reset_merged()
            else:
                del self.stats[m]
                self._referenced.discard(m)

    def drop_all(self) -> None:
        """Free every statistic, the reference ones included (they are captured again when needed)."""
        self.stats.clear()
        self._referenced.clear()
