"""No validation prompt or seed is in a test set, on any testbed's prompt sets."""

import pytest

from iteris_demo import bench, shapes, tiny
from iteris_demo.splits import MAX_HELD_OUT, SPLITS
from iteris_demo.testbeds import neutral_scenes


def test_shapes32_validation_and_test_prompts_and_seeds_are_disjoint():
    n = len(shapes.CONCEPTS)
    val = bench.problem(n, n_held_out=MAX_HELD_OUT, n_combined=5, split_name="validation")
    test = bench.problem(n, n_held_out=MAX_HELD_OUT, n_combined=5, split_name="test")
    assert val.calibration == test.calibration
    for cal, v, t in zip(val.calibration, val.held_out, test.held_out):
        assert len(set(t)) == MAX_HELD_OUT and not set(t) & (set(v) | set(cal)) and not set(v) & set(cal)
    assert not set(val.combined) & set(test.combined)
    two = [bench.problem(2, split_name=s).combined for s in SPLITS]
    assert len(two[1]) == 5 and not set(two[0]) & set(two[1])
    # the validation split is the set the shipped defaults were chosen on: the former held-out draw
    assert val.held_out[0][:4] == bench.problem(n, split_name="validation").held_out[0]
    seeds = {name: {s.picture_seed, s.picture_seed + 1, s.picture_seed + 2} for name, s in SPLITS.items()}
    assert not seeds["validation"] & seeds["test"]


@pytest.mark.parametrize("model", [tiny.TINY, tiny.DEEP], ids=lambda m: m.version)
def test_tiny_validation_and_test_prompts_are_disjoint_from_each_other_and_calibration(model):
    triggers = {c.trigger for c in model.concepts}
    assert len(triggers) == len(model.concepts)
    for c in model.concepts:
        assert not set(c.test) & (set(c.held_out) | set(c.prompts)) and not set(c.held_out) & set(c.prompts)
        assert all(c.trigger in p for p in (*c.held_out, *c.test))


def test_neutral_prompts_name_no_concept_and_differ_between_splits():
    """The base-preservation prompts: no trigger word, none used in training, disjoint splits."""
    shapes_neutral = neutral_scenes()
    for neutral, triggers, seen in ((tiny.NEUTRAL, {c.trigger for m in (tiny.TINY, tiny.DEEP) for c in m.concepts},
                                     set(tiny.PRIOR_PROMPTS)),
                                    (shapes_neutral, {c.trigger for c in shapes.CONCEPTS}, set())):
        assert set(neutral) == set(SPLITS) and not set(neutral["validation"]) & set(neutral["test"])
        for p in (*neutral["validation"], *neutral["test"]):
            assert p not in seen and not set(p.replace(",", " ").split()) & triggers
