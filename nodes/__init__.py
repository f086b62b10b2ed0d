"""ComfyUI glue over the `iteris_sd` core. Imported only by ComfyUI (it imports `comfy`)."""

from comfy_api.latest import ComfyExtension, io

from .compare_grid import CompareGridNode
from .lora_entry import LoraEntryNode
from .merge import MergeNode
from .save_lora import SaveLoraNode


class IterISExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [LoraEntryNode, MergeNode, SaveLoraNode, CompareGridNode]
