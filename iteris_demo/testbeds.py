"""The benchmark's testbeds: a base model, its concept LoRAs, their prompts per split, settings.

- ``shapes32``: the trained demo model and its four LoRAs (a new shape, two textures, a
  colour; ranks 4 to 8, with and without alpha, two with LoCon convs), read by the detector;
- ``tiny-sd1``: the random-weight SD1-architecture test model (`iteris_demo.tiny`, 32/64-channel
  UNet, 2-layer CLIP) with four concept LoRAs trained on it (ranks 4 to 8, two with convs),
  at its native 32 px and the recipe's default calibration otherwise; noise error only.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from iteris_demo import shapes
from iteris_demo.splits import SPLITS
from iteris_sd.backends.calibration import CalibrationSettings
from iteris_sd.progress import ProgressFn, no_progress


@dataclass(frozen=True)
class Testbed:
    name: str
    base: Path
    loras: tuple[Path, ...]
    names: tuple[str, ...]  # each LoRA's trigger word
    calibration: tuple[tuple[str, ...], ...]  # per LoRA
    held_out: dict[str, tuple[tuple[str, ...], ...]]  # split -> per LoRA
    settings: CalibrationSettings  # of the merge's calibration
    evaluation: CalibrationSettings  # of the evaluation pictures
    detector: Path | None = None
    concepts: tuple[shapes.Concept, ...] = field(default=())  # what the detector reads, per LoRA


def shapes32(progress: ProgressFn = no_progress) -> Testbed:
    from iteris_demo import bench
    from iteris_demo.model import demo_assets

    assets = demo_assets(progress)
    n = len(shapes.CONCEPTS)
    problems = {s: bench.problem(n, split_name=s) for s in SPLITS}
    return Testbed("shapes32", assets.base, assets.loras, tuple(c.trigger for c in shapes.CONCEPTS),
                   tuple(map(tuple, problems["validation"].calibration)),
                   {s: tuple(map(tuple, p.held_out)) for s, p in problems.items()},
                   bench.CALIBRATION, bench.EVALUATION, assets.detector, shapes.CONCEPTS)


def tiny_sd1(progress: ProgressFn = no_progress) -> Testbed:
    from iteris_demo import tiny

    base, loras = tiny.ensure_tiny_assets(len(tiny.CONCEPTS), progress)
    settings = CalibrationSettings(resolution=tiny.RESOLUTION)
    return Testbed("tiny-sd1", base, tuple(loras), tuple(c.trigger for c in tiny.CONCEPTS),
                   tuple(c.prompts for c in tiny.CONCEPTS),
                   {"validation": tuple(c.held_out for c in tiny.CONCEPTS), "test": tuple(c.test for c in tiny.CONCEPTS)},
                   settings, replace(settings, steps=12, seeds=2))


TESTBEDS = {"shapes32": shapes32, "tiny-sd1": tiny_sd1}


def testbed(name: str, progress: ProgressFn = no_progress) -> Testbed:
    try:
        make = TESTBEDS[name]
    except KeyError:
        raise ValueError(f"unknown testbed {name!r}; use one of {', '.join(TESTBEDS)}") from None
    return make(progress)
