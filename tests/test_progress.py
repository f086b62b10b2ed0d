"""The whole merge's time estimate (iteris_sd.progress.MergeTimeEstimate) on a fake clock."""

import pytest

from iteris_sd.progress import MergeTimeEstimate


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def run(estimate, clock, phase, calls, seconds_per_call, start=0):
    totals = []
    estimate.update(phase, start)
    for k in range(1, calls + 1):
        clock.now += seconds_per_call
        estimate.update(phase, k)
        totals.append(estimate.total_seconds())
    return totals


def test_the_first_timed_call_gives_the_total_and_a_merge_at_that_rate_keeps_it():
    """2 prompts, 4 steps, 2 captures each, 1 iteration: 8 trajectory calls, 4 reference
    captures, 2 re-measuring passes of 4 doubled captures: 8 + 4 + 16 = 28 call units."""
    clock = Clock()
    estimate = MergeTimeEstimate(prompts=2, steps=4, timesteps=2, iterations=1, clock=clock)
    assert estimate.calls == 28 and estimate.total_seconds() is None  # nothing timed yet
    assert run(estimate, clock, "trajectory concept 1", 4, 1.0)[0] == pytest.approx(28.0)
    run(estimate, clock, "trajectory concept 2", 4, 1.0)
    run(estimate, clock, "capture concept 1", 2, 1.0)
    run(estimate, clock, "capture concept 2", 2, 1.0)
    estimate.update("solve", 1)
    for _ in range(2):  # the doubled batch takes twice as long, and counts twice
        totals = run(estimate, clock, "capture concept 1", 2, 2.0) + run(estimate, clock, "capture concept 2", 2, 2.0)
        assert totals == pytest.approx([28.0] * 4)
    assert clock.now == 28.0 and estimate.done == estimate.calls


def test_solve_time_raises_the_estimate_and_it_never_falls_below_the_elapsed_time():
    clock = Clock()
    estimate = MergeTimeEstimate(prompts=1, steps=2, timesteps=2, iterations=0, clock=clock)
    assert estimate.calls == 4  # no re-measuring pass without iterations
    run(estimate, clock, "trajectory concept 1", 2, 1.0)
    clock.now += 10.0  # solving, no calls
    estimate.update("solve", 1)
    assert estimate.total_seconds() == pytest.approx(12.0 * 4 / 2)
    run(estimate, clock, "capture concept 1", 2, 1.0)
    run(estimate, clock, "capture concept 1", 2, 1.0)  # more calls than counted: the estimate is the elapsed time
    assert estimate.total_seconds() == pytest.approx(clock.now)
