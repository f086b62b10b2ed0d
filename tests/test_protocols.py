"""The benchmark's statistics on tiny fakes: draws, recovery, intervals, ties."""

import random

import pytest

from iteris_demo.protocols import (
    bootstrap,
    distractor_draws,
    mean,
    merges_of,
    recovery,
    root_ratio,
    tied,
)


@pytest.mark.parametrize("n,k,draws", [(8, 3, 3), (8, 5, 3), (8, 8, 3), (4, 2, 3), (5, 3, 4)])
def test_distractor_draws_are_seeded_distinct_and_balanced(n, k, draws):
    got = distractor_draws(n, k, draws, seed=1)
    assert got == distractor_draws(n, k, draws, seed=1)
    assert got != distractor_draws(n, k, draws, seed=2) or k == n
    for target in range(n):
        sets = [others for t, others in got if t == target]
        assert len(sets) == len(set(sets)) and 1 <= len(sets) <= draws
        assert all(len(o) == k - 1 and target not in o and len(set(o)) == k - 1 for o in sets)
        if len(sets) == draws:  # balanced: every other LoRA a distractor equally often, within one
            counts = [sum(j in o for o in sets) for j in range(n) if j != target]
            assert max(counts) - min(counts) <= 1
    with pytest.raises(ValueError, match="K must be between 2 and the 4 LoRAs, got 5"):
        distractor_draws(4, 5, 1, 0)


def test_merges_group_the_targets_that_drew_the_same_set():
    merges = merges_of([(0, (1,)), (1, (0,)), (2, (0, 1))])
    assert merges == {(0, 1): [0, 1], (0, 1, 2): [2]}


def test_recovery_is_one_for_the_lora_alone_and_zero_for_the_base():
    assert recovery(0.8, 0.8, 0.2) == 1.0
    assert recovery(0.2, 0.8, 0.2) == 0.0
    assert recovery(0.5, 0.8, 0.2) == pytest.approx(0.5)
    assert recovery(0.9, 0.8, 0.2) > 1.0  # more than the LoRA alone is reported, not clipped


def _errors(rng, n):
    dens = [1 + rng.random() for _ in range(n)]
    return [d * (0.25 + 0.2 * rng.random()) for d in dens], dens


def test_the_error_estimate_is_the_root_of_the_ratio_of_sums_and_its_interval_narrows_with_samples():
    rng = random.Random(0)
    widths = []
    for n in (10, 400):
        nums, dens = _errors(rng, n)
        est = bootstrap([n], lambda idx: root_ratio(nums, dens, idx[0]))
        assert est.value == pytest.approx((sum(nums) / sum(dens)) ** 0.5)
        assert est.low <= est.value <= est.high
        widths.append(est.high - est.low)
    assert 0 < widths[1] < 0.4 * widths[0]


def test_groups_are_resampled_separately_and_a_mean_of_presences_stays_in_its_range():
    presences = [[1, 0, 1, 1], [0, 0, 0, 1, 1]]
    est = bootstrap([4, 5], lambda idx: sum(mean(p, i) for p, i in zip(presences, idx)) / 2)
    assert est.value == pytest.approx((0.75 + 0.4) / 2) and 0 <= est.low <= est.value <= est.high <= 1
    constant = bootstrap([3, 1], lambda idx: mean([1, 1, 1], idx[0]) + mean([0], idx[1]))
    assert (constant.low, constant.value, constant.high) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="at least one sample"):
        bootstrap([3, 0], lambda idx: 0.0)


def test_a_paired_difference_separates_methods_that_one_interval_each_would_call_tied():
    rng = random.Random(3)
    dens = [1.0] * 40
    hard = [rng.random() * 2 for _ in dens]  # per-picture difficulty, shared by both methods
    a = [h * 0.50 for h in hard]
    b = [h * 0.56 for h in hard]
    ea = bootstrap([40], lambda idx: root_ratio(a, dens, idx[0]))
    eb = bootstrap([40], lambda idx: root_ratio(b, dens, idx[0]))
    assert ea.high > eb.low  # the two intervals overlap
    diff = bootstrap([40], lambda idx: root_ratio(b, dens, idx[0]) - root_ratio(a, dens, idx[0]))
    assert diff.value > 0 and not tied(diff)
    assert tied(bootstrap([40], lambda idx: root_ratio(a, dens, idx[0]) - root_ratio(a, dens, idx[0])))


def fake_distractor_result(rows: dict[str, float], pictures: int = 6, sets: int = 3) -> dict:
    """A run_distractors result whose row ``label`` has per-picture noise distance and base drift
    ``scale`` times the reference's: noise recovery 1 - scale, base drift scale."""
    rng = random.Random(0)
    groups, neutral = [], []
    for s in range(sets):
        den = [rng.uniform(1, 2) for _ in range(pictures)]
        alone = [rng.uniform(1, 2) for _ in range(pictures)]
        groups.append({"target": f"t{s}", "loras": [f"t{s}", "x"], "den": den, "seconds": {r: 1.0 for r in rows},
                       "noise": {r: [scale ** 2 * d for d in den] for r, scale in rows.items()}})
        neutral.append({"loras": [f"t{s}", "x"], "alone": alone,
                        "drift": {r: [scale ** 2 * a for a in alone] for r, scale in rows.items()}})
    return {"testbed": "fake", "split": "test", "rows": list(rows),
            "k": {"2": {"merges": sets, "seconds": 1.0, "groups": groups, "neutral": neutral}}}


def test_the_distractor_summary_reads_recovery_and_base_drift_and_orders_the_rows():
    from iteris_demo.distractors import markdown, summarize

    result = fake_distractor_result({"far": 0.8, "close": 0.2, "closer": 0.19})
    s = summarize(result)["2"]
    assert s["order"] == ["closer", "close", "far"] and s["pictures"] == 18
    for label, scale in (("far", 0.8), ("close", 0.2)):
        assert s["rows"][label]["noise"].value == pytest.approx(1 - scale)
        assert s["rows"][label]["drift"].value == pytest.approx(scale)
        assert s["rows"][label]["noise"].low <= s["rows"][label]["noise"].value <= s["rows"][label]["noise"].high
    # the same pictures for every row: a constant ratio has no spread, so 0.81 and 0.80 are told apart
    assert not s["first_two_tied"]
    assert markdown(result).splitlines()[4].startswith("| closer | 0.810 [0.810, 0.810] | 0.190")


def test_rows_whose_paired_difference_straddles_zero_are_reported_tied():
    from iteris_demo.distractors import summarize

    result = fake_distractor_result({"a": 0.5, "b": 0.5})
    for group in result["k"]["2"]["groups"]:  # b is closer on some pictures, farther on others
        group["noise"]["b"] = [n * (0.8 if k % 2 else 1.25) for k, n in enumerate(group["noise"]["b"])]
    assert summarize(result)["2"]["first_two_tied"]


@pytest.mark.slow
def test_the_quick_mode_writes_a_table_per_k_with_every_quick_row(tmp_path):
    import json

    from iteris_demo.distractors import QUICK_ROWS, main

    text = main(["--quick", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "distractors-tiny-sd1-test.json").read_text())
    assert result["split"] == "test" and list(result["k"]) == ["4"]
    assert (tmp_path / "distractors-tiny-sd1-test.md").read_text() == text
    table = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert sorted(line.split(" | ")[0][2:] for line in table) == sorted(r.label for r in QUICK_ROWS)
    for group in result["k"]["4"]["groups"]:
        assert all(d > 0 for d in group["den"])
        assert all(v >= 0 and v == v for values in group["noise"].values() for v in values)
