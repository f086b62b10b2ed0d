"""Break the algorithm on purpose and check that the quick suite notices (issue 19, item 4).

    .venv/bin/python scripts/guard_mutations.py

Each mutation is applied to a copy of the working tree (the checkout is never touched), the
quick suite (`-m "not slow and not comfyui"`) runs on the copy, and the mutation is "caught"
when at least one test fails. Prints the failing tests per mutation; exits 1 if any survives.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ITERATE, SOLVE = "iteris_sd/merge/iterate.py", "iteris_sd/merge/solve.py"
RIDGE_LINE = '    if form == "auto":\n        form = choose_form(problem, reg)'
MUTATIONS = {
    "keep the worst iterate": (ITERATE, "record.objective < best[0].objective", "record.objective > best[0].objective"),
    "ignore the adaptive weights": (ITERATE, "cal.weights(p, config.adaptive)", "cal.weights(p, False)"),
    "no damping": (ITERATE, "(1 - config.damping) * Z[m] + config.damping * results[m][2]", "results[m][2]"),
    "a ridge 2x too small": (SOLVE, RIDGE_LINE, "    reg = reg / 2\n" + RIDGE_LINE),
    "a ridge 10x too large": (SOLVE, RIDGE_LINE, "    reg = reg * 10\n" + RIDGE_LINE),
    "the ridge toward the other target": (SOLVE, RIDGE_LINE,
                                          '    ridge_target = {"sum": "average", "average": "sum"}[ridge_target]\n'
                                          + RIDGE_LINE),
}


def run(label: str, path: str, old: str, new: str) -> list[str]:
    """The quick suite's failing tests with one mutation applied to a copy of the tree."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "tree"
        shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".venv", ".comfyui", ".git", "out", "__pycache__"))
        target = copy / path
        text = target.read_text()
        if text.count(old) != 1:
            raise SystemExit(f"{label}: the line to mutate is not in {path} exactly once; update this script")
        target.write_text(text.replace(old, new))
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "not slow and not comfyui",
                               "-p", "no:cacheprovider"], cwd=copy, capture_output=True, text=True)
    return [line.split()[1] for line in done.stdout.splitlines() if line.startswith("FAILED")]


def main() -> int:
    survived = 0
    for label, (path, old, new) in MUTATIONS.items():
        failed = run(label, path, old, new)
        survived += not failed
        caught = f"caught by {len(failed)} test{'s' * (len(failed) != 1)}, first {failed[0]}" if failed else "NOT CAUGHT"
        print(f"{label}: {caught}", flush=True)
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
