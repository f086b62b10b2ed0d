"""The validation and test parts of every benchmark prompt and seed set.

Every default of the merge (ridge, ridge target, damping, iterations, calibration settings,
prompt scheme) is chosen on the validation split; the README reports the test split, whose
prompts and picture seeds played no part in any choice. ``validation`` is the set the
shipped defaults were chosen on (the benchmark's former "held-out" prompts and seed).
tests/test_splits.py checks that no validation prompt or seed is in a test set.
"""

from __future__ import annotations

from dataclasses import dataclass

from iteris_demo import shapes


@dataclass(frozen=True)
class Split:
    name: str
    prompt_seed: int  # the draw of each concept's held-out prompts
    combined_seed: int  # the draw of the prompts naming every merged concept
    picture_seed: int  # the evaluation pictures' generator seed (the combined prompts': + 1)


SPLITS = {"validation": Split("validation", 1, 2, 10_007), "test": Split("test", 3, 4, 20_011)}
MAX_HELD_OUT = 8  # held-out prompts per concept at most: the test draw excludes this many of validation's


def split(name: str) -> Split:
    try:
        return SPLITS[name]
    except KeyError:
        raise ValueError(f"unknown split {name!r}; use one of {', '.join(SPLITS)}") from None


def held_out_prompts(concept: shapes.Concept, calibration: list[str], n: int, which: Split) -> list[str]:
    """n prompts of ``concept`` for the split, none a calibration prompt; a test prompt is
    never one of the first MAX_HELD_OUT validation prompts (so at any count measured)."""
    exclude = tuple(calibration)
    if which.name == "test":
        exclude += tuple(held_out_prompts(concept, calibration, MAX_HELD_OUT, SPLITS["validation"]))
    return shapes.prompts((concept,), n, which.prompt_seed, exclude)


def combined_prompts(concepts: tuple[shapes.Concept, ...], n: int, which: Split) -> list[str]:
    """n prompts naming every concept; the test ones exclude the n validation ones, and are
    fewer where every concept applied leaves fewer distinct scenes."""
    exclude = () if which.name == "validation" else tuple(combined_prompts(concepts, n, SPLITS["validation"]))
    return shapes.prompts(concepts, n, which.combined_seed, exclude, at_most=which.name == "test")
