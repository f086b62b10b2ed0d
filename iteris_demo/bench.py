"""Every merge method on the trained demo model, measured on prompts and seeds that
calibration never used.

Per method and concept i (LoRA i's own held-out prompts, sampled along LoRA i's trajectory):
  noise     sqrt(sum ||eps_merged - eps_i||^2 / sum ||eps_base - eps_i||^2) along the steps
  image     the same ratio on the final pictures (same seeds)
  presence  the fraction of the merged model's pictures in which the detector finds concept i
and, on prompts that combine every merged concept, the fraction of pictures showing each
concept and showing all of them. 0 is perfect for the errors, 1 for the presences.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Collection
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from iteris_demo import shapes
from iteris_demo.detect import concept_present, load_detector, read_attributes
from iteris_demo.model import demo_assets
from iteris_demo.splits import combined_prompts, held_out_prompts, split
from iteris_sd.app.pipeline import MergeReport, merge_loras, noise_errors, peak_memory_bytes
from iteris_sd.backends.calibration import CalibrationSettings
from iteris_sd.backends.diffusers import DiffusersBackend
from iteris_sd.backends.load import load_backend
from iteris_sd.lora.layer import LoraFile
from iteris_sd.lora.read import read_lora
from iteris_sd.merge.backend import Deltas, same_deltas
from iteris_sd.merge.methods import METHOD_NAMES
from iteris_sd.merge.options import MergeOptions
from iteris_sd.progress import ProgressFn, no_progress

# CFG 2: the zero-terminal-SNR demo model over-saturates at higher scales (colours and
# backgrounds drift; `scripts/train_demo_model.py --check --cfg 4` measures it)
CALIBRATION = CalibrationSettings(resolution=shapes.SIZE, steps=10, timesteps=5, cfg=2.0, sampler="ddim")
EVALUATION = replace(CALIBRATION, steps=12, seeds=2)
CALIBRATION_SEED = 0


@dataclass(frozen=True)
class Problem:
    """A merge of the first n concept LoRAs with its prompts."""

    concepts: tuple[shapes.Concept, ...]
    calibration: list[list[str]]
    held_out: list[list[str]]
    combined: list[str]
    picture_seed: int  # the evaluation pictures' generator seed (the split's)

    @property
    def names(self) -> list[str]:
        return [c.trigger for c in self.concepts]


def problem(n_loras: int, n_prompts: int = 3, n_held_out: int = 4, n_combined: int = 5,
            split_name: str = "validation") -> Problem:
    """The first n concepts, their calibration prompts and the split's held-out ones."""
    concepts = shapes.CONCEPTS[:n_loras]
    which = split(split_name)
    # calibration covers the attribute values (as a user's prompts should); held-out prompts
    # are drawn at random, none of them a calibration prompt at any prompt count measured
    calibration = [shapes.covering_prompts((c,), n_prompts, CALIBRATION_SEED) for c in concepts]
    longest = [shapes.covering_prompts((c,), 5, CALIBRATION_SEED) for c in concepts]
    held_out = [held_out_prompts(c, cal, n_held_out, which) for c, cal in zip(concepts, longest)]
    return Problem(concepts, calibration, held_out, combined_prompts(concepts, n_combined, which), which.picture_seed)


def demo_backend(assets, prompts: list[list[str]], settings: CalibrationSettings = CALIBRATION) -> DiffusersBackend:
    return load_backend(str(assets.base), prompts, settings, seed=0, device="cpu")


def evaluation_backend(backend: DiffusersBackend, settings: CalibrationSettings = EVALUATION) -> DiffusersBackend:
    """The same modules, sampling as users would (by default more steps, two seeds per prompt)."""
    return backend_for(backend, backend.concepts, settings)


def backend_for(backend: DiffusersBackend, prompts: list[list[str]], settings: CalibrationSettings) -> DiffusersBackend:
    """The same modules (nothing reloaded) with other per-LoRA prompts and settings."""
    return DiffusersBackend(backend.model, backend.text_encoders, backend.tokenizers, backend.scheduler_config,
                            prompts, settings, seed=backend.seed, vae_scale_factor=backend.vae_scale_factor)


def _ratio(a: torch.Tensor, ref: torch.Tensor, base: torch.Tensor) -> float:
    den = float(((base - ref) ** 2).sum())
    return (float(((a - ref) ** 2).sum()) / den) ** 0.5 if den > 0 else 0.0


@dataclass
class Evaluation:
    """evaluate's result: per candidate, its scores and the pictures they were read from
    (per concept its held-out prompts' pictures, then the combined prompts', ``seeds``
    consecutive pictures per prompt)."""

    scores: dict[str, dict]
    pictures: dict[str, list[torch.Tensor]]
    seeds: int


def evaluate(backend: DiffusersBackend, detector, prob: Problem, references: list[Deltas],
             candidates: dict[str, Deltas], progress: ProgressFn = no_progress,
             presence_only: Collection[str] = ()) -> Evaluation:
    """Per candidate: noise, image and presence per concept, and the combined-prompt presences;
    for the names in ``presence_only`` (the reference rows of the tables) only the presences.
    Each distinct model is sampled once per prompt set (stack and concat are the same model,
    and a reference row is the model its image error compares against)."""
    same_as = {name: next(n for n, d in candidates.items() if same_deltas(d, deltas))
               for name, deltas in candidates.items()}
    distinct = {name: deltas for name, deltas in candidates.items() if same_as[name] == name}
    scored = {first: distinct[first] for name, first in same_as.items() if name not in presence_only}
    ev = evaluation_backend(backend)
    scores = {name: {"presence": []} for name in distinct}
    for name in scored:
        scores[name].update(noise=[], image=[])
    pictures = {name: [] for name in distinct}
    noise = noise_errors(ev, references, scored, prob.held_out, prob.picture_seed, progress)
    for i, (concept, ps, ref) in enumerate(zip(prob.concepts, prob.held_out, references)):
        sample = _sampler(ev, ps, prob.picture_seed)
        ref_images, base_images = sample(ref), sample({})
        for name, deltas in distinct.items():
            images = sample(deltas)
            pictures[name].append(images)
            found = read_attributes(detector, images)
            scores[name]["presence"].append(sum(concept_present(f, concept) for f in found) / len(found))
            if name in scored:
                scores[name]["noise"].append(noise[name][i])
                scores[name]["image"].append(_ratio(images, ref_images, base_images))
        progress("evaluate images", i + 1, len(prob.concepts))
    for name, deltas in distinct.items():
        images = ev.sample(prob.combined, prob.picture_seed + 1, deltas)
        pictures[name].append(images)
        scores[name].update(combined_presence(detector, prob, images))
    return Evaluation({name: scores[first] for name, first in same_as.items()},
                      {name: pictures[first] for name, first in same_as.items()}, ev.settings.seeds)


def _sampler(ev: DiffusersBackend, prompts: list[str], seed: int):
    """deltas -> ev.sample(prompts, seed, deltas), sampling each distinct model once."""
    done: list[tuple[Deltas, torch.Tensor]] = []

    def sample(deltas: Deltas) -> torch.Tensor:
        for d, images in done:
            if same_deltas(d, deltas):
                return images
        done.append((deltas, ev.sample(prompts, seed, deltas)))
        return done[-1][1]

    return sample


def combined_presence(detector, prob: Problem, images: torch.Tensor) -> dict:
    """How often each concept, and every concept at once, is found in the pictures of the
    combined prompts."""
    found = read_attributes(detector, images)
    each = [sum(concept_present(f, c) for f in found) / len(found) for c in prob.concepts]
    every = sum(all(concept_present(f, c) for c in prob.concepts) for f in found) / len(found)
    return {"combined": each, "combined_all": every}


def references_by_name(prob: Problem, references: list[Deltas]) -> dict[str, Deltas]:
    """The reference models of the tables and the grid: the base, then each LoRA alone."""
    return {"base": {}, **{f"{c} alone": d for c, d in zip(prob.names, references)}}


@dataclass
class Measured:
    result: dict  # what bench.json holds for one LoRA count
    report: MergeReport
    backend: DiffusersBackend
    problem: Problem
    loras: list[LoraFile]
    evaluation: Evaluation


def measure(n_loras: int, iterations: int = MergeOptions.iterations, n_prompts: int = 3, progress: ProgressFn = no_progress,
            assets=None) -> Measured:
    """Merge the first n concept LoRAs with every method (IterIS first) and measure each;
    ``assets`` (a DemoAssets) defaults to the shipped demo model."""

    assets = assets or demo_assets(progress)
    prob = problem(n_loras, n_prompts)
    loras = [read_lora(p) for p in assets.loras[:n_loras]]
    backend = demo_backend(assets, prob.calibration)
    methods = ["iteris"] + [m for m in METHOD_NAMES if m != "iteris"]
    t0 = time.perf_counter()
    report = merge_loras(backend, loras, methods, MergeOptions(iterations=iterations, memory_budget=None), progress)
    merge_seconds = time.perf_counter() - t0
    candidates = {n: r.deltas for n, r in report.results.items()}
    reference_rows = references_by_name(prob, report.references)
    evaluation = evaluate(backend, load_detector(assets.detector), prob, report.references,
                          {**reference_rows, **candidates}, progress, presence_only=reference_rows)
    scores = evaluation.scores
    result = {
        "concepts": prob.names, "iterations": iterations, "prompts_per_lora": n_prompts,
        "calibration_prompts": prob.calibration, "held_out_prompts": prob.held_out, "combined_prompts": prob.combined,
        "merge_seconds": merge_seconds, "peak_memory_bytes": peak_memory_bytes(),
        "iteris_history": [r.objective for r in report.history], "iteris_chosen_iteration": report.chosen_iteration,
        "methods": {n: {**scores[n], "calibration": r.calibration, "seconds": r.seconds}
                    for n, r in report.results.items()},
        "references": {n: scores[n] for n in reference_rows},
    }
    return Measured(result, report, backend, prob, loras, evaluation)


def calibrated(n_loras: int, assets=None, progress: ProgressFn = no_progress):
    """(problem, backend, per-LoRA deltas, CalibrationStats with the references captured) for
    the first n concept LoRAs of ``assets`` (default: the demo model): what IterIS variants
    start from."""
    from iteris_sd.app.pipeline import concept_deltas
    from iteris_sd.merge.calibration import CalibrationStats

    assets = assets or demo_assets(progress)
    prob = problem(n_loras)
    backend = demo_backend(assets, prob.calibration)
    refs = concept_deltas(backend, [read_lora(p) for p in assets.loras[:n_loras]])
    cal = CalibrationStats(backend, refs)
    cal.capture_references(backend, progress)
    return prob, backend, refs, cal


def run_curves(max_iterations: int = 10, prompt_counts=(1, 3, 5), progress: ProgressFn = no_progress) -> dict:
    """Held-out noise error of 2 merged LoRAs against IterIS iterations (every iterate,
    not only the kept one) and against calibration prompts per LoRA (IterIS and RegMean)."""
    from iteris_sd.merge.iterate import IterISConfig, run_iteris

    assets = demo_assets(progress)
    prob, backend, refs, cal = calibrated(2, assets, progress)
    loras = [read_lora(p) for p in assets.loras[:2]]
    outcome = run_iteris(backend, cal, IterISConfig(max_iterations, keep_best=False, keep_iterates=True), progress)
    iterates = {str(t): d for t, d in enumerate(outcome.iterates)}
    ev = evaluation_backend(backend)
    by_iteration = noise_errors(ev, refs, iterates, prob.held_out, prob.picture_seed, progress)
    by_prompts = {}
    for k in prompt_counts:
        pk = problem(2, k)
        backend_k = demo_backend(assets, pk.calibration)
        report = merge_loras(backend_k, loras, ["iteris", "regmean"], MergeOptions(memory_budget=None), progress)
        scores = noise_errors(evaluation_backend(backend_k), report.references,
                              {n: r.deltas for n, r in report.results.items()}, pk.held_out, prob.picture_seed, progress)
        by_prompts[str(k)] = scores
    return {"concepts": prob.names,
            "iterations": {t: {"held_out": e, "calibration": outcome.history[int(t)].errors}
                           for t, e in by_iteration.items()},
            "prompts": by_prompts}


def _mean(values) -> float:
    return sum(values) / len(values)


def markdown(result: dict) -> str:
    """One row per method (references first): each metric's mean over concepts, with the
    per-concept values for the errors."""
    names = result["concepts"]

    def cell(values, digits=2):
        return f"{_mean(values):.3f} ({', '.join(f'{v:.{digits}f}' for v in values)})"

    rows = [f"| method | noise error ({', '.join(names)}) | image error | concept shown, own prompts | "
            f"each concept shown, combined prompts | all shown, combined | merge s |",
            "|---|---|---|---|---|---|---|"]
    refs = result["references"]
    for n, s in refs.items():
        rows.append(f"| *{n}* | - | - | {cell(s['presence'])} | {cell(s['combined'])} | {s['combined_all']:.2f} | - |")
    for n, s in sorted(result["methods"].items(), key=lambda kv: _mean(kv[1]["noise"])):
        rows.append(f"| {n} | {cell(s['noise'])} | {cell(s['image'])} | {cell(s['presence'])} | "
                    f"{cell(s['combined'])} | {s['combined_all']:.2f} | {s['seconds']:.1f} |")
    return "\n".join(rows)


def curves_markdown(curves: dict) -> str:
    its = curves["iterations"]
    lines = ["| IterIS iteration | " + " | ".join(its) + " |", "|---" * (len(its) + 1) + "|",
             "| held-out noise error | " + " | ".join(f"{_mean(v['held_out']):.3f}" for v in its.values()) + " |",
             "| calibration error | " + " | ".join(f"{_mean(v['calibration']):.3f}" for v in its.values()) + " |",
             "", "| prompts per LoRA | iteris | regmean |", "|---|---|---|"]
    for k, scores in curves["prompts"].items():
        lines.append(f"| {k} | {_mean(scores['iteris']):.3f} | {_mean(scores['regmean']):.3f} |")
    return "\n".join(lines)


def run_bench(counts=(2, 3, 4), iterations: int = 5, out_dir: str = "out/bench") -> str:
    """Each LoRA count, and the curves, in a fresh process (so each peak memory figure is its
    own); writes bench.json and bench.md and returns the markdown."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for job in [*(str(n) for n in counts), "curves"]:
        path = out / f"{job}.json"
        subprocess.run([sys.executable, "-m", "iteris_demo.bench", job, str(iterations), str(path)], check=True)
        results[job] = json.loads(path.read_text())
    (out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    sections = []
    for n in counts:
        r = results[str(n)]
        sections.append(f"### {n} LoRAs ({', '.join(r['concepts'])})\n\n{markdown(r)}\n\n"
                        f"Merging with all {len(r['methods'])} methods took {r['merge_seconds']:.1f} s; peak process "
                        f"memory {r['peak_memory_bytes'] / 2**20:.0f} MiB. IterIS calibration error by iteration: "
                        f"{', '.join(f'{e:.3f}' for e in r['iteris_history'])} (kept: {r['iteris_chosen_iteration']}).")
    sections.append(f"### Iterations and calibration prompts (2 LoRAs)\n\n{curves_markdown(results['curves'])}")
    text = "\n\n".join(sections) + "\n"
    (out / "bench.md").write_text(text)
    return text


if __name__ == "__main__":  # one job of run_bench: python -m iteris_demo.bench {N|curves} ITERATIONS OUT.json
    job, iterations, path = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    torch.manual_seed(0)
    data = run_curves() if job == "curves" else measure(int(job), iterations).result
    path.write_text(json.dumps(data, indent=2) + "\n")
