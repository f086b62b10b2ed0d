"""The diffusers backend: SD1.x / SD2.x (UNet2DConditionModel + CLIPTextModel) and SDXL
(two text encoders), calibrated in latent space (no VAE is needed).

Deltas are applied by forward hooks (`iteris_sd.backends.hooks`), never written into the weights, so
X (the LoRA-i model) and X~ (the merged model) are captured in one forward call, row for row.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
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
from .hooks import hooked


@dataclass
class Trajectory:
    """A sampled trajectory: the UNet inputs at each step and the prompt tokens behind them."""

    token_ids: list[Tensor]  # per text encoder: (2b, L), negative prompts first
    steps: list[tuple[Tensor, Tensor]]  # (timestep, scaled model input (b, C, h, w))


class DiffusersBackend:
    """Backend over diffusers components. ``concepts[i]`` are LoRA i's calibration prompts."""

    def __init__(
        self,
        unet: nn.Module,
        text_encoders: list[nn.Module],
        tokenizers: list,
        scheduler_config: dict,
        concepts: list[list[str]],
        settings: CalibrationSettings = CalibrationSettings(),
        seed: int = 0,
        vae_scale_factor: int = 8,
    ):
        self.unet = unet
        self.text_encoders = text_encoders
        self.tokenizers = tokenizers
        self.scheduler_config = dict(scheduler_config)
        self.concepts = concepts
        self.vae_scale_factor = vae_scale_factor
        self.settings = settings if settings.resolution else replace(settings, resolution=native_resolution(unet, vae_scale_factor))
        self.seed = seed
        self.family = detect_family(unet.config)
        components = {"unet": unet, "text_encoder": text_encoders[0]}
        if len(text_encoders) > 1:
            components["text_encoder_2"] = text_encoders[1]
        self.keymap: KeyMap = build_keymap(components, self.family)
        self._trajectories = TrajectoryCache()

    # ----- the Backend protocol
    def match(self, lora: LoraFile) -> dict[str, LoraLayer]:
        return self.keymap.match(lora)

    def output_name(self, module_id: str) -> str:
        return self.keymap.output_name[module_id]

    @property
    def base_model_version(self) -> str:
        return {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}[self.family]

    def target(self, module_id: str) -> Target:
        module = self.keymap.modules[module_id]
        w = module.weight.detach()
        return Target(w.float().cpu().reshape(w.shape[0], -1), tuple(w.shape), ConvGeometry.of(module, module_id))

    def capture(self, concept, reference, merged, modules, sink, progress=no_progress) -> None:
        traj = self.trajectory(concept, reference, progress)
        chunks = [reference] if merged is None else [reference, merged]
        captured = spread(traj.steps, self.settings.timesteps)
        # each chunk of a call is [negative x b, prompts x b] (text) or [x, x] (UNet, CFG);
        # a single picture's forward calls (timesteps) alternate between the folds instead
        pictures = picture_folds(len(self.concepts[concept]), self.settings.seeds)
        folding = FoldingSink(sink)
        folding.now = None if pictures is None else torch.tensor(pictures * 2)
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
        repeated ``seeds`` times. A prompt longer than the context is truncated, with a warning."""
        prompts = [p for p in prompts for _ in range(self.settings.seeds)]
        out = []
        for tok, te in zip(self.tokenizers, self.text_encoders):
            L = context_length(tok, te)
            for p in prompts:
                if len(tok(p).input_ids) > L:
                    warnings.warn(f"prompt {p[:40]!r}... is longer than the text encoder's {L} tokens; the rest is ignored")
            texts = [self.settings.negative_prompt] * len(prompts) + prompts
            out.append(tok(texts, padding="max_length", max_length=L, truncation=True, return_tensors="pt").input_ids)
        return out

    # ----- model calls
    def _device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def _dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def _sample(self, token_ids, seed, chunks, on_step=None, progress=no_progress, phase="sample"):
        """Sample with CFG along chunk 0's predictions; returns ([(t, model input)] per step,
        the final latents)."""
        s = self.settings
        sched = make_scheduler(s.sampler, self.scheduler_config)
        sched.set_timesteps(s.steps)
        b = token_ids[0].shape[0] // 2
        side = s.resolution // self.vae_scale_factor
        g = torch.Generator().manual_seed(fold_seed(seed))
        latents = torch.randn(b, self.unet.config.in_channels, side, side, generator=g) * sched.init_noise_sigma
        latents = latents.to(self._device())
        steps = []
        with self._hooked(chunks), torch.inference_mode():
            cond = self._encode(token_ids, len(chunks))
            for k, t in enumerate(sched.timesteps):
                x = sched.scale_model_input(latents, t)
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
        ids = [t.repeat(n_chunks, 1).to(dev) for t in token_ids]
        if len(self.text_encoders) == 1:
            return {"encoder_hidden_states": self.text_encoders[0](ids[0])[0]}
        out1 = self.text_encoders[0](ids[0], output_hidden_states=True)
        out2 = self.text_encoders[1](ids[1], output_hidden_states=True)
        return {
            "encoder_hidden_states": torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1),
            "text_embeds": out2[0],
        }

    def _guided_eps(self, x: Tensor, t, cond: dict[str, Tensor], n_chunks: int) -> list[Tensor]:
        """CFG noise prediction for each chunk: u + cfg (c - u), float32 (b, C, h, w)."""
        b = x.shape[0]
        batch = x.to(self._dtype()).repeat(2 * n_chunks, 1, 1, 1)
        kwargs = {}
        if "text_embeds" in cond:
            side = self.settings.resolution
            time_ids = torch.tensor([side, side, 0, 0, side, side], dtype=batch.dtype, device=batch.device)
            kwargs["added_cond_kwargs"] = {"text_embeds": cond["text_embeds"], "time_ids": time_ids.repeat(2 * b * n_chunks, 1)}
        eps = self.unet(batch, t, encoder_hidden_states=cond["encoder_hidden_states"], **kwargs)[0].float()
        out = []
        for chunk in eps.chunk(n_chunks):
            u, c = chunk.chunk(2)
            out.append(u + self.settings.cfg * (c - u))
        return out

    def _hooked(self, chunks: list[Deltas], capture: Collection[str] = (), sink: InputSink | None = None):
        return hooked(self.keymap.modules, chunks, capture, sink)


def native_resolution(unet: nn.Module, vae_scale_factor: int) -> int:
    """The pixel size a diffusers UNet is trained at: its config's ``sample_size`` (latent
    pixels, an int or (h, w)) times the VAE's scale factor; 512 for SD1.x, 1024 for SDXL."""
    size = getattr(unet.config, "sample_size", None)
    if isinstance(size, (list, tuple)):
        size = max(size)
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"the UNet's config has no sample_size ({size!r}); set calibration.resolution in the recipe")
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


def make_scheduler(sampler: str, config: dict):
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
    )

    cls = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpmpp_2m": DPMSolverMultistepScheduler}[sampler]
    return cls.from_config(config)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def load_backend(base: str, concepts: list[list[str]], settings: CalibrationSettings = CalibrationSettings(),
                 seed: int = 0, device: str = "auto", base_config: str | None = None) -> DiffusersBackend:
    """A backend over a diffusers folder (model_index.json) or a single-file .safetensors
    checkpoint (its configs from ``base_config``, a diffusers folder of the same family).
    Calibration runs in fp16 on a GPU and fp32 on the CPU."""
    dev = resolve_device(device)
    dtype = torch.float16 if dev.type in ("cuda", "mps") else torch.float32
    path = Path(base)
    if path.is_dir():
        parts = _load_folder(path, dtype)
    else:
        parts = _load_single_file(path, dtype, base_config)
    parts["unet"].to(dev).eval()
    for te in parts["text_encoders"]:
        te.to(dev).eval()
    return DiffusersBackend(concepts=concepts, settings=settings, seed=seed, **parts)


def _load_folder(path: Path, dtype) -> dict:
    from diffusers import UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    if not (path / "model_index.json").is_file() or not (path / "unet").is_dir():
        raise FileNotFoundError(f"{path}: not a diffusers pipeline folder (no model_index.json or unet/)")
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype)
    tes = [CLIPTextModel.from_pretrained(path, subfolder="text_encoder", torch_dtype=dtype)]
    toks = [AutoTokenizer.from_pretrained(path, subfolder="tokenizer")]
    if (path / "text_encoder_2").is_dir():
        tes.append(CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", torch_dtype=dtype))
        toks.append(AutoTokenizer.from_pretrained(path, subfolder="tokenizer_2"))
    scheduler_config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    scale = 1  # a folder without vae/ is a pixel-space model (the demo model is one)
    vae_config = path / "vae" / "config.json"
    if vae_config.is_file():
        scale = 2 ** (len(json.loads(vae_config.read_text()).get("block_out_channels", [0] * 4)) - 1)
    return dict(unet=unet, text_encoders=tes, tokenizers=toks, scheduler_config=scheduler_config, vae_scale_factor=scale)


def _load_single_file(path: Path, dtype, base_config: str | None) -> dict:
    import safetensors

    if not path.is_file():
        raise FileNotFoundError(f"{path}: base model not found")
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{path}: only .safetensors checkpoints are read (pickle files can run code); "
                         "convert it, or pass a diffusers folder")
    with safetensors.safe_open(str(path), framework="pt") as f:
        is_xl = any(k.startswith("conditioner.embedders.1.") for k in f.keys())
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if is_xl else StableDiffusionPipeline
    try:
        pipe = cls.from_single_file(str(path), config=base_config, torch_dtype=dtype)
    except Exception as exc:  # diffusers fetches configs from the hub when none is given
        hint = "" if base_config else "; set base_config to a diffusers folder of the same model family"
        raise ValueError(f"{path}: could not load the checkpoint ({type(exc).__name__}: {exc}){hint}") from exc
    tes = [pipe.text_encoder] + ([pipe.text_encoder_2] if is_xl else [])
    toks = [pipe.tokenizer] + ([pipe.tokenizer_2] if is_xl else [])
    return dict(unet=pipe.unet, text_encoders=tes, tokenizers=toks,
                scheduler_config=dict(pipe.scheduler.config), vae_scale_factor=pipe.vae_scale_factor)
