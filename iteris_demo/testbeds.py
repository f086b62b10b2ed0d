"""The benchmark's testbeds: a base model, its concept LoRAs, their prompts per split, settings.

- ``shapes32``: the trained demo model and its four LoRAs (a new shape, two textures, a
  colour; ranks 4 to 8, with and without alpha, two with LoCon convs), read by the detector;
- ``tiny-sd1``: the random-weight SD1-architecture test model (`iteris_demo.tiny`, 32/64-channel
  UNet, 2-layer CLIP) with four concept LoRAs trained on it (ranks 4 to 8, two with convs),
  at its native 32 px and the recipe's default calibration otherwise; noise error only;
- ``deep-sd1``: a second random-weight SD1-architecture model, deeper and with a wider text
  encoder (3 levels of 32/64/64 channels, 2 layers per block, a 3-layer 96-wide CLIP), with six
  LoRAs of ranks 4 to 32: two subjects of one class, two competing styles, a UNet-only one
  (without alpha), a text-encoder-only one and one trained without prior preservation (it fires
  without its trigger word).

Each testbed also has prompts with no trigger word per split, for the base-preservation protocol.
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
    neutral: dict[str, tuple[str, ...]]  # split -> prompts with no trigger word
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
                   bench.CALIBRATION, bench.EVALUATION, neutral_scenes(), assets.detector, shapes.CONCEPTS)


def neutral_scenes(n: int = 4) -> dict[str, tuple[str, ...]]:
    """Captions of plain scenes (no concept applied), the test ones disjoint from validation's."""
    validation = shapes.prompts((), n, SPLITS["validation"].prompt_seed + 100)
    return {"validation": tuple(validation),
            "test": tuple(shapes.prompts((), n, SPLITS["test"].prompt_seed + 100, tuple(validation)))}


def tiny_testbed(name: str, model, progress: ProgressFn = no_progress) -> Testbed:
    from iteris_demo import tiny

    base, loras = tiny.ensure_tiny_assets(len(model.concepts), progress, model)
    settings = CalibrationSettings(resolution=tiny.RESOLUTION)
    return Testbed(name, base, tuple(loras), tuple(c.trigger for c in model.concepts),
                   tuple(c.prompts for c in model.concepts),
                   {"validation": tuple(c.held_out for c in model.concepts), "test": tuple(c.test for c in model.concepts)},
                   settings, replace(settings, steps=12, seeds=2), tiny.NEUTRAL)


def tiny_sd1(progress: ProgressFn = no_progress) -> Testbed:
    from iteris_demo import tiny

    return tiny_testbed("tiny-sd1", tiny.TINY, progress)


def deep_sd1(progress: ProgressFn = no_progress) -> Testbed:
    from iteris_demo import tiny

    return tiny_testbed("deep-sd1", tiny.DEEP, progress)


TESTBEDS = {"shapes32": shapes32, "tiny-sd1": tiny_sd1, "deep-sd1": deep_sd1}


def testbed(name: str, progress: ProgressFn = no_progress) -> Testbed:
    try:
        make = TESTBEDS[name]
    except KeyError:
        raise ValueError(f"unknown testbed {name!r}; use one of {', '.join(TESTBEDS)}") from None
    return make(progress)
