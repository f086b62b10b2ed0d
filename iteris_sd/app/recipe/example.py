"""The example recipe `iteris-sd example` prints, its values read from the defaults."""

from __future__ import annotations

from ...backends.calibration import SAMPLERS, CalibrationSettings
from ...lora.write import DEFAULT_DTYPE, DTYPES
from ...merge.methods import METHOD_NAMES
from ...merge.options import MergeOptions


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def _line(key: str, value: str, comment: str) -> str:
    return f"{key} = {value}".ljust(26) + f"# {comment}"


def example_recipe() -> str:
    o, c = MergeOptions(), CalibrationSettings()
    v = {name: _toml(getattr(o, name)) for name in ("iterations", "damping", "regularization", "ridge_target",
                                                     "adaptive_weights", "density", "seed", "memory_budget",
                                                     "solve_device")}
    v.update({f"cal_{name}": _toml(getattr(c, name)) for name in ("steps", "resolution", "cfg", "sampler",
                                                                  "timesteps", "seeds")})
    ridge_comment = 'what the ridge pulls toward: "sum" of the deltas or their "average" (the paper\'s)'
    return f"""\
# iteris_sd merge recipe. Relative paths are resolved against this file's folder.

base = "models/v1-5-pruned-emaonly.safetensors"  # diffusers folder or single-file checkpoint
# base_config = "models/stable-diffusion-v1-5"   # diffusers folder with configs/tokenizers
                                                 # for a single-file base (default: inferred)
output = "out/merged.safetensors"  # the merged LoRA; its folder must exist
overwrite = false                  # replace output if it exists

method = "iteris"         # {", ".join(METHOD_NAMES)}
{_line("iterations", v["iterations"], "IterIS iterations (>= 0)")}
# rank = 64               # output rank (>= 1); default: the sum of the input ranks
{_line("damping", v["damping"], "in (0, 1]; 1 = the paper's undamped iteration")}
{_line("regularization", v["regularization"], "ridge on the Gram matrices, relative to their Frobenius norm")}
{_line("ridge_target", v["ridge_target"], ridge_comment)}
{_line("adaptive_weights", v["adaptive_weights"], "the paper's per-layer, per-LoRA weights; false = equal weights")}
{_line("density", v["density"], "fraction kept by ties and dare, in (0, 1]")}
compare = ["linear", "regmean"]  # other methods scored in the same run for the report

{_line("dtype", _toml(DEFAULT_DTYPE), ", ".join(DTYPES))}
device = "auto"           # auto, cpu, cuda, cuda:N, mps
{_line("seed", v["seed"], "seed of the calibration noise")}
{_line("memory_budget", v["memory_budget"], 'for statistics and solves: auto (free memory less a margin), none, "6GiB"')}
# chunk_layers = 32       # layers captured and solved together (default: planned from memory_budget)
# tokens = 4096           # token rows kept per layer and LoRA (default: exact statistics)
{_line("solve_device", v["solve_device"], "device of the float64 solves: auto, cpu, cuda, cuda:N")}

[calibration]
{_line("steps", v["cal_steps"], "sampling steps of each LoRA's calibration trajectory")}
{_line("resolution", v["cal_resolution"], "pixels, a multiple of 8; 0: the model's native size")}
{_line("cfg", v["cal_cfg"], "guidance scale (>= 1.0); 0: the family's (Flux 1.0, else 5.0)")}
{_line("sampler", v["cal_sampler"], ", ".join(SAMPLERS) + " (SD3, Flux: flow-matching Euler)")}
{_line("timesteps", v["cal_timesteps"], "steps captured out of `steps` (1 .. steps)")}
negative_prompt = "lowres, blurry"
{_line("seeds", v["cal_seeds"], "noise seeds per prompt")}

[[lora]]
path = "loras/style_watercolor.safetensors"
strength = 1.0
name = "watercolor"       # default: the file name without extension
prompts = [               # calibration prompts: the LoRA's trigger words in context
    "a watercolor painting of a lighthouse at dawn",
    "a watercolor painting of a cat on a windowsill",
]
held_out_prompts = [      # evaluation only, never used for calibration
    "a watercolor painting of a mountain village",
]

[[lora]]
path = "loras/character_alice.safetensors"
strength = 0.8
prompts = ["alice, portrait, smiling", "alice walking in a park"]
"""

