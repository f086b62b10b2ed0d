"""ComfyUI entry point of the IterIS LoRA merge pack.

ComfyUI imports this file; it does no work at import. The nodes (and with them `comfy`) are
imported only when ComfyUI asks for them, so the core package `iteris_sd` stays usable and
testable without ComfyUI.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import IterISExtension

    return IterISExtension()
