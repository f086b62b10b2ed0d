"""What the node pack knows of ComfyUI's model families, from a loaded model's classes (no
ComfyUI import, so it is tested without one): the native calibration size and guidance, and
kohya's ``ss_base_model_version``."""

from __future__ import annotations

_VERSIONS = {"BaseModel": "sd_v1", "SDXL": "sdxl_base_v1-0", "SD3": "sd3", "Flux": "flux1"}


def native_resolution(base_model) -> int:
    """The pixel size a ComfyUI model's family is trained at, from its ``model_config`` class
    (ComfyUI's ``supported_models``): SD1.x 512, SD2.x 768 (512 for its epsilon-prediction
    base), else 1024 (SDXL and its fine-tunes, SD3, Flux and later DiTs)."""
    families = {c.__name__ for c in type(base_model.model_config).__mro__}
    if "SD15" in families:
        return 512
    if "SD20" in families:
        return 768 if base_model.model_type.name == "V_PREDICTION" else 512
    return 1024


def native_cfg(base_model, default: float) -> float:
    """The CFG scale a family is sampled at: 1.0 for Flux.1 and its fine-tunes (guidance-distilled:
    a second, unconditional pass only degrades them), else ``default``."""
    families = {c.__name__ for c in type(base_model.model_config).__mro__}
    return 1.0 if "Flux" in families else default


def base_model_version(base_model) -> str:
    """kohya's ``ss_base_model_version`` of a ComfyUI model (``comfy.model_base`` class name)."""
    name = type(base_model).__name__
    return _VERSIONS.get(name, name.lower())
