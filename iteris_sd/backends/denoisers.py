"""How each diffusers model family is conditioned and called: the part of the diffusers
backend that differs between a UNet (SD1.x, SD2.x, SDXL) and a DiT (SD3, Flux).

A denoiser wraps the model and turns text-encoder outputs into its conditioning
(`encode`), and a batch of latents (n, C, h, w) at scheduler timestep ``t`` into the model's
prediction of the same shape (`predict`): noise for a UNet, flow velocity for SD3 and Flux.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .calibration import GUIDED_CFG

FLUX_GUIDANCE = 3.5  # the distilled guidance a guidance-embedding Flux (dev) is calibrated with, as diffusers' default
SD3_T5_TOKENS = 256  # the T5 tokens SD3 is conditioned on (diffusers' max_sequence_length)
FLUX_T5_TOKENS = 512


class UNetDenoiser:
    """SD1.x / SD2.x (one CLIP text encoder: its last hidden state) and SDXL (two: their
    penultimate hidden states side by side, the second's pooled projection and the size ids)."""

    component = "unet"

    def __init__(self, model: nn.Module, text_encoders: list[nn.Module]):
        self.model = model
        self.text_encoders = text_encoders
        self.latent_channels = model.config.in_channels

    def token_lengths(self) -> list[int | None]:
        return [None] * len(self.text_encoders)

    def encode(self, ids: list[Tensor]) -> dict[str, Tensor]:
        if len(self.text_encoders) == 1:
            return {"encoder_hidden_states": self.text_encoders[0](ids[0])[0]}
        out1 = self.text_encoders[0](ids[0], output_hidden_states=True)
        out2 = self.text_encoders[1](ids[1], output_hidden_states=True)
        return {
            "encoder_hidden_states": torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1),
            "text_embeds": out2[0],
        }

    def predict(self, x: Tensor, t: Tensor, cond: dict[str, Tensor], resolution: int) -> Tensor:
        kwargs = {}
        if "text_embeds" in cond:
            side = resolution
            time_ids = torch.tensor([side, side, 0, 0, side, side], dtype=x.dtype, device=x.device)
            kwargs["added_cond_kwargs"] = {"text_embeds": cond["text_embeds"], "time_ids": time_ids.repeat(x.shape[0], 1)}
        return self.model(x, t, encoder_hidden_states=cond["encoder_hidden_states"], **kwargs)[0]


class SD3Denoiser:
    """SD3 / SD3.5 (MMDiT): CLIP-L and OpenCLIP bigG penultimate states side by side, padded
    to the joint width and followed by T5's tokens (zeros without T5, as diffusers does);
    pooled: both CLIPs' projections. The timestep is the scheduler's (0 .. 1000)."""

    component = "transformer"

    def __init__(self, model: nn.Module, text_encoders: list[nn.Module]):
        if len(text_encoders) not in (2, 3):
            raise ValueError(f"an SD3 model has 2 CLIP text encoders and an optional T5, got {len(text_encoders)}")
        self.model = model
        self.text_encoders = text_encoders
        self.latent_channels = model.config.in_channels

    def token_lengths(self) -> list[int | None]:
        return [None, None, SD3_T5_TOKENS][: len(self.text_encoders)]

    def encode(self, ids: list[Tensor]) -> dict[str, Tensor]:
        clips = [te(i, output_hidden_states=True) for te, i in zip(self.text_encoders[:2], ids)]
        width = self.model.config.joint_attention_dim
        clip_states = torch.cat([c.hidden_states[-2] for c in clips], dim=-1)
        clip_states = nn.functional.pad(clip_states, (0, width - clip_states.shape[-1]))
        if len(self.text_encoders) == 3:
            t5 = self.text_encoders[2](ids[2])[0]
        else:
            t5 = clip_states.new_zeros(clip_states.shape[0], SD3_T5_TOKENS, width)
        return {"encoder_hidden_states": torch.cat([clip_states, t5], dim=1),
                "pooled_projections": torch.cat([c[0] for c in clips], dim=-1)}

    def predict(self, x: Tensor, t: Tensor, cond: dict[str, Tensor], resolution: int) -> Tensor:
        timestep = t.to(x.device, x.dtype).reshape(-1).expand(x.shape[0])
        return self.model(hidden_states=x, timestep=timestep, encoder_hidden_states=cond["encoder_hidden_states"],
                          pooled_projections=cond["pooled_projections"], return_dict=False)[0]


class FluxDenoiser:
    """Flux.1: T5's tokens as context, CLIP-L's pooled output as the vector; latents are
    packed into 2 x 2 patches (n, h/2 * w/2, 4C) with their grid positions as ids, the
    timestep is the scheduler's / 1000, and a dev-style model (guidance embedding) gets
    `FLUX_GUIDANCE`. Flux is guidance-distilled: it is calibrated at cfg 1."""

    component = "transformer"

    def __init__(self, model: nn.Module, text_encoders: list[nn.Module]):
        if len(text_encoders) != 2:
            raise ValueError(f"a Flux model has a CLIP-L and a T5 text encoder, got {len(text_encoders)} text encoders")
        self.model = model
        self.text_encoders = text_encoders
        self.latent_channels = model.config.in_channels // 4

    def token_lengths(self) -> list[int | None]:
        return [None, FLUX_T5_TOKENS]

    def encode(self, ids: list[Tensor]) -> dict[str, Tensor]:
        return {"pooled_projections": self.text_encoders[0](ids[0]).pooler_output,
                "encoder_hidden_states": self.text_encoders[1](ids[1])[0]}

    def predict(self, x: Tensor, t: Tensor, cond: dict[str, Tensor], resolution: int) -> Tensor:
        n, c, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"a Flux latent of {h} x {w} cannot be packed into 2 x 2 patches; "
                             "use a calibration.resolution that is a multiple of 16")
        packed = x.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, h * w // 4, 4 * c)
        rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).to(x.device, x.dtype)
        context = cond["encoder_hidden_states"]
        txt_ids = torch.zeros(context.shape[1], 3, device=x.device, dtype=x.dtype)
        timestep = (t.to(x.device, x.dtype) / 1000).reshape(-1).expand(n)
        guidance = None
        if self.model.config.guidance_embeds:
            guidance = torch.full((n,), FLUX_GUIDANCE, device=x.device, dtype=x.dtype)
        out = self.model(hidden_states=packed, timestep=timestep, guidance=guidance, pooled_projections=cond["pooled_projections"],
                         encoder_hidden_states=context, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        return out.reshape(n, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)


Denoiser = UNetDenoiser | SD3Denoiser | FluxDenoiser
_DENOISERS = {"sd1": UNetDenoiser, "sd2": UNetDenoiser, "sdxl": UNetDenoiser, "sd3": SD3Denoiser, "flux": FluxDenoiser}
DISTILLED_CFG = {"flux": 1.0}  # guidance-distilled families; every other one: GUIDED_CFG
NATIVE_LATENT_SIZE = {"flux": 128}  # a Flux transformer's config has no sample_size


def make_denoiser(family: str, model: nn.Module, text_encoders: list[nn.Module]) -> Denoiser:
    """The denoiser of a model of ``family`` (see `iteris_sd.lora.keymap.detect_family`)."""
    return _DENOISERS[family](model, text_encoders)


def default_cfg(family: str) -> float:
    """The calibration CFG scale of a family: 1 for a guidance-distilled one, else `GUIDED_CFG`."""
    return DISTILLED_CFG.get(family, GUIDED_CFG)


def flow_timesteps(scheduler: Any, steps: int, latent_tokens: int) -> None:
    """Set a flow-matching scheduler's ``steps`` timesteps: sigmas from 1 down to 1/steps,
    shifted by the image's token count where the config asks for it (Flux's dynamic shift)."""
    config = scheduler.config
    if not config.get("use_dynamic_shifting", False):
        scheduler.set_timesteps(steps)
        return
    sigmas = torch.linspace(1.0, 1.0 / steps, steps).tolist()
    lo, hi = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    shift_lo, shift_hi = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    mu = shift_lo + (latent_tokens - lo) * (shift_hi - shift_lo) / (hi - lo)
    scheduler.set_timesteps(sigmas=sigmas, mu=mu)
