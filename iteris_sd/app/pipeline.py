"""From LoRA files to a merged LoRA: match, merge with each method, measure, write.

`merge_loras` is the backend-agnostic Python API (the ComfyUI nodes call it with their own
backend); `run_recipe` is what the CLI runs: it loads the diffusers backend from a recipe.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Sequence

import safetensors
import torch

from ..lora.layer import LoraFile
from ..lora.lowrank import balance, truncate
from ..lora.read import read_lora
from ..lora.write import DEFAULT_DTYPE, kohya_metadata, write_kohya
from ..merge.backend import Backend, Deltas, same_deltas
from ..merge.calibration import CalibrationStats
from ..merge.iterate import IterationRecord
from ..merge.measure import measure
from ..merge.methods import get_method
from ..merge.options import MergeOptions
from ..merge.plan import Plan, plan_merge
from ..merge.ridge import AUTO, RidgeChoice, describe_ridges
from ..progress import ProgressFn, no_progress
from .recipe import Recipe, recipe_to_dict


class ZeroDeltaWarning(UserWarning):
    """A LoRA changes nothing (all-zero weights, alpha = 0 or strength 0)."""


@dataclass
class MethodResult:
    name: str
    deltas: Deltas
    calibration: list[float]  # per concept, measured on the merged model (0 = perfect)
    seconds: float
    held_out: list[float] | None = None  # per concept noise-prediction error, held-out prompts
    new_seed: list[float] | None = None  # the same on the calibration prompts with an unseen seed
    # per layer, the fraction of sum(s^2) kept where an SVD truncated the merge (else absent)
    energy: dict[str, float] = field(default_factory=dict)


@dataclass
class MergeReport:
    concepts: list[str]
    method: str
    results: dict[str, MethodResult]
    history: list[IterationRecord] = field(default_factory=list)
    chosen_iteration: int = 0
    references: list[Deltas] = field(default_factory=list)  # each LoRA's own deltas, per module
    output: str | None = None
    seconds: float = 0.0
    peak_memory_bytes: int = 0
    plan: Plan | None = None  # the memory plan, with anything changed during the merge in plan.events
    ridges: dict[str, RidgeChoice] = field(default_factory=dict)  # IterIS's automatic ridge, per layer

    def ridge_summary(self) -> str | None:
        """One line on the automatic ridge's choices, or None with a fixed ridge."""
        return describe_ridges(self.ridges) if self.ridges else None

    def table(self) -> str:
        """A plain-text table: one row per method, one column per concept and metric."""
        columns = [("cal", "calibration")]
        for label, attr in (("new seed", "new_seed"), ("held-out", "held_out")):
            if any(getattr(r, attr) is not None for r in self.results.values()):
                columns.append((label, attr))
        head = ["method"] + [f"{label} {c}" for label, _ in columns for c in self.concepts] + ["seconds"]
        rows = [head]
        for r in self.results.values():
            row = [r.name + (" *" if r.name == self.method else "")]
            for _, attr in columns:
                values = getattr(r, attr)
                row += [f"{e:.4f}" for e in values] if values else ["-"] * len(self.concepts)
            rows.append(row + [f"{r.seconds:.1f}"])
        widths = [max(len(row[k]) for row in rows) for k in range(len(head))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def concept_deltas(backend: Backend, loras: Sequence[LoraFile]) -> list[Deltas]:
    """Each LoRA's flattened factors per module id, matched (and checked) by the backend."""
    targets = {}
    out = []
    for lora in loras:
        deltas = {}
        for module_id, layer in backend.match(lora).items():
            if module_id not in targets:
                targets[module_id] = backend.target(module_id)
            t = targets[module_id]
            deltas[module_id] = layer.factors(base_weight=t.weight.reshape(t.shape))
        if not any(bool(B.any()) and bool(A.any()) for B, A in deltas.values()):
            warnings.warn(
                f"{lora.path}: every weight change of this LoRA is zero (zero weights, alpha = 0 or "
                "strength 0); it is merged as asking for the base model's behaviour on its prompts",
                ZeroDeltaWarning, stacklevel=2,
            )
        out.append(deltas)
    return out


def _check_inputs(backend: Backend, loras: Sequence[LoraFile], methods: Sequence[str]) -> None:
    """One-line errors for what would otherwise fail deep inside the merge."""
    if not loras:
        raise ValueError("no LoRAs to merge; pass at least one")
    if not methods:
        raise ValueError("no merge method given; pass at least one, e.g. ['iteris']")
    for name in methods:
        get_method(name)
    concepts = getattr(backend, "concepts", None)  # the diffusers backend's calibration prompts
    if concepts is None:
        return
    if len(concepts) != len(loras):
        raise ValueError(f"{len(loras)} LoRAs but calibration prompts for {len(concepts)}; give one "
                         "prompt list per LoRA, in the same order")
    for i, (lora, prompts) in enumerate(zip(loras, concepts)):
        if not prompts:
            raise ValueError(f"{lora.path}: LoRA {i} has no calibration prompts; give at least one, "
                             "with its trigger words")
        for j, prompt in enumerate(prompts):
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"{lora.path}: calibration prompt {j} of LoRA {i} is {prompt!r}; "
                                 "give a non-empty prompt with the LoRA's trigger words")


def merge_loras(
    backend: Backend,
    loras: Sequence[LoraFile],
    methods: Sequence[str] = ("iteris",),
    options: MergeOptions = MergeOptions(),
    progress: ProgressFn = no_progress,
    on_plan: Callable[[Plan], None] | None = None,
) -> MergeReport:
    """Merge ``loras`` with each of ``methods`` (the first is the main one) and measure each
    on the calibration data. Nothing is written; see `write_merged`. ``on_plan`` is called
    with the memory plan before any calibration pass (the CLI prints ``plan.describe()``)."""
    start = time.perf_counter()
    _check_inputs(backend, loras, methods)
    per_concept = concept_deltas(backend, loras)
    folds = options.regularization == AUTO and "iteris" in methods  # the automatic ridge's two folds
    plan = plan_merge(backend, per_concept, budget=options.memory_budget, chunk_layers=options.chunk_layers,
                      tokens=options.tokens, solve_device=options.solve_device, iterations=options.iterations,
                      folds=folds)
    if on_plan is not None:
        on_plan(plan)
    cal = CalibrationStats(backend, per_concept, plan=plan, seed=options.seed, track_folds=folds)
    t_ref = time.perf_counter()
    cal.capture_references(backend, progress)
    reference_seconds = time.perf_counter() - t_ref
    report = MergeReport([f.name for f in loras], methods[0], {}, references=per_concept, plan=plan)
    for name in methods:
        method = get_method(name)
        t0 = time.perf_counter()
        out = method.run(backend, cal, options, progress)
        seconds = time.perf_counter() - t0
        if method.uses_data:  # it needed the reference capture
            seconds += reference_seconds
        deltas, energy = out.deltas, out.energy
        if out.history:
            report.history, report.chosen_iteration = out.history, out.chosen_iteration
        if out.ridges and name == methods[0]:
            report.ridges = out.ridges
        if options.rank is not None:
            deltas, kept = _truncate_all(deltas, options.rank)
            energy = {m: e * energy.get(m, 1.0) for m, e in kept.items()}
        same = next((r for r in report.results.values() if same_deltas(r.deltas, deltas)), None)
        if out.history and options.rank is None:  # IterIS measured its kept iterate already
            errors = out.history[out.chosen_iteration].errors
        elif same is not None:  # concat is stack written differently: one calibration pass less
            errors = list(same.calibration)
        else:
            errors = measure(backend, cal, deltas, progress)
        report.results[name] = MethodResult(name, deltas, errors, seconds, energy=energy)
        progress("methods", len(report.results), len(methods))
    report.seconds = time.perf_counter() - start
    report.peak_memory_bytes = peak_memory_bytes()
    return report


def noise_errors(backend, references: Sequence[Deltas], deltas: dict[str, Deltas], prompts: Sequence[Sequence[str]],
                 seed: int, progress: ProgressFn = no_progress) -> dict[str, list[float]]:
    """Per method, per concept: the noise-prediction distance from LoRA i alone along LoRA
    i's own CFG trajectory on ``prompts[i]`` from ``seed`` (0 = identical to LoRA i alone,
    1 = as far from it as the base model); see DiffusersBackend.noise_fidelity."""
    out = {name: [] for name in deltas}
    for ps, reference in zip(prompts, references):
        scores = backend.noise_fidelity(list(ps), seed, reference, deltas, progress)
        for name in deltas:
            out[name].append(scores[name])
    return out


def write_merged(path: str, backend: Backend, deltas: Deltas, *, inputs: Sequence[LoraFile], recipe: dict,
                 dtype: str = DEFAULT_DTYPE, overwrite: bool = False) -> None:
    """Write ``deltas`` as a kohya LoRA with alpha = rank (scale 1) and the merge metadata."""
    layers = kohya_layers(backend, deltas)
    write_kohya(path, {backend.output_name(m): v for m, v in layers.items()},
                merged_metadata(backend, layers, inputs, recipe), dtype=dtype, overwrite=overwrite)


def kohya_layers(backend: Backend, deltas: Deltas) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Per module: (up, down, alpha = rank), balanced, shaped like kohya's (4-D for convs)."""
    layers = {}
    for m, (U, Z) in deltas.items():
        U, Z = balance(U, Z)
        shape = backend.target(m).shape
        rank = U.shape[1]
        if len(shape) == 4:
            U, Z = U.reshape(shape[0], rank, 1, 1), Z.reshape(rank, *shape[1:])
        layers[m] = (U, Z, float(rank))
    return layers


def merged_metadata(backend: Backend, layers: dict, inputs: Sequence[LoraFile], recipe: dict) -> dict[str, str]:
    """kohya's ss_* metadata plus merged_from and the recipe, for ``kohya_layers`` output."""
    ranks = [u.shape[1] for u, _, _ in layers.values()]
    conv = any(d.dim() == 4 and d.shape[2:] != (1, 1) for _, d, _ in layers.values())
    return kohya_metadata(base_model_version=backend.base_model_version, network_dim=max(ranks),
                          network_alpha=float(max(ranks)), inputs=list(inputs), recipe=recipe, conv=conv)


def run_recipe(recipe: Recipe, progress: ProgressFn = no_progress, score_new_seed: bool = False,
               on_plan: Callable[[Plan], None] | None = None) -> MergeReport:
    """Everything the CLI's `merge` does: load, merge, evaluate, write the main method's LoRA.

    With ``score_new_seed`` every method is also scored on the calibration prompts with a
    seed calibration never saw (in-distribution generalisation)."""
    from ..backends.load import load_backend

    sources = [("base", recipe.base)] + [(f"lora[{i}].path", s.path) for i, s in enumerate(recipe.lora)]
    for field_name, path in sources:  # never let overwrite = true destroy an input
        if Path(recipe.output).exists() and Path(path).exists() and os.path.samefile(recipe.output, path):
            raise ValueError(f"{recipe.output}: output is the same file as {field_name}; write the merge "
                             "to a new file")
    if Path(recipe.output).exists() and not recipe.overwrite:  # say so before minutes of work
        raise FileExistsError(f"{recipe.output}: already exists; set overwrite = true (or --overwrite true) to replace it")
    loras = [read_lora(s.path, s.strength, s.name) for s in recipe.lora]
    try:
        backend = load_backend(recipe.base, [s.prompts for s in recipe.lora], recipe.calibration, recipe.seed,
                               recipe.device, recipe.base_config)
    except (ValueError, FileNotFoundError):
        raise
    except (OSError, RuntimeError, safetensors.SafetensorError) as exc:  # a damaged or partial model
        first = next(iter(str(exc).strip().splitlines()), "") or type(exc).__name__
        raise ValueError(f"{recipe.base}: could not load the base model ({type(exc).__name__}: {first.strip()}); "
                         "check that it is a complete diffusers folder or .safetensors checkpoint") from exc
    options = MergeOptions(**{f.name: getattr(recipe, f.name) for f in fields(MergeOptions)})
    methods = [recipe.method] + [m for m in recipe.compare if m != recipe.method]
    report = merge_loras(backend, loras, methods, options, progress, on_plan)
    methods_deltas = {n: r.deltas for n, r in report.results.items()}
    held_out = [s.held_out_prompts for s in recipe.lora]
    if all(held_out):  # held-out prompts, and a seed calibration never used
        for n, errors in noise_errors(backend, report.references, methods_deltas, held_out, recipe.seed + 10_007, progress).items():
            report.results[n].held_out = errors
    if score_new_seed:
        prompts = [s.prompts for s in recipe.lora]
        for n, errors in noise_errors(backend, report.references, methods_deltas, prompts, recipe.seed + 20_011, progress).items():
            report.results[n].new_seed = errors
    summary = recipe_to_dict(recipe)
    summary["calibration_error"] = dict(zip(report.concepts, report.results[recipe.method].calibration))
    summary["chosen_iteration"] = report.chosen_iteration
    if report.ridges:
        summary["ridge_chosen"] = report.ridge_summary()
    write_merged(recipe.output, backend, report.results[recipe.method].deltas, inputs=loras, recipe=summary,
                 dtype=recipe.dtype, overwrite=recipe.overwrite)
    report.output = recipe.output
    return report


def _truncate_all(deltas: Deltas, rank: int) -> tuple[Deltas, dict[str, float]]:
    out, kept = {}, {}
    for m, (U, Z) in deltas.items():
        U, Z, kept[m] = truncate(U, Z, rank)
        out[m] = (U, Z)
    return out, kept


def peak_memory_bytes() -> int:
    """Peak resident memory of this process (CPU), or peak CUDA allocation when on a GPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    try:
        import resource
    except ImportError:  # Windows
        return 0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)
