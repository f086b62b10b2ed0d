"""The IterIS LoRA node: one LoRA, its strength and prompts, chained into a list for the merge."""

from __future__ import annotations

from dataclasses import dataclass

import folder_paths
from comfy_api.latest import io

from .lora_types import LoraList


@dataclass(frozen=True)
class LoraEntry:
    name: str  # as listed in models/loras
    path: str
    strength: float
    prompts: tuple[str, ...]


class LoraEntryNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IterIS_LoraEntry",
            display_name="IterIS LoRA",
            category="loaders/IterIS",
            description="One LoRA to merge, with prompts that show what it does. Chain several into IterIS Merge.",
            inputs=[
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                               tooltip="A LoRA from models/loras (.safetensors)."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.05,
                               tooltip="How strongly this LoRA counts, as in LoraLoader; the merge reproduces the LoRA at this strength."),
                io.String.Input("prompts", multiline=True, default="",
                                tooltip="1 to 5 prompts, one per line, that use this LoRA: its trigger word, with varied subjects, "
                                        "backgrounds and compositions (the merge fits these prompts closely)."),
                LoraList.Input("previous", optional=True, tooltip="Chain from another IterIS LoRA node to merge more LoRAs."),
            ],
            outputs=[LoraList.Output(display_name="loras", tooltip="The LoRAs chosen so far; connect to IterIS Merge or another entry.")],
        )

    @classmethod
    def execute(cls, lora_name, strength, prompts, previous=None) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        if not path.lower().endswith(".safetensors"):
            raise ValueError(f"{lora_name}: only .safetensors LoRAs are read (pickle files can run code); "
                             "convert it to safetensors first")
        lines = tuple(p.strip() for p in prompts.splitlines() if p.strip())
        if not lines:
            raise ValueError(f"{lora_name}: give at least one calibration prompt (one per line)")
        return io.NodeOutput(list(previous or []) + [LoraEntry(lora_name, path, float(strength), lines)])
