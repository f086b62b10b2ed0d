"""The IterIS Save LoRA node: a LORA_MODEL into models/loras as a kohya .safetensors file."""

from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io, ui

from ..iteris_sd.lora.write import DEFAULT_DTYPE, DTYPES, write_kohya
from .lora_model import merge_extras, named_layers


class SaveLoraNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IterIS_SaveLora",
            display_name="IterIS Save LoRA",
            category="loaders/IterIS",
            description="Save a LoRA (from IterIS Merge, or any LORA_MODEL) into models/loras as a kohya .safetensors file.",
            is_output_node=True,
            inputs=[
                io.LoraModel.Input("lora", tooltip="The LoRA to save."),
                io.String.Input("filename", default="iteris_merged",
                                tooltip="File name inside models/loras (subfolders allowed, .safetensors added)."),
                io.Combo.Input("dtype", options=list(DTYPES), default=DEFAULT_DTYPE, tooltip="Precision of the saved tensors."),
                io.Boolean.Input("overwrite", default=False, tooltip="Replace an existing file of that name; otherwise saving refuses."),
            ],
            outputs=[],
        )

    @classmethod
    def execute(cls, lora, filename, dtype, overwrite) -> io.NodeOutput:
        path = lora_path(filename)
        if os.path.exists(path) and not overwrite:  # before any work, in the node's own words
            raise FileExistsError(f"{filename}: already exists in models/loras; turn on 'overwrite' to replace it")
        layers = named_layers(lora)
        if not layers:
            raise ValueError(f"{filename}: the LoRA has no lora_up/lora_down layers to save")
        extras = merge_extras(lora)
        metadata = (extras.metadata if extras is not None else None) or {"ss_network_module": "networks.lora"}
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_kohya(path, layers, metadata, dtype=dtype, overwrite=overwrite)
        name = os.path.relpath(path, os.path.realpath(folder_paths.get_folder_paths("loras")[0]))
        return io.NodeOutput(ui=ui.PreviewText(f"saved {name} in models/loras:\n{path}"))


def lora_path(filename: str) -> str:
    """The file for ``filename`` inside the first models/loras folder; refuses names that
    would leave it (``..``, absolute paths, drive letters)."""
    root = os.path.realpath(folder_paths.get_folder_paths("loras")[0])
    name = filename.strip()
    if not name or os.path.isabs(name) or os.path.splitdrive(name)[0] or ".." in name.replace("\\", "/").split("/"):
        raise ValueError(f"{filename!r}: give a file name inside models/loras (no '..', no absolute path)")
    if not name.lower().endswith(".safetensors"):
        name += ".safetensors"
    path = os.path.realpath(os.path.join(root, name))
    if os.path.commonpath([root, path]) != root:
        raise ValueError(f"{filename!r}: resolves outside models/loras; choose a name inside it")
    return path
