import pytest


@pytest.fixture(scope="session")
def tiny_assets():
    """The embedded tiny SD1 model and two concept LoRAs (built once, cached; see tiny.py)."""
    from iteris_sd.tiny import ensure_tiny_assets

    return ensure_tiny_assets(2)
