"""How each LoRA's calibration trajectory is sampled: one settings class for the diffusers
backend, the recipe's ``[calibration]`` table and the CLI's ``--calibration.*`` flags."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

from ..merge.backend import Deltas, same_deltas
from ..settings import check_settings, setting

SAMPLERS = ("ddim", "euler", "dpmpp_2m")
GUIDED_CFG = 5.0  # the CFG scale of every family's calibration but a guidance-distilled one's (Flux: 1)


@dataclass(frozen=True, kw_only=True)
class CalibrationSettings:
    """The sampled trajectory per prompt and seed, and which of its steps are captured."""

    steps: int = setting("Sampling steps of each LoRA's calibration trajectory (>= 1).", 8, ge=1)
    resolution: int = setting("Image size in pixels of the calibration samples (a multiple of 8, >= 16); "
                              "0: the model's native size (its UNet's sample size times the VAE's scale).",
                              0, ge=16, multiple_of=8, unset=0)
    cfg: float = setting("Classifier-free guidance scale of the calibration samples (>= 1.0; 1.0 samples without "
                         f"a negative prompt); 0: the family's, 1.0 for Flux (guidance-distilled), else {GUIDED_CFG}.",
                         0.0, ge=1.0, unset=0)
    sampler: str = setting("Sampler of the calibration trajectory: " + ", ".join(SAMPLERS) + "; SD3 and Flux always "
                           "sample with their own flow-matching Euler scheduler.", "ddim", choices=SAMPLERS)
    timesteps: int = setting("How many of the trajectory's steps are captured (1 .. steps).", 4, ge=1)
    negative_prompt: str = setting("Negative prompt of the calibration samples.", "")
    seeds: int = setting("Noise seeds per prompt (>= 1).", 1, ge=1)

    def __post_init__(self) -> None:
        check_settings(self, "CalibrationSettings")


def spread(items: list, count: int) -> list:
    """``count`` items spread evenly over the list, first and last included: which steps
    of a calibration trajectory a backend captures."""
    if count >= len(items):
        return list(items)
    if count == 1:
        return [items[len(items) // 2]]
    return [items[round(k * (len(items) - 1) / (count - 1))] for k in range(count)]


def picture_folds(prompts: int, seeds: int = 1) -> list[int] | None:
    """The two cross-validation folds of a concept's calibration pictures (prompt-major,
    ``seeds`` per prompt), for the automatic ridge: by prompt when there are several, else
    by seed; None for a single picture (the backend then folds by forward call)."""
    if prompts >= 2:
        return [p % 2 for p in range(prompts) for _ in range(seeds)]
    if seeds >= 2:
        return [s % 2 for s in range(seeds)]
    return None


class FoldingSink:
    """Wraps a capture sink so that every call it passes on carries ``now`` as its ``folds``
    (see `iteris_sd.merge.backend.InputSink`); the backend sets ``now`` before each call."""

    def __init__(self, sink) -> None:
        self.sink = sink
        self.now = None

    def __call__(self, module: str, X, X_merged) -> None:
        self.sink(module, X, X_merged, folds=self.now)


class TrajectoryCache:
    """Each concept's calibration trajectory, reused only for what it was sampled from: the
    same ``key`` (the backend's prompts, settings and seed) and the same reference deltas
    (the very tensors, or equal ones). Another merge on the same backend, with other LoRAs,
    strengths, prompts or settings, samples afresh (and replaces the concept's entry)."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[Hashable, Deltas, Any]] = {}

    def get(self, concept: int, key: Hashable, reference: Deltas) -> Any | None:
        entry = self._entries.get(concept)
        if entry is not None and entry[0] == key and same_deltas(entry[1], reference):
            return entry[2]
        return None

    def put(self, concept: int, key: Hashable, reference: Deltas, trajectory: Any) -> None:
        self._entries[concept] = (key, dict(reference), trajectory)
