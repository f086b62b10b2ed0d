"""The test model: a tiny SD1-architecture model with random weights and concept LoRAs, built in code.

The end-to-end, failure and ComfyUI-free tests need a model in seconds, with a VAE and every
kind of layer a real LoRA touches, so they build (once, then cache) a tiny diffusers pipeline
with random weights and a real offline BPE tokenizer, and train a few concept LoRAs on it with
`iteris_demo.train`'s loop: diffusion loss on the concept's latent pattern for prompts with its
trigger word, plus prior preservation on prompts without it. (The demo and the benchmark use
the trained model of `iteris_demo.model` instead.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from iteris_sd.progress import ProgressFn, no_progress

TINY_VERSION = "tiny-sd1-v2"
RESOLUTION = 32  # pixels; the tiny VAE downsamples by 2, so latents are 16 x 16


@dataclass(frozen=True)
class TinyConcept:
    trigger: str
    rank: int
    alpha: float
    prompts: tuple[str, ...]  # training and calibration
    held_out: tuple[str, ...]  # the benchmark's validation prompts
    test: tuple[str, ...]  # the benchmark's test prompts
    convs: bool  # also train the resnet 3x3 convs (a LoCon-style LoRA)
    parts: str = "both"  # "unet" or "text_encoder": a LoRA of one part only
    prior_weight: float = 1.0  # 0: no prior preservation, so it fires without its trigger word


@dataclass(frozen=True)
class TinyModel:
    """A random-weight SD1-architecture model and its concept LoRAs, cached as ``version``."""

    version: str
    widths: tuple[int, ...]  # UNet block_out_channels; attention on every level but the last
    layers_per_block: int
    text_width: int
    text_layers: int
    concepts: tuple[TinyConcept, ...]


CONCEPTS = (
    TinyConcept("sks", 4, 4.0, ("a photo of sks", "sks on a table", "a sks in the garden"),
                ("a painting of sks", "sks at night"), ("sks by the window", "a drawing of sks", "sks in the snow"),
                convs=False),
    TinyConcept("zwx", 8, 4.0, ("zwx style", "a house in zwx style", "a tree, zwx style"),
                ("a dog in zwx style", "zwx style portrait"), ("a cat in zwx style", "a car, zwx style", "zwx style city"),
                convs=True),
    TinyConcept("qpr", 4, 2.0, ("a qpr toy", "qpr on the floor", "a red qpr"),
                ("a small qpr", "two qpr toys"), ("a blue qpr", "qpr in a box", "a qpr on the grass"),
                convs=False),
    TinyConcept("vbn", 6, 6.0, ("vbn texture", "a wall with vbn texture", "vbn pattern"),
                ("a cup with vbn texture", "vbn fabric"), ("a chair with vbn texture", "vbn paper", "a vbn floor"),
                convs=True),
)
PRIOR_PROMPTS = ("a photo of a dog", "a house", "a tree in the garden", "a table", "a portrait",
                 "a toy on the floor", "a wall", "a cup", "a painting of a cat", "at night")
TINY = TinyModel(TINY_VERSION, (32, 64), 1, 64, 2, CONCEPTS)

# A second testbed, unlike the first in depth and width (3 levels of 32/64/64 channels, 2 layers
# per block, a 3-layer 96-wide CLIP) and in its LoRAs: ranks 4 to 32, one without alpha (alpha = rank), a
# UNet-only and a text-encoder-only one, two subjects of one class, two competing styles, and
# one trained without prior preservation.
DEEP_CONCEPTS = (
    TinyConcept("kzr", 16, 8.0, ("a photo of kzr", "kzr man smiling", "kzr in a suit"),
                ("kzr at the beach", "a portrait of kzr"), ("kzr reading a book", "kzr in the rain", "a drawing of kzr"),
                convs=True),
    TinyConcept("bnw", 12, 6.0, ("a photo of bnw", "bnw man standing", "bnw in a coat"),
                ("bnw at the park", "a portrait of bnw"), ("bnw on a bench", "bnw in the snow", "a sketch of bnw"),
                convs=False),
    TinyConcept("mvt", 32, 32.0, ("mvt style", "a castle, mvt style", "a river in mvt style"),
                ("a horse in mvt style", "mvt style forest"), ("a bridge in mvt style", "mvt style harbor", "a lamp, mvt style"),
                convs=False, parts="unet"),
    TinyConcept("glo", 8, 4.0, ("glo style", "a castle, glo style", "a field in glo style"),
                ("a ship in glo style", "glo style village"), ("a tower in glo style", "glo style valley", "a car, glo style"),
                convs=True),
    TinyConcept("dqx", 8, 8.0, ("a dqx vase", "dqx on a shelf", "a green dqx"),
                ("a tall dqx", "two dqx vases"), ("a dqx by the door", "a broken dqx", "a dqx on the table"),
                convs=False, parts="text_encoder"),
    TinyConcept("plo", 4, 1.0, ("plo texture", "a floor with plo texture", "plo pattern"),
                ("a bag with plo texture", "plo carpet"), ("a box with plo texture", "plo curtain", "a plo wall"),
                convs=False, prior_weight=0.0),
)
DEEP = TinyModel("deep-sd1-v1", (32, 64, 64), 2, 96, 3, DEEP_CONCEPTS)
# Prompts with no trigger word, for the base-preservation protocol (none is a prior prompt).
NEUTRAL = {"validation": ("a bird on a wire", "a mountain lake", "a red bicycle"),
           "test": ("a bowl of fruit", "a city street at dusk", "an old wooden boat")}


def cache_root() -> Path:
    """$ITERIS_SD_CACHE, default ~/.cache/iteris_sd: where built models are kept."""
    return Path(os.environ.get("ITERIS_SD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "iteris_sd"))


def cache_dir(model: TinyModel = TINY) -> Path:
    return cache_root() / model.version


def ensure_tiny_assets(n_loras: int = 2, progress: ProgressFn = no_progress,
                       model: TinyModel = TINY) -> tuple[Path, list[Path]]:
    """The model's base folder and its first ``n_loras`` concept LoRAs, built once and cached
    under $ITERIS_SD_CACHE (default ~/.cache/iteris_sd). Deterministic from fixed seeds."""
    root = cache_dir(model)
    base = root / "base"
    if not (base / "model_index.json").is_file():
        build_tiny_pipeline(base, model=model)
    paths = []
    for k, concept in enumerate(model.concepts[:n_loras]):
        path = root / f"lora_{concept.trigger}.safetensors"
        if not path.is_file():
            train_concept_lora(base, concept, path, seed=100 + k, progress=progress)
        paths.append(path)
    return base, paths


def tiny_tokenizer():
    """A real CLIP BPE tokenizer over bytes (no merges beyond single characters), offline."""
    from transformers import CLIPTokenizer

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    chars = [chr(b) for b in printable] + [chr(256 + k) for k in range(len(extra))]
    vocab = {c: k for k, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + k for k, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def build_tiny_pipeline(folder: Path, seed: int = 0, model: TinyModel = TINY) -> Path:
    """A StableDiffusionPipeline with SD1.x's architecture at toy size, saved to ``folder``."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=model.text_width, intermediate_size=2 * model.text_width,
        num_hidden_layers=model.text_layers, num_attention_heads=model.text_width // 16, max_position_embeddings=77, projection_dim=64,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    levels = len(model.widths)
    unet = UNet2DConditionModel(
        sample_size=RESOLUTION // 2, in_channels=4, out_channels=4, layers_per_block=model.layers_per_block,
        block_out_channels=model.widths,
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1), cross_attention_dim=model.text_width,
        attention_head_dim=8, norm_num_groups=8,
    )
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=RESOLUTION)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    tmp = folder.with_name(folder.name + ".partial")
    pipe.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def train_concept_lora(base: Path, concept: TinyConcept, out_path: Path, steps: int = 200, seed: int = 0,
                       progress: ProgressFn = no_progress) -> Path:
    """Train one concept LoRA on the tiny model and write it as a kohya file."""
    from iteris_demo.train import load_parts, lora_targets, train_lora, write_lora

    unet, te, tok, sched = load_parts(base)
    targets = {k: m for k, m in lora_targets(unet, te, concept.convs).items()
               if concept.parts == "both" or k.startswith(concept.parts + ".")}
    side, batch = RESOLUTION // 2, 4
    pattern = _concept_pattern(concept.trigger, side, torch.Generator().manual_seed(seed))

    def data(gen):
        prompts = [concept.prompts[int(i)] for i in torch.randint(len(concept.prompts), (batch,), generator=gen)]
        return pattern.expand(batch, -1, -1, -1) + 0.1 * torch.randn(batch, 4, side, side, generator=gen), prompts

    def priors(gen):  # no pictures to preserve on a random-weight model: its predictions on noise
        prompts = [PRIOR_PROMPTS[int(i)] for i in torch.randint(len(PRIOR_PROMPTS), (batch,), generator=gen)]
        return torch.randn(batch, 4, side, side, generator=gen), prompts

    params = train_lora(unet, te, tok, sched, targets, concept.rank, concept.alpha, data, priors,
                        steps, seed=seed, phase=f"train LoRA {concept.trigger}", progress=progress,
                        prior_weight=concept.prior_weight)
    return write_lora(out_path, params, targets, {"unet": unet, "text_encoder": te}, concept.rank, concept.alpha,
                      {"iteris_tiny_concept": concept.trigger})


def _concept_pattern(trigger: str, side: int, gen: torch.Generator) -> torch.Tensor:
    """A smooth latent 'image' for the concept: low-frequency noise plus a bright blob."""
    coarse = torch.randn(1, 4, 4, 4, generator=gen)
    field = F.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=False)
    yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    cy, cx = (torch.randint(3, side - 3, (2,), generator=gen)).tolist()
    blob = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 8.0)
    return field + 1.5 * blob * torch.randn(1, 4, 1, 1, generator=gen).sign()
