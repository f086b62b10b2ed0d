"""The diffusers backend: SD1.x / SD2.x (UNet2DConditionModel + CLIPTextModel), SDXL (two
text encoders), SD3 (SD3Transformer2DModel, two CLIPs and an optional T5) and Flux.1
(FluxTransformer2DModel, CLIP-L and T5), calibrated in latent space (no VAE is needed).
How each family is conditioned and called is `iteris_sd.backends.denoisers`.

Deltas are applied by forward hooks (`iteris_sd.backends.hooks`), never written into the weights, so
X (the LoRA-i model) and X~ (the merged model) are captured in one forward call, row for row.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import Collection

import torch
from torch import Tensor, nn

from ..lora.keymap import KeyMap, build_keymap, detect_family
from ..lora.layer import LoraFile, LoraLayer
from ..merge.backend import Deltas, InputSink, Target
from ..merge.layers import ConvGeometry
from ..progress import ProgressFn, no_progress
from ..seeds import fold_seed
from .calibration import CalibrationSettings, FoldingSink, TrajectoryCache, picture_folds, spread
from .denoisers import NATIVE_LATENT_SIZE, default_cfg, flow_timesteps, make_denoiser
from .hooks import hooked

BASE_MODEL_VERSIONS = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0", "sd3": "sd3", "flux": "flux1"}


@dataclass
class Trajectory:
    """A sampled trajectory: the model inputs at each step and the prompt tokens behind them."""

    token_ids: list[Tensor]  # per text encoder: (2b, L), negative prompts first; (b, L) at cfg 1
    steps: list[tuple[Tensor, Tensor]]  # (timestep, scaled model input (b, C, h, w))


class DiffusersBackend:
    """Backend over diffusers components: ``model`` is the UNet or the DiT, ``text_encoders``
    in the pipeline's order. ``concepts[i]`` are LoRA i's calibration prompts."""

    def __init__(
        self,
        model: nn.Module,
        text_encoders: list[nn.Module],
        tokenizers: list,
        scheduler_config: dict,
        concepts: list[list[str]],
        settings: CalibrationSettings = CalibrationSettings(),
        seed: int = 0,
        vae_scale_factor: int = 8,
    ):
        self.model = model
        self.text_encoders = text_encoders
        self.tokenizers = tokenizers
        self.scheduler_config = dict(scheduler_config)
        self.concepts = concepts
        self.vae_scale_factor = vae_scale_factor
        self.family = detect_family(model.config)
        self.denoiser = make_denoiser(self.family, model, text_encoders)
        self.settings = replace(settings, resolution=settings.resolution or native_resolution(model, vae_scale_factor, self.family),
                                cfg=settings.cfg or default_cfg(self.family))
        self.seed = seed
        components = {self.denoiser.component: model}
        for k, te in enumerate(text_encoders):
            components["text_encoder" if k == 0 else f"text_encoder_{k + 1}"] = te
        self.keymap: KeyMap = build_keymap(components, self.family)
        self._trajectories = TrajectoryCache()

    # ----- the Backend protocol
    def match(self, lora: LoraFile) -> dict[str, LoraLayer]:
        return self.keymap.match(lora)

    def output_name(self, module_id: str) -> str:
        return self.keymap.output_name[module_id]

    @property
    def base_model_version(self) -> str:
        return BASE_MODEL_VERSIONS[self.family]

    def target(self, module_id: str) -> Target:
        module = self.keymap.modules[module_id]
        w = module.weight.detach()
        return Target(w.float().cpu().reshape(w.shape[0], -1), tuple(w.shape), ConvGeometry.of(module, module_id))

    def capture(self, concept, reference, merged, modules, sink, progress=no_progress) -> None:
        traj = self.trajectory(concept, reference, progress)
        chunks = [reference] if merged is None else [reference, merged]
        captured = spread(traj.steps, self.settings.timesteps)
        # each chunk of a call is [negative x b, prompts x b] (text) or [x, x] (denoiser, CFG),
        # [prompts x b] / [x] at cfg 1; a single picture's forward calls (timesteps) alternate
        # between the folds instead
        pictures = picture_folds(len(self.concepts[concept]), self.settings.seeds)
        folding = FoldingSink(sink)
        folding.now = None if pictures is None else torch.tensor(pictures * self._rows)
        with self._hooked(chunks, modules, folding), torch.inference_mode():
            cond = self._encode(traj.token_ids, len(chunks))
            for k, (t, x) in enumerate(captured):
                if pictures is None:
                    folding.now = k % 2
                self._guided_eps(x, t, cond, len(chunks))
                progress(f"capture concept {concept + 1}", k + 1, len(captured))

    # ----- calibration data and evaluation
    def trajectory(self, concept: int, reference: Deltas, progress: ProgressFn = no_progress) -> Trajectory:
        """LoRA i's calibration trajectory, sampled with LoRA i alone (``reference``) from its
        prompts and a seed of its own; cached while the prompts, settings, seed and
        ``reference`` stay the same."""
        prompts = tuple(self.concepts[concept])
        key = (prompts, self.settings, self.seed)
        traj = self._trajectories.get(concept, key, reference)
        if traj is None:
            ids = self.token_ids(list(prompts))
            seed = self.seed + 1009 * concept
            steps, _ = self._sample(ids, seed, [reference], progress=progress,
                                    phase=f"trajectory concept {concept + 1}")
            traj = Trajectory(ids, steps)
            self._trajectories.put(concept, key, reference, traj)
        return traj

    def noise_fidelity(self, prompts: list[str], seed: int, reference: Deltas,
                       candidates: dict[str, Deltas], progress: ProgressFn = no_progress) -> dict[str, float]:
        """Held-out error of each candidate against the reference (LoRA i alone):

            sqrt(sum_t ||eps_cand - eps_ref||^2 / sum_t ||eps_ref - eps_base||^2)

        along the reference's own CFG trajectory from ``seed`` (0 = identical to LoRA i alone,
        1 = as far from it as the base model), summed over every picture."""
        nums, den = self.noise_distances(prompts, seed, reference, candidates, progress)
        total = float(den.sum())
        return {name: (float(num.sum()) / total) ** 0.5 if total > 0 else 0.0 for name, num in nums.items()}

    def noise_distances(self, prompts: list[str], seed: int, reference: Deltas, candidates: dict[str, Deltas],
                        progress: ProgressFn = no_progress) -> tuple[dict[str, Tensor], Tensor]:
        """Per picture (b = prompts x seeds, float64): sum_t ||eps_cand - eps_ref||^2 of each
        candidate, and sum_t ||eps_ref - eps_base||^2, the parts of `noise_fidelity`."""
        ids = self.token_ids(prompts)
        ref_eps, base_eps = [], []

        def keep(eps):
            ref_eps.append(eps[0])
            base_eps.append(eps[1])

        def per_picture(a: Tensor, b: Tensor) -> Tensor:
            return ((a - b).double() ** 2).flatten(1).sum(1)

        steps, _ = self._sample(ids, seed, [reference, {}], on_step=keep, progress=progress, phase="evaluate")
        den = sum(per_picture(r, b) for r, b in zip(ref_eps, base_eps))
        nums = {}
        for k, (name, deltas) in enumerate(candidates.items()):
            with self._hooked([deltas]), torch.inference_mode():
                cond = self._encode(ids, 1)
                nums[name] = sum(per_picture(self._guided_eps(x, t, cond, 1)[0], r) for (t, x), r in zip(steps, ref_eps))
            progress("evaluate", k + 1, len(candidates))
        return nums, den

    def sample(self, prompts: list[str], seed: int, deltas: Deltas, progress: ProgressFn = no_progress) -> Tensor:
        """The final latents (b, C, h, w) of the CFG trajectory under ``deltas`` from ``seed``;
        for a pixel-space model (no VAE) these are the pictures, in [-1, 1]."""
        return self._sample(self.token_ids(prompts), seed, [deltas], progress=progress)[1]

    def token_ids(self, prompts: list[str]) -> list[Tensor]:
        """Per tokenizer: (2b, L) ids, the negative prompt b times then the prompts, each
        repeated ``seeds`` times; (b, L), the prompts alone, at cfg 1 (no guidance). A prompt
        longer than the context is truncated, with a warning."""
        prompts = [p for p in prompts for _ in range(self.settings.seeds)]
        out = []
        for tok, te, cap in zip(self.tokenizers, self.text_encoders, self.denoiser.token_lengths()):
            L = context_length(tok, te)
            L = L if cap is None else min(L, cap)
            for p in prompts:
                if len(tok(p).input_ids) > L:
                    warnings.warn(f"prompt {p[:40]!r}... is longer than the text encoder's {L} tokens; the rest is ignored")
            negatives = [self.settings.negative_prompt] * len(prompts) if self._rows == 2 else []
            texts = negatives + prompts
            out.append(tok(texts, padding="max_length", max_length=L, truncation=True, return_tensors="pt").input_ids)
        return out

    # ----- model calls
    @property
    def _rows(self) -> int:
        """Rows per picture in a model call: 2 with guidance (negative, prompt), 1 at cfg 1."""
        return 1 if self.settings.cfg == 1.0 else 2

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _sample(self, token_ids, seed, chunks, on_step=None, progress=no_progress, phase="sample"):
        """Sample with CFG along chunk 0's predictions; returns ([(t, model input)] per step,
        the final latents)."""
        s = self.settings
        b = token_ids[0].shape[0] // self._rows
        side = s.resolution // self.vae_scale_factor
        sched = make_scheduler(s.sampler, self.scheduler_config)
        if is_flow_matching(self.scheduler_config):
            flow_timesteps(sched, s.steps, (side // 2) ** 2)
        else:
            sched.set_timesteps(s.steps)
        g = torch.Generator().manual_seed(fold_seed(seed))
        latents = torch.randn(b, self.denoiser.latent_channels, side, side, generator=g)
        latents = (latents * getattr(sched, "init_noise_sigma", 1.0)).to(self._device())
        steps = []
        with self._hooked(chunks), torch.inference_mode():
            cond = self._encode(token_ids, len(chunks))
            for k, t in enumerate(sched.timesteps):
                x = sched.scale_model_input(latents, t) if hasattr(sched, "scale_model_input") else latents
                eps = self._guided_eps(x, t, cond, len(chunks))
                steps.append((t, x))
                if on_step is not None:
                    on_step(eps)
                latents = sched.step(eps[0], t, latents).prev_sample
                progress(phase, k + 1, len(sched.timesteps))
        return steps, latents.float().cpu()

    def _encode(self, token_ids: list[Tensor], n_chunks: int) -> dict[str, Tensor]:
        """Text conditioning for n_chunks copies of the batch (chunk j under delta set j)."""
        dev = self._device()
        return self.denoiser.encode([t.repeat(n_chunks, 1).to(dev) for t in token_ids])

    def _guided_eps(self, x: Tensor, t, cond: dict[str, Tensor], n_chunks: int) -> list[Tensor]:
        """The guided prediction (noise, or a flow model's velocity) for each chunk:
        u + cfg (c - u), or c alone at cfg 1; float32 (b, C, h, w)."""
        batch = x.to(self._dtype()).repeat(self._rows * n_chunks, 1, 1, 1)
        eps = self.denoiser.predict(batch, t, cond, self.settings.resolution).float()
        out = []
        for chunk in eps.chunk(n_chunks):
            if self._rows == 1:
                out.append(chunk)
                continue
            u, c = chunk.chunk(2)
            out.append(u + self.settings.cfg * (c - u))
        return out

    def _hooked(self, chunks: list[Deltas], capture: Collection[str] = (), sink: InputSink | None = None):
        return hooked(self.keymap.modules, chunks, capture, sink)


def native_resolution(model: nn.Module, vae_scale_factor: int, family: str = "") -> int:
    """The pixel size a diffusers UNet or DiT is trained at: its config's ``sample_size``
    (latent pixels, an int or (h, w); Flux's has none: 128) times the VAE's scale factor;
    512 for SD1.x, 1024 for SDXL, SD3 and Flux."""
    size = getattr(model.config, "sample_size", None) or NATIVE_LATENT_SIZE.get(family)
    if isinstance(size, (list, tuple)):
        size = max(size)
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"the model's config has no sample_size ({size!r}); set calibration.resolution in the recipe")
    return size * vae_scale_factor


_UNSET_LENGTH = 10**9  # a model_max_length this large means "not set" (transformers reports 1e30)


def context_length(tokenizer, text_encoder) -> int:
    """L, the token length prompts are padded and truncated to: the tokenizer's
    ``model_max_length``, unless it is absent or longer than the text encoder's
    ``config.max_position_embeddings`` (a tokenizer_config.json without it reports 1e30,
    transformers' VERY_LARGE_INTEGER); then the latter."""
    length = getattr(tokenizer, "model_max_length", None)
    given = isinstance(length, int) and 0 < length < _UNSET_LENGTH
    positions = getattr(getattr(text_encoder, "config", None), "max_position_embeddings", None)
    if positions is None:
        if given:
            return length
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        unset = isinstance(length, int) and length >= _UNSET_LENGTH
        value = f"{float(length):.0e}, i.e. not set" if unset else repr(length)
        raise ValueError(f"tokenizer {name}: model_max_length is {value} and the text encoder has no "
                         "config.max_position_embeddings; set model_max_length in its tokenizer_config.json "
                         "(77 for CLIP)")
    return length if given and length <= positions else int(positions)


def is_flow_matching(scheduler_config: dict) -> bool:
    """Whether a scheduler config is a flow-matching one (SD3, Flux)."""
    return str(scheduler_config.get("_class_name", "")).startswith("FlowMatch")


def make_scheduler(sampler: str, config: dict):
    """The ``sampler``'s scheduler from a pipeline's scheduler config; a flow-matching model
    (SD3, Flux) always samples with its own flow-matching Euler scheduler."""
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        FlowMatchEulerDiscreteScheduler,
    )

    if is_flow_matching(config):
        return FlowMatchEulerDiscreteScheduler.from_config(config)
    cls = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpmpp_2m": DPMSolverMultistepScheduler}[sampler]
    return cls.from_config(config)
