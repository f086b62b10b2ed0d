"""IterIS against its ridge a (a1 = a2) and ridge target on the demo model, beside RegMean.

    .venv/bin/python scripts/regularization_sweep.py [--loras 2,4] [--values 1e-2,3e-3,1e-3,1e-4]
                                                     [--targets average,sum]

Same calibration (3 prompts per LoRA), held-out prompts, seeds and evaluation as
`python -m iteris_sd bench`; 5 damped iterations with adaptive weights. Prints a markdown
table per LoRA count: held-out noise error (mean over concepts, each concept's in brackets),
how often each concept is shown on its own held-out prompts, and how often all of them are
shown on the combined prompts.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from iteris_demo.bench import calibrated, evaluate  # noqa: E402
from iteris_demo.detect import load_detector  # noqa: E402
from iteris_demo.model import demo_assets  # noqa: E402
from iteris_sd.merge.iterate import IterISConfig, run_iteris  # noqa: E402
from iteris_sd.merge.regmean import regmean  # noqa: E402
from iteris_sd.progress import no_progress  # noqa: E402


def sweep(n_loras: int, values: list[float], targets: list[str]) -> dict[str, dict]:
    """Method label -> the bench's scores (noise, presence, combined_all, ...)."""
    prob, backend, refs, cal = calibrated(n_loras)
    candidates = {"regmean": regmean(backend, cal)}
    for target in targets:
        for a in values:
            config = IterISConfig(regularization=a, ridge_target=target)
            candidates[f"iteris, {target}, a = {a:g}"] = run_iteris(backend, cal, config, no_progress).deltas
    return evaluate(backend, load_detector(demo_assets().detector), prob, refs, candidates).scores


def _cell(values: list[float], digits: int) -> str:
    return f"{sum(values) / len(values):.{digits}f} ({', '.join(f'{x:.2f}' for x in values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loras", default="2,4", help="LoRA counts (default 2,4)")
    parser.add_argument("--values", default="1e-2,3e-3,1e-3,1e-4", help="ridges a to try")
    parser.add_argument("--targets", default="average,sum", help="ridge targets to try (default average,sum)")
    args = parser.parse_args()
    values = [float(v) for v in args.values.split(",")]
    targets = [t.strip() for t in args.targets.split(",")]
    for n in (int(n) for n in args.loras.split(",")):
        scores = sweep(n, values, targets)
        print(f"\n{n} LoRAs\n\n| method | noise error | concept shown, own prompts | all shown, combined |")
        print("|---|---|---|---|")
        for label, s in scores.items():
            print(f"| {label} | {_cell(s['noise'], 3)} | {_cell(s['presence'], 2)} | {s['combined_all']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
