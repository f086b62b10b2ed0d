"""How different two concepts' calibration inputs are, layer by layer, on the demo model.

    .venv/bin/python scripts/input_overlap.py [--loras 2]

For each layer, with G_i = X_i^T X_i / tr(X_i^T X_i) the normalised input Gram of LoRA i's
calibration (the statistics IterIS and RegMean solve with), prints the median and largest
||G_1 - G_2||_F / ||G_1||_F per kind of layer. Where the Grams are equal, the least-squares
merge of the two deltas is their (weighted) average.
"""

import argparse
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from iteris_demo.bench import demo_backend, problem  # noqa: E402
from iteris_demo.model import demo_assets  # noqa: E402
from iteris_sd.app.pipeline import concept_deltas  # noqa: E402
from iteris_sd.lora.read import read_lora  # noqa: E402
from iteris_sd.merge.calibration import CalibrationStats  # noqa: E402


def kind(module_id: str) -> str:
    if module_id.startswith("text_encoder"):
        return "text encoder"
    if ".attn2.to_k" in module_id or ".attn2.to_v" in module_id:
        return "cross-attention k, v (text input)"
    for part, name in ((".attn2.", "cross-attention q, out"), (".attn1.", "self-attention"), (".ff.", "feed-forward")):
        if part in module_id:
            return name
    return "convs, proj_in/out"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loras", type=int, default=2)
    n = parser.parse_args().loras
    assets, prob = demo_assets(), problem(n)
    backend = demo_backend(assets, prob.calibration)
    cal = CalibrationStats(backend, concept_deltas(backend, [read_lora(p) for p in assets.loras[:n]]))
    cal.capture_references(backend, lambda *a: None)
    groups = defaultdict(list)
    for m, p in cal.problems().items():
        grams = [s.gram.double() for s in p.stats[:2]]
        if all(float(g.trace()) > 0 for g in grams):
            g1, g2 = (g / g.trace() for g in grams)
            groups[kind(m)].append(float((g1 - g2).norm() / g1.norm()))
    print(f"| layers ({prob.names[0]} against {prob.names[1]}) | count | median | largest |\n|---|---|---|---|")
    for k, values in sorted(groups.items(), key=lambda kv: sorted(kv[1])[len(kv[1]) // 2]):
        values.sort()
        print(f"| {k} | {len(values)} | {values[len(values) // 2]:.3f} | {values[-1]:.3f} |")


if __name__ == "__main__":
    main()
