"""The benchmark's statistics: distractor draws, recovery, bootstrap intervals, ties.

Pure functions over numbers, so the protocol code is tested on tiny fakes
(tests/test_protocols.py) and the testbeds only supply per-picture measurements.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

LEVEL = 0.9  # every interval of the benchmark is a 90% bootstrap interval
RESAMPLES = 2000


def distractor_draws(n_loras: int, k: int, draws: int, seed: int) -> list[tuple[int, tuple[int, ...]]]:
    """Per target LoRA, up to ``draws`` distinct sets of k - 1 distractors (sorted tuples).

    Balanced: for each target the other LoRAs are put in a seeded random order and the
    draws take consecutive windows of it, cycling, so every other LoRA is a distractor of
    that target equally often (within one) over its draws. Repeated sets are dropped (with
    k - 1 = n_loras - 1 there is only one)."""
    if not 2 <= k <= n_loras:
        raise ValueError(f"K must be between 2 and the {n_loras} LoRAs, got {k}")
    out = []
    for target in range(n_loras):
        others = [j for j in range(n_loras) if j != target]
        random.Random(seed * 1_000_003 + target).shuffle(others)
        seen = set()
        for d in range(draws):
            chosen = tuple(sorted(others[(d * (k - 1) + j) % len(others)] for j in range(k - 1)))
            if chosen not in seen:
                seen.add(chosen)
                out.append((target, chosen))
    return out


def merges_of(draws: Sequence[tuple[int, tuple[int, ...]]]) -> dict[tuple[int, ...], list[int]]:
    """The distinct LoRA sets to merge (sorted tuples) and, for each, the targets that drew it."""
    out: dict[tuple[int, ...], list[int]] = {}
    for target, others in draws:
        out.setdefault(tuple(sorted((target, *others))), []).append(target)
    return out


def recovery(merged: float, alone: float, base: float) -> float:
    """How much of the target LoRA's effect on a higher-is-better score survives the merge:
    (merged - base) / (alone - base); 1 = as the LoRA alone, 0 = as the base model."""
    gap = alone - base
    return (merged - base) / gap if gap != 0 else float("nan")


@dataclass(frozen=True)
class Estimate:
    """A point estimate and its bootstrap interval."""

    value: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"


def bootstrap(sizes: Sequence[int], statistic: Callable[[list[list[int]]], float], seed: int = 0,
              level: float = LEVEL, resamples: int = RESAMPLES) -> Estimate:
    """``statistic`` (given the sample indices of each group) on every sample, and its
    percentile bootstrap interval: each group's samples (its pictures, prompt x seed) are
    resampled with replacement, independently of the other groups (stratified). Methods
    measured on the same pictures are read through the same indices inside one statistic, so a
    difference of two methods gets its paired interval."""
    if not sizes or min(sizes) < 1:
        raise ValueError(f"every group needs at least one sample, got sizes {list(sizes)}")
    rng = random.Random(seed)
    boot = sorted(statistic([[rng.randrange(n) for _ in range(n)] for n in sizes]) for _ in range(resamples))
    tail = (1 - level) / 2
    low, high = boot[int(tail * (resamples - 1))], boot[int(round((1 - tail) * (resamples - 1)))]
    return Estimate(statistic([list(range(n)) for n in sizes]), low, high)


def root_ratio(num: Sequence[float], den: Sequence[float], idx: Sequence[int]) -> float:
    """sqrt(sum num / sum den) over the samples ``idx``: the noise and image errors."""
    d = sum(den[i] for i in idx)
    return (sum(num[i] for i in idx) / d) ** 0.5 if d > 0 else 0.0


def mean(values: Sequence[float], idx: Sequence[int]) -> float:
    return sum(values[i] for i in idx) / len(idx)


def tied(a_minus_b: Estimate) -> bool:
    """Whether two methods are tied: the interval of their paired difference contains 0."""
    return a_minus_b.low <= 0 <= a_minus_b.high
