"""The memory planner: which layers are captured and solved together, in which form, and
what that will cost, decided before the merge starts.

A merge holds, per layer and concept, the reference statistics (G = X^T X) and the paired
ones (C = X^T X~, H = X~^T X~), d_in x d_in floats each; a 3x3 conv at 1280 channels has
d_in = 11520, 530 MB per matrix in float32. The planner splits the target layers into
*chunks* whose statistics and solves fit a memory budget; every calibration pass of a chunk
captures only that chunk's layers (the merged model is still the whole merged model).

Decisions, each overridable (`MergeOptions` / recipe fields):
- **budget** (`memory_budget`): bytes; "auto" = the compute device's free memory less a
  safety margin (1 GiB + 10% of the device's total) for the model's own activations;
  None / "none" = no limit (one chunk, the merge exactly as without a planner).
- **form per layer** (`tokens`): Gram form (exact, 3 d_in^2 floats per concept) or a token
  sample of at most k rows (2 k d_in + k d_in floats; exact when the layer sees <= k rows),
  whose solve is the cheaper of the primal (d_in x d_in) and dual (rows x rows) forms.
  With `tokens` unset, a layer is sampled only if its Gram statistics alone exceed the
  budget, with the largest k that fits. With `tokens = k`, every layer where k rows are
  cheaper than the Gram matrices (k < d_in) is sampled.
- **reference statistics**: *kept* for every layer across the iterations (one reference
  pass per chunk and LoRA in the whole merge) when they fit beside the largest chunk, or
  else *recomputed* in every paired pass from the reference half of the batch (the paired
  pass computes X anyway, so this costs no forward pass, only one more product per call).
  Whichever gives fewer chunks; kept on a tie.
- **chunks** (`chunk_layers`): first-fit-decreasing packing of the layers under the budget,
  or exactly `chunk_layers` layers per chunk (in name order) when given.
- **solve device** (`solve_device`): float64 solves one layer at a time on the statistics'
  device ("auto"; the CPU on mps, which has no float64), or "cpu" / a given device.

What happens when a chunk runs out of memory all the same is `iteris_sd.merge.chunks`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from .solve import dual_is_cheaper
from .stats import gram_bytes, sample_bytes

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
MIN_TOKENS = 64  # below this a token sample is too poor to solve from: the plan fails instead
F32, F64 = 4, 8

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": KiB, "mib": MiB, "gib": GiB, "tib": 1 << 40}
# A memory size: "auto", "none", bytes, or a number with a unit (kB MB GB TB, KiB MiB GiB TiB)
BUDGET_RE = re.compile(r"\s*(auto|none|(\d+(\.\d*)?|\.\d+)([eE]\d+)?\s*(?P<unit>b|k|kb|m|mb|g|gb|t|tb|kib|mib|gib|tib)?)\s*",
                       re.IGNORECASE)


class PlanError(ValueError):
    """No plan fits the budget (a single layer's smallest statistics exceed it)."""


def parse_budget(value) -> int | str | None:
    """A budget in bytes from an int/float, "auto", "none" / None, or a size string such as
    "6GiB", "800 MB", "2.5e9" (decimal units: kB, MB, GB; binary: KiB, MiB, GiB)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"memory budget: expected a size, got {value!r}")
    if isinstance(value, (int, float)):
        if value <= 0 or not math.isfinite(value):
            raise ValueError(f"memory budget: expected a positive size, got {value!r}")
        return int(value)
    text = str(value).strip().lower()
    if text in ("auto", "none"):
        return None if text == "none" else "auto"
    m = BUDGET_RE.fullmatch(text)
    if m is None:
        raise ValueError(f"memory budget: expected 'auto', 'none' or a size such as '6GiB' or '800MB', got {value!r}")
    number = float(text[: len(text) - len(m["unit"] or "")].strip())
    size = int(number * _UNITS[(m["unit"] or "").lower()])
    if size <= 0:
        raise ValueError(f"memory budget: expected a positive size, got {value!r}")
    return size


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "unlimited"
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def device_memory(device) -> tuple[int, int] | None:
    """(free, total) bytes of a device, or None where it cannot be read."""
    device = torch.device(device)
    try:
        if device.type == "cuda":
            return tuple(int(v) for v in torch.cuda.mem_get_info(device))
        if device.type == "mps":
            total = int(torch.mps.recommended_max_memory())
            return max(total - int(torch.mps.driver_allocated_memory()), 0), total
        if device.type == "cpu":
            info = {}
            with open("/proc/meminfo") as fh:
                for line in fh:
                    key, _, rest = line.partition(":")
                    info[key] = int(rest.split()[0]) * 1024
            return info["MemAvailable"], info["MemTotal"]
    except Exception:  # no /proc (macOS, Windows), an old torch, ...
        return None
    return None


def auto_budget(device) -> tuple[int | None, str]:
    """The device's free memory less a safety margin of 1 GiB + 10% of its total (for the
    model's activations, which the plan does not count); None when it cannot be read."""
    mem = device_memory(device)
    if mem is None:
        return None, f"auto: the free memory of {device} cannot be read, so no limit"
    free, total = mem
    margin = GiB + total // 10
    budget = max(free - margin, 64 * MiB)
    return budget, f"auto: {fmt_bytes(free)} free on {device} less a {fmt_bytes(margin)} margin"


def backend_device(backend) -> torch.device:
    """Where a backend computes: its ``device`` attribute if it has one, else the device of
    the parameters of its ``unet`` / ``model`` / ``transformer`` module (or that object's
    ``load_device``, as a ComfyUI ModelPatcher has), else the CPU."""
    dev = getattr(backend, "device", None)
    if dev is not None:
        return torch.device(dev() if callable(dev) else dev)
    for attr in ("unet", "model", "transformer"):
        module = getattr(backend, attr, None)
        if isinstance(module, torch.nn.Module):
            p = next(module.parameters(), None)
            if p is not None:
                return p.device
        load_device = getattr(module, "load_device", None)  # a ComfyUI ModelPatcher
        if load_device is not None:
            return torch.device(load_device)
    return torch.device("cpu")


@dataclass(frozen=True)
class LayerSpec:
    """A target layer's shape: d_in (C_in kh kw for a conv), d_out, and R = sum r_i."""

    name: str
    d_in: int
    d_out: int
    rank: int


def layer_bytes(spec: LayerSpec, n: int, tokens: int | None, folds: bool = False) -> tuple[int, int, int]:
    """(reference, paired, solve) bytes of one layer for n concepts: the reference
    statistics, the paired ones (float32, on the statistics' device) and the float64
    working memory of its solve (one layer at a time). ``folds``: the automatic ridge's
    second reference Gram per concept and its cross-validation (two D_f, their eigenvectors)."""
    d, R = spec.d_in, spec.rank
    small = F64 * d * (2 * spec.d_out + 3 * R)  # factors, right-hand sides, adaptive weights
    if tokens is None:
        ref, pair = (n + n * folds) * gram_bytes(d), 2 * n * gram_bytes(d)
        solve = (5 if folds else 3) * d * d * F64 + small  # D, one statistic, the Cholesky factor (or eigh's vectors)
        return ref, pair, solve
    k = tokens
    ref, pair = n * sample_bytes(d, k), 2 * n * sample_bytes(d, k)
    K = n * k
    if dual_is_cheaper(d, K, R):
        solve = F64 * (2 * K * d + 3 * k * d + 3 * K * K) + small
    else:
        solve = F64 * (3 * d * d + 3 * k * d) + small
    return ref, pair, solve


@dataclass
class Plan:
    """What the planner decided; `describe()` says it in words (the CLI prints it)."""

    specs: dict[str, LayerSpec]
    concepts: int
    chunks: list[list[str]]
    tokens: dict[str, int] = field(default_factory=dict)  # sampled layers -> k; others: Gram form
    keep_reference: bool = True
    budget: int | None = None
    budget_note: str = ""
    device: torch.device = torch.device("cpu")
    solve_device: torch.device | None = None  # None: where the statistics are
    iterations: int = 5
    folds: bool = False  # reference statistics split in two folds (the automatic ridge)
    notes: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)  # what changed during the merge

    # ----- estimates
    def costs(self, name: str) -> tuple[int, int, int]:
        return layer_bytes(self.specs[name], self.concepts, self.tokens.get(name), self.folds)

    def solve_on_device(self) -> bool:
        return self.solve_device is None or torch.device(self.solve_device) == torch.device(self.device)

    def persistent_bytes(self) -> int:
        """Reference statistics kept for every layer through the whole merge."""
        return sum(self.costs(m)[0] for m in self.specs) if self.keep_reference else 0

    def chunk_bytes(self, chunk: list[str]) -> int:
        """A chunk's working set beside the persistent part: its paired statistics (and
        reference ones when they are recomputed) and its largest solve when on the device."""
        stats = sum(self.costs(m)[1] + (0 if self.keep_reference else self.costs(m)[0]) for m in chunk)
        solve = max((self.costs(m)[2] for m in chunk), default=0) if self.solve_on_device() else 0
        return stats + solve

    def estimated_peak(self) -> int:
        return self.persistent_bytes() + max((self.chunk_bytes(c) for c in self.chunks), default=0)

    def min_layer_bytes(self, name: str) -> int:
        """The least a layer needs at one layer per chunk, reference recomputed."""
        ref, pair, solve = self.costs(name)
        return ref + pair + (solve if self.solve_on_device() else 0)

    def passes(self, iterations: int | None = None) -> tuple[int, int]:
        """(reference, paired) forward passes per LoRA of an IterIS merge."""
        t = self.iterations if iterations is None else iterations
        k = len(self.chunks)
        return k, (k * (t + 1) if t > 0 else 0)

    @property
    def trivial(self) -> bool:
        """One chunk of exact statistics and nothing to note: the merge as without a planner."""
        return len(self.chunks) <= 1 and not self.tokens and not self.notes

    def summary(self) -> str:
        """One line for the end of a merge."""
        k = len(self.chunks)
        sampled = f", token samples in {len(self.tokens)} layers" if self.tokens else ""
        budget = "no budget" if self.budget is None else f"a {fmt_bytes(self.budget)} budget"
        return (f"memory plan: {k} chunk{'s' if k != 1 else ''}{sampled}, estimated peak "
                f"{fmt_bytes(self.estimated_peak())} with {budget}")

    # ----- changes during the merge
    def split(self, index: int) -> None:
        chunk = self.chunks[index]
        half = len(chunk) // 2
        self.chunks[index:index + 1] = [chunk[:half], chunk[half:]]

    def describe(self) -> str:
        n_layers = len(self.specs)
        k = len(self.chunks)
        dev = str(self.device)
        lines = [f"memory plan: {n_layers} layers in {k} chunk{'s' if k != 1 else ''} on {dev}, "
                 f"budget {fmt_bytes(self.budget)}" + (f" ({self.budget_note})" if self.budget_note else "")]
        sampled = {m: t for m, t in self.tokens.items() if m in self.specs}
        if sampled:
            dual = sum(dual_is_cheaper(self.specs[m].d_in, self.concepts * t, self.specs[m].rank) for m, t in sampled.items())
            sizes = sorted(set(sampled.values()))
            ks = f"k = {sizes[0]}" if len(sizes) == 1 else f"k = {sizes[0]}..{sizes[-1]}"
            lines.append(f"  statistics: Gram (d_in x d_in) for {n_layers - len(sampled)} layers, token samples "
                         f"for {len(sampled)} ({ks} rows per LoRA; {dual} solved in the dual form)")
        else:
            lines.append(f"  statistics: Gram (d_in x d_in) for all {n_layers} layers, float32")
        if self.keep_reference:
            lines.append(f"  reference statistics: kept for every layer ({fmt_bytes(self.persistent_bytes())})")
        else:
            lines.append("  reference statistics: recomputed in every paired pass (they do not fit beside a chunk)")
        biggest = max(self.chunks, key=self.chunk_bytes) if self.chunks else []
        solve_at = self.device if self.solve_device is None else self.solve_device
        if torch.device(solve_at).type == "mps":
            solve_at = "cpu"
        lines.append(f"  largest chunk: {len(biggest)} layers, {fmt_bytes(self.chunk_bytes(biggest))}; "
                     f"solves in float64 on {solve_at}, one layer at a time")
        ref, paired = self.passes()
        lines.append(f"  estimated peak: {fmt_bytes(self.estimated_peak())} beside the model and its activations; "
                     f"forward passes per LoRA: {ref} reference + {paired} paired ({self.iterations} "
                     f"iteration{'s' if self.iterations != 1 else ''})")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def make_plan(specs: list[LayerSpec], concepts: int, budget: int | None, *, chunk_layers: int | None = None,
              tokens: int | None = None, device="cpu", solve_device="auto", iterations: int = 5,
              budget_note: str = "", folds: bool = False) -> Plan:
    """Plan a merge of ``concepts`` LoRAs over the layers ``specs`` under ``budget`` bytes
    (None: no limit). See the module docstring for what is decided and how."""
    device = torch.device(device)
    solve_dev = None if solve_device in (None, "auto") else torch.device(solve_device)
    if solve_dev is None and device.type == "mps":
        solve_dev = torch.device("cpu")
    by_name = {s.name: s for s in sorted(specs, key=lambda s: s.name)}
    names = list(by_name)
    plan = Plan(by_name, concepts, [names] if names else [], budget=budget, budget_note=budget_note, device=device,
                solve_device=solve_dev, iterations=iterations, folds=folds)
    if tokens is not None:
        if tokens < 1:
            raise ValueError(f"tokens: expected a positive number of rows, got {tokens}")
        plan.tokens = {m: tokens for m, s in by_name.items() if tokens * (s.d_in + 2) < s.d_in * s.d_in}
    if budget is not None:
        _fit_single_layers(plan, budget)
    if chunk_layers is not None:
        if chunk_layers < 1:
            raise ValueError(f"chunk_layers: expected >= 1, got {chunk_layers}")
        plan.chunks = [names[i:i + chunk_layers] for i in range(0, len(names), chunk_layers)]
        plan.keep_reference = True
        if budget is not None and plan.estimated_peak() > budget:
            plan.keep_reference = False
        if budget is not None and plan.estimated_peak() > budget:
            plan.notes.append(f"chunk_layers = {chunk_layers} is estimated to need {fmt_bytes(plan.estimated_peak())}, "
                              f"more than the budget")
        return plan
    if budget is None or not names:
        return plan
    options = []
    for keep in (True, False):
        plan.keep_reference = keep
        chunks = _pack(plan, budget)
        if chunks is not None:
            options.append((len(chunks), not keep, chunks))
    _, recompute, chunks = min(options, key=lambda o: (o[0], o[1]))
    plan.keep_reference, plan.chunks = not recompute, chunks
    return plan


def _fit_single_layers(plan: Plan, budget: int) -> None:
    """Layers whose statistics alone exceed the budget get the largest token sample that fits."""
    shrunk = []
    for m, spec in plan.specs.items():
        if plan.min_layer_bytes(m) <= budget:
            continue
        hi = min(plan.tokens.get(m, spec.d_in), spec.d_in)
        lo = MIN_TOKENS
        plan.tokens[m] = lo
        if plan.min_layer_bytes(m) > budget:
            need = plan.min_layer_bytes(m)
            raise PlanError(
                f"memory budget {fmt_bytes(budget)}: layer {m} (d_in {spec.d_in}) needs {fmt_bytes(need)} even with "
                f"a {MIN_TOKENS}-row token sample; raise memory_budget to at least {fmt_bytes(need)}")
        while lo < hi:  # the largest k that fits
            mid = (lo + hi + 1) // 2
            plan.tokens[m] = mid
            if plan.min_layer_bytes(m) <= budget:
                lo = mid
            else:
                hi = mid - 1
        plan.tokens[m] = lo
        shrunk.append((m, lo))
    if shrunk:
        worst = min(shrunk, key=lambda s: s[1])
        plan.notes.append(f"{len(shrunk)} layer(s) do not fit the budget with Gram statistics and use token samples "
                          f"(smallest: {worst[1]} rows in {worst[0]}); raise memory_budget for exact statistics")


def _pack(plan: Plan, budget: int) -> list[list[str]] | None:
    """First-fit decreasing: each layer into the first chunk it fits, largest layers first."""
    room = budget - plan.persistent_bytes()
    order = sorted(plan.specs, key=lambda m: (-plan.chunk_bytes([m]), m))
    chunks: list[list[str]] = []
    for m in order:
        if plan.chunk_bytes([m]) > room:
            return None
        for c in chunks:
            if plan.chunk_bytes(c + [m]) <= room:
                c.append(m)
                break
        else:
            chunks.append([m])
    return [sorted(c) for c in chunks]


def plan_merge(backend, concept_deltas: list[dict], *, budget="auto", chunk_layers: int | None = None,
               tokens: int | None = None, solve_device: str = "auto", iterations: int = 5, device=None,
               folds: bool = False) -> Plan:
    """The plan for merging ``concept_deltas`` (per LoRA: module id -> (B, A)) on ``backend``."""
    layers = sorted({m for d in concept_deltas for m in d})
    specs = []
    for m in layers:
        w = backend.target(m).weight
        rank = sum(d[m][0].shape[1] for d in concept_deltas if m in d)
        specs.append(LayerSpec(m, int(w.shape[1]), int(w.shape[0]), int(rank)))
    device = torch.device(device) if device is not None else backend_device(backend)
    value = parse_budget(budget)
    note = ""
    if value == "auto":
        value, note = auto_budget(device)
    return make_plan(specs, len(concept_deltas), value, chunk_layers=chunk_layers, tokens=tokens, device=device,
                     solve_device=solve_device, iterations=iterations, budget_note=note, folds=folds)
