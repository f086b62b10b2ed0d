"""The convergence chart: each concept's calibration error per IterIS iteration, as an IMAGE."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..iteris_sd.app.pipeline import MergeReport

COLORS = [(66, 133, 244), (234, 67, 53), (251, 188, 5), (52, 168, 83), (171, 71, 188), (0, 172, 193)]


def convergence_image(report: MergeReport, width: int = 512, height: int = 320) -> torch.Tensor:
    """(1, height, width, 3) float in [0, 1]: error (y) against iteration (x), one line per
    concept, the kept iterate marked; for a one-shot method, one point per concept."""
    img = Image.new("RGB", (width, height), (24, 24, 24))
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 48, width - 16, 16, height - 40
    draw.rectangle([left, top, right, bottom], outline=(90, 90, 90))
    series = [r.errors for r in report.history] or [report.results[report.method].calibration]
    top_value = max(1e-6, max(max(e) for e in series)) * 1.1
    n = len(series)

    def point(t: int, e: float) -> tuple[float, float]:
        x = left + (right - left) * (t / max(1, n - 1) if n > 1 else 0.5)
        return x, bottom - (bottom - top) * e / top_value

    for frac in (0.0, 0.5, 1.0):
        y = bottom - (bottom - top) * frac
        draw.text((4, y - 6), f"{top_value * frac:.2f}", fill=(200, 200, 200))
    for t in range(n):
        draw.text((point(t, 0)[0] - 3, bottom + 4), str(t), fill=(200, 200, 200))
    for c, name in enumerate(report.concepts):
        color = COLORS[c % len(COLORS)]
        pts = [point(t, errs[c]) for t, errs in enumerate(series)]
        if len(pts) > 1:
            draw.line(pts, fill=color, width=2)
        for x, y in pts:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        draw.text((left + 8 + 120 * c, height - 16), name[:18], fill=color)
    if report.history:
        x, _ = point(report.chosen_iteration, 0)
        draw.line([(x, top), (x, bottom)], fill=(120, 200, 120), width=1)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]
