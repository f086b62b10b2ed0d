"""What the demo model and its LoRAs draw, read by the detector, and how well its text
encoder tells a caption's words apart: `scripts/train_demo_model.py --check`."""

from __future__ import annotations

from dataclasses import replace

import torch

from iteris_demo import shapes
from iteris_demo.bench import EVALUATION, problem
from iteris_demo.detect import concept_present, load_detector, read_attributes
from iteris_demo.model import DemoAssets
from iteris_demo.train import encode
from iteris_sd.app.pipeline import concept_deltas
from iteris_sd.backends.load import load_backend
from iteris_sd.lora.read import read_lora


def check_assets(assets: DemoAssets, n_prompts: int = 24, seed: int = 5, cfg: float | None = None) -> dict:
    """What the model and LoRAs draw, read by the detector (the benchmark's sampling: 12 DDIM
    steps, its CFG unless ``cfg`` is given, 2 seeds per prompt): the base model's accuracy on
    the colour, shape, position and background its prompts ask for, and, per concept, how
    often it appears with its LoRA and without it on the benchmark's held-out prompts; and
    the text encoder's separation of each attribute's words (`text_separation`)."""
    detector = load_detector(assets.detector)
    settings = replace(EVALUATION, seeds=2, cfg=EVALUATION.cfg if cfg is None else cfg)
    backend = load_backend(str(assets.base), [["a"]], settings, device="cpu")
    gen = torch.Generator().manual_seed(seed)
    scenes = [shapes.random_scene(gen) for _ in range(n_prompts)]
    found = read_attributes(detector, backend.sample([shapes.caption(s) for s in scenes], seed, {}))
    asked = [s for s in scenes for _ in range(2)]
    out = {"base": {k: sum(f[k] == getattr(s, k) for f, s in zip(found, asked)) / len(found)
                    for k in shapes.PLAIN_VALUES}, "loras": {}}
    held_out = problem(len(shapes.CONCEPTS)).held_out
    for k, concept in enumerate(shapes.CONCEPTS):
        deltas = concept_deltas(backend, [read_lora(assets.loras[k])])[0]
        shown = {}
        for name, d in (("with LoRA", deltas), ("base", {})):
            found = read_attributes(detector, backend.sample(held_out[k], seed + 6, d))
            shown[name] = sum(concept_present(f, concept) for f in found) / len(found)
        out["loras"][concept.trigger] = shown
    out["text"] = text_separation(backend.text_encoders[0], backend.tokenizers[0], scenes)
    return out


def text_separation(text_encoder, tokenizer, scenes: list[shapes.Scene]) -> dict[str, float]:
    """Per attribute, how far the text encoder's output (77, d) moves when only that word of
    a caption changes (to the next value of the attribute): the mean over ``scenes`` of
    ||E(caption) - E(changed caption)||_F / ||E(caption)||_F. Near 0, the UNet cannot tell
    the words apart, whatever it learned."""
    out = {}
    with torch.no_grad():
        e = encode(text_encoder, tokenizer, [shapes.caption(s) for s in scenes])
        for attribute, values in shapes.PLAIN_VALUES.items():
            changed = [replace(s, **{attribute: values[(values.index(getattr(s, attribute)) + 1) % len(values)]})
                       for s in scenes]
            f = encode(text_encoder, tokenizer, [shapes.caption(s) for s in changed])
            out[attribute] = float(((e - f).flatten(1).norm(dim=1) / e.flatten(1).norm(dim=1)).mean())
    return out
