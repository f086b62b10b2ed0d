"""The embedded default: a tiny SD1-architecture model and concept LoRAs, built in code.

No download is possible in CI or on a fresh machine, so `python -m iteris_sd demo` and the
end-to-end tests build (once, then cache) a tiny diffusers pipeline with random weights and
a real offline BPE tokenizer, and train a few concept LoRAs on it with a real LoRA training
loop: diffusion loss on the concept's latent pattern for prompts with its trigger word, plus
prior preservation (match the base model) on prompts without it. Each LoRA has UNet
attention, feed-forward and resnet-conv layers and text-encoder layers, and its own rank.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .progress import ProgressFn, no_progress

TINY_VERSION = "tiny-sd1-v1"
RESOLUTION = 32  # pixels; the tiny VAE downsamples by 2, so latents are 16 x 16


@dataclass(frozen=True)
class TinyConcept:
    trigger: str
    rank: int
    alpha: float
    prompts: tuple[str, ...]
    held_out: tuple[str, ...]
    convs: bool  # also train the resnet 3x3 convs (a LoCon-style LoRA)


CONCEPTS = (
    TinyConcept("sks", 4, 4.0, ("a photo of sks", "sks on a table", "a sks in the garden"),
                ("a painting of sks", "sks at night"), convs=False),
    TinyConcept("zwx", 8, 4.0, ("zwx style", "a house in zwx style", "a tree, zwx style"),
                ("a dog in zwx style", "zwx style portrait"), convs=True),
    TinyConcept("qpr", 4, 2.0, ("a qpr toy", "qpr on the floor", "a red qpr"),
                ("a small qpr", "two qpr toys"), convs=False),
    TinyConcept("vbn", 6, 6.0, ("vbn texture", "a wall with vbn texture", "vbn pattern"),
                ("a cup with vbn texture", "vbn fabric"), convs=True),
)
PRIOR_PROMPTS = ("a photo of a dog", "a house", "a tree in the garden", "a table", "a portrait",
                 "a toy on the floor", "a wall", "a cup", "a painting of a cat", "at night")


def cache_dir() -> Path:
    root = os.environ.get("ITERIS_SD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "iteris_sd")
    return Path(root) / TINY_VERSION


def ensure_tiny_assets(n_loras: int = 2, progress: ProgressFn = no_progress) -> tuple[Path, list[Path]]:
    """The tiny base folder and the first ``n_loras`` concept LoRAs, built once and cached
    under $ITERIS_SD_CACHE (default ~/.cache/iteris_sd). Deterministic from fixed seeds."""
    root = cache_dir()
    base = root / "base"
    if not (base / "model_index.json").is_file():
        build_tiny_pipeline(base)
    paths = []
    for k, concept in enumerate(CONCEPTS[:n_loras]):
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


def build_tiny_pipeline(folder: Path, seed: int = 0) -> Path:
    """A StableDiffusionPipeline with SD1.x's architecture at toy size, saved to ``folder``."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=64,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    unet = UNet2DConditionModel(
        sample_size=RESOLUTION // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
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


def _lora_targets(unet: nn.Module, text_encoder: nn.Module, convs: bool) -> dict[str, nn.Module]:
    """Module id -> module: attention, feed-forward, proj_in/out, optionally resnet convs, and
    the text encoder's attention projections."""
    out = {}
    for name, m in unet.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(m, nn.Linear) and (".attn" in name or ".ff." in name):
            out[f"unet.{name}"] = m
        elif isinstance(m, nn.Conv2d) and (leaf in ("proj_in", "proj_out") or (convs and leaf in ("conv1", "conv2"))):
            out[f"unet.{name}"] = m
    for name, m in text_encoder.named_modules():
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out[f"text_encoder.{name}"] = m
    return out


def train_concept_lora(base: Path, concept: TinyConcept, out_path: Path, steps: int = 200, seed: int = 0,
                       progress: ProgressFn = no_progress) -> Path:
    """Train one concept LoRA on the tiny model and write it as a kohya file."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    from .formats import write_kohya
    from .keymap import build_keymap

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet").requires_grad_(False)
    te = CLIPTextModel.from_pretrained(base, subfolder="text_encoder").requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(base, subfolder="tokenizer")
    sched = DDIMScheduler.from_pretrained(base, subfolder="scheduler")
    targets = _lora_targets(unet, te, concept.convs)
    scale = concept.alpha / concept.rank
    params: dict[str, tuple[nn.Parameter, nn.Parameter]] = {}
    for mid, m in targets.items():
        d_in = m.weight[0].numel()
        down = nn.Parameter(torch.randn(concept.rank, d_in) / d_in ** 0.5)
        up = nn.Parameter(torch.zeros(m.weight.shape[0], concept.rank))
        params[mid] = (up, down)

    enabled = {"on": True}

    def hook_for(mid, m):
        def hook(module, args, output):
            if not enabled["on"]:
                return None
            up, down = params[mid]
            x = args[0]
            if isinstance(module, nn.Conv2d):
                k = down.reshape(concept.rank, module.in_channels, *module.kernel_size)
                h = F.conv2d(x, k, None, module.stride, module.padding, module.dilation)
                return output + scale * F.conv2d(h, up[:, :, None, None])
            return output + scale * F.linear(F.linear(x, down), up)
        return hook

    handles = [m.register_forward_hook(hook_for(mid, m)) for mid, m in targets.items()]
    opt = torch.optim.Adam([p for pair in params.values() for p in pair], lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    side = RESOLUTION // 2
    pattern = _concept_pattern(concept.trigger, side, gen)
    abar = sched.alphas_cumprod
    batch = 4
    try:
        for step in range(steps):
            prompts = [concept.prompts[int(i)] for i in torch.randint(len(concept.prompts), (batch,), generator=gen)]
            priors = [PRIOR_PROMPTS[int(i)] for i in torch.randint(len(PRIOR_PROMPTS), (batch,), generator=gen)]
            ids = tok(prompts + priors, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            x0 = torch.cat([pattern.expand(batch, -1, -1, -1) + 0.1 * torch.randn(batch, 4, side, side, generator=gen),
                            torch.randn(batch, 4, side, side, generator=gen)])
            t = torch.randint(0, len(abar), (2 * batch,), generator=gen)
            noise = torch.randn(x0.shape, generator=gen)
            a = abar[t].reshape(-1, 1, 1, 1)
            xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
            with torch.no_grad():
                enabled["on"] = False
                prior_target = unet(xt[batch:], t[batch:], encoder_hidden_states=te(ids[batch:])[0]).sample
                enabled["on"] = True
            pred = unet(xt, t, encoder_hidden_states=te(ids)[0]).sample
            loss = F.mse_loss(pred[:batch], noise[:batch]) + F.mse_loss(pred[batch:], prior_target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            progress(f"train LoRA {concept.trigger}", step + 1, steps)
    finally:
        for h in handles:
            h.remove()
    keymap = build_keymap({"unet": unet, "text_encoder": te}, "sd1")
    layers = {}
    for mid, (up, down) in params.items():
        w = targets[mid].weight
        layers[keymap.output_name[mid]] = (up.detach().clone(), down.detach().reshape(concept.rank, *w.shape[1:]).clone(), concept.alpha)
    write_kohya(out_path, layers, {"ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1",
                                   "ss_network_dim": str(concept.rank), "ss_network_alpha": str(concept.alpha),
                                   "iteris_tiny_concept": concept.trigger}, dtype="fp32", overwrite=True)
    return out_path


def _concept_pattern(trigger: str, side: int, gen: torch.Generator) -> torch.Tensor:
    """A smooth latent 'image' for the concept: low-frequency noise plus a bright blob."""
    coarse = torch.randn(1, 4, 4, 4, generator=gen)
    field = F.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=False)
    yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    cy, cx = (torch.randint(3, side - 3, (2,), generator=gen)).tolist()
    blob = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 8.0)
    return field + 1.5 * blob * torch.randn(1, 4, 1, 1, generator=gen).sign()
