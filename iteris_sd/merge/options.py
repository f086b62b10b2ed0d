"""The options of a merge, each with its default, help text and checks, defined once.

`MergeOptions` carries every method's settings and the memory planner's. The recipe
(`iteris_sd.app.recipe`) exposes the same fields as top-level recipe keys and CLI flags,
and the ComfyUI Merge node takes its widget defaults from them. The IterIS defaults are the
algorithm's own (`IterISConfig`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..settings import SettingError, check_settings, setting
from .iterate import IterISConfig
from .ridge import AUTO
from .solve import RIDGE_TARGETS

SOLVE_DEVICE_RE = re.compile(r"auto|cpu|cuda|cuda:\d+")


@dataclass(frozen=True, kw_only=True)
class MergeOptions:
    """Settings of every method; ``rank`` None keeps each method's natural rank (exact
    rank sum r_i for iteris/regmean/stack/linear/concat, max r_i for svd, and the sum of
    the ranks for ties/dare, whose dense result is SVD-truncated). Checked when made: a bad
    value is a one-line `SettingError` before any work."""

    iterations: int = setting("IterIS re-solves after the first solve (>= 0; 0 = one-shot): each re-captures the "
                              "merged model's inputs and solves again.", IterISConfig.iterations, ge=0)
    damping: float = setting("Damping of each iteration, in (0, 1]; 1 = the paper's undamped iteration.",
                             IterISConfig.damping, gt=0.0, le=1.0)
    regularization: float | str = setting(
        "IterIS's ridge on the feature Gram matrices, relative to their Frobenius norm: 'auto' (chosen per layer, "
        "from 1e-7 to 10, by 2-fold cross-validation over the calibration pictures) or a number >= 0 for every "
        "layer (the paper's a1 = a2, 1e-7 to 1e-4 in its configurations).",
        IterISConfig.regularization, ge=0.0, words=(AUTO,))
    ridge_target: str = setting("What IterIS's ridge pulls the merge toward along input directions the calibration "
                                "barely reaches: 'average' of the LoRAs' deltas (the paper's; each LoRA at about 1/N "
                                "strength there), their 'sum' (each at full strength, as when stacked), or 'auto' "
                                "(with regularization 'auto': chosen per layer with the ridge).",
                                IterISConfig.ridge_target, choices=(*RIDGE_TARGETS, AUTO))
    adaptive_weights: bool = setting("IterIS's adaptive weights c_i = ||W0 + dW_i||^2 / ||X_i (W0 + dW_i)^T||^2 per "
                                     "layer and LoRA (true, as in the paper) or equal weights (false).",
                                     IterISConfig.adaptive)
    rank: int | None = setting("Rank of the merged LoRA (>= 1); omit it (or pass 'none') for the exact sum of the "
                               "input ranks.", None, ge=1)
    density: float = setting("Fraction of each delta kept by ties and dare, in (0, 1].", 0.5, gt=0.0, le=1.0)
    seed: int = setting("Random seed of the calibration noise, the token samples and DARE's masks (>= 0).", 0, ge=0)
    memory_budget: int | str | None = setting(
        "Memory the merge's statistics and solves may use on the compute device: 'auto' (its free memory less a "
        "margin of 1 GiB + 10% of its total), 'none' (no limit), or a size such as '6GiB' or '800MB'. Layers are "
        "captured and solved in chunks that fit.", "auto")
    chunk_layers: int | None = setting("Layers captured and solved together (>= 1); omit it (or pass 'none') for the "
                                       "planner's choice from `memory_budget`.", None, ge=1)
    tokens: int | None = setting("Token rows kept per layer and LoRA (>= 1): a seeded sample, the same rows for the "
                                 "LoRA's and the merged model's inputs, used where it is smaller than the d_in x d_in "
                                 "statistics (a layer seeing fewer rows keeps all, exactly). Omit it (or pass 'none') "
                                 "for exact statistics, sampled only where a layer alone exceeds `memory_budget`.",
                                 None, ge=1)
    solve_device: str = setting("Device of the float64 solves: auto (where the statistics are; the CPU on mps), cpu, "
                                "cuda or cuda:N.", "auto", pattern=SOLVE_DEVICE_RE,
                                expected="'auto', 'cpu', 'cuda' or 'cuda:N'")

    def __post_init__(self) -> None:
        check_settings(self, "MergeOptions")
        if self.ridge_target == AUTO and self.regularization != AUTO:
            raise SettingError(f"MergeOptions.ridge_target: 'auto' needs regularization 'auto' (got "
                               f"{self.regularization!r}); set ridge_target to 'sum' or 'average'")

    def iteris_config(self) -> IterISConfig:
        return IterISConfig(iterations=self.iterations, damping=self.damping, regularization=self.regularization,
                            ridge_target=self.ridge_target, adaptive=self.adaptive_weights)

