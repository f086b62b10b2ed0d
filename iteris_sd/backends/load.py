"""Loading the diffusers backend: a pipeline folder (model_index.json), or a single-file
checkpoint with ``base_config`` (a diffusers folder of the same family) for what it lacks."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .calibration import CalibrationSettings
from .diffusers import DiffusersBackend


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
    parts["model"].to(dev).eval()
    for te in parts["text_encoders"]:
        te.to(dev).eval()
    return DiffusersBackend(concepts=concepts, settings=settings, seed=seed, **parts)


# the classes a pipeline folder's model_index.json may name for its parts
_DENOISER_CLASSES = ("UNet2DConditionModel", "SD3Transformer2DModel", "FluxTransformer2DModel")
_TEXT_ENCODER_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel")
_TEXT_ENCODER_PARTS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"), ("text_encoder_3", "tokenizer_3"))


def _load_folder(path: Path, dtype, model: nn.Module | None = None) -> dict:
    """The parts of a diffusers pipeline folder: the UNet or transformer (unless ``model``
    is given), the text encoders and tokenizers that model_index.json names (in its order),
    the scheduler config and the VAE's scale factor (1 without a vae/: a pixel-space model,
    as the demo model is)."""
    import diffusers
    import transformers
    from transformers import AutoTokenizer

    index_path = path / "model_index.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"{path}: not a diffusers pipeline folder (no model_index.json)")
    index = json.loads(index_path.read_text())

    def part_class(name: str, allowed: tuple[str, ...]) -> str | None:
        entry = index.get(name)
        if not (isinstance(entry, list) and len(entry) == 2 and entry[1]) or not (path / name).is_dir():
            return None
        if entry[1] not in allowed:
            raise ValueError(f"{index_path}: {name} is a {entry[1]}; this tool loads {', '.join(allowed)}")
        return entry[1]

    if model is None:
        denoisers = [(name, cls) for name in ("unet", "transformer") if (cls := part_class(name, _DENOISER_CLASSES))]
        if not denoisers:
            raise FileNotFoundError(f"{path}: model_index.json names no unet or transformer folder that is there")
        name, cls = denoisers[0]
        model = getattr(diffusers, cls).from_pretrained(path, subfolder=name, torch_dtype=dtype)
    tes, toks = [], []
    for te_name, tok_name in _TEXT_ENCODER_PARTS:
        te_cls = part_class(te_name, _TEXT_ENCODER_CLASSES)
        if te_cls is None:
            break
        tes.append(getattr(transformers, te_cls).from_pretrained(path, subfolder=te_name, torch_dtype=dtype))
        toks.append(AutoTokenizer.from_pretrained(path, subfolder=tok_name))
    if not tes:
        raise FileNotFoundError(f"{path}: model_index.json names no text_encoder folder that is there")
    scheduler_config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    scale = 1
    vae_config = path / "vae" / "config.json"
    if vae_config.is_file():
        scale = 2 ** (len(json.loads(vae_config.read_text()).get("block_out_channels", [0] * 4)) - 1)
    return dict(model=model, text_encoders=tes, tokenizers=toks, scheduler_config=scheduler_config, vae_scale_factor=scale)


# a key of each single-file DiT layout (BFL's Flux, Stability's SD3), with or without "model.diffusion_model."
_SINGLE_FILE_DITS = (("double_blocks.0.img_attn.qkv.weight", "FluxTransformer2DModel"),
                     ("joint_blocks.0.x_block.attn.qkv.weight", "SD3Transformer2DModel"))


def _load_single_file(path: Path, dtype, base_config: str | None) -> dict:
    """A single-file checkpoint: SD1.x/SD2.x/SDXL (the whole pipeline in one file), or an
    SD3/Flux transformer as those are shared (text encoders and scheduler from ``base_config``)."""
    import safetensors

    if not path.is_file():
        raise FileNotFoundError(f"{path}: base model not found")
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{path}: only .safetensors checkpoints are read (pickle files can run code); "
                         "convert it, or pass a diffusers folder")
    with safetensors.safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    is_xl = any(k.startswith("conditioner.embedders.1.") for k in keys)
    dit = next((cls for key, cls in _SINGLE_FILE_DITS if any(k.endswith(key) for k in keys)), None)
    if dit is not None:
        import diffusers

        if not base_config:
            raise ValueError(f"{path}: a single-file {dit.removesuffix('Transformer2DModel')} transformer needs "
                             "base_config, a diffusers folder of the same model (for its text encoders and configs)")
        try:
            model = getattr(diffusers, dit).from_single_file(str(path), config=base_config, subfolder="transformer",
                                                             torch_dtype=dtype)
        except Exception as exc:
            raise ValueError(f"{path}: could not load the checkpoint ({type(exc).__name__}: {exc})") from exc
        return _load_folder(Path(base_config), dtype, model=model)
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if is_xl else StableDiffusionPipeline
    try:
        pipe = cls.from_single_file(str(path), config=base_config, torch_dtype=dtype)
    except Exception as exc:  # diffusers fetches configs from the hub when none is given
        hint = "" if base_config else "; set base_config to a diffusers folder of the same model family"
        raise ValueError(f"{path}: could not load the checkpoint ({type(exc).__name__}: {exc}){hint}") from exc
    tes = [pipe.text_encoder] + ([pipe.text_encoder_2] if is_xl else [])
    toks = [pipe.tokenizer] + ([pipe.tokenizer_2] if is_xl else [])
    return dict(model=pipe.unet, text_encoders=tes, tokenizers=toks,
                scheduler_config=dict(pipe.scheduler.config), vae_scale_factor=pipe.vae_scale_factor)
