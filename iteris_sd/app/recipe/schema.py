"""The recipe's schema: the TOML tables as dataclasses whose fields carry their help text
and declarative checks (`iteris_sd.settings`), and `recipe_fields` for --help and docs.

The merge settings (iterations, ridge, memory, ...) are `MergeOptions`'s own fields and the
``[calibration]`` table is `CalibrationSettings`: their defaults, help and checks are
defined there once and only listed here.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ...backends.calibration import CalibrationSettings
from ...lora.write import DEFAULT_DTYPE, DTYPES
from ...merge.methods import METHOD_NAMES
from ...merge.options import MergeOptions
from ...merge.plan import BUDGET_RE
from ...settings import SettingError, field_default, setting

_DEVICE_RE = re.compile(r"auto|cpu|cuda|cuda:\d+|mps")


class RecipeError(SettingError):
    """A recipe file or value is invalid; the message is one line naming field and value."""


def _option(name: str, **checks: Any) -> Any:
    """MergeOptions's field ``name`` as a recipe field: the same default, help and checks
    (plus ``checks``)."""
    f = next(f for f in dataclasses.fields(MergeOptions) if f.name == name)
    return field(default=f.default, metadata={**f.metadata, **checks})


@dataclass(kw_only=True)
class LoraSpec:
    """One ``[[lora]]`` entry: a LoRA file and the prompts that calibrate it."""

    path: str = setting("The LoRA file (.safetensors); relative paths are resolved against the "
                        "recipe's folder.", kind="file")
    strength: float = setting("Multiplier on the LoRA's delta before merging (its usual "
                              "strength; negative values are allowed).", 1.0)
    prompts: list[str] = setting("Calibration prompts (1 or more non-empty strings, each "
                                 "stripped) on which the LoRA's own outputs are captured; "
                                 "use the LoRA's trigger words.", min_items=1)
    name: str | None = setting("Name in reports and metadata; default: the file name without "
                               "its extension.", None, nonblank=True)
    held_out_prompts: list[str] = setting("Prompts used only to evaluate the merge, never to "
                                          "calibrate it; each must differ from every prompt "
                                          "in `prompts`.", [])


@dataclass(kw_only=True)
class Recipe:
    """A whole merge: base model, LoRAs, method and settings, all validated."""

    base: str = setting("The base model: a diffusers folder or a single-file checkpoint "
                        "(.safetensors).", kind="exists")
    output: str = setting("The merged LoRA to write (.safetensors); its folder must exist.",
                          kind="output")
    method: str = setting("Merge method: " + ", ".join(METHOD_NAMES) + ".", "iteris", choices=METHOD_NAMES)
    iterations: int = _option("iterations")
    rank: int | None = _option("rank")
    dtype: str = setting("Precision of the tensors in the written LoRA file: "
                         + ", ".join(DTYPES) + ".", DEFAULT_DTYPE, choices=DTYPES)
    device: str = setting("Device: auto, cpu, cuda, cuda:N or mps.", "auto", pattern=_DEVICE_RE,
                          expected="'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    seed: int = _option("seed")
    overwrite: bool = setting("Replace `output` if it already exists.", False)
    damping: float = _option("damping")
    regularization: float | str = _option("regularization")
    ridge_target: str = _option("ridge_target")
    adaptive_weights: bool = _option("adaptive_weights")
    compare: list[str] = setting("Other methods evaluated in the same run for the report table "
                                 "(same names as `method`, no repeats).", [], item_choices=METHOD_NAMES,
                                 unique=True)
    density: float = _option("density")
    base_config: str | None = setting("A diffusers folder holding the configs and tokenizers "
                                      "for a single-file `base`; omit it (or pass 'none') to infer "
                                      "them.", None,
                                      kind="folder")
    # MergeOptions also takes a number of bytes; a recipe value is a string of this form
    memory_budget: str = _option("memory_budget", pattern=BUDGET_RE,
                                 expected="'auto', 'none' or a size such as '6GiB' or '800MB'")
    chunk_layers: int | None = _option("chunk_layers")
    tokens: int | None = _option("tokens")
    solve_device: str = _option("solve_device")
    calibration: CalibrationSettings = setting("The [calibration] table.", CalibrationSettings())
    lora: list[LoraSpec] = setting("The [[lora]] tables: the LoRAs to merge (at least 1).",
                                   min_items=1)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _split_optional(hint: Any) -> tuple[Any, bool]:
    """(inner type, is optional) for ``X | None``."""
    args = typing.get_args(hint)
    if type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return inner[0], True
    return hint, False


def _type_text(hint: Any) -> str:
    """A short type description: int, float, str, bool, list[str], int | None, ..."""
    inner, optional = _split_optional(hint)
    if typing.get_origin(inner) is list:
        text = f"list[{_type_text(typing.get_args(inner)[0])}]"
    else:
        text = getattr(inner, "__name__", str(inner))
    return f"{text} | None" if optional else text


class FieldInfo(NamedTuple):
    """One recipe field for --help and docs: dotted name, type text, default, help."""

    name: str
    type: str
    default: Any
    help: str


def recipe_fields() -> list[FieldInfo]:
    """Every field: top-level names, ``calibration.<name>`` and ``lora[].<name>``.

    Required fields have the default `REQUIRED` (prints as "(required)").
    """
    out = []
    for f in dataclasses.fields(Recipe):
        if f.name in ("calibration", "lora"):
            cls = CalibrationSettings if f.name == "calibration" else LoraSpec
            prefix = "calibration." if f.name == "calibration" else "lora[]."
            hints = _hints(cls)
            for g in dataclasses.fields(cls):
                out.append(FieldInfo(prefix + g.name, _type_text(hints[g.name]),
                                     field_default(g), g.metadata["help"]))
        else:
            out.append(FieldInfo(f.name, _type_text(_hints(Recipe)[f.name]),
                                 field_default(f), f.metadata["help"]))
    return out


def recipe_to_dict(recipe: Recipe) -> dict:
    """A JSON-serialisable dict of the recipe (None stays None); parse_recipe accepts it."""
    return dataclasses.asdict(recipe)
