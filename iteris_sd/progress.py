"""One progress/cancel callback for the whole core.

The core calls ``progress(phase, done, total)`` inside every loop; the CLI maps it to tqdm
bars and the ComfyUI nodes to ProgressBar plus the interrupt check. To cancel, the callback
raises (any exception propagates; `MergeCancelled` is the conventional one). Some calls add
``detail``, a dict of measurements: after each IterIS iterate, ``{"errors": [per concept],
"objective": float}`` (what the ComfyUI node charts live).
"""

from __future__ import annotations

from typing import Callable


class MergeCancelled(Exception):
    """Raised by a progress callback to stop a merge; nothing is written."""


def no_progress(phase: str, done: int, total: int, detail: dict | None = None) -> None:
    """The default callback: reports nothing, never cancels."""


ProgressFn = Callable[..., None]  # (phase, done, total, detail=None)
