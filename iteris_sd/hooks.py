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
import torch.nn.functional as F
from torch import Tensor, nn

from .backend import Deltas, Factors, InputSink


@contextlib.contextmanager
def hooked(modules: Mapping[str, nn.Module], chunks: list[Deltas], capture: Collection[str] = (),
           sink: InputSink | None = None) -> Iterator[None]:
    """While active, module m's output for batch chunk j gains ``chunks[j][m]``'s delta, and
    every module in ``capture`` calls ``sink(m, X_chunk0, X_chunk1 or None)`` on each forward.

    Deltas are (U, Z) flattened factors (U (d_out, R), Z (R, d_in)); they are cast to each
    module's device and dtype once, on entry."""
    prepared = [{m: _prepare(f, modules[m]) for m, f in c.items()} for c in chunks]
    capture = frozenset(capture)
    handles = []
    try:
        for m in capture.union(*[c.keys() for c in chunks]):
            handles.append(modules[m].register_forward_hook(_hook(m, prepared, capture, sink)))
        yield
    finally:
        for h in handles:
            h.remove()


def _hook(module_id: str, chunks: list[dict[str, Factors]], capture: frozenset[str], sink: InputSink | None):
    deltas = [c.get(module_id) for c in chunks]
    n = len(chunks)

    def hook(module, args, output):
        xs = args[0].chunk(n)
        if module_id in capture:
            sink(module_id, xs[0], xs[1] if n > 1 else None)
        if all(d is None for d in deltas):
            return None
        outs = output.chunk(n)
        return torch.cat([o if d is None else o + apply_delta(module, d, x) for o, x, d in zip(outs, xs, deltas)])

    return hook


def _prepare(factors: Factors, module: nn.Module) -> Factors:
    """(U, Z) on the module's device and dtype, shaped for it: conv kernels for a Conv2d."""
    w = module.weight
    U, Z = (f.to(device=w.device, dtype=w.dtype) for f in factors)
    if isinstance(module, nn.Conv2d):
        return U.reshape(U.shape[0], U.shape[1], 1, 1), Z.reshape(Z.shape[0], module.in_channels, *module.kernel_size)
    return U, Z


def apply_delta(module: nn.Module, factors: Factors, x: Tensor) -> Tensor:
    """The low-rank delta's output for input x: x Z^T U^T (a conv with Z's kernel, then 1x1 U)."""
    U, Z = (f.to(device=x.device, dtype=x.dtype) for f in factors)  # no-op unless weights are offloaded
    if isinstance(module, nn.Conv2d):
        return F.conv2d(F.conv2d(x, Z, None, module.stride, module.padding, module.dilation), U)
    return F.linear(F.linear(x, Z), U)
