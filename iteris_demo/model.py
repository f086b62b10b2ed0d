"""The trained demo model: a tiny pixel-space SD1-architecture text-to-image model on the
synthetic shapes of `iteris_demo.shapes`, its four concept LoRAs and the attribute detector.

The base model is trained in two phases. It first learns to draw on SD1.x's own noise
schedule (epsilon prediction). That schedule ends at sqrt(abar_T) = 0.07: on a 32 px picture
of one flat shape that much signal still shows where the shape is and what the background
is, so a model trained only on it reads layout from its starting noise, not from the
prompt. It is then fine-tuned to zero terminal SNR with v-prediction and trailing
timesteps (Lin et al. 2024, what they did to SD 2.1), where the layout must come from the
prompt, with `CaptionProbe` added to the loss so that the text encoder keeps shape and
position words apart (without it, it merged them and the UNet could not follow them).

The weights ship in iteris_demo/assets/shapes32 (built by `scripts/train_demo_model.py`, a
fixed seed, ~2 hours on 2 CPU cores); `demo_assets()` rebuilds them into the cache only if
that folder is missing. The model is pixel space by choice: the folder has no vae/, the
UNet denoises (3, 32, 32) images directly, and a sample is its own picture.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from iteris_demo import shapes
from iteris_sd.progress import ProgressFn, no_progress

ASSETS = Path(__file__).parent / "assets" / "shapes32"
VERSION = "shapes32-v3"
RESOLUTION = shapes.SIZE
BASE_STEPS = 2000
FINETUNE_STEPS = 3000
LORA_STEPS = 300


@dataclass(frozen=True)
class DemoAssets:
    base: Path
    loras: tuple[Path, ...]  # in shapes.CONCEPTS order
    detector: Path


def demo_assets(progress: ProgressFn = no_progress) -> DemoAssets:
    """The shipped assets, or (if the package was installed without them) the same built
    once into $ITERIS_SD_CACHE from the fixed seeds."""
    folder = ASSETS
    if not (folder / "train_log.json").is_file():
        from iteris_demo.tiny import cache_root

        folder = cache_root() / VERSION
        if not (folder / "train_log.json").is_file():
            build_demo_assets(folder, progress=progress)
    return DemoAssets(folder / "base", tuple(folder / f"lora_{c.trigger}.safetensors" for c in shapes.CONCEPTS),
                      folder / "detector.safetensors")


def word_tokenizer():
    """A CLIP BPE tokenizer over bytes whose merges make every caption word one token."""
    from transformers import CLIPTokenizer

    from iteris_demo.tiny import tiny_tokenizer

    vocab = dict(tiny_tokenizer().get_vocab())
    merges: list[tuple[str, str]] = []
    words = shapes.vocabulary()
    for _ in range(4):  # a word's chain of merges can be cut by another word's; re-chain what is left
        tok = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=77)
        split = [w for w in words if len(tok(w).input_ids) != 3]
        if not split:
            return tok
        for w in split:
            pieces = tok.convert_ids_to_tokens(tok(w).input_ids[1:-1])
            left = pieces[0]
            for piece in pieces[1:]:
                if (left, piece) not in merges:
                    merges.append((left, piece))
                left += piece
                vocab.setdefault(left, len(vocab))
    raise AssertionError(f"words still split into several tokens: {split}")


def new_base_model(seed: int = 0):
    """(unet, text_encoder, tokenizer, SD1's scheduler) with random weights."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tok = word_tokenizer()
    te = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=64, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    blocks = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    unet = UNet2DConditionModel(
        sample_size=RESOLUTION, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64, 96),
        down_block_types=blocks, up_block_types=tuple(b.replace("Down", "Up") for b in reversed(blocks)),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=8)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    return unet, te, tok, sched


def zero_snr_scheduler():
    """SD1's betas rescaled to zero terminal SNR, v-prediction, sampling from t = T."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing",
                         clip_sample=True, set_alpha_to_one=False)


def save_base(folder: Path, unet, te, tok, sched) -> None:
    """A diffusers pipeline folder without vae/ (pixel space), weights in fp16."""
    folder.mkdir(parents=True, exist_ok=True)
    copy.deepcopy(unet).half().save_pretrained(folder / "unet")  # copies: training may go on in fp32
    config = folder / "unet" / "config.json"  # without the folder it was loaded from, if it was
    config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items() if k != "_name_or_path"},
                                 indent=2, sort_keys=True) + "\n")
    copy.deepcopy(te).half().save_pretrained(folder / "text_encoder")
    tok.save_pretrained(folder / "tokenizer")
    sched.save_pretrained(folder / "scheduler")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
             "unet": ["diffusers", "UNet2DConditionModel"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"],
             "vae": [None, None], "safety_checker": [None, None], "feature_extractor": [None, None],
             "requires_safety_checker": False}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def build_demo_assets(folder: Path, base_steps: int = BASE_STEPS, lora_steps: int = LORA_STEPS,
                      detector_steps: int | None = None, seed: int = 0, progress: ProgressFn = no_progress,
                      finetune_steps: int = FINETUNE_STEPS, pretrained: Path | None = None) -> Path:
    """Train the base model (``base_steps`` on SD1's schedule, then ``finetune_steps`` at
    zero terminal SNR), the concept LoRAs and the detector into ``folder`` (written under a
    temporary name and renamed when complete). ``pretrained`` is a base folder saved by an
    earlier build after its first phase (or a shapes32-v1 base): the first phase is then
    read from it instead of trained again."""
    from iteris_demo.detect import train_detector
    from iteris_demo.train import load_parts, train_base

    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    log = {"version": VERSION, "seed": seed, "torch": torch.__version__, "threads": torch.get_num_threads()}
    if pretrained is None:
        t0 = time.perf_counter()
        unet, te, tok, sched = new_base_model(seed)
        losses = train_base(unet, te, tok, sched, _base_batch, base_steps, seed=seed, progress=progress)
        log["base"] = _train_record(base_steps, t0, losses)
        pretrained = tmp / "pretrained"
        save_base(pretrained, unet, te, tok, sched)
    else:
        log["base"] = {"pretrained": "phase 1 read from a saved base, not trained in this run"}
    # fine-tune from the fp16 save, so that a build from ``pretrained`` is the same as one without
    unet, te, tok, _ = load_parts(pretrained)
    sched = zero_snr_scheduler()
    t0 = time.perf_counter()
    losses = train_base(unet, te, tok, sched, _base_batch, finetune_steps, lr=1e-3, seed=seed + 1,
                        phase="fine-tune base model to zero terminal SNR", progress=progress,
                        text_probe=CaptionProbe(te.config.hidden_size))
    log["finetune"] = _train_record(finetune_steps, t0, losses)
    shutil.rmtree(tmp / "pretrained", ignore_errors=True)
    save_base(tmp / "base", unet, te, tok, sched)
    log["loras"] = train_demo_loras(tmp, lora_steps, seed, progress)
    t0 = time.perf_counter()
    train_detector(tmp / "detector.safetensors", seed=seed, progress=progress,
                   **({"steps": detector_steps} if detector_steps else {}))
    log["detector"] = {"seconds": round(time.perf_counter() - t0, 1)}
    (tmp / "train_log.json").write_text(json.dumps(log, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def train_demo_loras(folder: Path, lora_steps: int = LORA_STEPS, seed: int = 0,
                     progress: ProgressFn = no_progress) -> dict:
    """Train each concept LoRA on ``folder``/base (the fp16 weights users get) into
    ``folder``/lora_<trigger>.safetensors; returns their training record."""
    from iteris_demo.train import load_parts, lora_targets, train_lora, write_lora

    unet, te, tok, sched = load_parts(folder / "base")
    log = {}
    for k, concept in enumerate(shapes.CONCEPTS):
        t0 = time.perf_counter()
        targets = lora_targets(unet, te, concept.convs)
        params = train_lora(
            unet, te, tok, sched, targets, concept.rank, concept.alpha,
            data=lambda g, c=concept: shapes.batch(g, 8, (c,))[:2], priors=_noise_priors, steps=lora_steps,
            seed=seed + 100 + k, phase=f"train LoRA {concept.trigger}", progress=progress)
        write_lora(folder / f"lora_{concept.trigger}.safetensors", params, targets,
                   {"unet": unet, "text_encoder": te}, concept.rank, concept.alpha,
                   {"iteris_demo_concept": concept.trigger}, dtype="fp16")
        log[concept.trigger] = {"steps": lora_steps, "rank": concept.rank, "alpha": concept.alpha,
                                "convs": concept.convs, "seconds": round(time.perf_counter() - t0, 1)}
    return log


def _noise_priors(gen: torch.Generator):
    """Prior preservation's batch: 8 captions without a trigger, on random-noise pictures.
    Rendered pictures were tried for shapes32-v3 and zwx then barely learned its stripes
    (shown in 0.12 of its pictures after 300 steps; 0.38 after 600, and as often without its
    trigger)."""
    prompts = shapes.batch(gen, 8)[1]
    return torch.randn((len(prompts), 3, RESOLUTION, RESOLUTION), generator=gen), prompts


def _base_batch(gen: torch.Generator):
    """The base model's training batch: 32 captioned pictures, 10% of captions dropped (for CFG)."""
    return shapes.batch(gen, 32, drop_caption=0.1)[:2]


class CaptionProbe(torch.nn.Module):
    """A loss that keeps every attribute's words apart in the text encoder's output.

    Per attribute (shape, colour, position, background), a linear read-out of the output
    averaged over tokens, (b, 77, d) -> (b, d), classifies which value the caption names
    (or that it names none); the loss is ``weight`` times the mean cross-entropy. The
    read-out's rows are unit vectors, so a low loss needs the encoder's outputs themselves
    to differ, not a large read-out. Trained on the diffusion loss alone the encoder left
    shape and position words almost where they started (`text_separation` 0.012 and 0.008
    against colour's 0.44), and a UNet cannot follow words it cannot tell apart."""

    def __init__(self, width: int, weight: float = 0.1):
        super().__init__()
        self.weight = weight
        self.heads = torch.nn.ParameterDict({field: torch.nn.Parameter(torch.randn(len(values) + 1, width))
                                             for field, values in shapes.PLAIN_VALUES.items()})

    def forward(self, prompts: list[str], hidden: torch.Tensor) -> torch.Tensor:
        pooled = hidden.mean(1)
        loss = hidden.new_zeros(())
        for field, values in shapes.PLAIN_VALUES.items():
            named = [shapes.caption_value(p, values) for p in prompts]
            logits = pooled @ torch.nn.functional.normalize(self.heads[field], dim=1).T
            loss = loss + torch.nn.functional.cross_entropy(logits, torch.tensor(named))
        return self.weight * loss / len(self.heads)


def _train_record(steps: int, t0: float, losses: list[float]) -> dict:
    head, tail = losses[:100] or [0.0], losses[-100:] or [0.0]
    return {"steps": steps, "batch": 32, "seconds": round(time.perf_counter() - t0, 1),
            "loss_first_100": sum(head) / len(head), "loss_last_100": sum(tail) / len(tail)}
