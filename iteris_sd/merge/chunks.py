"""The chunk loop of a memory plan, and what it does when a chunk runs out of memory.

Layers are worked on in the chunks of an `iteris_sd.merge.plan.Plan`: each chunk's
statistics exist only while it is worked on. When a chunk runs out of memory its
statistics are freed and it is retried: split in two, then (at one layer) without kept
reference statistics, then with the solves on the CPU; only then the merge fails with a
`MergeOutOfMemory` that names a budget the planner would have fitted.
"""

from __future__ import annotations

import time
import warnings
from typing import TYPE_CHECKING, Callable

import torch

from ..progress import ProgressFn, no_progress
from .backend import Backend, Deltas
from .plan import MIN_TOKENS, GiB, Plan, device_memory, fmt_bytes, layer_bytes

if TYPE_CHECKING:
    from .calibration import CalibrationStats
    from .solve import LayerProblem


class MergeOutOfMemory(MemoryError):
    """The merge ran out of memory even at one layer per chunk with the solves on the CPU."""


class MemoryPlanWarning(UserWarning):
    """The plan was changed during the merge (a chunk split after running out of memory...)."""


def run_chunks(cal: CalibrationStats, work: Callable[[list[str]], dict], progress: ProgressFn = no_progress) -> dict:
    """``work(chunk)`` for every chunk of the plan, the results merged; each chunk's
    statistics are released after it. ``work`` must have no effect but its result and
    the statistics, so that a chunk can be retried.

    Out of memory in a chunk (torch.OutOfMemoryError, MemoryError, a RuntimeError saying
    "out of memory"): its statistics are freed and the chunk is split in two and retried;
    at one layer, kept reference statistics are dropped (recomputed from then on), then
    the solves move to the CPU; only then does it raise `MergeOutOfMemory`."""
    out = {}
    k = 0
    while k < len(cal.plan.chunks):
        chunk = cal.plan.chunks[k]
        failure = None
        try:
            result = work(chunk)
        except Exception as exc:  # only out-of-memory errors are handled
            if not is_out_of_memory(exc):
                raise
            failure = f"{type(exc).__name__}: {exc}"
        if failure is not None:  # outside the except block, so its frames are freed
            cal.release(chunk, everything=True)
            free_cached_memory()
            _recover(cal, k, failure)
            continue
        cal.release(chunk)
        out.update(result)
        if len(cal.plan.chunks) > 1:
            progress("chunks", k + 1, len(cal.plan.chunks))
        k += 1
    return out


def solve_on_references(backend: Backend, cal: CalibrationStats, layer_solve: Callable[[LayerProblem], torch.Tensor],
                        progress: ProgressFn = no_progress) -> Deltas:
    """A one-shot method on each LoRA's own inputs (X~ = X): per layer (U, layer_solve(problem)),
    U = [B_1 ... B_N] and Z (R, d_in) from the solve, chunk by chunk."""
    ups = cal.ups()

    def work(chunk):
        problems = cal.reference_problems(backend, chunk, progress)
        t0 = time.perf_counter()
        out = {m: (ups[m], layer_solve(p)) for m, p in problems.items()}
        cal.timings.solve += time.perf_counter() - t0
        return out

    return run_chunks(cal, work, progress)


def _recover(cal: CalibrationStats, index: int, failure: str) -> None:
    plan = cal.plan
    chunk = plan.chunks[index]
    if len(chunk) > 1:
        plan.split(index)
        warn_event(plan, f"out of memory in a chunk of {len(chunk)} layers; split into "
                         f"{len(chunk) // 2} + {len(chunk) - len(chunk) // 2} and retried")
        return
    if plan.keep_reference:
        plan.keep_reference = False
        cal.drop_all()
        warn_event(plan, f"out of memory with one layer ({chunk[0]}); reference statistics are no longer "
                         "kept but recomputed in each paired pass")
        return
    if plan.solve_device is None or torch.device(plan.solve_device).type != "cpu":
        plan.solve_device = torch.device("cpu")
        warn_event(plan, f"out of memory with one layer ({chunk[0]}); the solves moved to the CPU")
        return
    raise MergeOutOfMemory(oom_message(plan, chunk[0], failure))


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's OutOfMemoryError, MemoryError, or a RuntimeError saying it ran out of memory."""
    if isinstance(exc, MergeOutOfMemory):  # our own verdict, after every fallback
        return False
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    if isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def free_cached_memory() -> None:
    """Return what torch's CUDA caching allocator holds to the device (after a failed chunk)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        import gc

        gc.collect()
        torch.cuda.empty_cache()


def warn_event(plan: Plan, text: str) -> None:
    plan.events.append(text)
    warnings.warn(text, MemoryPlanWarning, stacklevel=3)


def oom_message(plan: Plan, layer: str, failure: str) -> str:
    """The final out-of-memory message: the layer, what was tried, and a budget at which the
    planner would have fitted it (token samples for the largest layers)."""
    need = plan.min_layer_bytes(layer)
    spec = plan.specs[layer]
    ref, pair, solve = layer_bytes(spec, plan.concepts, MIN_TOKENS)
    floor = ref + pair + (solve if plan.solve_on_device() else 0)
    suggest = need // 2
    mem = device_memory(plan.device)
    if mem is not None and plan.device.type != "cpu":
        suggest = min(suggest, max(mem[0] - GiB - mem[1] // 10, 0))
    head = (f"out of memory on {plan.device} ({failure.splitlines()[0][:200]}) even with one layer per chunk "
            f"and the solves on the CPU: layer {layer} needed about {fmt_bytes(need)} (budget was "
            f"{fmt_bytes(plan.budget)}). ")
    if suggest >= floor:
        return head + (f"A memory_budget of {fmt_bytes(suggest)} would have planned token samples for the "
                       "largest layers so that they fit; or set tokens lower, or free memory on the device")
    return head + (f"Even a {MIN_TOKENS}-row token sample needs {fmt_bytes(floor)}, so a memory_budget of at "
                   f"least {fmt_bytes(floor)} free on the device is needed; free memory on the device or use a "
                   "larger one")
