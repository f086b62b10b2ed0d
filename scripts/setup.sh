#!/usr/bin/env bash
# Create .venv (once) with torch and the project's requirements; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, diffusers, transformers, safetensors, pytest, peft, tqdm, playwright" 2>/dev/null; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -c scripts/constraints.txt torch==2.13.0
  .venv/bin/python -m pip install --quiet -c scripts/constraints.txt -r requirements-dev.txt
fi
# Chromium for tests/test_browser.py (playwright drives Debian's build; it cannot download its own here).
if [ ! -x /usr/lib/chromium/chromium-headless-shell ] && command -v apt-get >/dev/null; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium-headless-shell
fi
# A real ComfyUI server for the `comfyui` integration tests (tests/comfy_harness.py).
bash scripts/setup_comfyui.sh
