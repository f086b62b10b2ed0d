import pytest
import torch


@pytest.fixture(autouse=True)
def float32_default():
    """Build float32 tensors even if a test changed torch's default dtype."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture
def one_thread():
    """For modules of tiny tensors: one thread is fastest, and immune to a busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_assets():
    """The embedded tiny SD1 model and two concept LoRAs (built once, cached; see tiny.py)."""
    from iteris_demo.tiny import ensure_tiny_assets

    return ensure_tiny_assets(2)


# --- A real ComfyUI server (tests marked `comfyui`; see tests/comfy_harness.py) ---------------


@pytest.fixture(scope="session")
def comfy_sd15_checkpoint(tmp_path_factory):
    """A random SD1.5-detected checkpoint (~440 MB), built once, cached under $ITERIS_SD_CACHE."""
    import os
    from pathlib import Path

    import comfy_harness as ch

    if not ch.comfy_installed():
        pytest.fail(ch.SETUP_HINT, pytrace=False)
    cache = os.environ.get("ITERIS_SD_CACHE")
    folder = Path(cache) / "comfyui" if cache else tmp_path_factory.mktemp("comfy_checkpoint")
    path = folder / f"iteris_test_sd15-v{ch.CHECKPOINT_VERSION}.safetensors"
    if not path.is_file():
        ch.build_sd15_checkpoint(path, seed=0)
    return path


@pytest.fixture(scope="session")
def comfy_server(comfy_sd15_checkpoint, tmp_path_factory):
    """A started ComfyServer with comfy_harness.TEST_CHECKPOINT_NAME in its models/checkpoints."""
    import comfy_harness as ch

    if not ch.comfy_installed():
        pytest.fail(ch.SETUP_HINT, pytrace=False)
    server = ch.ComfyServer(tmp_path_factory.mktemp("comfy_base"))
    server.add_model("checkpoints", comfy_sd15_checkpoint, ch.TEST_CHECKPOINT_NAME)
    with server:
        yield server


@pytest.fixture(scope="session")
def comfy_lora_pair(comfy_server, comfy_sd15_checkpoint):
    """Two kohya LoRAs for that checkpoint in the server's models/loras; returns their names
    ("concept_a.safetensors" rank 4, "concept_b.safetensors" rank 8)."""
    import comfy_harness as ch

    loras = comfy_server.models_dir / "loras"
    (name_a, name_b) = ch.TEST_LORA_NAMES
    for name, seed, rank in ((name_a, 1, 4), (name_b, 2, 8)):
        ch.build_lora(loras / name, comfy_sd15_checkpoint, seed=seed, rank=rank)
    return ch.TEST_LORA_NAMES
