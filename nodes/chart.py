"""The convergence chart: each concept's calibration error per IterIS iteration, as an IMAGE.

web/iteris.js draws the same chart live on the node; keep the two alike."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..iteris_sd.app.pipeline import MergeReport

COLORS = [(66, 133, 244), (234, 67, 53), (251, 188, 5), (52, 168, 83), (171, 71, 188), (0, 172, 193)]
BACKGROUND, FRAME, GRID, TEXT, KEPT = (24, 24, 24), (110, 110, 110), (50, 50, 50), (220, 220, 220), (120, 210, 120)


def nice_ticks(low: float, high: float, count: int = 6) -> list[float]:
    """Round tick values (steps of 1, 2 or 5 x 10^k) covering [low, high]."""
    raw = (high - low) / max(1, count - 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step) * step
    return [first + k * step for k in range(math.ceil((high - first) / step + 1e-9) + 1)]


def y_range(values: list[float]) -> tuple[float, float]:
    """The data's range with some room, at least 0.01 tall so equal values still get an axis."""
    low, high = min(values), max(values)
    pad = max((high - low) * 0.08, 0.005)
    return max(0.0, low - pad), high + pad


def convergence_image(report: MergeReport, width: int = 640, height: int = 400) -> torch.Tensor:
    """(1, height, width, 3) float in [0, 1]: error (y) against iteration (x), one line per
    concept, the kept iterate marked and labelled; for a one-shot method, one point per concept."""
    img = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    font, small = ImageFont.load_default(size=15), ImageFont.load_default(size=13)
    series = [r.errors for r in report.history] or [report.results[report.method].calibration]
    n = len(series)
    kept = series[report.chosen_iteration] if report.history else series[0]
    legend = _legend_lines(draw, small, report.concepts, kept, width - 24)
    left, right, top = 64, width - 20, 34
    bottom = height - 46 - 18 * len(legend)
    ticks = nice_ticks(*y_range([e for errs in series for e in errs]))
    low, high = ticks[0], ticks[-1]

    def point(t: int, e: float) -> tuple[float, float]:
        x = left + (right - left) * (t / (n - 1) if n > 1 else 0.5)
        return x, bottom - (bottom - top) * (e - low) / (high - low)

    draw.text((left, 8), f"{report.method}: calibration error per LoRA (lower is better)", fill=TEXT, font=font)
    for value in ticks:
        y = point(0, value)[1]
        draw.line([(left, y), (right, y)], fill=GRID)
        draw.text((left - 6, y), f"{value:.3g}", fill=TEXT, font=small, anchor="rm")
    label = Image.new("RGB", (bottom - top, 16), BACKGROUND)
    ImageDraw.Draw(label).text(((bottom - top) / 2, 8), "error (0 = as the LoRA alone)", fill=TEXT, font=small, anchor="mm")
    img.paste(label.rotate(90, expand=True), (4, top))
    step = max(1, math.ceil(n / 12))
    for t in range(0, n, step):
        x = point(t, low)[0]
        draw.line([(x, bottom), (x, bottom + 4)], fill=FRAME)
        draw.text((x, bottom + 6), str(t), fill=TEXT, font=small, anchor="mt")
    axis = "iteration (0 = first solve)" if report.history else "one-shot method: no iterations"
    draw.text(((left + right) / 2, bottom + 22), axis, fill=TEXT, font=small, anchor="mt")
    draw.rectangle([left, top, right, bottom], outline=FRAME)
    if report.history:
        x = point(report.chosen_iteration, low)[0]
        for y in range(top, bottom, 8):
            draw.line([(x, y), (x, min(y + 4, bottom))], fill=KEPT, width=2)
        anchor = "ra" if x > (left + right) / 2 else "la"
        draw.text((x + (-4 if anchor == "ra" else 4), top + 3), f"kept: iteration {report.chosen_iteration}",
                  fill=KEPT, font=small, anchor=anchor)
    for c in range(len(report.concepts)):
        color = COLORS[c % len(COLORS)]
        pts = [point(t, errs[c]) for t, errs in enumerate(series)]
        if len(pts) > 1:
            draw.line(pts, fill=color, width=2)
        for t, (x, y) in enumerate(pts):
            r = 6 if report.history and t == report.chosen_iteration else 3
            draw.ellipse([x - r, y - r, x + r, y + r], fill=color, outline=KEPT if r == 6 else None, width=2)
    y = height - 12 - 18 * len(legend)
    for line in legend:
        x = 12
        for c, text in line:
            draw.rectangle([x, y + 3, x + 10, y + 13], fill=COLORS[c % len(COLORS)])
            draw.text((x + 14, y), text, fill=TEXT, font=small)
            x += 14 + draw.textlength(text, font=small) + 18
        y += 18
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]


def _legend_lines(draw: ImageDraw.ImageDraw, font, concepts: list[str], errors: list[float],
                  width: float) -> list[list[tuple[int, str]]]:
    """Legend entries ("name: error of the kept iterate"), wrapped into lines that fit ``width``; a name
    too long for a line of its own is shortened with an ellipsis."""
    lines: list[list[tuple[int, str]]] = [[]]
    used = 0.0
    for c, name in enumerate(concepts):
        text = f"{name}: {errors[c]:.4f}"
        while draw.textlength(text, font=font) + 14 > width and len(name) > 4:
            name = name[:-2]
            text = f"{name}...: {errors[c]:.4f}"
        size = 14 + draw.textlength(text, font=font) + 18
        if lines[-1] and used + size > width:
            lines.append([])
            used = 0.0
        lines[-1].append((c, text))
        used += size
    return lines
