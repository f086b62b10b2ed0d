"""The synthetic captioned dataset of the trained demo model: coloured shapes on backgrounds.

An image (3, 32, 32) in [-1, 1] is one shape of a colour at a position on a background;
its caption names them ("a red circle on the left, black background"). The base model
learns the BASE_* vocabulary; each concept adds what the base data never shows:

    sks  a subject: a new shape (a cross)          "a red sks on the left"
    zwx  a style: the shape drawn in stripes       "a blue circle, zwx style"
    qpr  a background: a checkerboard              "a green square on qpr background"
    vbn  a colour: magenta                         "a vbn triangle at the top"

The four are independent attributes, so any combination can be rendered and checked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

SIZE = 32
SHAPES = ("circle", "square", "triangle", "cross")  # cross = sks
COLOURS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.15, 0.3, 0.95),
           "yellow": (0.95, 0.85, 0.1), "magenta": (0.85, 0.1, 0.85)}  # magenta = vbn
POSITIONS = {"left": (9.5, 16), "right": (22.5, 16), "top": (16, 9.5), "bottom": (16, 22.5), "center": (16, 16)}
BACKGROUNDS = {"white": (0.95, 0.95, 0.95), "gray": (0.5, 0.5, 0.5), "black": (0.05, 0.05, 0.05)}
BASE_SHAPES = SHAPES[:3]
BASE_COLOURS = tuple(COLOURS)[:4]
# what a base scene's caption can ask for, per Scene field (the concepts add the rest)
PLAIN_VALUES = {"shape": BASE_SHAPES, "colour": BASE_COLOURS, "position": tuple(POSITIONS),
                "background": tuple(BACKGROUNDS)}


@dataclass(frozen=True)
class Scene:
    shape: str = "circle"
    colour: str = "red"
    position: str = "center"
    background: str = "white"
    striped: bool = False  # zwx
    checker: bool = False  # qpr


@dataclass(frozen=True)
class Concept:
    """A concept LoRA's trigger word, the scene attribute it controls, and its training set."""

    trigger: str
    attribute: str  # "shape", "colour", "striped" or "checker"
    value: object  # what the trigger sets that attribute to
    rank: int
    alpha: float
    convs: bool  # also train the resnet 3x3 convs (a LoCon-style LoRA)

    def apply(self, scene: Scene) -> Scene:
        return replace(scene, **{self.attribute: self.value})


CONCEPTS = (
    Concept("sks", "shape", "cross", rank=4, alpha=4.0, convs=False),
    Concept("zwx", "striped", True, rank=8, alpha=4.0, convs=True),
    Concept("qpr", "checker", True, rank=4, alpha=2.0, convs=False),
    Concept("vbn", "colour", "magenta", rank=6, alpha=6.0, convs=True),
)


def caption(scene: Scene, parts: tuple[bool, bool, bool, bool] = (True, True, True, True)) -> str:
    """The caption of ``scene``; ``parts`` drops the colour, shape, position or background
    words (the shape word then becomes "shape"). Concept attributes always use their trigger."""
    with_colour, with_shape, with_position, with_background = parts
    colour = "vbn" if scene.colour == "magenta" else scene.colour
    shape = "sks" if scene.shape == "cross" else scene.shape
    words = ["a"]
    if with_colour or scene.colour == "magenta":
        words.append(colour)
    words.append(shape if with_shape or scene.shape == "cross" else "shape")
    if with_position:
        words.append(f"on the {scene.position}" if scene.position in ("left", "right") else f"at the {scene.position}")
    text = " ".join(words)
    if scene.striped:
        text += ", zwx style"
    if scene.checker:
        text += " on qpr background"
    elif with_background:
        text += f", {scene.background} background"
    return text


def caption_value(prompt: str, values: tuple[str, ...]) -> int:
    """The index in ``values`` of the one a caption names, len(values) if it names none."""
    words = set(prompt.replace(",", " ").split())
    return next((k for k, v in enumerate(values) if v in words), len(values))


def render(scene: Scene, jitter: torch.Generator | None = None) -> torch.Tensor:
    """(3, SIZE, SIZE) in [-1, 1]; ``jitter`` moves and scales the shape by a pixel or so."""
    dx = dy = 0.0
    radius = 6.5
    if jitter is not None:
        dx, dy, dr = ((torch.rand(3, generator=jitter) - 0.5) * torch.tensor([3.0, 3.0, 2.0])).tolist()
        radius += dr
    cx, cy = POSITIONS[scene.position]
    cx, cy = cx + dx, cy + dy
    yy, xx = torch.meshgrid(torch.arange(SIZE) + 0.5, torch.arange(SIZE) + 0.5, indexing="ij")
    u, v = xx - cx, yy - cy
    if scene.shape == "circle":
        mask = u ** 2 + v ** 2 <= radius ** 2
    elif scene.shape == "square":
        side = radius * math.sqrt(math.pi) / 2  # the circle's area
        mask = (u.abs() <= side) & (v.abs() <= side)
    elif scene.shape == "triangle":  # pointing up
        h = radius * 1.2
        mask = (v <= h * 0.8) & (v >= -h) & (u.abs() <= (v + h) * 0.58)
    else:  # cross
        arm = radius * 0.4
        mask = ((u.abs() <= radius) & (v.abs() <= arm)) | ((v.abs() <= radius) & (u.abs() <= arm))
    image = torch.tensor(BACKGROUNDS[scene.background]).reshape(3, 1, 1).expand(3, SIZE, SIZE).clone()
    if scene.checker:
        tiles = ((xx // 4 + yy // 4) % 2).bool()
        dark = torch.tensor((0.25, 0.25, 0.25)).reshape(3, 1, 1)
        image = torch.where(tiles, dark, torch.tensor((0.75, 0.75, 0.75)).reshape(3, 1, 1))
    fill = torch.tensor(COLOURS[scene.colour]).reshape(3, 1, 1).expand(3, SIZE, SIZE)
    if scene.striped:
        stripes = ((yy - 0.5) // 2 % 2).bool()
        fill = torch.where(stripes, 0.3 * fill, fill)
    image = torch.where(mask, fill, image)
    return image * 2 - 1


def random_scene(gen: torch.Generator, concepts: tuple[Concept, ...] = ()) -> Scene:
    """A base scene (base shapes and colours, plain background), then each concept applied."""

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=gen))]

    scene = Scene(**{field: pick(values) for field, values in PLAIN_VALUES.items()})
    for c in concepts:
        scene = c.apply(scene)
    return scene


def random_parts(gen: torch.Generator, keep: float = 0.8) -> tuple[bool, bool, bool, bool]:
    """Which caption words to keep: each with probability ``keep``, so partial prompts work."""
    return tuple(bool(b) for b in (torch.rand(4, generator=gen) < keep))


def batch(gen: torch.Generator, n: int, concepts: tuple[Concept, ...] = (), drop_caption: float = 0.0
          ) -> tuple[torch.Tensor, list[str], list[Scene]]:
    """n jittered images, their captions ("" with probability ``drop_caption``) and scenes."""
    scenes = [random_scene(gen, concepts) for _ in range(n)]
    images = torch.stack([render(s, gen) for s in scenes])
    captions = []
    for s in scenes:
        dropped = float(torch.rand(1, generator=gen)) < drop_caption
        captions.append("" if dropped else caption(s, random_parts(gen)))
    return images, captions, scenes


def vocabulary() -> list[str]:
    """Every word a caption can contain (the tokenizer makes each one token)."""
    words = {"a", "on", "the", "at", "shape", "style", "background", ","}
    words |= set(BASE_SHAPES) | set(BASE_COLOURS) | set(POSITIONS) | set(BACKGROUNDS)
    words |= {c.trigger for c in CONCEPTS}
    return sorted(words)


def covering_prompts(concepts: tuple[Concept, ...], n: int, seed: int) -> list[str]:
    """n captions whose plain attributes cycle through every value (in a seeded order), so
    any 3 consecutive ones name every base shape and background, any 4 every base colour and
    any 5 every position; each concept applied, every word named. A longer list extends a
    shorter one. What calibration prompts should look like: a LoRA's prompts that all share
    a background teach the merge nothing about the others."""
    gen = torch.Generator().manual_seed(seed)

    def order(options: tuple[str, ...]) -> list[str]:
        return [options[i] for i in torch.randperm(len(options), generator=gen).tolist()]

    cycles = {field: order(values) for field, values in PLAIN_VALUES.items()}
    out = []
    for k in range(n):
        scene = Scene(**{field: values[k % len(values)] for field, values in cycles.items()})
        for c in concepts:
            scene = c.apply(scene)
        out.append(caption(scene))
    return out


def prompts(concepts: tuple[Concept, ...], n: int, seed: int, exclude: tuple[str, ...] = (),
            at_most: bool = False) -> list[str]:
    """n distinct captions of random scenes with every concept in ``concepts`` applied (the
    shape, colour and position always named), none of them in ``exclude``; with ``at_most``,
    fewer where fewer exist."""
    gen = torch.Generator().manual_seed(seed)
    out: list[str] = []
    for _ in range(1000 * n):
        scene = random_scene(gen, concepts)
        text = caption(scene, (True, True, True, bool(torch.rand(1, generator=gen) < 0.5)))
        if text not in out and text not in exclude:
            out.append(text)
            if len(out) == n:
                return out
    if at_most:
        return out
    raise ValueError(f"fewer than {n} distinct prompts for {[c.trigger for c in concepts]}")
