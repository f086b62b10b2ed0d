"""The automatic ridge against the fixed rows on one testbed and split: every LoRA merged once
per setting, then each concept's held-out noise error (0 = the LoRA alone, 1 = as if absent).

    PYTHONPATH=. python scripts/ridge_validation.py tiny-sd1 validation

Prints each merge's time, the automatic ridge's choices and the calibration objective per
iterate, then one line per concept. Measures only: no default is read from it.
"""
import sys
import time

from iteris_demo.testbeds import testbed
from iteris_demo.bench import backend_for
from iteris_sd.app.pipeline import merge_loras
from iteris_sd.backends.load import load_backend
from iteris_sd.lora.read import read_lora
from iteris_sd.merge.options import MergeOptions
bed = testbed(sys.argv[1]); split = sys.argv[2] if len(sys.argv) > 2 else "validation"
loras = [read_lora(str(p)) for p in bed.loras]
backend = load_backend(str(bed.base), [list(c) for c in bed.calibration], bed.settings, device="cpu")
configs = {k: MergeOptions(memory_budget=None, **v) for k, v in {
    "auto0": dict(regularization="auto", ridge_target="auto", iterations=0),
    "auto": dict(regularization="auto", ridge_target="auto"),
    "fixed": dict(), "paper": dict(regularization=1e-3, ridge_target="average")}.items()}
deltas = {}
for name, o in configs.items():
    t = time.time()
    r = merge_loras(backend, loras, ["iteris"] + (["regmean", "linear", "stack", "ssr"] if name == "fixed" else []), o)
    print(name, f"{time.time()-t:.0f}s", r.ridge_summary(), "kept", r.chosen_iteration, [f"{h.objective:.3f}" for h in r.history])
    for m, res in r.results.items():
        deltas[name if m == "iteris" else m] = res.deltas
ev = backend_for(backend, [list(c) for c in bed.calibration], bed.evaluation)
refs = r.references
for i, (ps, ref) in enumerate(zip(bed.held_out[split], refs)):
    s = ev.noise_fidelity(list(ps), 10007, ref, deltas)
    print(bed.names[i], " ".join(f"{k} {v:.3f}" for k, v in s.items()))
