"""Training loops for the project's own models: a text-to-image base and kohya LoRAs on it.

Both minimise the usual diffusion loss
    E_{x0, t, eps} || f_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t, text) - target ||^2,
where the target is eps, or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 when the scheduler's
prediction_type is "v_prediction".
A LoRA adds scale * up @ down to each target layer (through forward hooks, so the base
weights never change) and, for prior preservation, also matches the frozen base model on
prompts without its trigger word.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iteris_sd.backends.diffusers import context_length
from iteris_sd.progress import ProgressFn, no_progress

# gen -> (x0 (b, C, h, w), prompts)
DataFn = Callable[[torch.Generator], tuple[Tensor, list[str]]]


def noised(x0: Tensor, scheduler, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """(x_t, t, target) for random timesteps: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,
    target eps or v as the scheduler's prediction_type says."""
    abar = scheduler.alphas_cumprod
    t = torch.randint(0, len(abar), (x0.shape[0],), generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    a = abar[t].reshape(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return xt, t, eps
    if kind == "v_prediction":
        return xt, t, a.sqrt() * eps - (1 - a).sqrt() * x0
    raise ValueError(f"training supports epsilon and v_prediction schedulers, not prediction_type={kind!r}")


def encode(text_encoder: nn.Module, tokenizer, prompts: list[str]) -> Tensor:
    ids = tokenizer(prompts, padding="max_length", max_length=context_length(tokenizer, text_encoder), truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids)[0]


def train_base(unet: nn.Module, text_encoder: nn.Module, tokenizer, scheduler, data: DataFn,
               steps: int, lr: float = 2e-3, seed: int = 0, phase: str = "train base model",
               progress: ProgressFn = no_progress, text_probe: nn.Module | None = None) -> list[float]:
    """Train the UNet and text encoder together (AdamW, warm-up then cosine decay); returns
    the diffusion loss of every step. ``text_probe(prompts, encoder output)``, if given,
    returns a loss that is added to it; its parameters are trained too."""
    gen = torch.Generator().manual_seed(seed)
    params = [*unet.parameters(), *text_encoder.parameters()]
    if text_probe is not None:
        params += list(text_probe.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + torch.cos(torch.tensor(torch.pi * s / max(steps, 1))).item()))
    unet.train()
    text_encoder.train()
    losses = []
    for step in range(steps):
        x0, prompts = data(gen)
        xt, t, target = noised(x0, scheduler, gen)
        hidden = encode(text_encoder, tokenizer, prompts)
        loss = F.mse_loss(unet(xt, t, encoder_hidden_states=hidden).sample, target)
        total = loss + text_probe(prompts, hidden) if text_probe is not None else loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        progress(phase, step + 1, steps, {"loss": losses[-1]})
    unet.eval()
    text_encoder.eval()
    return losses


def load_parts(folder: Path):
    """(unet, text_encoder, tokenizer, DDIM scheduler) of an SD1-style diffusers folder, float32."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=torch.float32).eval()
    te = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", torch_dtype=torch.float32).eval()
    return (unet, te, AutoTokenizer.from_pretrained(folder, subfolder="tokenizer"),
            DDIMScheduler.from_pretrained(folder, subfolder="scheduler"))


def lora_targets(unet: nn.Module, text_encoder: nn.Module, convs: bool) -> dict[str, nn.Module]:
    """Module id -> module: UNet attention, feed-forward and proj_in/out, optionally resnet
    convs, and the text encoder's attention projections (what kohya's trainer targets)."""
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


def train_lora(unet: nn.Module, text_encoder: nn.Module, tokenizer, scheduler,
               targets: dict[str, nn.Module], rank: int, alpha: float, data: DataFn, priors: DataFn,
               steps: int, lr: float = 3e-3, seed: int = 0, phase: str = "train LoRA",
               progress: ProgressFn = no_progress, prior_weight: float = 1.0) -> dict[str, tuple[Tensor, Tensor]]:
    """Train a LoRA (up zero-initialised, down random) on ``data`` with prior preservation on
    ``priors`` (pictures without the trigger, where the LoRA must match the frozen base's
    prediction; its loss weighted ``prior_weight``, 0 for a LoRA that fires everywhere); returns module id -> (up (out, r), down (r, in...)) with scale alpha / rank."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    scale = alpha / rank
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    params = {}
    for mid, m in targets.items():
        d_in = m.weight[0].numel()
        params[mid] = (nn.Parameter(torch.zeros(m.weight.shape[0], rank)),
                       nn.Parameter(torch.randn(rank, d_in) / d_in ** 0.5))
    enabled = [True]

    def hook_for(mid):
        def hook(module, args, output):
            if not enabled[0]:
                return None
            up, down = params[mid]
            x = args[0]
            if isinstance(module, nn.Conv2d):
                k = down.reshape(rank, module.in_channels, *module.kernel_size)
                h = F.conv2d(x, k, None, module.stride, module.padding, module.dilation)
                return output + scale * F.conv2d(h, up[:, :, None, None])
            return output + scale * F.linear(F.linear(x, down), up)
        return hook

    handles = [m.register_forward_hook(hook_for(mid)) for mid, m in targets.items()]
    opt = torch.optim.Adam([p for pair in params.values() for p in pair], lr=lr)
    try:
        for step in range(steps):
            x0, prompts = data(gen)
            prior_x0, prior_prompts = priors(gen)
            b = x0.shape[0]
            xt, t, target = noised(torch.cat([x0, prior_x0]), scheduler, gen)
            with torch.no_grad():
                enabled[0] = False
                prior_target = unet(xt[b:], t[b:], encoder_hidden_states=encode(text_encoder, tokenizer, prior_prompts)).sample
                enabled[0] = True
            pred = unet(xt, t, encoder_hidden_states=encode(text_encoder, tokenizer, prompts + prior_prompts)).sample
            loss = F.mse_loss(pred[:b], target[:b]) + prior_weight * F.mse_loss(pred[b:], prior_target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            progress(phase, step + 1, steps, {"loss": float(loss.detach())})
    finally:
        for h in handles:
            h.remove()
    return {mid: (up.detach().clone(), down.detach().clone()) for mid, (up, down) in params.items()}


def write_lora(path: Path, params: dict[str, tuple[Tensor, Tensor]], targets: dict[str, nn.Module],
               components: dict[str, nn.Module], rank: int, alpha: float, metadata: dict[str, str],
               dtype: str = "fp32") -> Path:
    """Write ``train_lora``'s result as a kohya LoRA file for an SD1-architecture model."""
    from iteris_sd.lora.keymap import build_keymap
    from iteris_sd.lora.write import write_kohya

    keymap = build_keymap(components, "sd1")
    layers = {}
    for mid, (up, down) in params.items():
        shape = targets[mid].weight.shape
        layers[keymap.output_name[mid]] = (up, down.reshape(rank, *shape[1:]), alpha)
    meta = {"ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1",
            "ss_network_dim": str(rank), "ss_network_alpha": str(alpha), **metadata}
    write_kohya(path, layers, meta, dtype=dtype, overwrite=True)
    return path
