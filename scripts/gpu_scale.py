"""IterIS at full size on a GPU: SD1.5- and SDXL-architecture models with random weights (no
download), random rank-8 LoRAs on every UNet attention projection, merged under a memory
budget; prints time (split into forward passes, statistics, solves) and peak VRAM against
the budget. One command, a few minutes on a recent GPU:

    python scripts/gpu_scale.py                      # budget 6GiB, 2/4/8 LoRAs, 3 prompts each
    python scripts/gpu_scale.py --budget 2GiB        # a tighter budget: more chunks, token samples
    python scripts/gpu_scale.py --tiny --device cpu  # the same code on the tiny model (a smoke test)

"peak VRAM" is torch.cuda.max_memory_allocated over the merge (model weights included);
"above model" subtracts what was allocated when the merge started. The budget covers the
merge's statistics and solves (see iteris_sd/merge/plan.py); the model and its activations come
on top of it.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from iteris_demo.scale import MODELS, measure  # noqa: E402
from iteris_sd.merge.plan import fmt_bytes, parse_budget  # noqa: E402

# model -> (calibration resolution, sampling steps, captured timesteps)
FULL = {"sd15": (512, 4, 2), "sdxl": (1024, 4, 2)}
TINY = {"tiny": (32, 2, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--budget", default="6GiB", help="memory_budget of every merge (default 6GiB)")
    parser.add_argument("--loras", default="2,4,8")
    parser.add_argument("--prompts", type=int, default=3, help="calibration prompts per LoRA (default 3)")
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--models", default=None, help="comma list of sd15, sdxl, tiny (default sd15,sdxl)")
    parser.add_argument("--tiny", action="store_true", help="only the tiny model: checks the script anywhere")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    try:
        from diffusers.utils import logging as dl
        from transformers.utils import logging as tl

        for lib in (dl, tl):
            lib.set_verbosity_error()
            lib.disable_progress_bar()
    except ImportError:
        pass
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    settings = TINY if args.tiny else FULL
    models = args.models.split(",") if args.models else list(settings)
    budget = parse_budget(args.budget)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {device} ({name}), calibration dtype {dtype}, budget {fmt_bytes(budget)}, "
          f"{args.prompts} prompts per LoRA, {args.iterations} iterations", flush=True)
    print("| model | px | LoRAs | layers | chunks | forward s | statistics s | solves s | other s | total s | "
          "peak VRAM | above model | plan estimate | budget | error |")
    print("|" + "---|" * 15, flush=True)
    for model in models:
        resolution, steps, timesteps = (FULL | TINY)[model]
        t0 = time.perf_counter()
        components = MODELS[model][0](dtype=dtype, device=device)
        built = time.perf_counter() - t0
        model_bytes = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        for n in (int(v) for v in args.loras.split(",")):
            r = measure(components, n, args.prompts, resolution, args.iterations, steps, timesteps,
                        budget=args.budget, device=device)
            total_peak = r["peak"] + r["base"]
            print(f"| {model} | {resolution} | {n} | {r['layers']} | {r['chunks']} | {r['forward']:.1f} | "
                  f"{r['statistics']:.1f} | {r['solve']:.1f} | {r['other']:.1f} | {r['total']:.1f} | "
                  f"{fmt_bytes(total_peak)} | {fmt_bytes(r['peak'])} | {fmt_bytes(r['estimate'])} | "
                  f"{fmt_bytes(r['budget'])} | {r['error']:.3f} |", flush=True)
        print(f"({model}: built in {built:.0f} s, weights {fmt_bytes(model_bytes) if model_bytes else 'on cpu'})",
              flush=True)
        del components
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
