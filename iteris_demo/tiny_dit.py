"""Tiny random-weight SD3 and Flux.1 diffusers pipeline folders, built in code (no downloads):
the DiT families' architectures at toy width, for the diffusers backend's and the CLI's tests.

Each folder is what ``save_pretrained`` of the pipeline writes for the parts the merge reads
(model_index.json, transformer/, text_encoder*/, tokenizer*/, scheduler/), without a VAE: the
models are sampled in latent space. Every tokenizer is the offline byte-level CLIP tokenizer of
`iteris_demo.tiny`, T5's included (T5 only needs token ids below its vocabulary size).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .tiny import tiny_tokenizer

TEXT_WIDTH = 16  # each CLIP's width
JOINT_WIDTH = 32  # T5's width and the transformer's context width
SD3_TOKENS = 77  # the T5 tokenizer's length here (the real ones are 256 to 512)


def _clip(projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tok = tiny_tokenizer()
    config = CLIPTextConfig(vocab_size=len(tok), hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                            projection_dim=TEXT_WIDTH, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _t5():
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tiny_tokenizer()), d_model=JOINT_WIDTH, d_kv=8, d_ff=2 * JOINT_WIDTH,
                                   num_layers=2, num_heads=4, decoder_start_token_id=0))


def build_tiny_sd3(folder: Path, seed: int = 0) -> Path:
    """An SD3-architecture pipeline folder: MMDiT (2 joint blocks, the first with dual
    attention), CLIP-L and bigG stand-ins with projections, and T5."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=JOINT_WIDTH, caption_projection_dim=16,
        pooled_projection_dim=2 * TEXT_WIDTH, pos_embed_max_size=16, dual_attention_layers=(0,),
    )
    parts = {"transformer": transformer, "text_encoder": _clip(True), "text_encoder_2": _clip(True), "text_encoder_3": _t5(),
             "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0)}
    return _save(folder, "StableDiffusion3Pipeline", parts)


def build_tiny_flux(folder: Path, seed: int = 0, guidance: bool = True, full_width: bool = False) -> Path:
    """A Flux.1-architecture pipeline folder: one double and one single block, CLIP-L and
    T5; ``guidance``: a dev-style model with the guidance embedding, else schnell-style;
    ``full_width``: Flux.1's 24 heads of 128 (diffusers reads BFL's single files only at that
    width; about 500M parameters), else 2 of 8."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=128 if full_width else 8,
        num_attention_heads=24 if full_width else 2, joint_attention_dim=JOINT_WIDTH, pooled_projection_dim=TEXT_WIDTH,
        guidance_embeds=guidance, axes_dims_rope=(16, 56, 56) if full_width else (2, 2, 4),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    parts = {"transformer": transformer, "text_encoder": _clip(False), "text_encoder_2": _t5(), "scheduler": scheduler}
    return _save(folder, "FluxPipeline", parts)


def _save(folder: Path, pipeline: str, parts: dict) -> Path:
    """Each part with its ``save_pretrained``, its tokenizer beside each text encoder, and a
    model_index.json naming them; written to a sibling folder first, then renamed."""
    tmp = folder.with_name(folder.name + ".partial")
    tmp.mkdir(parents=True)
    index = {"_class_name": pipeline, "_diffusers_version": "0.42.1"}
    for name, part in parts.items():
        library = "diffusers" if type(part).__module__.startswith("diffusers") else "transformers"
        index[name] = [library, type(part).__name__]
        if name == "scheduler":
            part.save_config(tmp / name)
        else:
            part.eval().save_pretrained(tmp / name)
        if name.startswith("text_encoder"):
            tok_name = name.replace("text_encoder", "tokenizer")
            tiny_tokenizer().save_pretrained(tmp / tok_name)
            index[tok_name] = ["transformers", "CLIPTokenizer"]
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    tmp.rename(folder)
    return folder
