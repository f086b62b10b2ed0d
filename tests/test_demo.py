"""`python -m iteris_sd demo` on the shipped demo model: every method measured in one run,
the merged LoRA, the picture grid and the tables (a few minutes on 2 CPU cores)."""

import json

import pytest

from iteris_demo.bench import curves_markdown, markdown
from iteris_sd.app.cli import main
from iteris_sd.merge.methods import METHOD_NAMES

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    code = main(["demo", "--out", str(out)])
    return code, out


def test_demo_writes_the_lora_grid_and_report(demo, capsys):
    from PIL import Image

    from iteris_demo.run import CELL
    from iteris_sd.lora.read import read_lora

    code, out = demo
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["methods"]) == set(METHOD_NAMES)
    for scores in report["methods"].values():
        for metric in ("noise", "image", "presence", "combined", "calibration"):
            assert len(scores[metric]) == 2
    assert set(report["references"]) == {"base", "sks alone", "zwx alone"}
    for scores in report["references"].values():  # the tables show only their presences
        assert set(scores) == {"presence", "combined", "combined_all"}
    assert not set(report["held_out_prompts"][0]) & set(report["calibration_prompts"][0])
    merged = read_lora(out / "merged.safetensors")
    assert json.loads(merged.metadata["iteris_recipe"])["concepts"] == ["sks", "zwx"]
    # zwx (rank 8) touches every layer sks (rank 4) touches, and its convs too: 4 + 8 or 8 alone
    assert {layer.rank for layer in merged.layers.values()} == {8, 12}
    rows, columns = 6, 3 + 6  # 2 prompts per concept + 2 combined; base, each alone, 6 methods
    width, height = Image.open(out / "grid.png").size
    assert width > columns * CELL and height > rows * CELL and height < (rows + 1) * CELL
    assert (out / "report.md").read_text().strip() == markdown(report)


def test_iteris_is_closer_than_weight_merges_and_keeps_more_concepts_than_an_average(demo):
    """With the defaults, on the shipped model (fixed seeds: exactly repeatable)."""
    _, out = demo
    methods = json.loads((out / "report.json").read_text())["methods"]

    def mean(name, metric):
        return sum(methods[name][metric]) / 2

    for weight_merge in ("stack", "linear", "svd", "ties", "dare"):
        assert mean("iteris", "noise") < mean(weight_merge, "noise"), weight_merge
    assert mean("iteris", "presence") > mean("linear", "presence")
    # Each base row of the table shows no concept; each LoRA alone shows its own.
    refs = json.loads((out / "report.json").read_text())["references"]
    assert refs["base"]["presence"] == [0.0, 0.0]
    assert refs["sks alone"]["presence"][0] > 0 and refs["zwx alone"]["presence"][1] > 0.5


def test_curves_table_has_a_column_per_iteration_and_a_row_per_prompt_count():
    curves = {"iterations": {str(t): {"held_out": [0.5, 0.4], "calibration": [0.3, 0.2]} for t in range(3)},
              "prompts": {"1": {"iteris": [0.6, 0.5], "regmean": [0.7, 0.6]}}}
    text = curves_markdown(curves)
    assert "| IterIS iteration | 0 | 1 | 2 |" in text
    assert "| held-out noise error | 0.450 | 0.450 | 0.450 |" in text
    assert "| 1 | 0.550 | 0.650 |" in text
