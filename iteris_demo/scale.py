"""`python -m iteris_sd scale`: time and peak memory of an IterIS merge against the number of
LoRAs, the prompts per LoRA and the model size, split into forward passes, statistics and
solves.

Models are built in code with random weights (nothing is downloaded): ``tiny`` (the embedded
tiny SD1 model of `iteris_demo.tiny`), ``sd15`` (Stable Diffusion 1.5's UNet and CLIP ViT-L/14
text encoder architectures) and ``sdxl`` (SDXL's UNet and both text encoders; for
`scripts/gpu_scale.py`). LoRAs are random, of rank 8, on every attention projection of the
UNet (attn1/attn2 to_q, to_k, to_v, to_out.0). Each model runs in its own process so its
peak memory is its own; within it, each configuration's peak is measured from its start.

Columns: forward = the backend's capture calls (trajectory sampling and captured passes, the
floor) minus the time spent in the statistics sinks; statistics = the sinks; solves =
adaptive weights, solves and residuals; other = everything else of the merge (planning,
bookkeeping). overhead = (statistics + solves + other) / forward.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ATTENTION = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
             "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
SCHEDULER = {"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "num_train_timesteps": 1000, "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}
SUBJECTS = ("a cat", "a house by the sea", "a portrait of a woman", "a red car", "a bowl of fruit",
            "a mountain at dawn", "a city street at night", "a dog in the snow")


def _tokenizer():
    from iteris_demo.tiny import tiny_tokenizer

    return tiny_tokenizer()


def sd15_components(dtype=torch.float32, device="cpu") -> dict:
    """SD1.5's UNet (860M) and text encoder (CLIP ViT-L/14, 123M) configs, random weights."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tok = _tokenizer()
    te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                      num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                                      projection_dim=768, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id))
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
    )
    return dict(model=unet.to(device, dtype).eval(), text_encoders=[te.to(device, dtype).eval()], tokenizers=[tok],
                scheduler_config=SCHEDULER, vae_scale_factor=8)


def sdxl_components(dtype=torch.float32, device="cpu") -> dict:
    """SDXL's UNet (2.6B) and text encoders (CLIP ViT-L/14 and OpenCLIP ViT-bigG/14), random weights."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    tok = _tokenizer()
    ids = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    te1 = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                       num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768, **ids))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                                     num_attention_heads=20, hidden_act="gelu", projection_dim=1280,
                                                     **ids))
    unet = UNet2DConditionModel(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816, norm_num_groups=32,
    )
    scheduler = dict(SCHEDULER, _class_name="EulerDiscreteScheduler")
    return dict(model=unet.to(device, dtype).eval(), text_encoders=[te1.to(device, dtype).eval(), te2.to(device, dtype).eval()],
                tokenizers=[tok, tok], scheduler_config=scheduler, vae_scale_factor=8)


def tiny_components(dtype=torch.float32, device="cpu") -> dict:
    """The embedded tiny SD1 model (built in a few seconds, then cached)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from iteris_demo.tiny import build_tiny_pipeline, cache_dir

    base = cache_dir() / "base"
    if not (base / "model_index.json").is_file():
        base.parent.mkdir(parents=True, exist_ok=True)
        build_tiny_pipeline(base)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    te = CLIPTextModel.from_pretrained(base, subfolder="text_encoder")
    scheduler = json.loads((base / "scheduler" / "scheduler_config.json").read_text())
    return dict(model=unet.to(device, dtype).eval(), text_encoders=[te.to(device, dtype).eval()], tokenizers=[_tokenizer()],
                scheduler_config=scheduler, vae_scale_factor=2)


MODELS = {"tiny": (tiny_components, 32), "sd15": (sd15_components, None), "sdxl": (sdxl_components, None)}


def attention_modules(backend) -> list[str]:
    return sorted(m for m in backend.keymap.modules if m.startswith("unet.") and m.endswith(ATTENTION))


def random_deltas(backend, n_loras: int, rank: int = 8, seed: int = 0) -> list[dict]:
    """Per LoRA, random (B, A) on every UNet attention projection, dW about 10% of W."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_loras):
        deltas = {}
        for m in attention_modules(backend):
            w = backend.target(m).weight
            B = torch.randn(w.shape[0], rank, generator=g) * (0.1 / rank**0.5)
            A = torch.randn(rank, w.shape[1], generator=g) / w.shape[1] ** 0.5
            deltas[m] = (B, A)
        out.append(deltas)
    return out


def prompts(lora: int, count: int) -> list[str]:
    return [f"{SUBJECTS[(lora + k) % len(SUBJECTS)]}, style{lora}" for k in range(count)]


def _vm(key: str) -> int:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_peak(device: torch.device) -> int:
    """Start a peak measurement; returns the baseline (bytes in use now)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed memory back, so RSS is what is in use
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM to the current RSS
    except OSError:
        pass
    return _vm("VmRSS")


def _peak(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return _vm("VmHWM")


def measure(components: dict, n_loras: int, n_prompts: int, resolution: int, iterations: int = 1, steps: int = 2,
            timesteps: int = 1, budget="auto", device="cpu", rank: int = 8) -> dict:
    """One IterIS merge of ``n_loras`` random LoRAs with ``n_prompts`` prompts each; its
    timings (seconds), peak memory above the loaded model (bytes) and plan."""
    from iteris_sd.backends.calibration import CalibrationSettings
    from iteris_sd.backends.diffusers import DiffusersBackend
    from iteris_sd.merge.calibration import CalibrationStats
    from iteris_sd.merge.iterate import IterISConfig, run_iteris
    from iteris_sd.merge.plan import plan_merge

    device = torch.device(device)
    settings = CalibrationSettings(steps=steps, timesteps=timesteps, resolution=resolution, cfg=5.0)
    backend = DiffusersBackend(concepts=[prompts(i, n_prompts) for i in range(n_loras)], settings=settings, **components)
    deltas = random_deltas(backend, n_loras, rank)
    base = _reset_peak(device)
    start = time.perf_counter()
    plan = plan_merge(backend, deltas, budget=budget, iterations=iterations)
    cal = CalibrationStats(backend, deltas, plan=plan)
    if device.type == "cuda":
        cal.timing_sync = lambda: torch.cuda.synchronize(device)
    cal.capture_references(backend, lambda *a: None)
    outcome = run_iteris(backend, cal, IterISConfig(iterations=iterations), lambda *a: None)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    total = time.perf_counter() - start
    t = cal.timings
    return {
        "loras": n_loras, "prompts": n_prompts, "layers": len(cal.layers), "chunks": len(plan.chunks),
        "forward": t.forward, "statistics": t.statistics, "solve": t.solve,
        "other": total - t.capture - t.solve, "total": total,
        "peak": _peak(device) - base, "base": base, "estimate": plan.estimated_peak(), "budget": plan.budget,
        "error": outcome.history[outcome.chosen_iteration].objective if outcome.history else None,
    }


def configs(model: str, loras: list[int], prompt_counts: list[int], full_grid: bool = False) -> list[tuple[int, int]]:
    """(LoRAs, prompts) to run: every pair for the tiny model (or with ``full_grid``); for the
    large ones one factor at a time from the smallest (keeps the CPU run short)."""
    if full_grid or model == "tiny":
        return [(n, p) for n in loras for p in prompt_counts]
    return [(n, prompt_counts[0]) for n in loras] + [(loras[0], p) for p in prompt_counts[1:]]


def run_model(model: str, loras: list[int], prompt_counts: list[int], resolution: int, iterations: int,
              budget, device: str = "cpu", full_grid: bool = False) -> list[dict]:
    build, native = MODELS[model]
    components = build(device=device)
    res = native or resolution
    rows = []
    for n, p in configs(model, loras, prompt_counts, full_grid):
        row = measure(components, n, p, res, iterations, budget=budget, device=device)
        row.update(model=model, resolution=res, threads=torch.get_num_threads())
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    def mib(v):
        return f"{v / 2**20:.0f}"

    head = ("| model | LoRAs | prompts | forward s | statistics s | solves s | other s | total s | overhead | "
            "peak MiB | plan MiB | chunks |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        over = (r["statistics"] + r["solve"] + r["other"]) / r["forward"] if r["forward"] > 0 else float("nan")
        lines.append(f"| {r['model']} | {r['loras']} | {r['prompts']} | {r['forward']:.1f} | {r['statistics']:.1f} | "
                     f"{r['solve']:.1f} | {r['other']:.1f} | {r['total']:.1f} | {over:.0%} | {mib(r['peak'])} | "
                     f"{mib(r['estimate'])} | {r['chunks']} |")
    return "\n".join(lines)


def run_scale(models=("tiny", "sd15"), loras=(2, 4, 8), prompt_counts=(1, 3, 5), resolution: int = 128,
              iterations: int = 1, budget="auto", out_dir: str = "out/scale", threads: int = 1,
              full_grid: bool = False) -> str:
    """Each model in its own process, ``threads`` torch threads (1: stable timings on a busy
    machine); writes scale.json and scale.md under out_dir."""
    rows = []
    for model in models:
        cmd = [sys.executable, "-m", "iteris_demo.scale", model, ",".join(map(str, loras)),
               ",".join(map(str, prompt_counts)), str(resolution), str(iterations), str(budget), str(threads),
               str(int(full_grid))]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                              env=dict(os.environ, PYTHONWARNINGS="ignore"))
        if proc.returncode != 0:
            raise RuntimeError(f"scale run of {model} failed:\n{proc.stderr[-3000:]}")
        rows += [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps(rows, indent=1))
    text = markdown(rows) + "\n"
    (out / "scale.md").write_text(text)
    return text


if __name__ == "__main__":  # one model's rows as JSON lines (run_scale's subprocess)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for lib in (diffusers_logging, transformers_logging):
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    model, loras, prompt_counts, resolution, iterations, budget, threads, full = sys.argv[1:9]
    torch.set_num_threads(int(threads))
    run_model(model, [int(v) for v in loras.split(",")], [int(v) for v in prompt_counts.split(",")], int(resolution),
              int(iterations), budget, full_grid=bool(int(full)))
