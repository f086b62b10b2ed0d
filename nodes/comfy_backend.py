"""The ComfyUI backend: the core's Backend protocol over a ModelPatcher and a CLIP.

LoRAs are read the way ComfyUI reads them (``comfy.lora`` key maps, ``comfy.lora_convert``
and the weight adapters), so every family ComfyUI loads works here. Deltas are applied and
inputs captured by the core's forward hooks (``iteris_sd.backends.hooks``), removed in ``finally``:
the user's MODEL and CLIP are never patched or mutated.

Calibration: each concept's trajectory is sampled by ComfyUI's own ``comfy.sample.sample``
with LoRA i alone, and every model call the sampler makes (conditional and unconditional
batches, as the user's sampler batches them) is recorded through a model function wrapper.
A capture replays recorded calls with the batch doubled: the first half carries LoRA i and
its text encoder's conditioning, the second half the merged deltas and the merged text
encoder's conditioning, so X and X~ come from one forward call, row for row.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field, replace

import comfy.lora
import comfy.lora_convert
import comfy.model_management
import comfy.model_patcher
import comfy.sample
import comfy.weight_adapter
import torch
from torch import Tensor, nn

from ..iteris_sd.backends.calibration import GUIDED_CFG, CalibrationSettings, FoldingSink, TrajectoryCache, picture_folds, spread
from ..iteris_sd.backends.hooks import hooked
from ..iteris_sd.lora.keymap import KeyMismatchError
from ..iteris_sd.lora.layer import LoraFile, LoraLayer
from ..iteris_sd.lora.read import LoraFormatError
from ..iteris_sd.merge.backend import Deltas, InputSink, Target
from ..iteris_sd.merge.layers import ConvGeometry
from ..iteris_sd.progress import ProgressFn, no_progress
from ..iteris_sd.seeds import fold_seed
from .families import base_model_version, native_cfg, native_resolution


@dataclass(frozen=True)
class ComfyCalibration:
    """How each LoRA's calibration trajectory is sampled (names as ComfyUI's KSampler)."""

    sampler: str = "euler"
    scheduler: str = "normal"
    steps: int = CalibrationSettings.steps
    timesteps: int = CalibrationSettings.timesteps  # model calls captured per prompt, spread over the trajectory
    resolution: int = CalibrationSettings.resolution  # 0: the model's native size (native_resolution)
    cfg: float = CalibrationSettings.cfg  # 0: the family's (native_cfg: 1 for Flux, else GUIDED_CFG)
    negative_prompt: str = CalibrationSettings.negative_prompt
    seed: int = 0


@dataclass
class _Call:
    """One recorded model call: its inputs exactly as the sampler made them."""

    x: Tensor
    sigma: Tensor
    c: dict
    cond_or_uncond: list[int]


@dataclass
class _Trajectory:
    prompts: list[str]
    calls: list[list[_Call]] = field(default_factory=list)  # per prompt


class ComfyBackend:
    """Backend over a ComfyUI MODEL (ModelPatcher) and CLIP. ``concepts[i]`` are LoRA i's
    calibration prompts. ``clip`` may be None (then text-encoder keys are an error)."""

    def __init__(self, model, clip, concepts: list[list[str]], settings: ComfyCalibration = ComfyCalibration()):
        self.model = model.clone()
        self.clip = clip.clone() if clip is not None else None
        self.concepts = concepts
        base = self.model.model
        self.settings = replace(settings, resolution=settings.resolution or native_resolution(base),
                                cfg=settings.cfg or native_cfg(base, GUIDED_CFG))
        self.key_map = comfy.lora.model_lora_keys_unet(self.model.model, {})
        self.unet_keys = set(self.key_map.values())
        if self.clip is not None:
            comfy.lora.model_lora_keys_clip(self.clip.cond_stage_model, self.key_map)
        self._names = _output_names(self.key_map, self.clip)
        self._modules: dict[str, nn.Module] = {}
        self._trajectories = TrajectoryCache()
        self._targets: dict[str, Target] = {}

    # ----- the Backend protocol
    @property
    def base_model_version(self) -> str:
        return base_model_version(self.model.model)

    def output_name(self, module_id: str) -> str:
        return self._names[module_id]

    def module(self, module_id: str) -> nn.Module:
        if module_id not in self._modules:
            owner = self.model.model if module_id in self.unet_keys else self.clip.cond_stage_model
            self._modules[module_id] = owner.get_submodule(module_id[: -len(".weight")])
        return self._modules[module_id]

    def target(self, module_id: str) -> Target:
        """The weight as the model computes with it (upstream patches applied), flattened."""
        if module_id not in self._targets:
            w = self._base_weight(module_id)
            module = self.module(module_id)
            self._targets[module_id] = Target(w.reshape(w.shape[0], -1), tuple(w.shape), ConvGeometry.of(module, module_id))
        return self._targets[module_id]

    def match(self, lora: LoraFile) -> dict[str, LoraLayer]:
        """Read ``lora.path`` through ComfyUI's loader: module id (weight key) -> layer."""
        from safetensors.torch import load_file

        sd = comfy.lora_convert.convert_lora(load_file(lora.path))
        with _collect_unloaded() as unloaded:
            patches = comfy.lora.load_lora(sd, self.key_map)
        if unloaded:
            raise KeyMismatchError(
                f"{lora.path}: {len(unloaded)} of {len(sd)} keys match no module of this "
                f"{self.base_model_version} model (e.g. {', '.join(sorted(unloaded)[:3])}); "
                "is the LoRA made for another model family?")
        blocks: dict[str, list[tuple[Tensor, Tensor]]] = {}
        dense: dict[str, Tensor] = {}
        layers: dict[str, LoraLayer] = {}
        for key, patch in patches.items():
            weight_key = key if isinstance(key, str) else key[0]
            if self.clip is None and weight_key not in self.unet_keys:
                raise KeyMismatchError(f"{lora.path}: has text-encoder keys ({weight_key}) but no CLIP was given")
            plain = _plain_lora(patch)
            if plain is not None and isinstance(key, str):
                up, down, alpha, mid = plain
                layers[weight_key] = LoraLayer(weight_key, up=up, down=down, mid=mid, alpha=alpha, strength=lora.strength)
                continue
            block = _slice_block(plain, key, self.target(weight_key).shape[0], lora.strength)
            if block is not None:  # a plain LoRA on rows of a fused weight (Flux's qkv, linear1)
                blocks.setdefault(weight_key, []).append(block)
                continue
            # everything else (LoHa, LoKr, DoRA, OFT, diff, other slices): its exact dense
            # change, computed by ComfyUI's own calculate_weight
            w0 = self._base_weight(weight_key)
            offset, function = (None, None) if isinstance(key, str) else (key[1], key[2] if len(key) > 2 else None)
            patched = comfy.lora.calculate_weight([(lora.strength, patch, 1.0, offset, function)], w0.clone(), weight_key)
            dense[weight_key] = dense.get(weight_key, 0) + (patched.float() - w0)
        for weight_key, parts in blocks.items():
            whole = layers.pop(weight_key, None)  # a plain LoRA on the whole weight too
            if whole is not None and whole.mid is None and whole.up.dim() == 2:
                parts.append(whole.factors())
            elif whole is not None:
                dense[weight_key] = dense.get(weight_key, 0) + whole.dense_delta()
            # the slices side by side: rank sum(r_i), up zero outside each slice's rows; exact
            layers[weight_key] = LoraLayer(weight_key, up=torch.cat([B for B, _ in parts], 1),
                                           down=torch.cat([A for _, A in parts]))
        for weight_key, d in dense.items():
            if weight_key in layers:  # low-rank and dense patches on one weight: sum them
                d = d + layers.pop(weight_key).dense_delta().reshape(d.shape)
            layers[weight_key] = LoraLayer(weight_key, dense=d)
        for weight_key, layer in layers.items():
            _check_finite(lora.path, weight_key, layer)
        return layers

    def capture(self, concept: int, reference: Deltas, merged: Deltas | None, modules: Collection[str],
                sink: InputSink, progress: ProgressFn = no_progress) -> None:
        traj = self.trajectory(concept, reference, progress)
        te = [m for m in modules if m not in self.unet_keys]
        unet = [m for m in modules if m in self.unet_keys]
        pictures = picture_folds(len(traj.prompts))  # one picture per prompt
        folding = FoldingSink(sink)
        phase, total = f"capture concept {concept + 1}", len(traj.prompts) * min(len(traj.calls[0]), self.settings.timesteps)
        progress(phase, 0, total)  # the phase shows before its first (slow) call ends
        for p, prompt in enumerate(traj.prompts):
            folding.now = None if pictures is None else pictures[p]
            conds = self._encode_paired(prompt, reference, merged, te, folding)
            chunks = [reference] if merged is None else [reference, merged]
            calls = spread(traj.calls[p], self.settings.timesteps)
            comfy.model_management.load_models_gpu([self.model])
            with hooked(self._module_map(chunks, unet), chunks, unet, folding), torch.inference_mode():
                for k, call in enumerate(calls):
                    if pictures is None:  # a single picture: its calls alternate between the folds
                        folding.now = k % 2
                    _replay(self.model.model, call, conds)
                    progress(phase, p * len(calls) + k + 1, total)

    # ----- calibration data
    def trajectory(self, concept: int, reference: Deltas, progress: ProgressFn = no_progress) -> _Trajectory:
        """LoRA i's trajectory per prompt, sampled by ComfyUI with LoRA i alone; cached while
        the prompts, settings and ``reference`` stay the same."""
        s = self.settings
        key = (tuple(self.concepts[concept]), s)
        cached = self._trajectories.get(concept, key, reference)
        if cached is not None:
            return cached
        traj = _Trajectory(list(key[0]))
        for p, prompt in enumerate(traj.prompts):
            calls: list[_Call] = []
            positive = self._conditioning(prompt, reference)
            negative = self._conditioning(s.negative_prompt, reference)
            model = self.model.clone()
            model.set_model_unet_function_wrapper(_recorder(calls, self.model.model_options.get("model_function_wrapper")))
            latent = torch.zeros([1, 4, s.resolution // 8, s.resolution // 8])
            latent = comfy.sample.fix_empty_latent_channels(model, latent)  # the model's channels: 16 for SD3 and Flux
            seed = fold_seed(s.seed + 1009 * concept + p)
            noise = comfy.sample.prepare_noise(latent, seed)
            phase = f"trajectory concept {concept + 1}"
            modules = self._module_map([reference], [])
            with hooked(modules, [reference]):
                comfy.sample.sample(model, noise, s.steps, s.cfg, s.sampler, s.scheduler, positive, negative, latent,
                                    callback=lambda step, *_: progress(phase, p * s.steps + step + 1, len(traj.prompts) * s.steps),
                                    disable_pbar=True, seed=seed)
            traj.calls.append(calls)
        self._trajectories.put(concept, key, reference, traj)
        return traj

    # ----- helpers
    def _module_map(self, chunks: list[Deltas], capture: Collection[str]) -> dict[str, nn.Module]:
        ids = set(capture).union(*[c.keys() for c in chunks])
        return {m: self.module(m) for m in ids}

    def _base_weight(self, weight_key: str) -> Tensor:
        """float32 CPU copy of the weight with the patcher's existing patches applied."""
        patcher = self.model if weight_key in self.unet_keys else self.clip.patcher
        weight, _, convert = comfy.model_patcher.get_key_weight(patcher.model, weight_key)
        if weight_key in patcher.backup:  # the model is loaded with some clone's patches applied
            weight = patcher.backup[weight_key].weight
        w = weight.detach().to("cpu", torch.float32, copy=True)
        if convert is not None:
            w = convert(w, inplace=True)
        if weight_key in patcher.patches:
            w = comfy.lora.calculate_weight(patcher.patches[weight_key], w, weight_key)
        return w

    def _conditioning(self, text: str, deltas: Deltas) -> list:
        """ComfyUI conditioning of ``text`` with ``deltas`` on the text encoder."""
        if self.clip is None:
            raise ValueError("calibration needs a CLIP (text encoder) input")
        te = {m: d for m, d in deltas.items() if m not in self.unet_keys}
        with hooked(self._module_map([te], []), [te]), torch.inference_mode():
            return self.clip.encode_from_tokens_scheduled(self.clip.tokenize(text), show_pbar=False)

    def _encode_paired(self, prompt: str, reference: Deltas, merged: Deltas | None, te: list[str],
                       sink: InputSink) -> dict[int, tuple[Tensor, Tensor | None]] | None:
        """Capture the text encoder's inputs for the prompt and the negative prompt (LoRA i,
        and when given the merged model on the same tokens); returns the merged model's
        conditioning {0: positive, 1: negative} as (cond, pooled)."""
        texts = [prompt, self.settings.negative_prompt]
        if merged is None:
            with _te_capture(self, te, lambda m, x: sink(m, x, None)):
                for t in texts:
                    self._conditioning(t, reference)
            return None
        runs = []
        for deltas in (reference, merged):
            rows: dict[str, list[Tensor]] = {m: [] for m in te}
            with _te_capture(self, te, lambda m, x, rows=rows: rows[m].append(x.detach().clone())):
                out = [self._conditioning(t, deltas)[0] for t in texts]
            runs.append((rows, out))
        (ref_rows, _), (merged_rows, merged_out) = runs
        for m in te:
            for x, x_merged in zip(ref_rows[m], merged_rows[m]):
                sink(m, x, x_merged)
        return {k: (c[0], c[1].get("pooled_output")) for k, c in enumerate(merged_out)}


@contextlib.contextmanager
def _te_capture(backend: ComfyBackend, te: list[str], store) -> Iterator[None]:
    """Capture hooks on the text-encoder modules ``te`` (deltas are applied by _conditioning)."""
    with hooked({m: backend.module(m) for m in te}, [{}], te, lambda m, x, _: store(m, x)):
        yield


def _recorder(calls: list[_Call], inner):
    """A model function wrapper that records every call, then runs it (or the user's wrapper)."""

    def wrapper(apply_model, args):
        c = args["c"]
        calls.append(_Call(args["input"].detach().clone(), args["timestep"].detach().clone(),
                           {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in c.items()},
                           list(args["cond_or_uncond"])))
        if inner is not None:
            return inner(apply_model, args)
        return apply_model(args["input"], args["timestep"], **c)

    return wrapper


def _replay(model, call: _Call, merged_conds: dict | None) -> None:
    """Run a recorded call; with ``merged_conds`` the batch is doubled and its second half
    gets the merged text encoder's conditioning (the hooks give it the merged deltas)."""
    dev = comfy.model_management.get_torch_device()
    x, sigma, c = call.x.to(dev), call.sigma.to(dev), dict(call.c)
    if merged_conds is not None:
        merged_c = dict(c)
        if "c_crossattn" in c:
            merged_c["c_crossattn"] = _rows(c["c_crossattn"], call.cond_or_uncond, {k: v[0] for k, v in merged_conds.items()})
        if "y" in c and all(v[1] is not None for v in merged_conds.values()):
            pooled = {k: v[1] for k, v in merged_conds.items()}
            width = pooled[0].shape[-1]  # the pooled text embedding leads y (SDXL, SD3, Flux)
            merged_c["y"] = torch.cat([_rows(c["y"][:, :width], call.cond_or_uncond, pooled), c["y"][:, width:]], dim=1)
        for k, v in c.items():
            if torch.is_tensor(v) and v.shape[:1] == x.shape[:1]:
                c[k] = torch.cat([v, merged_c[k]])
        x, sigma = torch.cat([x, x]), torch.cat([sigma, sigma])
        options = dict(c.get("transformer_options", {}))
        options["cond_or_uncond"] = call.cond_or_uncond * 2
        c["transformer_options"] = options
    c = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in c.items()}
    model.apply_model(x, sigma, **c)


def _rows(template: Tensor, cond_or_uncond: list[int], by_kind: dict[int, Tensor]) -> Tensor:
    """A tensor shaped like ``template`` whose chunk j is by_kind[cond_or_uncond[j]] repeated."""
    chunks = template.chunk(len(cond_or_uncond))
    out = []
    for chunk, kind in zip(chunks, cond_or_uncond):
        src = by_kind[kind].to(chunk.device, chunk.dtype)
        if src.shape[1:] != chunk.shape[1:]:
            raise ValueError(f"merged conditioning shape {tuple(src.shape)} does not pair with {tuple(chunk.shape)}")
        out.append(src.expand(chunk.shape[0], *src.shape[1:]))
    return torch.cat(out)


def _plain_lora(patch) -> tuple[Tensor, Tensor, float | None, Tensor | None] | None:
    """(up, down, alpha, mid) of a plain LoRA patch (no DoRA), else None."""
    if not isinstance(patch, comfy.weight_adapter.LoRAAdapter):
        return None
    up, down, alpha, mid, dora_scale, reshape = patch.weights
    if dora_scale is not None or reshape is not None:
        return None
    return up, down, alpha, mid


def _slice_block(plain, key, d_out: int, strength: float) -> tuple[Tensor, Tensor] | None:
    """Factors (B (d_out, r), A (r, d_in)) of a plain linear LoRA patched onto rows
    [start, start + length) of a fused weight, keyed ``(weight_key, (0, start, length))``:
    the LoRA's own factors, B zero outside those rows."""
    if plain is None or isinstance(key, str) or len(key) > 2 and key[2] is not None:
        return None
    (dim, start, length), (up, down, alpha, mid) = key[1], plain
    if dim != 0 or mid is not None or up.dim() != 2 or down.dim() != 2 or up.shape[0] != length:
        return None
    B_rows, A = LoraLayer(str(key[0]), up=up, down=down, alpha=alpha, strength=strength).factors()
    B = torch.zeros(d_out, B_rows.shape[1])
    B[start:start + length] = B_rows
    return B, A


def _check_finite(path: str, key: str, layer: LoraLayer) -> None:
    for t in (layer.up, layer.down, layer.mid, layer.dense):
        if t is not None and not torch.isfinite(t).all():
            raise LoraFormatError(f"{path}: layer {key} has NaN or Inf values; the file is damaged, re-download or re-train it")


def _output_names(key_map: dict, clip) -> dict[str, str]:
    """Weight key -> the kohya layer name to write: diffusers-style ``lora_unet_down_blocks_``
    names where ComfyUI knows them (what kohya's trainer writes), else ComfyUI's LDM-style
    ``lora_unet_`` names; ``lora_te1_``/``lora_te2_`` with two text encoders, else ``lora_te_``."""
    two_encoders = clip is not None and any(k.startswith("lora_te2_") for k in key_map)
    te_prefixes = ("lora_te1_", "lora_te2_") if two_encoders else ("lora_te_",)
    names: dict[str, str] = {}
    for name, target in key_map.items():
        if not isinstance(target, str):
            continue
        if name.startswith("lora_unet_"):
            ldm = "lora_unet_" + target[len("diffusion_model."):-len(".weight")].replace(".", "_")
            if target not in names or (names[target] == ldm and name != ldm):
                names[target] = name
        elif name.startswith(te_prefixes) and target not in names:
            names[target] = name
    for name, target in key_map.items():  # anything else: ComfyUI's generic names
        if isinstance(target, str) and target not in names and name.startswith(("diffusion_model.", "text_encoders.")):
            names[target] = name
    return names


class _UnloadedKeys(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.keys: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if msg.startswith("lora key not loaded: "):
            self.keys.append(msg[len("lora key not loaded: "):])


@contextlib.contextmanager
def _collect_unloaded() -> Iterator[list[str]]:
    """The keys comfy.lora.load_lora reports as not loaded (it only logs them)."""
    handler = _UnloadedKeys()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler.keys
    finally:
        root.removeHandler(handler)
