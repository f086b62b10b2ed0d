"""The Compare Grid node's picture (nodes/grid.py, which imports no ComfyUI module): every
picture in its cell, row and column labels beside them. The node itself runs in a real
ComfyUI in test_comfy_nodes.py's test_example_workflow_runs."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location("iteris_nodes_grid", Path(__file__).resolve().parent.parent / "nodes" / "grid.py")
grid = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)  # (nodes/__init__ imports comfy)
_spec.loader.exec_module(grid)

ROWS = ["base", "concept_a alone", "stacked"]
COLUMNS = ["a photo of sks dog", "a zwx style painting of a house in the forest at night with a full moon"]


def pictures(h=64, w=48):
    """Picture (r, c) is one flat colour that names its cell."""
    return [[torch.full((h, w, 3), 0.1 + 0.3 * r).index_fill_(2, torch.tensor([2]), 0.2 + 0.35 * c)
             for c in range(len(COLUMNS))] for r in range(len(ROWS))]


def origin(image, h=64, w=48):
    """The top left corner of cell (0, 0): the grid's size less the cells is the label room."""
    H, W = image.shape[1:3]
    return H - len(ROWS) * (h + grid.GAP), W - len(COLUMNS) * (w + grid.GAP)


def test_each_picture_lands_in_its_cell():
    image = grid.labelled_grid(pictures(), ROWS, COLUMNS)
    assert image.shape[0] == 1 and image.shape[3] == 3 and image.dtype == torch.float32
    top, left = origin(image)
    assert top > 0 and left > 0  # room for the column and row labels
    for r, row in enumerate(pictures()):
        for c, picture in enumerate(row):
            y, x = top + r * (64 + grid.GAP), left + c * (48 + grid.GAP)
            cell = image[0, y:y + 64, x:x + 48]
            assert torch.allclose(cell, picture, atol=1 / 255), (r, c)
            assert (image[0, y:y + 64, x + 48:x + 48 + grid.GAP] == 1).all()  # white gap to the right


def test_labels_are_drawn_left_of_each_row_and_above_each_column():
    image = grid.labelled_grid(pictures(), ROWS, COLUMNS)
    top, left = origin(image)
    ink = image[0].mean(-1) < 0.5
    for r in range(len(ROWS)):
        y = top + r * (64 + grid.GAP)
        assert ink[y:y + 64, :left].any(), f"row {r} has no label"
    for c in range(len(COLUMNS)):
        x = left + c * (48 + grid.GAP)
        assert ink[:top, x:x + 48].any(), f"column {c} has no label"
    # nothing is drawn past a column's own width: the long prompt is wrapped, then cut with "..."
    header = grid._wrap(grid._font(11), COLUMNS[1], 48)
    assert len(header) == grid.HEADER_LINES and header[-1].endswith("...")
    assert all(grid._width(grid._font(11), line) <= 48 for line in header)


def test_unlabelled_or_mismatched_pictures_are_refused():
    with pytest.raises(ValueError, match="2 row and 2 column labels for a 3 x 2 grid"):
        grid.labelled_grid(pictures(), ROWS[:2], COLUMNS)
    bad = pictures()
    bad[1][0] = torch.zeros(32, 48, 3)
    with pytest.raises(ValueError, match=r"picture \(1, 0\) is \(32, 48, 3\), expected \(64, 48, 3\)"):
        grid.labelled_grid(bad, ROWS, COLUMNS)
