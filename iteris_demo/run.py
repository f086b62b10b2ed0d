"""`python -m iteris_sd demo`: merge concept LoRAs of the trained demo model with IterIS,
measure every baseline in the same run (see `iteris_demo.bench`), and draw a picture grid.

Writes merged.safetensors, grid.png, report.json and report.md into the output folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from iteris_demo.bench import Measured, markdown, measure, references_by_name
from iteris_sd.app.pipeline import write_merged
from iteris_sd.merge.options import MergeOptions
from iteris_sd.progress import ProgressFn, no_progress

GRID_METHODS = ("stack", "linear", "svd", "ties", "regmean", "iteris")
CELL = 96  # pixels per picture in the grid (each 32 x 32 sample scaled 3x)


def run_demo(n_loras: int = 2, iterations: int = MergeOptions.iterations, out_dir: str = "out/demo",
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
    draw_grid(m, out / "grid.png")
    return m


def grid_columns(m: Measured) -> list[str]:
    """The base, each LoRA alone, then GRID_METHODS."""
    return [*references_by_name(m.problem, m.report.references), *GRID_METHODS]


def grid_rows(m: Measured) -> list[tuple[str, torch.Tensor]]:
    """(prompt, pictures) per row: two held-out prompts per concept, then two that combine every
    concept; the pictures (one per column) are the evaluation's own, its first seed."""
    prompt_sets = [*m.problem.held_out, m.problem.combined]
    columns = grid_columns(m)
    seeds = m.evaluation.seeds
    return [(prompts[p], torch.stack([m.evaluation.pictures[name][k][p * seeds] for name in columns]))
            for k, prompts in enumerate(prompt_sets) for p in range(2)]


def draw_grid(m: Measured, path: Path) -> Path:
    """Rows: grid_rows; columns: grid_columns."""
    from PIL import Image, ImageDraw, ImageFont

    columns = grid_columns(m)
    rows = grid_rows(m)
    font = ImageFont.load_default(size=13)
    label_w, head_h = 360, 24
    grid = Image.new("RGB", (label_w + CELL * len(columns), head_h + CELL * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for c, name in enumerate(columns):
        draw.text((label_w + c * CELL + 4, 6), name, fill="black", font=font)
    for r, (prompt, pictures) in enumerate(rows):
        draw.text((4, head_h + r * CELL + CELL // 2 - 8), prompt, fill="black", font=font)
        for c, picture in enumerate(pictures):
            pixels = ((picture.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
            grid.paste(Image.fromarray(pixels).resize((CELL, CELL), Image.NEAREST), (label_w + c * CELL, head_h + r * CELL))
    grid.save(path)
    return path
