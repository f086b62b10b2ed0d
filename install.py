"""Run by ComfyUI-Manager after it installs requirements.txt. Safe to run any number of times.

It never installs or replaces torch: it pins whatever torch (and torchvision) ComfyUI already
uses, and installs only what requirements.txt lists that is missing.
"""

import importlib.metadata
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
NEEDED = ("safetensors", "numpy", "diffusers", "transformers", "tqdm")


def main() -> int:
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        print("[iteris] torch is not installed in this Python; install ComfyUI's torch first", file=sys.stderr)
        return 1
    missing = [dist for dist in NEEDED if not _installed(dist)]
    if not missing:
        print("[iteris] requirements already satisfied")
        return 0
    pins = [f"torch=={torch_version}"] + [f"{d}=={importlib.metadata.version(d)}" for d in ("torchvision", "torchaudio") if _installed(d)]
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(pins) + "\n")
    try:
        cmd = [sys.executable, "-m", "pip", "install", "-r", os.path.join(HERE, "requirements.txt"), "-c", f.name]
        print("[iteris] installing", ", ".join(missing), "with", ", ".join(pins), "pinned")
        return subprocess.call(cmd)
    finally:
        os.unlink(f.name)


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.version(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


if __name__ == "__main__":
    sys.exit(main())
