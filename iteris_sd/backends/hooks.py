"""Low-rank deltas applied by forward hooks, and layer inputs captured by the same hooks.

Nothing is written into the weights, so one batch can carry several models at once: the
batch is split into equal chunks and chunk j gets delta set j. That is how X (the LoRA-i
model) and X~ (the merged model) are captured in one forward call, row for row, and why a
user's model is left exactly as it was once the hooks are removed (they always are).
Framework-free: any backend that can name its torch modules uses it.
"""

from __future__ import annotations

import contextlib
from typing import Collection, Iterator, Mapping

import torch
from torch import nn

from ..merge.backend import Deltas, Factors, InputSink
from ..merge.layers import ConvGeometry, apply_delta


@contextlib.contextmanager
def hooked(modules: Mapping[str, nn.Module], chunks: list[Deltas], capture: Collection[str] = (),
           sink: InputSink | None = None) -> Iterator[None]:
    """While active, module m's output for batch chunk j gains ``chunks[j][m]``'s delta, and
    every module in ``capture`` calls ``sink(m, X_chunk0, X_chunk1 or None)`` on each forward.

    Deltas are (U, Z) flattened factors (U (d_out, R), Z (R, d_in)). They are applied in the
    layer's compute dtype, that of its input, cast to it (and its device) on first use:
    never in the weight's storage dtype, which may be fp8 or bf16 with the layer casting
    the weight up in its forward (ComfyUI's manual-cast layers)."""
    capture = frozenset(capture)
    handles = []
    try:
        for m in capture.union(*[c.keys() for c in chunks]):
            hook = _hook(m, chunks, capture, sink, ConvGeometry.of(modules[m], m))
            handles.append(modules[m].register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


def _hook(module_id: str, chunks: list[dict[str, Factors]], capture: frozenset[str], sink: InputSink | None,
          conv: ConvGeometry | None):
    deltas = [c.get(module_id) for c in chunks]
    n = len(chunks)
    cast: dict[tuple, list[Factors | None]] = {}  # per input (device, dtype): the deltas, cast once

    def hook(module, args, output):
        xs = args[0].chunk(n)
        if module_id in capture:
            sink(module_id, xs[0], xs[1] if n > 1 else None)
        if all(d is None for d in deltas):
            return None
        key = (xs[0].device, xs[0].dtype)
        if key not in cast:
            cast[key] = [None if d is None else _in(d, *key) for d in deltas]
        outs = output.chunk(n)
        return torch.cat([o if d is None else o + apply_delta(d, x, conv) for o, x, d in zip(outs, xs, cast[key])])

    return hook


def _in(factors: Factors, device: torch.device, dtype: torch.dtype) -> Factors:
    return tuple(f.to(device=device, dtype=dtype) for f in factors)
