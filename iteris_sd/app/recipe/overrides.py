"""Command-line overrides of a validated recipe: ``--iterations 3``, ``--calibration.steps 4``."""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any

from ...backends.calibration import CalibrationSettings
from .parse import _Ctx, _parse
from .schema import Recipe, RecipeError, _hints, _split_optional, recipe_to_dict

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _from_string(text: str, hint: Any, label: str) -> Any:
    """Convert a command-line string by a field's type hint ("none" = None if optional)."""
    inner, optional = _split_optional(hint)
    if optional and text.strip().lower() in ("none", ""):
        return None
    if typing.get_origin(inner) is list:
        return [part.strip() for part in text.split(",") if part.strip()]
    if inner is bool:
        low = text.strip().lower()
        if low in _TRUE or low in _FALSE:
            return low in _TRUE
        raise RecipeError(f"{label}: expected true or false, got {text!r}")
    if inner is int:
        try:
            return int(text.strip())
        except ValueError:
            raise RecipeError(f"{label}: expected an integer, got {text!r}") from None
    if inner is float or typing.get_args(inner) == (float, str):
        try:
            return float(text.strip())
        except ValueError:
            if inner is float:
                raise RecipeError(f"{label}: expected a number, got {text!r}") from None
            return text.strip()  # a word, checked by the field's `words`
    return text


def _overridable() -> dict[str, tuple[type, dataclasses.Field]]:
    """Dotted override key -> (owning dataclass, field), for every scalar/list field."""
    out = {}
    for f in dataclasses.fields(Recipe):
        if f.name == "calibration":
            for g in dataclasses.fields(CalibrationSettings):
                out[f"calibration.{g.name}"] = (CalibrationSettings, g)
        elif f.name != "lora":
            out[f.name] = (Recipe, f)
    return out


def apply_overrides(recipe: Recipe, overrides: dict[str, object]) -> Recipe:
    """A new validated Recipe with dotted keys ("iterations", "calibration.steps") replaced.

    String values are converted by the field's type (the CLI passes strings); for optional
    fields (`rank`, `base_config`) "none" means None; `compare` takes "a,b,c". Relative
    paths are resolved against the current folder. Errors name the option as ``--key``.
    """
    fields = _overridable()
    data = recipe_to_dict(recipe)
    ctx = _Ctx(None, None)
    for raw_key, value in overrides.items():
        key = raw_key.lstrip("-").replace("-", "_")
        flag = f"--{raw_key.lstrip('-')}"
        if key not in fields:
            if key == "lora" or key.startswith("lora"):
                raise RecipeError(f"{flag}: [[lora]] entries can't be overridden; edit the "
                                  "recipe file")
            close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.6)
            hint = f" (did you mean --{close[0]}?)" if close else ""
            raise RecipeError(f"{flag}: unknown recipe field{hint}")
        cls, f = fields[key]
        if isinstance(value, str):
            value = _from_string(value, _hints(cls)[f.name], flag)
        elif isinstance(value, (tuple, list)):
            value = list(value)
        if "kind" in f.metadata:
            ctx.path_bases[key] = Path.cwd()
        ctx.labels[key] = flag
        target = data["calibration"] if cls is CalibrationSettings else data
        target[f.name] = value
    return _parse(data, ctx)
