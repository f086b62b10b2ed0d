"""The protocol a model backend implements so one iteration driver runs on any framework.

A backend owns a base model and the calibration data of each concept (its prompts, and the
latents, timesteps and conditioning of a short trajectory sampled with that LoRA alone).
It applies sets of low-rank deltas to its modules and reports each targeted layer's inputs.
The diffusers backend is `iteris_sd.backends.diffusers`; a ComfyUI one lives in the nodes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Collection, Protocol

import torch
from torch import Tensor

from ..lora.layer import LoraFile, LoraLayer
from ..progress import ProgressFn
from .layers import ConvGeometry, Factors

# module id -> (U, Z): the flattened weight change U @ Z, U (d_out, R), Z (R, d_in)
Deltas = dict[str, Factors]
# sink(module id, X of the reference model, X~ of the merged model or None, folds=None): the
# layer's inputs as it received them (batch first). The keyword ``folds`` puts the call's
# calibration pictures into two folds for the automatic ridge: an int for the whole call, or a
# (batch,) tensor of 0/1 per batch element; every sink accepts it, a backend may omit it.
InputSink = Callable[..., None]


@dataclass(frozen=True)
class Target:
    """A module a LoRA can change: its base weight flattened to (d_out, d_in), float32 on
    the CPU, the weight's own shape, and for a conv the geometry to unfold its input."""

    weight: Tensor
    shape: tuple[int, ...]
    conv: ConvGeometry | None = None


class Backend(Protocol):
    def target(self, module_id: str) -> Target:
        """The module's base weight and geometry."""

    def match(self, lora: LoraFile) -> dict[str, LoraLayer]:
        """Module id -> layer for every layer of the file; raises naming unmatched keys."""

    def output_name(self, module_id: str) -> str:
        """The kohya layer name to write for a module."""

    @property
    def base_model_version(self) -> str:
        """kohya's ss_base_model_version of the base model, e.g. "sd_v1", "sdxl_base_v1-0"."""

    def capture(
        self,
        concept: int,
        reference: Deltas,
        merged: Deltas | None,
        modules: Collection[str],
        sink: InputSink,
        progress: ProgressFn,
    ) -> None:
        """Run concept ``concept``'s calibration data through the model carrying ``reference``
        (LoRA i alone) and, when ``merged`` is given, through the model carrying ``merged`` on
        exactly the same latents, timesteps and prompt tokens. For every module in ``modules``
        and every forward call, call ``sink(module, X, X_merged, folds=...)`` with the paired inputs;
        X_merged is None when ``merged`` is None. ``folds`` (see `InputSink`) should split the
        concept's calibration pictures in two: by prompt where it has several, else by seed,
        else by forward call; a backend that passes none gets the fixed fallback ridge."""

    def noise_fidelity(
        self, prompts: list[str], seed: int, reference: Deltas, candidates: dict[str, Deltas],
        progress: ProgressFn,
    ) -> dict[str, float]:
        """For evaluation: per candidate, sqrt(sum_t ||eps_cand - eps_ref||^2 / sum_t
        ||eps_ref - eps_base||^2) along the reference's own CFG trajectory from ``seed``."""


def same_deltas(a: Deltas, b: Deltas) -> bool:
    """The same layers with the same factors (so the same merged model): the same tensors
    (no cost), or bit-identical ones."""
    return a.keys() == b.keys() and all(_same(x, y) for m in a for x, y in zip(a[m], b[m]))


def _same(x: Tensor, y: Tensor) -> bool:
    return x is y or (x.shape == y.shape and x.dtype == y.dtype and x.device == y.device and torch.equal(x, y))
