"""How far a merge is from each LoRA on the calibration data: the calibration error.

Per concept i, over every layer:

    error_i = sqrt( sum_layers ||X~_i W^T - X_i dW_i^T||^2 / sum_layers ||X_i dW_i^T||^2 )

0 means every layer reproduces LoRA i's effect; 1 is what a merge of zero scores when
X~ = X. Layers the merge leaves out count with W = 0.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..progress import ProgressFn, no_progress
from .backend import Backend, Deltas
from .layers import apply_delta

if TYPE_CHECKING:
    from .calibration import CalibrationStats


def measure(backend: Backend, cal: CalibrationStats, merged: Deltas, progress: ProgressFn = no_progress) -> list[float]:
    """Calibration errors of ``merged`` on ``cal``'s concepts, straight from the layer
    outputs of one paired pass per concept over every layer:

        residual_i = sum ||X~_i W^T - X_i dW_i^T||^2,  reference_i = sum ||X_i dW_i^T||^2

    with W = U Z. No statistics are kept, so it needs no chunking and costs n d r per
    layer where the Gram form costs n d^2; every token counts, also under a token budget."""
    sums = {m: ([0.0] * len(cal.concept_deltas), [0.0] * len(cal.concept_deltas)) for m in cal.layers}
    for i, reference in enumerate(cal.concept_deltas):
        def sink(module, X, X_merged, folds=None, i=i, reference=reference):
            conv = cal.targets[module].conv
            got = _delta_output(merged.get(module), X_merged, conv)
            want = _delta_output(reference.get(module), X, conv)
            residual, ref = sums[module]
            residual[i] += float(((got - want).double() ** 2).sum())
            ref[i] += float((want.double() ** 2).sum())

        t0 = time.perf_counter()
        backend.capture(i, reference, merged, cal.layers, sink, progress)
        cal.timings.capture += time.perf_counter() - t0
    return concept_errors(sums, cal.layers)


def concept_errors(per_layer: dict[str, tuple[list[float], list[float]]], layers: list[str]) -> list[float]:
    """sqrt(sum_layers residual / sum_layers reference) per concept, summed in layer order."""
    res = ref = None
    for m in layers:
        r, q = per_layer[m][0], per_layer[m][1]
        res = list(r) if res is None else [a + b for a, b in zip(res, r)]
        ref = list(q) if ref is None else [a + b for a, b in zip(ref, q)]
    if res is None:
        return []
    return [math.sqrt(a / b) if b > 0 else 0.0 for a, b in zip(res, ref)]


def _delta_output(factors, x: Tensor, conv) -> Tensor:
    """`apply_delta` in float32; 0 without a delta."""
    if factors is None:
        return x.new_zeros((), dtype=torch.float32)
    return apply_delta(factors, x.float(), conv)
