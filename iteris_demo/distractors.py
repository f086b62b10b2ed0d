"""The target + distractors protocol (SSR-Merge's): one target LoRA merged with K - 1 others,
prompted for the target only, measured against the target LoRA alone.

For each K, every target gets up to ``draws`` seeded, balanced distractor sets
(`protocols.distractor_draws`); each distinct LoRA set is merged once with every row's method
and scored for the targets that drew it, on the split's held-out prompts of the target:

- noise recovery: 1 - noise error (the README's definition: 0 error = the LoRA alone, 1 = as
  if it were absent), averaged over the (target, draw) groups;
- presence recovery (testbeds with a detector): (p_merged - p_base) / (p_alone - p_base) of
  the group-averaged presence of the target's concept; 1 = as the LoRA alone, 0 = the base;
- leakage (with a detector): how often a distractor's concept shows on the target's prompts;
- base drift (base preservation): on prompts with no trigger word, the merged model's noise
  distance from the base, sqrt(sum ||eps_merged - eps_base||^2 / mean_i sum ||eps_i - eps_base||^2)
  over the merge's LoRAs i alone: 1 = it moves the base as much as one of its LoRAs alone.

Every figure has a 90% stratified bootstrap interval over the pictures (prompt x seed) of
each group; the first two rows are marked tied when their paired difference's interval holds 0.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from iteris_demo.bench import backend_for
from iteris_demo.detect import concept_present, load_detector, read_attributes
from iteris_demo.protocols import (
    bootstrap,
    distractor_draws,
    mean,
    merges_of,
    recovery,
    root_ratio,
    tied,
)
from iteris_demo.splits import split
from iteris_demo.testbeds import Testbed, testbed
from iteris_sd.app.pipeline import merge_loras
from iteris_sd.backends.diffusers import DiffusersBackend
from iteris_sd.backends.load import load_backend
from iteris_sd.lora.read import read_lora
from iteris_sd.merge.options import MergeOptions
from iteris_sd.progress import ProgressFn, no_progress


@dataclass(frozen=True)
class Row:
    """One line of the tables: a method of the registry with option overrides."""

    label: str
    method: str
    overrides: tuple[tuple[str, object], ...] = ()

    def options(self) -> MergeOptions:
        return MergeOptions(memory_budget=None, **dict(self.overrides))


PAPER = Row("iteris (paper: average, a = 1e-3)", "iteris", (("ridge_target", "average"), ("regularization", 1e-3)))
# The default is the paper's setting, so PAPER is not a row of its own here (it would merge twice).
ROWS = (Row("iteris (default: paper's a = 1e-3 toward the average)", "iteris"), Row("regmean", "regmean"),
        Row("ssr", "ssr"), Row("stack", "stack"), Row("linear", "linear"), Row("ties", "ties"), Row("svd", "svd"))
QUICK_ROWS = ROWS[:5]
# The IterIS settings a default is chosen from, each spelled out (on the validation split only).
CANDIDATES = (Row("iteris a = 0.1 toward the sum", "iteris", (("regularization", 0.1), ("ridge_target", "sum"))),
              Row("iteris auto", "iteris", (("regularization", "auto"), ("ridge_target", "auto"))),
              Row("iteris auto, one-shot", "iteris", (("regularization", "auto"), ("ridge_target", "auto"),
                                                      ("iterations", 0))),
              Row("iteris auto toward the sum", "iteris", (("regularization", "auto"), ("ridge_target", "sum"))),
              PAPER, *ROWS[1:5])
# The iteration counts the default is chosen from (the default's ridge; its own count is ROWS[0]'s).
ITERATION_COUNTS = (Row("iteris, one-shot (0 iterations)", "iteris", (("iterations", 0),)),
                    Row("iteris, 1 iteration", "iteris", (("iterations", 1),)),
                    Row("iteris, 2 iterations", "iteris", (("iterations", 2),)),
                    ROWS[0], Row("regmean", "regmean"), Row("linear", "linear"))
ROW_SETS = {"all": ROWS, "quick": QUICK_ROWS, "candidates": CANDIDATES, "iterations": ITERATION_COUNTS}


def merge_rows(backend: DiffusersBackend, loras, rows, progress: ProgressFn) -> tuple[dict, list, dict]:
    """(label -> deltas, the LoRAs' own deltas, label -> merge seconds): one merge_loras per
    distinct options, each with the methods of its rows."""
    by_options: dict[tuple, list[Row]] = {}
    for row in rows:
        by_options.setdefault(row.overrides, []).append(row)
    deltas, seconds, references = {}, {}, []
    for group in by_options.values():
        report = merge_loras(backend, loras, [r.method for r in group], group[0].options(), progress)
        references = report.references
        for r in group:
            deltas[r.label] = report.results[r.method].deltas
            seconds[r.label] = report.results[r.method].seconds
    return deltas, references, seconds


def measure_set(bed: Testbed, backend: DiffusersBackend, lora_set: tuple[int, ...], targets: list[int],
                split_name: str, rows, detector, progress: ProgressFn) -> tuple[list[dict], dict]:
    """Merge one LoRA set and score it for each of its targets: per row the per-picture noise
    distances, and with a detector per-picture presences of the target and the distractors;
    and once for the set, each row's and each LoRA alone's drift from the base on the neutral prompts."""
    loras = [read_lora(bed.loras[i]) for i in lora_set]
    merge_backend = backend_for(backend, [list(bed.calibration[i]) for i in lora_set], bed.settings)
    deltas, references, seconds = merge_rows(merge_backend, loras, rows, progress)
    seed = split(split_name).picture_seed
    groups = []
    for t in targets:
        reference = references[lora_set.index(t)]
        prompts = list(bed.held_out[split_name][t])
        nums, den = backend.noise_distances(prompts, seed, reference, deltas, progress)
        group = {"target": bed.names[t], "loras": [bed.names[i] for i in lora_set], "seconds": seconds,
                 "den": den.tolist(), "noise": {k: v.tolist() for k, v in nums.items()}}
        if detector is not None:
            models = {**deltas, "alone": reference, "base": {}}
            found = {k: read_attributes(detector, backend.sample(prompts, seed, d)) for k, d in models.items()}
            group["presence"] = {k: [float(concept_present(f, bed.concepts[t])) for f in fs] for k, fs in found.items()}
            group["leakage"] = {k: [float(any(concept_present(f, bed.concepts[j]) for j in lora_set if j != t)) for f in fs]
                                for k, fs in found.items()}
        groups.append(group)
    alone = {f"alone {bed.names[i]}": r for i, r in zip(lora_set, references)}
    drift, _ = backend.noise_distances(list(bed.neutral[split_name]), seed + 2, {}, {**deltas, **alone}, progress)
    neutral = {"loras": [bed.names[i] for i in lora_set], "drift": {k: drift[k].tolist() for k in deltas},
               "alone": (sum(drift[k] for k in alone) / len(alone)).tolist()}
    return groups, neutral


def run_distractors(bed_name: str, split_name: str, ks=(2, 3, 4), draws: int = 3, seed: int = 0, rows=ROWS,
                    progress: ProgressFn = no_progress) -> dict:
    """Every K's groups (see `measure_set`) on one testbed and split."""
    bed = testbed(bed_name, progress)
    backend = load_backend(str(bed.base), [list(bed.calibration[0])], bed.evaluation, seed=0, device="cpu")
    detector = load_detector(bed.detector) if bed.detector else None
    out = {"testbed": bed.name, "split": split_name, "draws": draws, "seed": seed,
           "rows": [r.label for r in rows], "k": {}}
    for k in ks:
        t0 = time.perf_counter()
        merges = merges_of(distractor_draws(len(bed.loras), k, draws, seed))
        groups, neutral = [], []
        for lora_set, targets in merges.items():
            scored, drift = measure_set(bed, backend, lora_set, targets, split_name, rows, detector, progress)
            groups += scored
            neutral.append(drift)
        out["k"][str(k)] = {"merges": len(merges), "seconds": time.perf_counter() - t0, "groups": groups,
                            "neutral": neutral}
    return out


def summarize(result: dict) -> dict:
    """Per K and row: noise recovery, base drift, and where measured presence recovery and
    leakage, each an `Estimate`; and whether the first two rows by noise recovery are tied."""
    summary = {}
    for k, data in result["k"].items():
        groups, neutral = data["groups"], data["neutral"]
        sizes = [len(g["den"]) for g in groups]
        neutral_sizes = [len(n["alone"]) for n in neutral]

        def drift(label):
            return lambda idx: sum(root_ratio(n["drift"][label], n["alone"], i) for n, i in zip(neutral, idx)) / len(neutral)

        def noise(label):
            return lambda idx: 1 - sum(root_ratio(g["noise"][label], g["den"], i) for g, i in zip(groups, idx)) / len(groups)

        def averaged(key, label):
            return lambda idx: sum(mean(g[key][label], i) for g, i in zip(groups, idx)) / len(groups)

        def presence(label):
            m, a, b = averaged("presence", label), averaged("presence", "alone"), averaged("presence", "base")
            return lambda idx: recovery(m(idx), a(idx), b(idx))

        rows = {}
        for label in result["rows"]:
            row = {"noise": bootstrap(sizes, noise(label)), "drift": bootstrap(neutral_sizes, drift(label))}
            if "presence" in groups[0]:
                row["presence"] = bootstrap(sizes, presence(label))
                row["leakage"] = bootstrap(sizes, averaged("leakage", label))
            row["seconds"] = sum(g["seconds"][label] for g in groups) / len(groups)
            rows[label] = row
        order = sorted(rows, key=lambda r: -rows[r]["noise"].value)
        first, second = order[0], order[1]
        gap = bootstrap(sizes, lambda idx: noise(first)(idx) - noise(second)(idx))
        references = {}
        if "presence" in groups[0]:
            references = {ref: bootstrap(sizes, averaged("leakage", ref)) for ref in ("alone", "base")}
        summary[k] = {"rows": rows, "order": order, "first_two_tied": tied(gap), "merges": data["merges"],
                      "targets": len(groups), "pictures": sum(sizes), "leakage_references": references}
    return summary


def markdown(result: dict) -> str:
    """One table per K: rows by noise recovery, best first."""
    out = []
    for k, s in summarize(result).items():
        detector = "presence" in next(iter(s["rows"].values()))
        head = ("| method | noise recovery | " + ("presence recovery | leakage | " if detector else "")
                + "base drift | merge s |")
        lines = [f"K = {k}: {s['merges']} merges, {s['targets']} (target, draw) groups, {s['pictures']} pictures"
                 f"{'; first two tied' if s['first_two_tied'] else ''}", "", head,
                 "|---" * (head.count("|") - 1) + "|"]
        for label in s["order"]:
            r = s["rows"][label]
            cells = [str(r["noise"])] + ([str(r["presence"]), str(r["leakage"])] if detector else []) + [str(r["drift"])]
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {r['seconds']:.1f} |")
        if s["leakage_references"]:
            refs = s["leakage_references"]
            lines.append(f"\nLeakage of the target LoRA alone: {refs['alone']}; of the base model: {refs['base']}.")
        out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


def write_distractors(result: dict, out_dir: str) -> str:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"distractors-{result['testbed']}-{result['split']}"
    (out / f"{stem}.json").write_text(json.dumps(result) + "\n")
    text = f"### {result['testbed']}, {result['split']} split\n\n{markdown(result)}"
    (out / f"{stem}.md").write_text(text)
    return text


QUICK = {"testbed": "tiny-sd1", "split": "test", "k": "4", "draws": 1, "rows": "quick"}


def main(argv: list[str] | None = None) -> str:
    """The command line; returns the markdown it printed and wrote."""
    import argparse
    import sys

    import torch

    from iteris_demo.testbeds import TESTBEDS

    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m iteris_demo.distractors",
                                     description="the target + distractors protocol on one testbed and split")
    parser.add_argument("--testbed", choices=tuple(TESTBEDS), default="shapes32")
    parser.add_argument("--split", choices=("validation", "test"), default="validation")
    parser.add_argument("--k", default="2,3,4", help="merge sizes K (default 2,3,4)")
    parser.add_argument("--draws", type=int, default=3, help="distractor draws per target (default 3)")
    parser.add_argument("--rows", choices=tuple(ROW_SETS), default="all",
                        help="the methods: all, quick (" + ", ".join(r.label for r in QUICK_ROWS) + "), candidates "
                             "(the IterIS settings a default is chosen from, beside the baselines) or iterations "
                             "(IterIS with 0, 1, 2 and the default's iterations, beside regmean and linear)")
    parser.add_argument("--quick", action="store_true",
                        help="the quick mode: "
                             + ", ".join(f"--{k} {v}" for k, v in QUICK.items()) + " (a flag given beside it still counts)")
    parser.add_argument("--out", default="out/distractors")
    if "--quick" in argv:
        parser.set_defaults(**QUICK)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    result = run_distractors(args.testbed, args.split, tuple(int(k) for k in args.k.split(",")), args.draws,
                             rows=ROW_SETS[args.rows])
    text = write_distractors(result, args.out)
    print(text)
    return text


if __name__ == "__main__":  # python -m iteris_demo.distractors --quick
    main()
