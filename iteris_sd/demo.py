"""`python -m iteris_sd demo`: merge concept LoRAs of the trained demo model with IterIS,
measure every baseline in the same run (see `iteris_sd.bench`), and draw a picture grid.

Writes merged.safetensors, grid.png, report.json and report.md into the output folder.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from .bench import EVAL_SEED, EVALUATION, Measured, evaluation_backend, markdown, measure, references_by_name
from .pipeline import write_merged
from .progress import ProgressFn, no_progress

GRID_METHODS = ("stack", "linear", "svd", "ties", "regmean", "iteris")
CELL = 96  # pixels per picture in the grid (each 32 x 32 sample scaled 3x)


def run_demo(n_loras: int = 2, iterations: int = 5, out_dir: str = "out/demo",
             progress: ProgressFn = no_progress, assets=None) -> Measured:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    m = measure(n_loras, iterations, progress=progress, assets=assets)
    recipe = {"method": "iteris", "iterations": iterations, "concepts": m.problem.names,
              "prompts": m.problem.calibration, "chosen_iteration": m.report.chosen_iteration}
    write_merged(str(out / "merged.safetensors"), m.backend, m.report.results["iteris"].deltas, inputs=m.loras,
                 recipe=recipe, dtype="fp16", overwrite=True)
    (out / "report.json").write_text(json.dumps(m.result, indent=2) + "\n")
    (out / "report.md").write_text(markdown(m.result) + "\n")
    draw_grid(m, out / "grid.png", progress)
    return m


def grid_rows(m: Measured) -> list[str]:
    """Two held-out prompts per concept, then two that combine every concept."""
    return [p for ps in m.problem.held_out for p in ps[:2]] + m.problem.combined[:2]


def draw_grid(m: Measured, path: Path, progress: ProgressFn = no_progress) -> Path:
    """Rows: prompts; columns: base, each LoRA alone, then GRID_METHODS; one seed per row."""
    from PIL import Image, ImageDraw

    ev = evaluation_backend(m.backend, replace(EVALUATION, seeds=1))
    prompts = grid_rows(m)
    columns = {**references_by_name(m.problem, m.report.references),
               **{name: m.report.results[name].deltas for name in GRID_METHODS}}
    pictures = []
    for k, deltas in enumerate(columns.values()):
        pictures.append(ev.sample(prompts, EVAL_SEED, deltas))
        progress("draw grid", k + 1, len(columns))
    label_w, head_h = 280, 24
    grid = Image.new("RGB", (label_w + CELL * len(columns), head_h + CELL * len(prompts)), "white")
    draw = ImageDraw.Draw(grid)
    for c, name in enumerate(columns):
        draw.text((label_w + c * CELL + 4, 6), name, fill="black")
    for r, prompt in enumerate(prompts):
        draw.text((4, head_h + r * CELL + CELL // 2 - 6), prompt, fill="black")
        for c, batch in enumerate(pictures):
            pixels = ((batch[r].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
            grid.paste(Image.fromarray(pixels).resize((CELL, CELL), Image.NEAREST), (label_w + c * CELL, head_h + r * CELL))
    grid.save(path)
    return path
