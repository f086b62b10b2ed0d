"""Held-out noise error of IterIS against its ridge a (a1 = a2) on the demo model, beside RegMean.

    .venv/bin/python scripts/regularization_sweep.py [--loras 2,4] [--values 1e-2,3e-3,1e-3,1e-4]

Same calibration (3 prompts per LoRA), held-out prompts, seeds and evaluation as
`python -m iteris_sd bench`; 5 damped iterations with adaptive weights. Prints a markdown
table: the mean over concepts, each concept's error in brackets.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from iteris_sd.bench import EVAL_SEED, calibrated, evaluation_backend  # noqa: E402
from iteris_sd.iterate import IterISConfig, run_iteris  # noqa: E402
from iteris_sd.pipeline import noise_errors  # noqa: E402
from iteris_sd.progress import no_progress  # noqa: E402


def sweep(n_loras: int, values: list[float]) -> dict[str, list[float]]:
    """Method label -> held-out noise error per concept."""
    prob, backend, refs, cal = calibrated(n_loras)
    candidates = {"regmean": cal.regmean(backend)}
    for a in values:
        candidates[f"iteris, a = {a:g}"] = run_iteris(backend, cal, IterISConfig(regularization=a), no_progress).deltas
    return noise_errors(evaluation_backend(backend), refs, candidates, prob.held_out, EVAL_SEED)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loras", default="2,4", help="LoRA counts (default 2,4)")
    parser.add_argument("--values", default="1e-2,3e-3,1e-3,1e-4", help="ridges a to try")
    args = parser.parse_args()
    counts = [int(n) for n in args.loras.split(",")]
    values = [float(v) for v in args.values.split(",")]
    results = {n: sweep(n, values) for n in counts}
    print("| method | " + " | ".join(f"{n} LoRAs" for n in counts) + " |")
    print("|---" * (len(counts) + 1) + "|")
    for label in results[counts[0]]:
        cells = [f"{sum(e) / len(e):.3f} ({', '.join(f'{x:.2f}' for x in e)})" for e in (results[n][label] for n in counts)]
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
