"""A labelled picture grid as an IMAGE: rows named on the left, columns (prompts) on top.
Imports no ComfyUI module."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

BACKGROUND, TEXT = (255, 255, 255), (20, 20, 20)
GAP = 8  # pixels between pictures
HEADER_LINES = 3  # a column's prompt is wrapped onto at most this many lines


def labelled_grid(pictures: list[list[Tensor]], rows: list[str], columns: list[str]) -> Tensor:
    """``pictures[r][c]``: (H, W, 3) floats in [0, 1], all one size -> (1, H', W', 3): the
    pictures ``GAP`` apart, ``rows[r]`` left of row r and ``columns[c]`` above column c."""
    if len(pictures) != len(rows) or any(len(r) != len(columns) for r in pictures):
        raise ValueError(f"labelled_grid: {len(rows)} row and {len(columns)} column labels for a "
                         f"{len(pictures)} x {len(pictures[0]) if pictures else 0} grid")
    h, w = pictures[0][0].shape[:2]
    font = _font(max(11, min(32, w // 16)))
    line = _line_height(font)
    label_w = min(max(_width(font, t) for t in rows) + 2 * GAP, max(w, 4 * line))
    headers = [_wrap(font, t, w) for t in columns]
    header_h = max(len(h_) for h_ in headers) * line + GAP
    canvas = Image.new("RGB", (label_w + len(columns) * (w + GAP), header_h + len(rows) * (h + GAP)), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for c, lines in enumerate(headers):
        x = label_w + c * (w + GAP)
        for k, text in enumerate(lines):
            draw.text((x, k * line), text, fill=TEXT, font=font)
    for r, name in enumerate(rows):
        y = header_h + r * (h + GAP)
        for k, text in enumerate(_wrap(font, name, label_w - 2 * GAP)):
            draw.text((GAP, y + k * line), text, fill=TEXT, font=font)
        for c, picture in enumerate(pictures[r]):
            if tuple(picture.shape) != (h, w, 3):
                raise ValueError(f"labelled_grid: picture ({r}, {c}) is {tuple(picture.shape)}, expected {(h, w, 3)}")
            pixels = (picture.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
            canvas.paste(Image.fromarray(pixels), (label_w + c * (w + GAP), y))
    return torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0)[None]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one small bitmap font
        return ImageFont.load_default()


def _line_height(font) -> int:
    top, bottom = font.getbbox("Ag")[1::2]
    return bottom - top + 4


def _width(font, text: str) -> int:
    return int(font.getlength(text)) + 1


def _wrap(font, text: str, width: int, max_lines: int = HEADER_LINES) -> list[str]:
    """``text`` broken at spaces into lines at most ``width`` wide; the last kept line ends
    in an ellipsis when the text does not fit in ``max_lines``."""
    lines: list[str] = []
    for word in text.split():
        if lines and _width(font, f"{lines[-1]} {word}") <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    lines = [_clip(font, t, width) for t in lines] or [""]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = _clip(font, lines[-1] + " ...", width, force=True)
    return lines


def _clip(font, text: str, width: int, force: bool = False) -> str:
    """``text``, cut to end in "..." if it is wider than ``width`` (or ``force``)."""
    if _width(font, text) <= width and not force:
        return text
    while text and _width(font, text.rstrip(". ") + "...") > width:
        text = text[:-1]
    return text.rstrip(". ") + "..."
