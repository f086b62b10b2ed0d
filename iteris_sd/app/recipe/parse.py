"""Validating a parsed recipe: types, ranges, paths and cross-field rules, each failure a
one-line `RecipeError` naming the field by its TOML path (``lora[0].prompts``) or the file."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from ...backends.calibration import CalibrationSettings
from ...settings import SettingError, check_setting, show
from .schema import LoraSpec, Recipe, RecipeError, _hints, _split_optional, _type_text

_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a float", str: "a string",
               list: "an array", dict: "a table"}


def _got(value: Any, with_type: bool = True) -> str:
    """'got <value> (<type>)' for error messages."""
    kind = next((n for t, n in _TYPE_NAMES.items() if isinstance(value, t)), None)
    if value is None:
        kind = "none"
    if not with_type or kind is None or isinstance(value, dict):
        return f"got {show(value)}"
    return f"got {show(value)} ({kind})"


def _check_scalar(value: Any, typ: type, label: str, with_type: bool = True) -> Any:
    """Type-check one TOML scalar; int is accepted (and converted) where float is expected."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise RecipeError(f"{label}: expected true or false, {_got(value, with_type)}")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise RecipeError(f"{label}: expected an integer, {_got(value, with_type)}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise RecipeError(f"{label}: expected a finite number, {_got(value, with_type)}")
            return float(value)
        raise RecipeError(f"{label}: expected a number, {_got(value, with_type)}")
    if typ is str:
        if isinstance(value, str):
            return value
        raise RecipeError(f"{label}: expected a string, {_got(value, with_type)}")
    if typing.get_args(typ) == (float, str):  # a number or a word (the field's `words` check says which)
        if isinstance(value, str):
            return value
        return _check_scalar(value, float, label, with_type)
    raise TypeError(f"unsupported field type {typ!r}")  # pragma: no cover


def _check_value(value: Any, hint: Any, label: str) -> Any:
    """Type-check a value against a field's type hint (scalars, optionals, list[str])."""
    inner, optional = _split_optional(hint)
    if value is None:
        if optional:
            return None
        raise RecipeError(f"{label}: expected {_type_text(hint)}, got none")
    if typing.get_origin(inner) is list:
        if not isinstance(value, list):
            hint_text = ""
            if isinstance(value, str):
                hint_text = f"; write {label.rsplit('.', 1)[-1].lstrip('-')} = [{show(value)}]"
            raise RecipeError(f"{label}: expected an array of strings, {_got(value)}{hint_text}")
        item = typing.get_args(inner)[0]
        return [_check_scalar(v, item, f"{label}[{i}]") for i, v in enumerate(value)]
    return _check_scalar(value, inner, label)


@dataclass
class _Ctx:
    """Where a parse reports from: the file prefix, path base and per-field labels."""

    source: str | None
    base_dir: Path | None
    labels: dict[str, str] = field(default_factory=dict)  # TOML path -> label shown
    path_bases: dict[str, Path] = field(default_factory=dict)  # TOML path -> its own base

    def label(self, path: str) -> str:
        return self.labels.get(path, path)

    def error(self, path: str, message: str) -> RecipeError:
        text = f"{self.label(path)}: {message}" if path else message
        prefixed = self.source and not self.label(path).startswith("--")
        return RecipeError(f"{self.source}: {text}" if prefixed else text)

    def wrap(self, path: str, fn: Callable[[str], Any]) -> Any:
        """Run fn(label); a failed check becomes a RecipeError prefixed with the source file."""
        try:
            return fn(self.label(path))
        except SettingError as e:
            if self.source and not self.label(path).startswith("--"):
                raise RecipeError(f"{self.source}: {e}") from None
            raise RecipeError(str(e)) from None


def _reject_unknown(data: dict, cls: type, prefix: str, ctx: _Ctx) -> None:
    """Unknown keys at one level → one error naming each, with a difflib suggestion."""
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in known]
    if not unknown:
        return
    parts = []
    for key in unknown:
        close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
        where = f"{prefix}.{key}" if prefix else str(key)
        if close:
            parts.append(f"{where}: unknown field (did you mean '{close[0]}'?)")
        else:
            parts.append(f"{where}: unknown field (expected one of {', '.join(known)})")
    message = "; ".join(parts)
    raise RecipeError(f"{ctx.source}: {message}" if ctx.source else message)


def _resolve(text: str, base: Path | None) -> str:
    """Expand ~ and make a relative path absolute against base (when given)."""
    p = Path(text).expanduser()
    if base is not None and not p.is_absolute():
        p = base / p
    return os.path.normpath(p) if (base is not None or p.is_absolute()) else str(p)


def _check_path(value: str, kind: str, path: str, ctx: _Ctx) -> str:
    """Resolve a path field and check it on disk according to its kind."""
    if not value.strip():
        raise ctx.error(path, "expected a path, got ''")
    resolved = _resolve(value, ctx.path_bases.get(path, ctx.base_dir))
    p = Path(resolved)
    if kind == "file":
        if not p.exists():
            raise ctx.error(path, f"file not found: {resolved}")
        if p.is_dir():
            raise ctx.error(path, f"expected a file, got a folder: {resolved}")
    elif kind == "exists":
        if not p.exists():
            raise ctx.error(path, f"file or folder not found: {resolved}")
    elif kind == "folder":
        if not p.is_dir():
            what = "not a folder" if p.exists() else "folder not found"
            raise ctx.error(path, f"{what}: {resolved}")
    elif kind == "output":
        if p.suffix.lower() != ".safetensors":
            raise ctx.error(path, f"expected a path ending in .safetensors, got {resolved!r}")
        if p.is_dir():
            raise ctx.error(path, f"expected a file path, got a folder: {resolved}")
        parent = p.parent
        if not parent.is_dir():
            raise ctx.error(path, f"folder does not exist: {parent}")
    return resolved


def _parse_fields(data: Any, cls: type, prefix: str, ctx: _Ctx,
                  nested: dict[str, Callable[[Any, str], Any]] | None = None) -> dict:
    """Validate one table against a dataclass; returns the constructor kwargs."""
    if not isinstance(data, dict):
        if prefix:
            raise ctx.error(prefix, f"expected a table, {_got(data)}")
        raise RecipeError(f"{ctx.source or '<recipe>'}: expected a table at the top level, "
                          f"{_got(data)}")
    _reject_unknown(data, cls, prefix, ctx)
    hints = _hints(cls)
    nested = nested or {}
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        path = f"{prefix}.{f.name}" if prefix else f.name
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ctx.error(path, f"missing required field ({f.metadata['help']})")
            continue
        value = data[f.name]
        if f.name in nested:
            out[f.name] = nested[f.name](value, path)
            continue
        value = ctx.wrap(path, lambda lb: _check_value(value, hints[f.name], lb))
        ctx.wrap(path, lambda lb: check_setting(value, f.metadata, lb))
        if "kind" in f.metadata and value is not None:
            value = _check_path(value, f.metadata["kind"], path, ctx)
        out[f.name] = value
    return out


def _check_prompts(values: list[str], path: str, ctx: _Ctx) -> list[str]:
    """Strip prompts; a blank one is an error naming its index."""
    out = []
    for i, text in enumerate(values):
        if not text.strip():
            raise ctx.error(f"{path}[{i}]", f"expected a non-empty prompt, got {show(text)}")
        out.append(text.strip())
    return out


def _parse_lora(data: Any, path: str, ctx: _Ctx) -> LoraSpec:
    """One [[lora]] table."""
    kw = _parse_fields(data, LoraSpec, path, ctx)
    kw["prompts"] = _check_prompts(kw["prompts"], f"{path}.prompts", ctx)
    held = _check_prompts(kw.get("held_out_prompts", []), f"{path}.held_out_prompts", ctx)
    for i, text in enumerate(held):
        if text in kw["prompts"]:
            raise ctx.error(f"{path}.held_out_prompts[{i}]",
                            f"{show(text)} is also a calibration prompt in {path}.prompts; "
                            "held-out prompts must differ from them")
    kw["held_out_prompts"] = held
    if kw.get("name") is not None:
        kw["name"] = kw["name"].strip()
    return LoraSpec(**kw)


def _parse_loras(data: Any, path: str, ctx: _Ctx) -> list[LoraSpec]:
    """The [[lora]] array of tables (at least one entry)."""
    if isinstance(data, dict):
        raise ctx.error(path, "expected an array of tables: write [[lora]], not [lora]")
    if not isinstance(data, list):
        raise ctx.error(path, f"expected an array of [[lora]] tables, {_got(data)}")
    if not data:
        raise ctx.error(path, "expected at least 1 [[lora]] table, got none")
    loras = [_parse_lora(item, f"{path}[{i}]", ctx) for i, item in enumerate(data)]
    seen: dict[str, int] = {}
    for i, spec in enumerate(loras):
        if spec.name is not None:
            if spec.name in seen:
                raise ctx.error(f"{path}[{i}].name", f"{show(spec.name)} is already the name "
                                f"of {path}[{seen[spec.name]}]; names must be unique")
            seen[spec.name] = i
    return loras


def _parse_calibration(data: Any, path: str, ctx: _Ctx) -> CalibrationSettings:
    """The [calibration] table, including timesteps <= steps."""
    spec = CalibrationSettings(**_parse_fields(data, CalibrationSettings, path, ctx))
    if spec.timesteps > spec.steps:
        raise ctx.error(f"{path}.timesteps", f"must be between 1 and {path}.steps "
                        f"({spec.steps}), got {spec.timesteps}")
    return spec


def _parse(data: Any, ctx: _Ctx) -> Recipe:
    if isinstance(data, dict) and "lora" not in data:
        raise ctx.error("lora", "missing; add at least one [[lora]] table with a path and "
                        "prompts")
    nested = {
        "calibration": lambda v, p: _parse_calibration(v, p, ctx),
        "lora": lambda v, p: _parse_loras(v, p, ctx),
    }
    return Recipe(**_parse_fields(data, Recipe, "", ctx, nested))


def parse_recipe(data: dict, source: str = "<recipe>", base_dir: Path | None = None) -> Recipe:
    """Validate a parsed recipe (a dict as TOML gives it) into a `Recipe`.

    Relative `base`, `output`, `base_config` and `lora[].path` are resolved against
    `base_dir` (the recipe file's folder) when given; `lora[].path` and `base` must exist,
    and so must the folder of `output`. Messages start with `source`.
    """
    return _parse(data, _Ctx(source, Path(base_dir) if base_dir is not None else None))


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read a TOML recipe file and validate it; relative paths are resolved next to it."""
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise RecipeError(f"{p}: recipe file not found") from None
    except IsADirectoryError:
        raise RecipeError(f"{p}: expected a TOML recipe file, got a folder") from None
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{p}: TOML syntax error: {e}") from None
    except UnicodeDecodeError as e:
        raise RecipeError(f"{p}: expected UTF-8 text, found byte 0x{e.object[e.start]:02x} "
                          f"at offset {e.start}") from None
    except OSError as e:
        raise RecipeError(f"{p}: cannot read the recipe: {e.strerror or e}") from None
    return parse_recipe(data, source=str(p), base_dir=p.resolve().parent)
