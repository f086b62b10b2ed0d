"""Command line: `python -m iteris_sd merge RECIPE.toml`, `demo`, `example-recipe`.

Every recipe field can be overridden by a flag of the same dotted name
(`--iterations 3`, `--calibration.steps 4`). Bad input ends with exit code 2 and one line
saying what is wrong and where; a failed write (a full disk) with 1 and one line; Ctrl-C
ends with 130 and writes nothing. Warnings are one "iteris-sd: warning:" line each.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import textwrap
from pathlib import Path

from ..merge.options import MergeOptions
from .recipe import REQUIRED, example_recipe, recipe_fields

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError, FloatingPointError,
               MemoryError)  # MemoryError: iteris_sd.merge.plan.MergeOutOfMemory, whose message names a budget


class TqdmProgress:
    """The core's progress callback as tqdm bars, one per phase."""

    def __init__(self):
        from tqdm import tqdm

        self._tqdm = tqdm
        self._bars = {}

    def __call__(self, phase: str, done: int, total: int, detail: dict | None = None) -> None:
        bar = self._bars.get(phase)
        if bar is None or bar.n > done:
            if bar is not None:
                bar.close()
            bar = self._bars[phase] = self._tqdm(total=total, desc=phase, leave=False, file=sys.stderr,
                                                 dynamic_ncols=True)
        if detail and "errors" in detail:
            bar.set_postfix_str("error " + " ".join(f"{e:.3f}" for e in detail["errors"]))
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
            del self._bars[phase]

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()


def _fields_help() -> str:
    lines = ["Flags override the recipe's fields of the same name. Each [[lora]] table has:"]
    for f in recipe_fields():
        if not f.name.startswith("lora[]"):
            continue
        default = "required" if f.default is REQUIRED else f"default {f.default!r}"
        lines.append(f"  {f.name} ({f.type}, {default})")
        lines += textwrap.wrap(f.help, 76, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m iteris_sd", description="Merge diffusion LoRAs with IterIS.")
    sub = parser.add_subparsers(dest="command", required=True)
    merge = sub.add_parser("merge", help="merge the LoRAs of a TOML recipe",
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog=_fields_help() + "\n\nexample recipe:\n" + textwrap.indent(example_recipe(), "  "))
    merge.add_argument("recipe", help="the recipe .toml file")
    for f in recipe_fields():
        if f.name.startswith("lora[]"):
            continue
        default = "required in the recipe" if f.default is REQUIRED else f"recipe default {f.default!r}"
        merge.add_argument(f"--{f.name}", dest=f"override:{f.name}", metavar=f.type.upper().replace(" ", ""),
                           help=f"{f.help} ({default})".replace("%", "%%"))  # argparse formats help with %
    demo = sub.add_parser("demo", help="merge concept LoRAs of the embedded demo model, compare every method, "
                                       "draw a picture grid (no download)")
    demo.add_argument("--loras", type=int, default=2, choices=(2, 3, 4), help="how many concept LoRAs (default 2)")
    demo.add_argument("--iterations", type=int, default=MergeOptions.iterations,
                      help=f"IterIS iterations (default {MergeOptions.iterations})")
    demo.add_argument("--out", default="out/demo", help="folder for the merged LoRA, grid and report (default out/demo)")
    bench = sub.add_parser("bench", help="every method with 2, 3 and 4 LoRAs on held-out prompts and seeds, and "
                                         "curves against iterations and prompts; writes bench.json and bench.md")
    bench.add_argument("--loras", default="2,3,4", help="LoRA counts (default 2,3,4)")
    bench.add_argument("--iterations", type=int, default=5, help="IterIS iterations (default 5)")
    bench.add_argument("--out", default="out/bench", help="output folder (default out/bench)")
    scale = sub.add_parser("scale", help="time and peak memory of IterIS against LoRAs, prompts and model size; "
                                         "writes scale.md")
    scale.add_argument("--models", default="tiny,sd15", help="tiny, sd15 (SD1.5's architecture, random weights)")
    scale.add_argument("--loras", default="2,4,8", help="LoRA counts (default 2,4,8)")
    scale.add_argument("--prompts", default="1,3,5", help="calibration prompts per LoRA (default 1,3,5)")
    scale.add_argument("--resolution", type=int, default=128, help="calibration resolution in pixels (default 128)")
    scale.add_argument("--iterations", type=int, default=1, help="IterIS iterations (default 1)")
    scale.add_argument("--memory-budget", default="auto", help="the merge's memory_budget (default auto)")
    scale.add_argument("--threads", type=int, default=1, help="torch threads (default 1: stable on a busy machine)")
    scale.add_argument("--full-grid", action="store_true", help="every (LoRAs, prompts) pair for the large models "
                                                                 "too (default: one factor at a time)")
    scale.add_argument("--out", default="out/scale", help="output folder (default out/scale)")
    sub.add_parser("example-recipe", help="print a commented example recipe")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "example-recipe":
        print(example_recipe())
        return 0
    if args.command == "scale":
        from iteris_demo.scale import run_scale

        print(run_scale(args.models.split(","), [int(v) for v in args.loras.split(",")],
                        [int(v) for v in args.prompts.split(",")], args.resolution, args.iterations,
                        args.memory_budget, args.out, args.threads, args.full_grid))
        return 0
    if args.command == "bench":
        from iteris_demo.bench import run_bench

        print(run_bench([int(v) for v in args.loras.split(",")], args.iterations, args.out))
        return 0
    _quiet_library_output()
    progress = TqdmProgress()
    try:
        with _one_line_warnings():
            if args.command == "demo":
                return _demo(args, progress)
            report = _merge(args, progress)
    except KeyboardInterrupt:
        progress.close()
        print("iteris-sd: interrupted; nothing was written", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        progress.close()
        print(f"iteris-sd: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # not the input's fault: a full disk, a failing drive
        progress.close()
        print(f"iteris-sd: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    progress.close()
    print(report.table())
    if report.ridges:
        print(report.ridge_summary())
    for r in report.history:
        per_concept = ", ".join(f"{c} {e:.4f}" for c, e in zip(report.concepts, r.errors))
        kept = "  <- kept" if r.iteration == report.chosen_iteration else ""
        print(f"iteris iteration {r.iteration}: error {r.objective:.4f} ({per_concept}){kept}")
    energy = report.results[report.method].energy
    if energy:
        worst = min(energy, key=energy.get)
        print(f"rank truncation kept {sum(energy.values()) / len(energy):.1%} of the energy on average, "
              f"least {energy[worst]:.1%} in {worst}")
    if report.plan is not None:
        print(report.plan.summary())
        for event in report.plan.events:
            print(f"memory: {event}")
    print(f"merge time {report.seconds:.1f} s, peak memory {report.peak_memory_bytes / 2**20:.0f} MiB")
    if report.output:
        print(f"wrote {report.output}")
    return 0


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line (an OSError of ours without its "[Errno N]")."""
    text = str(exc)
    if isinstance(exc, OSError) and exc.errno is not None and exc.strerror and exc.filename is None:
        text = exc.strerror
    return " ".join(part.strip() for part in text.splitlines() if part.strip()) or type(exc).__name__


@contextlib.contextmanager
def _one_line_warnings():
    """Warnings (a long prompt, an ill-conditioned layer) as one "iteris-sd: warning:" line each."""
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"iteris-sd: warning: {_one_line(Exception(message))}", file=sys.stderr)

    previous, warnings.showwarning = warnings.showwarning, show
    try:
        yield
    finally:
        warnings.showwarning = previous


def _quiet_library_output() -> None:
    """Our own bars say what is happening; silence the libraries' loading bars and chatter."""
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for lib in (diffusers_logging, transformers_logging):
        lib.disable_progress_bar()
        lib.set_verbosity_error()
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def _demo(args, progress) -> int:
    from iteris_demo.bench import markdown
    from iteris_demo.run import run_demo

    m = run_demo(args.loras, args.iterations, args.out, progress)
    progress.close()
    print(markdown(m.result))
    print(f"IterIS kept iteration {m.report.chosen_iteration}; merging with every method took "
          f"{m.result['merge_seconds']:.1f} s, peak memory {m.result['peak_memory_bytes'] / 2**20:.0f} MiB")
    for name in ("merged.safetensors", "grid.png", "report.md", "report.json"):
        print(f"wrote {Path(args.out) / name}")
    return 0


def _merge(args, progress):
    from .pipeline import run_recipe
    from .recipe import apply_overrides, load_recipe

    recipe = load_recipe(args.recipe)
    overrides = {k.split(":", 1)[1]: v for k, v in vars(args).items() if k.startswith("override:") and v is not None}
    if overrides:
        recipe = apply_overrides(recipe, overrides)
    return run_recipe(recipe, progress, on_plan=_show_plan)


def _show_plan(plan) -> None:
    """The memory plan, before the merge starts, when it splits or samples anything."""
    if not plan.trivial:
        print(plan.describe(), flush=True)
