"""The one registry of merge methods: name -> `MergeMethod`, all run the same way.

Every method is ``run(backend, cal, options, progress) -> MethodOutput``: ``cal`` is the
merge's `CalibrationStats` (the LoRAs' deltas per layer, and the statistics a data-driven
method captures through it), ``options`` a `MergeOptions`. The pipeline, the recipe, the
CLI and the ComfyUI node all read `METHODS`.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Callable

from ..progress import ProgressFn
from . import weight_space
from .backend import Backend, Deltas
from .calibration import CalibrationStats
from .iterate import IterationRecord, run_iteris
from .options import MergeOptions
from .regmean import regmean
from .ridge import RidgeChoice
from .ssr import ssr


@dataclass
class MethodOutput:
    """A method's merge: the deltas, and where an SVD truncated it, the fraction of
    sum(s^2) kept per layer (``energy``); IterIS adds its measured iterations."""

    deltas: Deltas
    energy: dict[str, float] = field(default_factory=dict)
    history: list[IterationRecord] = field(default_factory=list)
    chosen_iteration: int = 0
    ridges: dict[str, RidgeChoice] = field(default_factory=dict)  # IterIS's automatic ridge, per layer


@dataclass(frozen=True)
class MergeMethod:
    name: str
    summary: str  # one line, for --help, the node's tooltip and the README
    uses_data: bool  # needs the reference capture (its time is counted in the method's)
    run: Callable[[Backend, CalibrationStats, MergeOptions, ProgressFn], MethodOutput]


def _iteris(backend, cal, options, progress) -> MethodOutput:
    outcome = run_iteris(backend, cal, options.iteris_config(), progress)
    return MethodOutput(outcome.deltas, history=outcome.history, chosen_iteration=outcome.chosen_iteration,
                        ridges=outcome.ridges)


def _regmean(backend, cal, options, progress) -> MethodOutput:
    return MethodOutput(regmean(backend, cal, progress))


def _ssr(backend, cal, options, progress) -> MethodOutput:
    return MethodOutput(ssr(backend, cal, progress))


def _layerwise(merge_layer: Callable[[str, list, MergeOptions], weight_space.LayerMerge], truncates: bool):
    """A data-free method, applied layer by layer to the LoRAs' factors."""

    def run(backend, cal, options, progress) -> MethodOutput:
        out = MethodOutput({})
        for m, p in cal.problems().items():
            merged = merge_layer(m, p.factors, options)
            out.deltas[m] = (merged.U, merged.Z)
            if truncates:
                out.energy[m] = merged.energy
        return out

    return run


def _ranks(factors: list) -> list[int]:
    return [f[0].shape[1] for f in factors if f is not None]


def _dare(m: str, factors: list, options: MergeOptions) -> weight_space.LayerMerge:
    # a seed per layer, so layers of one shape do not share a DARE mask
    return weight_space.dare(factors, options.rank or sum(_ranks(factors)), options.density,
                             seed=options.seed + zlib.crc32(m.encode()))


_METHODS = (
    MergeMethod("iteris", "damped IterIS: least squares on the merged model's own inputs, re-solved; "
                "the best measured iterate is kept", True, _iteris),
    MergeMethod("regmean", "RegMean, one-shot least squares on each LoRA's inputs", True, _regmean),
    MergeMethod("ssr", "SSR-Merge: the LoRAs' own down-projections kept, a sum(r_i)-wide router solved "
                "by least squares on each LoRA's inputs", True, _ssr),
    MergeMethod("stack", "the sum of the deltas: what chaining LoRA loaders does", False,
                _layerwise(lambda m, f, o: weight_space.stack(f), False)),
    MergeMethod("linear", "weighted average, 1/N each", False,
                _layerwise(lambda m, f, o: weight_space.linear(f), False)),
    MergeMethod("concat", "kohya's concat: the sum written as one LoRA of rank sum r_i", False,
                _layerwise(lambda m, f, o: weight_space.concat(f), False)),
    MergeMethod("svd", "dense sum, then SVD to `rank` (default max r_i)", False,
                _layerwise(lambda m, f, o: weight_space.svd(f, o.rank or max(_ranks(f))), True)),
    MergeMethod("ties", "TIES on the dense deltas, then SVD", False,
                _layerwise(lambda m, f, o: weight_space.ties(f, o.rank or sum(_ranks(f)), o.density), True)),
    MergeMethod("dare", "DARE (drop, rescale, sum), seeded per layer, then SVD", False, _layerwise(_dare, True)),
)
METHODS: dict[str, MergeMethod] = {m.name: m for m in _METHODS}
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)


def get_method(name: str) -> MergeMethod:
    """The registered method, or a one-line error listing them."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown merge method {name!r}; use one of {', '.join(METHOD_NAMES)}") from None
