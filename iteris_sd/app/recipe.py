"""The merge recipe: one TOML file naming the base model, the LoRAs and every setting.

`load_recipe` reads and validates a file, `parse_recipe` validates an already-parsed
dict, and `apply_overrides` applies command-line overrides ("iterations", "calibration.steps")
to a validated recipe. Every problem raises `RecipeError` with a one-line message that
names the field by its TOML path (``lora[0].prompts``) or the file, the bad value and
what is expected. LoRA entries are numbered from 0, in file order.

Each dataclass field carries its help text in ``metadata["help"]``; `recipe_fields` lists
them all for the CLI's ``--help`` and the README.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from ..backends.calibration import SAMPLERS, CalibrationSettings
from ..merge.plan import BUDGET_RE
from ..merge.solve import RIDGE_TARGETS

__all__ = [
    "RecipeError",
    "LoraSpec",
    "CalibrationSettings",
    "Recipe",
    "FieldInfo",
    "REQUIRED",
    "METHODS",
    "SAMPLERS",
    "DTYPES",
    "RIDGE_TARGETS",
    "parse_recipe",
    "load_recipe",
    "apply_overrides",
    "recipe_fields",
    "recipe_to_dict",
    "EXAMPLE_RECIPE",
]

METHODS = ("iteris", "regmean", "stack", "linear", "concat", "svd", "ties", "dare")
DTYPES = ("fp16", "bf16", "fp32")
_DEVICE_RE = re.compile(r"auto|cpu|cuda|cuda:\d+|mps")
_SOLVE_DEVICE_RE = re.compile(r"auto|cpu|cuda|cuda:\d+")


class RecipeError(ValueError):
    """A recipe file or value is invalid; the message is one line naming field and value."""


class _Required:
    """Sentinel default of a required field (shown as "(required)")."""

    def __repr__(self) -> str:
        return "(required)"

    __str__ = __repr__


REQUIRED: Any = _Required()


def _f(help: str, default: Any = REQUIRED, **checks: Any) -> Any:
    """A dataclass field with its help text and declarative checks in metadata."""
    meta = {"help": help, **checks}
    if default is REQUIRED:
        return field(metadata=meta)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    if dataclasses.is_dataclass(default):
        return field(default_factory=type(default), metadata=meta)
    return field(default=default, metadata=meta)


# ---------------------------------------------------------------------------- schema


@dataclass(kw_only=True)
class LoraSpec:
    """One ``[[lora]]`` entry: a LoRA file and the prompts that calibrate it."""

    path: str = _f("The LoRA file (.safetensors); relative paths are resolved against the "
                   "recipe's folder.", kind="file")
    strength: float = _f("Multiplier on the LoRA's delta before merging (its usual "
                         "strength; negative values are allowed).", 1.0)
    prompts: list[str] = _f("Calibration prompts (1 or more non-empty strings, each "
                            "stripped) on which the LoRA's own outputs are captured; "
                            "use the LoRA's trigger words.", min_items=1)
    name: str | None = _f("Name in reports and metadata; default: the file name without "
                          "its extension.", None, nonblank=True)
    held_out_prompts: list[str] = _f("Prompts used only to evaluate the merge, never to "
                                     "calibrate it; each must differ from every prompt "
                                     "in `prompts`.", [])


@dataclass(kw_only=True)
class Recipe:
    """A whole merge: base model, LoRAs, method and settings, all validated."""

    base: str = _f("The base model: a diffusers folder or a single-file checkpoint "
                   "(.safetensors).", kind="exists")
    output: str = _f("The merged LoRA to write (.safetensors); its folder must exist.",
                     kind="output")
    method: str = _f("Merge method: " + ", ".join(METHODS) + ".", "iteris", choices=METHODS)
    iterations: int = _f("IterIS re-solves after the first solve (>= 0; 0 = one-shot): each "
                         "re-captures the merged model's inputs and solves again.", 5, ge=0)
    rank: int | None = _f("Rank of the merged LoRA (>= 1); omit it (or pass 'none') for "
                          "the exact sum of the input ranks.", None, ge=1)
    dtype: str = _f("Precision of the tensors in the written LoRA file: "
                    + ", ".join(DTYPES) + ".", "fp16", choices=DTYPES)
    device: str = _f("Device: auto, cpu, cuda, cuda:N or mps.", "auto", pattern=_DEVICE_RE,
                     expected="'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    seed: int = _f("Random seed of the calibration noise (>= 0).", 0, ge=0)
    overwrite: bool = _f("Replace `output` if it already exists.", False)
    damping: float = _f("Damping of each iteration, in (0, 1]; 1 = the paper's undamped "
                        "iteration.", 0.5, gt=0.0, le=1.0)
    regularization: float = _f("Ridge on the feature Gram matrices, relative to their Frobenius norm "
                               "(>= 0; the paper's a1 = a2, 1e-7 to 1e-4 in its configurations).", 0.1, ge=0.0)
    ridge_target: str = _f("What IterIS's ridge pulls the merge toward along input directions the "
                           "calibration barely reaches: 'average' of the LoRAs' deltas (the paper's; "
                           "each LoRA at about 1/N strength there) or their 'sum' (each at full "
                           "strength, as when stacked).", "sum", choices=RIDGE_TARGETS)
    adaptive_weights: bool = _f("IterIS's adaptive weights c_i = ||W0 + dW_i||^2 / "
                                "||X_i (W0 + dW_i)^T||^2 per layer and LoRA (true, as in the paper) "
                                "or equal weights (false).", True)
    compare: list[str] = _f("Other methods evaluated in the same run for the report table "
                            "(same names as `method`, no repeats).", [], item_choices=METHODS,
                            unique=True)
    density: float = _f("Fraction of each delta kept by ties and dare, in (0, 1].", 0.5,
                        gt=0.0, le=1.0)
    base_config: str | None = _f("A diffusers folder holding the configs and tokenizers "
                                 "for a single-file `base`; omit it (or pass 'none') to infer "
                                 "them.", None,
                                 kind="folder")
    memory_budget: str = _f("Memory the merge's statistics and solves may use on the compute device: "
                            "'auto' (its free memory less a margin of 1 GiB + 10% of its total), 'none' "
                            "(no limit), or a size such as '6GiB' or '800MB'. Layers are captured and "
                            "solved in chunks that fit.", "auto", pattern=BUDGET_RE,
                            expected="'auto', 'none' or a size such as '6GiB' or '800MB'")
    chunk_layers: int | None = _f("Layers captured and solved together (>= 1); omit it (or pass 'none') "
                                  "for the planner's choice from `memory_budget`.", None, ge=1)
    tokens: int | None = _f("Token rows kept per layer and LoRA (>= 1): a seeded sample, the same rows "
                            "for the LoRA's and the merged model's inputs, used where it is smaller than "
                            "the d_in x d_in statistics (a layer seeing fewer rows keeps all, exactly). "
                            "Omit it (or pass 'none') for exact statistics, sampled only where a layer "
                            "alone exceeds `memory_budget`.", None, ge=1)
    solve_device: str = _f("Device of the float64 solves: auto (where the statistics are; the CPU on "
                           "mps), cpu, cuda or cuda:N.", "auto", pattern=_SOLVE_DEVICE_RE,
                           expected="'auto', 'cpu', 'cuda' or 'cuda:N'")
    calibration: CalibrationSettings = _f("The [calibration] table.", CalibrationSettings())
    lora: list[LoraSpec] = _f("The [[lora]] tables: the LoRAs to merge (at least 1).",
                              min_items=1)


# ---------------------------------------------------------------------------- values


_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a float", str: "a string",
               list: "an array", dict: "a table"}


def _show(value: Any) -> str:
    """A short one-line, TOML-flavoured rendering of a value for error messages."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, dict):
        return "a table"
    else:
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _got(value: Any, with_type: bool = True) -> str:
    """'got <value> (<type>)' for error messages."""
    kind = next((n for t, n in _TYPE_NAMES.items() if isinstance(value, t)), None)
    if value is None:
        kind = "none"
    if not with_type or kind is None or isinstance(value, dict):
        return f"got {_show(value)}"
    return f"got {_show(value)} ({kind})"


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
                hint_text = f"; write {label.rsplit('.', 1)[-1].lstrip('-')} = [{_show(value)}]"
            raise RecipeError(f"{label}: expected an array of strings, {_got(value)}{hint_text}")
        item = typing.get_args(inner)[0]
        return [_check_scalar(v, item, f"{label}[{i}]") for i, v in enumerate(value)]
    return _check_scalar(value, inner, label)


def check_value(name: str, value: Any, label: str) -> None:
    """Apply top-level recipe field ``name``'s declarative checks to ``value``; the
    RecipeError (a ValueError) names ``label``. MergeOptions checks its fields with this."""
    _check_range(value, next(f.metadata for f in dataclasses.fields(Recipe) if f.name == name), label)


def _check_range(value: Any, meta: dict, label: str) -> None:
    """Apply a field's declarative checks (ge, gt, le, multiple_of, choices, ...)."""
    if value is None:
        return
    if "choices" in meta and value not in meta["choices"]:
        raise RecipeError(f"{label}: expected one of {', '.join(meta['choices'])}; "
                          f"got {_show(value)}")
    if "pattern" in meta and not meta["pattern"].fullmatch(value):
        raise RecipeError(f"{label}: expected {meta['expected']}; got {_show(value)}")
    if "ge" in meta and value < meta["ge"]:
        raise RecipeError(f"{label}: must be >= {meta['ge']}, got {_show(value)}")
    if "gt" in meta and value <= meta["gt"]:
        interval = f"in ({meta['gt']}, {meta['le']}]" if "le" in meta else f"> {meta['gt']}"
        raise RecipeError(f"{label}: must be {interval}, got {_show(value)}")
    if "le" in meta and value > meta["le"]:
        interval = f"in ({meta['gt']}, {meta['le']}]" if "gt" in meta else f"<= {meta['le']}"
        raise RecipeError(f"{label}: must be {interval}, got {_show(value)}")
    if "multiple_of" in meta and value % meta["multiple_of"]:
        raise RecipeError(f"{label}: must be a multiple of {meta['multiple_of']}, "
                          f"got {_show(value)}")
    if "min_items" in meta and len(value) < meta["min_items"]:
        raise RecipeError(f"{label}: expected at least {meta['min_items']} "
                          f"entr{'y' if meta['min_items'] == 1 else 'ies'}, got an empty array")
    if meta.get("nonblank") and not value.strip():
        raise RecipeError(f"{label}: expected a non-empty string, got {_show(value)}")
    if "item_choices" in meta:
        for i, item in enumerate(value):
            if item not in meta["item_choices"]:
                raise RecipeError(f"{label}[{i}]: expected one of "
                                  f"{', '.join(meta['item_choices'])}; got {_show(item)}")
    if meta.get("unique"):
        for i, item in enumerate(value):
            if item in value[:i]:
                raise RecipeError(f"{label}[{i}]: {_show(item)} is repeated "
                                  f"(also at [{value.index(item)}])")


# ---------------------------------------------------------------------------- parsing


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
        """Run fn(label), re-prefixing any RecipeError with the source file."""
        try:
            return fn(self.label(path))
        except RecipeError as e:
            if self.source and not self.label(path).startswith("--"):
                raise RecipeError(f"{self.source}: {e}") from None
            raise


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
        ctx.wrap(path, lambda lb: _check_range(value, f.metadata, lb))
        if "kind" in f.metadata and value is not None:
            value = _check_path(value, f.metadata["kind"], path, ctx)
        out[f.name] = value
    return out


def _check_prompts(values: list[str], path: str, ctx: _Ctx) -> list[str]:
    """Strip prompts; a blank one is an error naming its index."""
    out = []
    for i, text in enumerate(values):
        if not text.strip():
            raise ctx.error(f"{path}[{i}]", f"expected a non-empty prompt, got {_show(text)}")
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
                            f"{_show(text)} is also a calibration prompt in {path}.prompts; "
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
                raise ctx.error(f"{path}[{i}].name", f"{_show(spec.name)} is already the name "
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


# ---------------------------------------------------------------------------- overrides


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
    if inner is float:
        try:
            return float(text.strip())
        except ValueError:
            raise RecipeError(f"{label}: expected a number, got {text!r}") from None
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


# ---------------------------------------------------------------------------- introspection


class FieldInfo(NamedTuple):
    """One recipe field for --help and docs: dotted name, type text, default, help."""

    name: str
    type: str
    default: Any
    help: str


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return REQUIRED


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
                                     _field_default(g), g.metadata["help"]))
        else:
            out.append(FieldInfo(f.name, _type_text(_hints(Recipe)[f.name]),
                                 _field_default(f), f.metadata["help"]))
    return out


def recipe_to_dict(recipe: Recipe) -> dict:
    """A JSON-serialisable dict of the recipe (None stays None); parse_recipe accepts it."""
    return dataclasses.asdict(recipe)


EXAMPLE_RECIPE = """\
# iteris_sd merge recipe. Relative paths are resolved against this file's folder.

base = "models/v1-5-pruned-emaonly.safetensors"  # diffusers folder or single-file checkpoint
# base_config = "models/stable-diffusion-v1-5"   # diffusers folder with configs/tokenizers
                                                 # for a single-file base (default: inferred)
output = "out/merged.safetensors"  # the merged LoRA; its folder must exist
overwrite = false                  # replace output if it exists

method = "iteris"         # iteris, regmean, stack, linear, concat, svd, ties, dare
iterations = 5            # IterIS iterations (>= 0)
# rank = 64               # output rank (>= 1); default: the sum of the input ranks
damping = 0.5             # in (0, 1]; 1 = the paper's undamped iteration
regularization = 0.1      # ridge on the Gram matrices, relative to their Frobenius norm
ridge_target = "sum"      # what the ridge pulls toward: "sum" of the deltas or their "average" (the paper's)
adaptive_weights = true   # the paper's per-layer, per-LoRA weights; false = equal weights
density = 0.5             # fraction kept by ties and dare, in (0, 1]
compare = ["linear", "regmean"]  # other methods scored in the same run for the report

dtype = "fp16"            # fp16, bf16, fp32
device = "auto"           # auto, cpu, cuda, cuda:N, mps
seed = 0                  # seed of the calibration noise
memory_budget = "auto"    # for statistics and solves: auto (free memory less a margin), none, "6GiB"
# chunk_layers = 32       # layers captured and solved together (default: planned from memory_budget)
# tokens = 4096           # token rows kept per layer and LoRA (default: exact statistics)
solve_device = "auto"     # device of the float64 solves: auto, cpu, cuda, cuda:N

[calibration]
steps = 8                 # sampling steps of each LoRA's calibration trajectory
resolution = 512          # pixels, a multiple of 8
cfg = 5.0                 # guidance scale (>= 1.0)
sampler = "ddim"          # ddim, euler, dpmpp_2m
timesteps = 4             # steps captured out of `steps` (1 .. steps)
negative_prompt = "lowres, blurry"
seeds = 1                 # noise seeds per prompt

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
