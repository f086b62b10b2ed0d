"""A real ComfyUI 0.3.75 server for integration tests, and models to feed it.

ComfyUI is installed by ``bash scripts/setup_comfyui.sh`` into ``.comfyui/ComfyUI`` (its
requirements into ``.venv``). Nothing here imports ``comfy``: the checkpoint is built by a
subprocess of ``.venv/bin/python`` with ComfyUI's tree on ``sys.path``, and the server runs as a
subprocess spoken to over HTTP (stdlib ``urllib`` only).

- ``build_sd15_checkpoint(path, seed=0)``: a random-weight checkpoint that ComfyUI detects as
  SD1.5 (a one-level UNet of ~26M parameters, full-size CLIP-L and KL VAE; ~440 MB in fp16).
- ``build_lora(path, checkpoint_path, seed, rank, targets=...)``: a kohya-format LoRA whose shapes
  match that checkpoint (needs only torch and safetensors).
- ``ComfyServer``: a context manager running ``main.py --cpu`` on a free port over a fresh base
  directory (models/, custom_nodes/ with this repo linked in as ``comfyui-iteris``, output/, ...).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
COMFY_DIR = Path(os.environ.get("ITERIS_COMFYUI_DIR", REPO_ROOT / ".comfyui" / "ComfyUI"))
_VENV_PYTHON = REPO_ROOT / ".venv" / "bin" / "python"
PYTHON = Path(os.environ.get("ITERIS_COMFYUI_PYTHON", _VENV_PYTHON if _VENV_PYTHON.exists() else sys.executable))
SETUP_HINT = "ComfyUI is not installed: run `bash scripts/setup_comfyui.sh`"
CUSTOM_NODE_NAME = "comfyui-iteris"

# Bump when build_sd15_checkpoint's output changes, so cached files are rebuilt.
CHECKPOINT_VERSION = 1
# Names the conftest fixtures give the test checkpoint and LoRAs in the server's models/.
TEST_CHECKPOINT_NAME = "iteris_test_sd15.safetensors"
TEST_LORA_NAMES = ("concept_a.safetensors", "concept_b.safetensors")

UNET_PREFIX = "model.diffusion_model."
CLIP_PREFIX = "cond_stage_model.transformer."
VAE_PREFIX = "first_stage_model."


class ComfyError(RuntimeError):
    """A ComfyUI request or run failed; the message carries the response body or log tail.

    From ``ComfyServer.wait``: ``entry`` is the history entry (None on time-out or a dead
    server) and ``interrupted`` tells an interrupted run from a failed one.
    """

    def __init__(self, message: str, entry: dict | None = None, interrupted: bool = False):
        super().__init__(message)
        self.entry = entry
        self.interrupted = interrupted


def _status_summary(status: dict) -> tuple[str, bool]:
    """(one readable paragraph, interrupted?) from a history entry's ``status``."""
    for kind, data in reversed(status.get("messages") or []):
        if kind == "execution_interrupted":
            return f"interrupted at node {data.get('node_id')} ({data.get('node_type')})", True
        if kind == "execution_error":
            tb = "".join(data.get("traceback") or [])
            return (
                f"node {data.get('node_id')} ({data.get('node_type')}) raised "
                f"{data.get('exception_type')}: {data.get('exception_message')}\n{_tail(tb, 20)}"
            ), False
    return json.dumps(status.get("messages"))[-2000:], False


def comfy_installed(comfy_dir: Path = COMFY_DIR) -> bool:
    return (Path(comfy_dir) / "main.py").is_file() and (Path(comfy_dir) / "comfy").is_dir()


def require_comfy(comfy_dir: Path = COMFY_DIR) -> None:
    if not comfy_installed(comfy_dir):
        raise ComfyError(f"{SETUP_HINT} (no {Path(comfy_dir) / 'main.py'})")


# --------------------------------------------------------------------------------------------
# Checkpoint

# Seeded initialisation of a model built from ComfyUI's layers (which skip their own), shared by
# the build scripts here and in comfy_families: each layer's own reset, then what no layer owns
# (RMSNorm gains: ones; embeddings and buffers such as SD3's pos_embed: normal, std 0.02).
INIT_WEIGHTS = r"""
def init_weights(model):
    done = set()
    for m in model.modules():
        if isinstance(m, torch.nn.Embedding):
            torch.nn.init.normal_(m.weight, std=0.02)
        else:
            for base in (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Conv1d,
                         torch.nn.GroupNorm, torch.nn.LayerNorm):
                if isinstance(m, base):
                    base.reset_parameters(m)
                    break
            else:
                continue
        done.update(id(p) for p in m.parameters(recurse=False))
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if id(t) not in done and t.is_floating_point():
            if t.dim() == 1 and name.endswith(("scale", "weight")):
                torch.nn.init.ones_(t)
            else:
                torch.nn.init.normal_(t, std=0.02)
    return model
"""

_BUILD_SCRIPT = r"""
import json, os, sys
cfg = json.loads(sys.argv[1])
sys.path.insert(0, cfg["comfy_dir"])
import comfy.cli_args
comfy.cli_args.args.cpu = True  # before comfy.model_management is imported: no CUDA probing
import torch
import comfy.model_management
import comfy.model_detection
import comfy.ops
from comfy.clip_model import CLIPTextModel
from comfy.ldm.models.autoencoder import AutoencoderKL
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
import safetensors.torch

ops = comfy.ops.disable_weight_init  # ComfyUI's layers skip init: initialise them below, seeded
torch.manual_seed(cfg["seed"])

""" + INIT_WEIGHTS + r"""

with torch.no_grad():
    unet = init_weights(UNetModel(
        image_size=32, in_channels=4, out_channels=4, model_channels=320,
        num_res_blocks=[cfg["num_res_blocks"]], channel_mult=[1],
        transformer_depth=[cfg["transformer_depth"]] * cfg["num_res_blocks"],
        transformer_depth_output=[cfg["transformer_depth"]] * (cfg["num_res_blocks"] + 1),
        transformer_depth_middle=cfg["transformer_depth"],
        num_heads=8, num_head_channels=-1, use_spatial_transformer=True, context_dim=768,
        use_linear_in_transformer=False, legacy=False, adm_in_channels=None,
        dtype=torch.float32, device="cpu", operations=ops))
    with open(os.path.join(cfg["comfy_dir"], "comfy", "sd1_clip_config.json")) as f:
        clip_config = json.load(f)
    clip = init_weights(CLIPTextModel(clip_config, dtype=torch.float32, device="cpu", operations=ops))
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
                "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [],
                "dropout": 0.0}
    vae = init_weights(AutoencoderKL(ddconfig=ddconfig, embed_dim=4))

    sd = {}
    for prefix, model in (("model.diffusion_model.", unet), ("cond_stage_model.transformer.", clip),
                          ("first_stage_model.", vae)):
        for k, v in model.state_dict().items():
            if k in ("text_projection.weight", "logit_scale"):  # not in SD1 checkpoints
                continue
            sd[prefix + k] = v.to(torch.float16).contiguous()

    detected = comfy.model_detection.model_config_from_unet(sd, "model.diffusion_model.")
    if type(detected).__name__ != "SD15":
        sys.exit(f"built UNet is detected as {type(detected).__name__}, not SD15")
    tmp = cfg["path"] + ".tmp"
    safetensors.torch.save_file(sd, tmp, metadata={"format": "pt", "iteris_test": "random SD1.5"})
    os.replace(tmp, cfg["path"])
    n_unet = sum(p.numel() for p in unet.parameters())
    print(json.dumps({"unet_params": n_unet, "tensors": len(sd), "detected": type(detected).__name__}))
"""


def build_sd15_checkpoint(
    path: str | os.PathLike,
    seed: int = 0,
    *,
    num_res_blocks: int = 1,
    transformer_depth: int = 1,
    comfy_dir: Path = COMFY_DIR,
    python: Path = PYTHON,
    timeout: float = 600,
) -> Path:
    """Write a random-weight checkpoint that ComfyUI detects as SD1.5 to ``path`` (fp16).

    UNet: one resolution level (model_channels 320, context_dim 768, 1x1-conv proj_in,
    in_channels 4; ``num_res_blocks`` res blocks with transformer depth ``transformer_depth``,
    also in the middle block), ~26M parameters with the defaults. CLIP-L text encoder and KL VAE
    at full size from ComfyUI's own classes. Init is seeded. Built in a subprocess of the venv
    python so this process never imports comfy; the file is written atomically.
    """
    require_comfy(comfy_dir)
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = {
        "comfy_dir": str(Path(comfy_dir).resolve()),
        "path": str(path),
        "seed": int(seed),
        "num_res_blocks": int(num_res_blocks),
        "transformer_depth": int(transformer_depth),
    }
    proc = subprocess.run(
        [str(python), "-c", _BUILD_SCRIPT, json.dumps(cfg)],
        check=False, capture_output=True, text=True, timeout=timeout, cwd=str(comfy_dir),
    )
    if proc.returncode != 0 or not path.is_file():
        raise ComfyError(
            f"building {path} failed (exit {proc.returncode}):\n{_tail(proc.stdout + proc.stderr)}"
        )
    return path


# --------------------------------------------------------------------------------------------
# LoRA

# Regexes over checkpoint keys (without the trailing ".weight"): every UNet attention projection,
# every transformer's proj_in/proj_out (1x1 convs in SD1), and the attention projections of the
# first three text-encoder layers.
DEFAULT_LORA_TARGETS: tuple[str, ...] = (
    r"model\.diffusion_model\..*\.transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)",
    r"model\.diffusion_model\..*\.proj_(in|out)",
    r"cond_stage_model\.transformer\.text_model\.encoder\.layers\.[0-2]\.self_attn\.(q|k|v|out)_proj",
)


def kohya_name(checkpoint_key: str) -> str:
    """``model.diffusion_model.a.b.weight`` -> ``lora_unet_a_b``;
    ``cond_stage_model.transformer.text_model.x.weight`` -> ``lora_te_text_model_x``."""
    key = checkpoint_key.removesuffix(".weight")
    if key.startswith(UNET_PREFIX):
        return "lora_unet_" + key[len(UNET_PREFIX):].replace(".", "_")
    if key.startswith(CLIP_PREFIX):
        return "lora_te_" + key[len(CLIP_PREFIX):].replace(".", "_")
    raise ValueError(f"no kohya name for {checkpoint_key}")


def checkpoint_shapes(checkpoint_path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(checkpoint_path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def build_lora(
    path: str | os.PathLike,
    checkpoint_path: str | os.PathLike,
    seed: int,
    rank: int,
    targets: Sequence[str] = DEFAULT_LORA_TARGETS,
    *,
    alpha: float | None = None,
    std: float = 0.05,
    dtype: str = "float16",
) -> dict[str, tuple[int, ...]]:
    """Write a kohya-format LoRA for ``checkpoint_path`` to ``path``; return {kohya name: weight shape}.

    ``targets``: regexes matched (fullmatch) against the checkpoint's weight keys without
    ``.weight``. For each target, ``<name>.lora_down.weight`` (rank, in[, kh, kw]),
    ``<name>.lora_up.weight`` (out, rank[, 1, 1]) ~ N(0, std) and ``<name>.alpha`` (= rank unless
    given). Linear and conv (1x1 or kxk) weights are supported.
    """
    import torch
    from safetensors.torch import save_file

    shapes = checkpoint_shapes(checkpoint_path)
    patterns = [re.compile(t) for t in targets]
    chosen = {}
    for key, shape in sorted(shapes.items()):
        if not key.endswith(".weight") or len(shape) not in (2, 4):
            continue
        if any(p.fullmatch(key[: -len(".weight")]) for p in patterns):
            chosen[kohya_name(key)] = shape
    if not chosen:
        raise ValueError(f"no key of {checkpoint_path} matches {list(targets)}")
    gen = torch.Generator().manual_seed(int(seed))
    torch_dtype = getattr(torch, dtype)
    alpha = float(rank if alpha is None else alpha)
    tensors = {}
    for name, shape in chosen.items():
        out_f, in_f = shape[0], shape[1]
        if len(shape) == 4:
            down_shape, up_shape = (rank, in_f, shape[2], shape[3]), (out_f, rank, 1, 1)
        else:
            down_shape, up_shape = (rank, in_f), (out_f, rank)
        tensors[f"{name}.lora_down.weight"] = (torch.randn(down_shape, generator=gen) * std).to(torch_dtype)
        tensors[f"{name}.lora_up.weight"] = (torch.randn(up_shape, generator=gen) * std).to(torch_dtype)
        tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch_dtype)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"ss_network_dim": str(rank), "ss_network_alpha": str(alpha)})
    os.replace(tmp, path)
    return chosen


# --------------------------------------------------------------------------------------------
# Server


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(text: str, n: int = 60) -> str:
    return "\n".join(text.splitlines()[-n:])


class ComfyServer:
    """A ComfyUI server (``main.py --cpu``) over a fresh base directory; use as a context manager.

    ``base_dir`` (created if missing; a temp dir, removed on exit, if None) gets ``models/``
    (``checkpoints``, ``loras``, ...), ``custom_nodes/`` (``custom_node_src``, this repo by
    default, symlinked as ``comfyui-iteris``), ``input/``, ``output/``, ``temp/``, ``user/``.
    The server runs with ``--base-directory base_dir`` and an in-memory database (the default
    database lives in the ComfyUI tree, which ``--base-directory`` does not move); its
    stdout+stderr go to ``base_dir/comfyui.log``.
    """

    def __init__(
        self,
        base_dir: str | os.PathLike | None = None,
        *,
        port: int | None = None,
        comfy_dir: Path = COMFY_DIR,
        python: Path = PYTHON,
        custom_node_src: str | os.PathLike | None = REPO_ROOT,
        custom_node_name: str = CUSTOM_NODE_NAME,
        extra_args: Iterable[str] = (),
        startup_timeout: float = 120,
        env: dict[str, str] | None = None,
    ):
        require_comfy(comfy_dir)
        self.comfy_dir = Path(comfy_dir).resolve()
        self.python = Path(python)
        self._own_base = base_dir is None
        self.base_dir = Path(tempfile.mkdtemp(prefix="comfy-base-") if base_dir is None else base_dir).resolve()
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_args = list(extra_args)
        self.startup_timeout = startup_timeout
        self.env = env
        self.client_id = uuid.uuid4().hex
        self.proc: subprocess.Popen | None = None
        self._log_file = None

        for sub in ("models/checkpoints", "models/loras", "models/vae", "models/embeddings",
                    "output", "input", "temp", "user", "custom_nodes"):
            (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
        if custom_node_src is not None:
            link = self.custom_nodes_dir / custom_node_name
            if not link.exists() and not link.is_symlink():
                link.symlink_to(Path(custom_node_src).resolve(), target_is_directory=True)

    # -- paths ---------------------------------------------------------------------------------
    @property
    def models_dir(self) -> Path:
        return self.base_dir / "models"

    @property
    def output_dir(self) -> Path:
        return self.base_dir / "output"

    @property
    def input_dir(self) -> Path:
        return self.base_dir / "input"

    @property
    def custom_nodes_dir(self) -> Path:
        return self.base_dir / "custom_nodes"

    @property
    def log_path(self) -> Path:
        return self.base_dir / "comfyui.log"

    def add_model(self, folder: str, src: str | os.PathLike, name: str | None = None) -> str:
        """Symlink ``src`` into ``models/<folder>/`` (as ``name``); return the name ComfyUI lists."""
        src = Path(src).resolve()
        name = name or src.name
        dst = self.models_dir / folder / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.is_symlink() or dst.exists():
            dst.unlink()
        dst.symlink_to(src)
        return name

    # -- life cycle ----------------------------------------------------------------------------
    def start(self) -> ComfyServer:
        """Start the server (once; again after ``stop``) and wait until it answers."""
        if self.alive:
            return self
        cmd = [
            str(self.python), str(self.comfy_dir / "main.py"),
            "--cpu", "--listen", "127.0.0.1", "--port", str(self.port), "--disable-auto-launch",
            "--base-directory", str(self.base_dir),
            "--database-url", "sqlite:///:memory:",
            *self.extra_args,
        ]
        env = dict(os.environ if self.env is None else self.env)
        env["PYTHONUNBUFFERED"] = "1"
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            cmd, cwd=str(self.comfy_dir), env=env, stdin=subprocess.DEVNULL,
            stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.stop()
                raise ComfyError(f"ComfyUI exited with {code} during start-up:\n{self.log_tail()}")
            try:
                stats = self._request("GET", "/system_stats", timeout=2)
            except (urllib.error.URLError, ConnectionError, OSError):
                stats = None
            if stats is not None:
                if str(self.base_dir) not in (stats.get("system") or {}).get("argv", []):
                    self.stop()
                    raise ComfyError(f"port {self.port} is answered by another server: {stats}")
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise ComfyError(
                    f"ComfyUI did not answer /system_stats within {self.startup_timeout:.0f} s:\n{self.log_tail()}"
                )
            time.sleep(0.25)

    def stop(self, timeout: float = 15) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> ComfyServer:
        try:
            return self.start()
        except BaseException:
            self.cleanup()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
        self.cleanup()

    def cleanup(self) -> None:
        if self._own_base:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- log -----------------------------------------------------------------------------------
    def log_mark(self) -> int:
        """A position in the log; pass it to ``log_text(since=...)`` to read only what followed."""
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def log_text(self, since: int = 0) -> str:
        if not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as f:
            f.seek(since)
            return f.read().decode("utf-8", errors="replace")

    def log_tail(self, n: int = 60) -> str:
        return _tail(self.log_text(), n)

    # -- HTTP ----------------------------------------------------------------------------------
    def _request(self, method: str, route: str, body: object = None, timeout: float = 30):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + route, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return raw.decode("utf-8", errors="replace")

    def get(self, route: str, timeout: float = 30):
        return self._request("GET", route, timeout=timeout)

    def system_stats(self) -> dict:
        return self.get("/system_stats")

    def object_info(self, node_class: str | None = None) -> dict:
        return self.get("/object_info" + (f"/{node_class}" if node_class else ""), timeout=60)

    def post(self, prompt: dict) -> str:
        """Queue an API-format workflow; return its prompt_id (ComfyError with the body on 400)."""
        try:
            resp = self._request("POST", "/prompt", {"prompt": prompt, "client_id": self.client_id})
        except urllib.error.HTTPError as e:
            body = e.read().decode("utf-8", errors="replace")
            raise ComfyError(f"POST /prompt answered {e.code}: {body}") from None
        return resp["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        return (self.get(f"/history/{prompt_id}") or {}).get(prompt_id)

    def wait(self, prompt_id: str, timeout: float = 300, poll: float = 0.2) -> dict:
        """Wait for a queued prompt; return its history entry (``outputs``, ``status``, ...).

        Raises ComfyError (with the error, the log tail and ``.entry``) if it ends in error or is
        interrupted (``.interrupted``), if the server dies, or if it is not done within ``timeout``.
        """
        deadline = time.monotonic() + timeout
        while True:
            entry = self.history(prompt_id)
            if entry is not None:
                status = entry.get("status") or {}
                if status.get("status_str") == "error":
                    summary, interrupted = _status_summary(status)
                    raise ComfyError(
                        f"prompt {prompt_id} failed: {summary}\n--- server log ---\n{self.log_tail()}",
                        entry, interrupted,
                    )
                if status.get("completed", True):
                    return entry
            if not self.alive:
                raise ComfyError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise ComfyError(f"prompt {prompt_id} not done after {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(poll)

    def run(self, prompt: dict, timeout: float = 300) -> dict:
        """``post`` then ``wait``."""
        return self.wait(self.post(prompt), timeout)

    def interrupt(self) -> None:
        self._request("POST", "/interrupt", {})

    def queue(self) -> dict:
        return self.get("/queue")

    def output_files(self, entry: dict, kind: str = "images") -> list[Path]:
        """Paths of the files a history entry's output nodes wrote (SaveImage: ``images``)."""
        base = {"output": self.output_dir, "temp": self.base_dir / "temp", "input": self.input_dir}
        files = []
        for out in (entry.get("outputs") or {}).values():
            for item in out.get(kind, []):
                files.append(base[item.get("type", "output")] / item.get("subfolder", "") / item["filename"])
        return files


# --------------------------------------------------------------------------------------------
# Workflows


def txt2img_workflow(
    ckpt_name: str,
    *,
    seed: int,
    positive: str = "a photo of a cat",
    negative: str = "",
    width: int = 64,
    height: int = 64,
    steps: int = 3,
    cfg: float = 5.0,
    sampler: str = "euler",
    scheduler: str = "normal",
    loras: Sequence[tuple[str, float, float]] = (),
    filename_prefix: str = "iteris_test",
) -> dict:
    """API-format txt2img graph: CheckpointLoaderSimple -> [LoraLoader (name, model strength,
    clip strength) ...] -> CLIPTextEncode x2 -> EmptyLatentImage -> KSampler -> VAEDecode -> SaveImage."""
    g: dict = {"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}}}
    model, clip = ["ckpt", 0], ["ckpt", 1]
    for i, (name, sm, sc) in enumerate(loras):
        node = f"lora{i}"
        g[node] = {"class_type": "LoraLoader", "inputs": {
            "model": model, "clip": clip, "lora_name": name, "strength_model": sm, "strength_clip": sc}}
        model, clip = [node, 0], [node, 1]
    g["pos"] = {"class_type": "CLIPTextEncode", "inputs": {"text": positive, "clip": clip}}
    g["neg"] = {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": clip}}
    g["latent"] = {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": 1}}
    g["sample"] = {"class_type": "KSampler", "inputs": {
        "model": model, "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
        "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler, "scheduler": scheduler, "denoise": 1.0}}
    g["decode"] = {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["ckpt", 2]}}
    g["save"] = {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": filename_prefix}}
    return g


LOADER_WARNINGS = ("lora key not loaded", "NOT LOADED", "clip missing", "unet missing")


def loader_warnings(log: str) -> list[str]:
    """Lines of a server log that report weights a loader could not apply."""
    return [line for line in log.splitlines() if any(w in line for w in LOADER_WARNINGS)]


def custom_node_import_failures(log: str, name: str = CUSTOM_NODE_NAME) -> list[str]:
    """Log lines saying the custom node folder ``name`` failed to import (ComfyUI only logs it)."""
    return [
        line for line in log.splitlines()
        if name in line and ("IMPORT FAILED" in line or "Cannot import" in line)
    ]
