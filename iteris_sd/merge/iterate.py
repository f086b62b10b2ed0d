"""The IterIS driver: capture, solve every layer, re-capture with the merge applied, repeat.

The plain fixed-point iteration of the official code oscillates on a diffusion UNet, so each
step is damped, Z <- (1 - beta) Z + beta Z*, and the iterate with the lowest measured
calibration error is kept. Every iterate is measured on statistics captured with that
iterate applied, so "error at iteration t" is a property of the model, not of the solver.

Layers are worked on in the chunks of a memory plan (`iteris_sd.merge.plan`): for each iterate,
each chunk's layers are captured (with the whole merged model applied), measured and
re-solved, and their statistics freed before the next chunk; the re-solves are applied
together once every chunk is done, so the chunking never changes the result.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from .backend import Backend, Deltas
from .layers import apply_delta, layer_rows
from .plan import (
    LayerSpec,
    MergeOutOfMemory,
    Plan,
    free_cached_memory,
    is_out_of_memory,
    make_plan,
    oom_message,
    warn_event,
)
from ..progress import ProgressFn, no_progress
from .solve import (
    LayerProblem,
    adaptive_weights,
    concept_residuals,
    regmean_layer,
    solve_layer,
)
from .stats import ConceptStats, SampledStats, Stats, sample_seed


@dataclass(frozen=True)
class IterISConfig:
    """iterations: re-solves after the first solve (0 = one-shot, RegMean with IterIS's
    weights and ridge); damping: beta, 1 = undamped; regularization: a1 = a2; ridge_target:
    what the ridge pulls toward, "average" (the paper's) or "sum" of the deltas (solve.py)."""

    iterations: int = 5
    damping: float = 0.5
    # Not the paper's (1e-3 toward the average): on the demo model, a ridge of 0.1 toward the sum
    # keeps 2 to 4 LoRAs' concepts in the pictures far more often at about the same held-out
    # error; 1e-3 toward the average fits more closely and loses most concepts (README, The ridge)
    regularization: float = 0.1
    ridge_target: str = "sum"
    keep_best: bool = True
    adaptive: bool = True
    keep_iterates: bool = False  # MergeOutcome.iterates: every iterate, for curves against t
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
    iterates: list[Deltas] = field(default_factory=list)  # with IterISConfig.keep_iterates


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


class CalibrationStats:
    """Per-layer, per-concept statistics for a merge, filled by backend captures, chunk by
    chunk as ``plan`` (an `iteris_sd.merge.plan.Plan`) says; without a plan, one chunk of every
    layer in Gram form with no budget: the plain merge.

    Statistics exist only for the layers being worked on (and, when the plan keeps them,
    the reference statistics of every layer). See `for_each_chunk` for the chunk loop and
    what happens when a chunk runs out of memory."""

    def __init__(self, backend: Backend, concept_deltas: list[Deltas], dtype=torch.float32, plan: Plan | None = None,
                 seed: int = 0):
        self.concept_deltas = concept_deltas
        self.layers = sorted({m for d in concept_deltas for m in d})
        self.targets = {m: backend.target(m) for m in self.layers}
        self.dtype = dtype
        self.seed = seed
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
            return SampledStats(d_in, k, sample_seed(self.seed, m, i), self.dtype)
        return ConceptStats.lazy(d_in, self.dtype)

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
    def capture(self, backend: Backend, merged: Deltas | None, progress: ProgressFn) -> None:
        """Reference statistics (merged None) or the paired ones for ``merged``, of every
        layer at once (no chunking)."""
        self._capture(backend, self.layers, merged, progress)

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

            def sink(module, X, X_merged, i=i):
                sync = self.timing_sync
                if sync is not None:
                    sync()
                t0 = time.perf_counter()
                conv = self.targets[module].conv
                st = self.stats[module][i]
                if X_merged is None:
                    st.add_reference(layer_rows(X.detach(), conv))
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
            self.for_each_chunk(work, progress)

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

    # ----- the chunk loop
    def for_each_chunk(self, work: Callable[[list[str]], dict], progress: ProgressFn = no_progress) -> dict:
        """``work(chunk)`` for every chunk of the plan, the results merged; each chunk's
        statistics are released after it. ``work`` must have no effect but its result and
        the statistics, so that a chunk can be retried.

        Out of memory in a chunk (torch.OutOfMemoryError, MemoryError, a RuntimeError saying
        "out of memory"): its statistics are freed and the chunk is split in two and retried;
        at one layer, kept reference statistics are dropped (recomputed from then on), then
        the solves move to the CPU; only then does it raise `MergeOutOfMemory`."""
        out = {}
        k = 0
        while k < len(self.plan.chunks):
            chunk = self.plan.chunks[k]
            failure = None
            try:
                result = work(chunk)
            except Exception as exc:  # only out-of-memory errors are handled
                if not is_out_of_memory(exc):
                    raise
                failure = f"{type(exc).__name__}: {exc}"
            if failure is not None:  # outside the except block, so its frames are freed
                self.release(chunk, everything=True)
                free_cached_memory()
                self._recover(k, failure)
                continue
            self.release(chunk)
            out.update(result)
            if len(self.plan.chunks) > 1:
                progress("chunks", k + 1, len(self.plan.chunks))
            k += 1
        return out

    def _recover(self, index: int, failure: str) -> None:
        plan = self.plan
        chunk = plan.chunks[index]
        if len(chunk) > 1:
            plan.split(index)
            warn_event(plan, f"out of memory in a chunk of {len(chunk)} layers; split into "
                             f"{len(chunk) // 2} + {len(chunk) - len(chunk) // 2} and retried")
            return
        if plan.keep_reference:
            plan.keep_reference = False
            for m in list(self.stats):
                del self.stats[m]
            self._referenced.clear()
            warn_event(plan, f"out of memory with one layer ({chunk[0]}); reference statistics are no longer "
                             "kept but recomputed in each paired pass")
            return
        if plan.solve_device is None or torch.device(plan.solve_device).type != "cpu":
            plan.solve_device = torch.device("cpu")
            warn_event(plan, f"out of memory with one layer ({chunk[0]}); the solves moved to the CPU")
            return
        raise MergeOutOfMemory(oom_message(plan, chunk[0], failure))

    # ----- whole-merge operations, chunk by chunk
    def measure(self, backend: Backend, merged: Deltas, progress: ProgressFn = no_progress) -> list[float]:
        """Calibration errors of ``merged`` (as `calibration_errors`), straight from the layer
        outputs of one paired pass per concept over every layer:

            residual_i = sum ||X~_i W^T - X_i dW_i^T||^2,  reference_i = sum ||X_i dW_i^T||^2

        with W = U Z. No statistics are kept, so it needs no chunking and costs n d r per
        layer where the Gram form costs n d^2; every token counts, also under a token budget."""
        sums = {m: ([0.0] * len(self.concept_deltas), [0.0] * len(self.concept_deltas)) for m in self.layers}
        for i, reference in enumerate(self.concept_deltas):
            def sink(module, X, X_merged, i=i, reference=reference):
                conv = self.targets[module].conv
                got = _delta_output(merged.get(module), X_merged, conv)
                want = _delta_output(reference.get(module), X, conv)
                residual, ref = sums[module]
                residual[i] += float(((got - want).double() ** 2).sum())
                ref[i] += float((want.double() ** 2).sum())

            t0 = time.perf_counter()
            backend.capture(i, reference, merged, self.layers, sink, progress)
            self.timings.capture += time.perf_counter() - t0
        return _errors(sums, self.layers)

    def regmean(self, backend: Backend, progress: ProgressFn = no_progress) -> Deltas:
        """RegMean on every layer, chunk by chunk."""
        ups = self.ups()

        def work(chunk):
            problems = self.reference_problems(backend, chunk, progress)
            t0 = time.perf_counter()
            out = {m: (ups[m], regmean_layer(p, device=self.solve_device)) for m, p in problems.items()}
            self.timings.solve += time.perf_counter() - t0
            return out

        return self.for_each_chunk(work, progress)


def _delta_output(factors, x: Tensor, conv) -> Tensor:
    """`apply_delta` in float32; 0 without a delta."""
    if factors is None:
        return x.new_zeros((), dtype=torch.float32)
    return apply_delta(factors, x.float(), conv)


def _layer_residuals(p: LayerProblem, merged: Deltas, device) -> tuple[list[float], list[float]]:
    U, Z = merged.get(p.name, (p.up[:, :0], p.stacked_down()[:0]))
    return concept_residuals(p, U, Z, device)


def _errors(per_layer: dict[str, tuple[list[float], list[float]]], layers: list[str]) -> list[float]:
    """sqrt(sum_layers residual / sum_layers reference) per concept, summed in layer order."""
    res = ref = None
    for m in layers:
        r, q = per_layer[m][0], per_layer[m][1]
        res = list(r) if res is None else [a + b for a, b in zip(res, r)]
        ref = list(q) if ref is None else [a + b for a, b in zip(ref, q)]
    if res is None:
        return []
    return [math.sqrt(a / b) if b > 0 else 0.0 for a, b in zip(res, ref)]


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
    plan: Plan | None = None,
) -> MergeOutcome:
    """Merge the concepts' deltas with damped IterIS; returns the kept iterate and history."""
    cal = CalibrationStats(backend, concept_deltas, config.stats_dtype, plan=plan)
    cal.capture_references(backend, progress)
    return run_iteris(backend, cal, config, progress)


def run_iteris(backend: Backend, cal: CalibrationStats, config: IterISConfig, progress: ProgressFn) -> MergeOutcome:
    """The iteration, chunk by chunk as ``cal.plan`` says, over reference statistics already
    captured in ``cal`` or captured here when a chunk first needs them.

    Iterate t is measured on X~ captured with iterate t applied (to every layer; a chunk's
    pass only captures that chunk's layers); t = 0 is the first solve (X~ = X). There are
    ``iterations`` damped re-solves, so iterations + 1 measurements. Each chunk's re-solve
    is made right after its capture, but applied only once every chunk has been measured,
    so the result does not depend on the chunking."""
    cal.reset_merged()  # the first solve is from X~ = X, whatever was measured before
    n = len(cal.concept_deltas)
    ups = cal.ups()
    reg = config.regularization
    solved = [0]

    def solve(p: LayerProblem) -> Tensor:
        weights = cal.weights(p, config.adaptive)  # (timed on its own)
        t0 = time.perf_counter()
        z = solve_layer(p, weights, reg, device=cal.solve_device, ridge_target=config.ridge_target)
        cal.timings.solve += time.perf_counter() - t0
        solved[0] += 1
        progress("solve", solved[0], len(cal.layers))
        return z

    def first(chunk):
        return {m: solve(p) for m, p in cal.reference_problems(backend, chunk, progress).items()}

    Z = cal.for_each_chunk(first, progress)
    if config.iterations == 0:
        deltas = {m: (ups[m], Z[m]) for m in cal.layers}
        return MergeOutcome(deltas, iterates=[deltas] if config.keep_iterates else [])
    outcome, best = MergeOutcome({}), None
    for t in range(config.iterations + 1):
        current = {m: (ups[m], Z[m]) for m in cal.layers}
        last = t == config.iterations
        solved[0] = 0

        def step(chunk, current=current, last=last):
            problems = cal.paired_problems(backend, chunk, current, progress)
            out = {}
            for m, p in problems.items():
                t0 = time.perf_counter()
                r, q = _layer_residuals(p, current, cal.solve_device)
                cal.timings.solve += time.perf_counter() - t0
                out[m] = (r, q, None if last else solve(p))
            return out

        results = cal.for_each_chunk(step, progress)
        errors = _errors(results, cal.layers)
        record = IterationRecord(t, errors, sum(errors) / n)
        outcome.history.append(record)
        if config.keep_iterates:
            outcome.iterates.append(current)
        progress("iterate", t + 1, config.iterations + 1, {"errors": list(errors), "objective": record.objective})
        if best is None or not config.keep_best or record.objective < best[0].objective:
            best = (record, current)
        if not last:
            Z = {m: (1 - config.damping) * Z[m] + config.damping * results[m][2] for m in cal.layers}
    outcome.deltas, outcome.chosen_iteration = best[1], best[0].iteration
    return outcome
