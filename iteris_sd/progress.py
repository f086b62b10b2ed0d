"""One progress/cancel callback for the whole core.

The core calls ``progress(phase, done, total)`` inside every loop; the CLI maps it to tqdm
bars and the ComfyUI nodes to ProgressBar plus the interrupt check. To cancel, the callback
raises (any exception propagates; `MergeCancelled` is the conventional one). Some calls add
``detail``, a dict of measurements: after each IterIS iterate, ``{"errors": [per concept],
"objective": float}`` (what the ComfyUI node charts live).
"""

from __future__ import annotations

import time
from typing import Callable


class MergeCancelled(Exception):
    """Raised by a progress callback to stop a merge; nothing is written."""


def no_progress(phase: str, done: int, total: int, detail: dict | None = None) -> None:
    """The default callback: reports nothing, never cancels."""


ProgressFn = Callable[..., None]  # (phase, done, total, detail=None)


class MergeTimeEstimate:
    """The whole merge's expected time, counted in model calls.

    With P prompts in all, S sampling steps, T captured calls per prompt and I iterations, a
    merge makes P*S trajectory calls, P*T reference captures, and in each of its I + 1
    re-measuring passes (none when I = 0) P*T captures with the batch doubled (LoRA i | merged),
    counted twice: calls = P*S + P*T*(1 + 2*(I + 1)). Fed every progress call (captures before
    the first solve are the reference pass); ``total_seconds()`` = elapsed / calls done x calls,
    so it exists from the first timed call on and corrects itself as the merge runs (solves
    and the slower paired calls raise the rate it measures)."""

    def __init__(self, prompts: int, steps: int, timesteps: int, iterations: int, clock: Callable[[], float] = time.monotonic):
        passes = 2 * (iterations + 1) if iterations else 0
        self.calls = prompts * steps + prompts * min(timesteps, steps) * (1 + passes)
        self.clock, self.started = clock, clock()
        self.done = 0.0
        self._solved = False
        self._last: dict[str, int] = {}

    def update(self, phase: str, done: int) -> None:
        if phase == "solve":
            self._solved = True
        if not phase.startswith(("trajectory", "capture")):
            return
        previous = self._last.get(phase, 0)
        self._last[phase] = done
        weight = 2 if phase.startswith("capture") and self._solved else 1
        self.done += weight * (done - previous if done >= previous else done)  # a new pass restarts the count

    def total_seconds(self) -> float | None:
        if self.done <= 0:
            return None
        return (self.clock() - self.started) * max(self.calls, self.done) / self.done
