"""`demo` and `bench`: every method on the embedded tiny model, on held-out prompts and seeds.

demo: merge the first N concept LoRAs with IterIS, score every baseline in the same run,
write the merged LoRA, report.json and report.md. bench: demo for 2 and 4 LoRAs, each in
its own process (so each peak memory figure is its own), combined into one markdown table.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .pipeline import MergeReport, run_recipe
from .progress import ProgressFn, no_progress
from .recipe import METHODS, parse_recipe

DEMO_CALIBRATION = {"resolution": 32, "steps": 8, "timesteps": 4, "cfg": 5.0}


def run_demo(n_loras: int = 2, iterations: int = 5, out_dir: str = "out/demo",
             progress: ProgressFn = no_progress) -> MergeReport:
    from .tiny import CONCEPTS, ensure_tiny_assets

    base, paths = ensure_tiny_assets(n_loras, progress)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    recipe = parse_recipe({
        "base": str(base), "output": str(out / "merged.safetensors"), "overwrite": True,
        "method": "iteris", "iterations": iterations, "dtype": "fp32", "device": "cpu",
        "compare": [m for m in METHODS if m != "iteris"], "calibration": DEMO_CALIBRATION,
        "lora": [{"path": str(p), "prompts": list(c.prompts), "held_out_prompts": list(c.held_out)}
                 for p, c in zip(paths, CONCEPTS)],
    }, source="demo")
    report = run_recipe(recipe, progress, score_new_seed=True)
    (out / "report.json").write_text(json.dumps(report_dict(report), indent=2))
    (out / "report.md").write_text(markdown_table(report) + "\n")
    return report


def report_dict(report: MergeReport) -> dict:
    return {
        "concepts": report.concepts,
        "method": report.method,
        "seconds": report.seconds,
        "peak_memory_bytes": report.peak_memory_bytes,
        "chosen_iteration": report.chosen_iteration,
        "history": [r.objective for r in report.history],
        "methods": {n: {"calibration": r.calibration, "new_seed": r.new_seed, "held_out": r.held_out,
                        "seconds": r.seconds}
                    for n, r in report.results.items()},
    }


def markdown_table(report: MergeReport) -> str:
    """Per method, the mean over concepts of each error (per concept in brackets), and time."""

    def cell(values):
        if not values:
            return "-"
        return f"{sum(values) / len(values):.3f} ({', '.join(f'{e:.2f}' for e in values)})"

    rows = ["| method | held-out prompts | calibration prompts, new seed | calibration (layers) | merge s |",
            "|---|---|---|---|---|"]
    for r in sorted(report.results.values(), key=lambda r: sum(r.held_out or [0])):
        rows.append(f"| {r.name} | {cell(r.held_out)} | {cell(r.new_seed)} | {cell(r.calibration)} | {r.seconds:.1f} |")
    return "\n".join(rows)


def run_bench(counts=(2, 4), iterations: int = 5, out_dir: str = "out/bench") -> str:
    """demo for each LoRA count in a fresh process; returns (and writes) bench.md."""
    sections = []
    for n in counts:
        folder = Path(out_dir) / f"{n}-loras"
        subprocess.run([sys.executable, "-m", "iteris_sd", "demo", "--loras", str(n), "--iterations",
                        str(iterations), "--out", str(folder)], check=True)
        data = json.loads((folder / "report.json").read_text())
        md = (folder / "report.md").read_text().strip()
        sections.append(f"### {n} LoRAs ({', '.join(data['concepts'])})\n\n{md}\n\n"
                        f"Whole run (capture, all methods, evaluation): {data['seconds']:.1f} s; "
                        f"peak process memory {data['peak_memory_bytes'] / 2**20:.0f} MiB; IterIS error by "
                        f"iteration: {', '.join(f'{e:.3f}' for e in data['history'])}.")
    text = "\n\n".join(sections) + "\n"
    Path(out_dir, "bench.md").write_text(text)
    return text
