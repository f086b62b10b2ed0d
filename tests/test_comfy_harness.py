"""The ComfyUI harness itself: a real ComfyUI 0.3.75 server loads, samples and applies a LoRA."""

import numpy as np
import pytest
from comfy_harness import TEST_CHECKPOINT_NAME as COMFY_CHECKPOINT_NAME
from comfy_harness import loader_warnings, txt2img_workflow
from PIL import Image

pytestmark = pytest.mark.comfyui


def _image(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def test_server_lists_core_nodes(comfy_server):
    info = comfy_server.object_info()
    for node in ("CheckpointLoaderSimple", "LoraLoader", "KSampler", "SaveImage"):
        assert node in info, node
    ckpts = info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    assert COMFY_CHECKPOINT_NAME in ckpts


def test_txt2img_writes_an_image(comfy_server):
    mark = comfy_server.log_mark()
    entry = comfy_server.run(txt2img_workflow(COMFY_CHECKPOINT_NAME, seed=101, filename_prefix="t2i"))
    assert entry["status"]["status_str"] == "success"
    (path,) = comfy_server.output_files(entry)
    assert path.is_file()
    img = _image(path)
    assert img.shape == (64, 64, 3)
    assert img.std() > 0  # not a constant image (NaNs decode to black)
    log = comfy_server.log_text(since=mark)
    assert loader_warnings(log) == [], log


def test_lora_applies_without_unloaded_keys(comfy_server, comfy_lora_pair):
    concept_a = comfy_lora_pair[0]
    seed = 202
    base = comfy_server.run(txt2img_workflow(COMFY_CHECKPOINT_NAME, seed=seed, filename_prefix="base"))
    mark = comfy_server.log_mark()
    with_lora = comfy_server.run(
        txt2img_workflow(COMFY_CHECKPOINT_NAME, seed=seed, loras=[(concept_a, 1.0, 1.0)], filename_prefix="lora")
    )
    log = comfy_server.log_text(since=mark)
    assert "lora key not loaded" not in log, log
    assert "NOT LOADED" not in log, log
    (base_path,) = comfy_server.output_files(base)
    (lora_path,) = comfy_server.output_files(with_lora)
    # Same seed and prompt: only the LoRA differs, and it visibly changes the image.
    diff = np.abs(_image(base_path) - _image(lora_path)).mean()
    assert diff > 1.0, diff
