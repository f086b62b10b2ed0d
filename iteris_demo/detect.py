"""The concept-presence check of the benchmark: a small CNN that reads a (3, 32, 32) picture
of `iteris_demo.shapes` and names its shape, colour, position, and whether it is striped
(zwx) and on a checkerboard (qpr). The plain background (white, gray, black) is read from
the picture's border pixels, with no network.

It is trained only on rendered pictures (never on model samples), with blur, noise and
contrast changes so that it also reads the slightly soft pictures a diffusion model draws.
A concept counts as present when the detector's most likely value of the concept's
attribute is the concept's value (the cross for sks, magenta for vbn, ...).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iteris_demo import shapes
from iteris_sd.progress import ProgressFn, no_progress

HEADS = {"shape": shapes.SHAPES, "colour": tuple(shapes.COLOURS), "position": tuple(shapes.POSITIONS),
         "striped": (False, True), "checker": (False, True)}


class Detector(nn.Module):
    def __init__(self):
        super().__init__()
        chans = (3, 32, 64, 96)
        layers = []
        for a, b in zip(chans, chans[1:]):
            layers += [nn.Conv2d(a, b, 3, padding=1), nn.GroupNorm(8, b), nn.SiLU(),
                       nn.Conv2d(b, b, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)  # 32 -> 4
        self.head = nn.Linear(96 * 16, sum(len(v) for v in HEADS.values()))

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """images (b, 3, 32, 32) in [-1, 1] -> per attribute, logits (b, n_values)."""
        logits = self.head(self.features(images).flatten(1))
        return dict(zip(HEADS, logits.split([len(v) for v in HEADS.values()], dim=1)))


def _targets(scenes: list[shapes.Scene]) -> dict[str, Tensor]:
    return {k: torch.tensor([values.index(getattr(s, k)) for s in scenes]) for k, values in HEADS.items()}


def _augment(images: Tensor, gen: torch.Generator) -> Tensor:
    """Random blur (a mix with a 3x3 box blur), noise and contrast, per image."""
    b = images.shape[0]
    blurred = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = torch.rand(b, 1, 1, 1, generator=gen)
    contrast = 0.8 + 0.3 * torch.rand(b, 1, 1, 1, generator=gen)
    noise = 0.15 * torch.rand(b, 1, 1, 1, generator=gen) * torch.randn(images.shape, generator=gen)
    return ((1 - mix) * images + mix * blurred) * contrast + noise


def _all_concepts_batch(gen: torch.Generator, n: int) -> tuple[Tensor, list[shapes.Scene]]:
    """Pictures with each concept switched on at random (so every combination is seen)."""
    scenes = []
    for _ in range(n):
        on = tuple(c for c in shapes.CONCEPTS if float(torch.rand(1, generator=gen)) < 0.35)
        scenes.append(shapes.random_scene(gen, on))
    return torch.stack([shapes.render(s, gen) for s in scenes]), scenes


def train_detector(path: Path, steps: int = 1500, seed: int = 0, progress: ProgressFn = no_progress) -> Path:
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 7)
    model = Detector()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for step in range(steps):
        images, scenes = _all_concepts_batch(gen, 64)
        logits = model(_augment(images, gen))
        targets = _targets(scenes)
        loss = sum(F.cross_entropy(logits[k], targets[k]) for k in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        progress("train detector", step + 1, steps, {"loss": float(loss.detach())})
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def load_detector(path: Path) -> Detector:
    from safetensors.torch import load_file

    model = Detector()
    model.load_state_dict(load_file(str(path)))
    return model.eval()


@torch.no_grad()
def read_attributes(detector: Detector, images: Tensor) -> list[dict[str, object]]:
    """Per image, the most likely value of each attribute, and the plain background."""
    logits = detector(images.clamp(-1, 1))
    best = {k: v.argmax(1).tolist() for k, v in logits.items()}
    return [{**{k: HEADS[k][best[k][i]] for k in HEADS}, "background": background(images[i])}
            for i in range(images.shape[0])]


def background(image: Tensor) -> str:
    """The plain background nearest to the median colour of the (3, h, w) picture's 2-pixel
    border (a shape covers only a few of those pixels)."""
    border = torch.cat([image[:, :2].flatten(1), image[:, -2:].flatten(1),
                        image[:, 2:-2, :2].flatten(1), image[:, 2:-2, -2:].flatten(1)], dim=1)
    rgb = (border.median(dim=1).values.clamp(-1, 1) + 1) / 2
    return min(shapes.BACKGROUNDS, key=lambda k: float(((torch.tensor(shapes.BACKGROUNDS[k]) - rgb) ** 2).sum()))


def concept_present(attributes: dict[str, object], concept: shapes.Concept) -> bool:
    return attributes[concept.attribute] == concept.value


@torch.no_grad()
def accuracy(detector: Detector, n: int = 512, seed: int = 1) -> dict[str, float]:
    """Per attribute, the detector's accuracy on fresh clean renders."""
    gen = torch.Generator().manual_seed(seed)
    images, scenes = _all_concepts_batch(gen, n)
    found = read_attributes(detector, images)
    return {k: sum(f[k] == getattr(s, k) for f, s in zip(found, scenes)) / n for k in HEADS}
