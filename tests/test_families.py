"""nodes/families.py (which imports no ComfyUI module): a model's native calibration size and
kohya version from ComfyUI's class names. The real families go through it in
test_comfy_families.py and test_comfy_nodes.py."""

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

_spec = importlib.util.spec_from_file_location(
    "iteris_nodes_families", Path(__file__).resolve().parent.parent / "nodes" / "families.py")
families = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)  # (nodes/__init__ imports comfy)
_spec.loader.exec_module(families)

# stand-ins named as comfy.supported_models' classes, with its inheritance
SD15 = type("SD15", (), {})
SD20 = type("SD20", (), {})
SDXL = type("SDXL", (), {})
FLUX = type("Flux", (), {})
CONFIGS = {
    "SD15": SD15, "SD15_instructpix2pix": type("SD15_instructpix2pix", (SD15,), {}),
    "SD20": SD20, "SD21UnclipH": type("SD21UnclipH", (SD20,), {}), "SDXL": SDXL,
    "SSD1B": type("SSD1B", (SDXL,), {}), "SD3": type("SD3", (), {}), "Flux": FLUX,
    "FluxSchnell": type("FluxSchnell", (FLUX,), {}), "QwenImage": type("QwenImage", (), {}),
}


def model(config: str, prediction: str = "EPS"):
    return SimpleNamespace(model_config=CONFIGS[config](), model_type=SimpleNamespace(name=prediction))


@pytest.mark.parametrize(("config", "prediction", "size"), [
    ("SD15", "EPS", 512), ("SD15_instructpix2pix", "EPS", 512), ("SD20", "V_PREDICTION", 768), ("SD20", "EPS", 512),
    ("SD21UnclipH", "V_PREDICTION", 768), ("SDXL", "EPS", 1024), ("SSD1B", "EPS", 1024), ("SD3", "FLOW", 1024),
    ("Flux", "FLUX", 1024), ("FluxSchnell", "FLUX", 1024), ("QwenImage", "FLOW", 1024),
])
def test_native_resolution_follows_the_family(config, prediction, size):
    assert families.native_resolution(model(config, prediction)) == size


def test_base_model_version_names_the_family():
    versions = {name: families.base_model_version(type(name, (), {})()) for name in ("BaseModel", "SDXL", "Flux", "WAN21")}
    assert versions == {"BaseModel": "sd_v1", "SDXL": "sdxl_base_v1-0", "Flux": "flux1", "WAN21": "wan21"}


@pytest.mark.parametrize(("config", "cfg"), [("SD15", 7.5), ("SDXL", 7.5), ("SD3", 7.5), ("Flux", 1.0),
                                             ("FluxSchnell", 1.0), ("QwenImage", 7.5)])
def test_flux_is_calibrated_without_cfg_and_the_others_at_the_default(config, cfg):
    assert families.native_cfg(model(config), 7.5) == cfg
