"""The IterIS Compare Grid node: one labelled picture grid of the base model, each LoRA alone,
all of them stacked and the merge, on the same prompts and seed."""

from __future__ import annotations

import os

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.sd
import comfy.utils
import torch
from comfy_api.latest import io

from .grid import labelled_grid
from .lora_types import LoraList

MAX_PROMPTS = 8


class CompareGridNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IterIS_CompareGrid",
            display_name="IterIS Compare Grid",
            category="loaders/IterIS",
            description="One labelled picture grid: a row per model (base, each LoRA alone, all stacked, merged) and a "
                        "column per prompt, every picture from the same seed.",
            inputs=[
                io.Model.Input("model", tooltip="The base model (the one the merge was made on)."),
                io.Clip.Input("clip", tooltip="The base model's text encoder."),
                io.Vae.Input("vae", tooltip="The VAE that decodes the pictures."),
                LoraList.Input("loras", tooltip="The LoRAs that were merged, from IterIS LoRA nodes: a row each "
                                                "(at its strength) and one row with all of them stacked."),
                io.Model.Input("merged_model", tooltip="The merged MODEL from IterIS Merge LoRAs: the last row."),
                io.Clip.Input("merged_clip", tooltip="The merged CLIP from IterIS Merge LoRAs."),
                io.String.Input("prompts", multiline=True, default="",
                                tooltip=f"1 to {MAX_PROMPTS} prompts, one per line: a column each (for example one per "
                                        "LoRA and one that combines them)."),
                io.String.Input("negative_prompt", default="", tooltip="The negative prompt of every picture."),
                io.Int.Input("width", default=512, min=64, max=2048, step=64, tooltip="Picture width in pixels."),
                io.Int.Input("height", default=512, min=64, max=2048, step=64, tooltip="Picture height in pixels."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="The noise seed of every picture."),
                io.Int.Input("steps", default=20, min=1, max=100, tooltip="Sampling steps per picture."),
                io.Float.Input("cfg", default=7.0, min=0.0, max=30.0, step=0.5, tooltip="CFG scale."),
                io.Combo.Input("sampler", options=comfy.samplers.KSampler.SAMPLERS, default="euler", tooltip="Sampler."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="normal", tooltip="Scheduler."),
            ],
            outputs=[io.Image.Output(display_name="grid", tooltip="The labelled grid, as one picture.")],
        )

    @classmethod
    def execute(cls, model, clip, vae, loras, merged_model, merged_clip, prompts, negative_prompt, width, height,
                seed, steps, cfg, sampler, scheduler) -> io.NodeOutput:
        columns = [p.strip() for p in prompts.splitlines() if p.strip()]
        if not 1 <= len(columns) <= MAX_PROMPTS:
            raise ValueError(f"prompts: give 1 to {MAX_PROMPTS} prompts, one per line (got {len(columns)})")
        if not loras:
            raise ValueError("loras: connect the IterIS LoRA nodes that were merged")
        rows = [("base", model, clip)]
        stacked = (model, clip)
        for entry in loras:
            sd = comfy.utils.load_torch_file(entry.path, safe_load=True)
            rows.append((f"{_stem(entry.name)} alone",
                         *comfy.sd.load_lora_for_models(model, clip, sd, entry.strength, entry.strength)))
            stacked = comfy.sd.load_lora_for_models(*stacked, sd, entry.strength, entry.strength)
        rows += [("stacked", *stacked), ("merged", merged_model, merged_clip)]
        bar = comfy.utils.ProgressBar(len(rows) * len(columns) * steps)
        pictures = [[_picture(m, c, vae, text, negative_prompt, width, height, seed, steps, cfg, sampler, scheduler, bar)
                     for text in columns] for _, m, c in rows]
        return io.NodeOutput(labelled_grid(pictures, [name for name, _, _ in rows], columns))


def _picture(model, clip, vae, prompt, negative, width, height, seed, steps, cfg, sampler, scheduler, bar) -> torch.Tensor:
    """One picture (H, W, 3) of ``prompt``, sampled as KSampler would from an empty latent."""
    positive, negative = (clip.encode_from_tokens_scheduled(clip.tokenize(t)) for t in (prompt, negative))
    ratio = vae.downscale_ratio if isinstance(vae.downscale_ratio, int) else 8
    latent = comfy.sample.fix_empty_latent_channels(model, torch.zeros([1, 4, height // ratio, width // ratio]))
    noise = comfy.sample.prepare_noise(latent, seed)

    def step(*_):
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar.update(1)

    samples = comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, positive, negative, latent,
                                  callback=step, disable_pbar=True, seed=seed)
    return vae.decode(samples)[0, ..., :3]


def _stem(name: str) -> str:
    return os.path.splitext(os.path.basename(name))[0]
