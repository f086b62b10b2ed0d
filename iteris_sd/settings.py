"""Settings declared once: a dataclass field carries its default, help text and checks.

`setting(help, default, ge=..., choices=...)` makes such a field; `check_setting` applies
its checks to a value, and `check_settings` to every field of a settings object. The recipe
(`iteris_sd.app.recipe`), the CLI and the nodes read the same fields, so a default, a range
or a help text is written in one place. Every failure is a `SettingError` (a ValueError)
with a one-line message naming the setting, the value and what is expected.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any


class SettingError(ValueError):
    """A setting has a bad value; the message is one line naming setting and value."""


class _Required:
    """Sentinel default of a required field (shown as "(required)")."""

    def __repr__(self) -> str:
        return "(required)"

    __str__ = __repr__


REQUIRED: Any = _Required()


def setting(help: str, default: Any = REQUIRED, **checks: Any) -> Any:
    """A dataclass field with its help text and declarative checks (ge, gt, le,
    multiple_of, choices, pattern + expected, min_items, nonblank, item_choices, unique;
    words: the strings a number field also takes, e.g. ("auto",); unset: the value, e.g. 0,
    that means "ask the model", which the other checks let through)."""
    meta = {"help": help, **checks}
    if default is REQUIRED:
        return field(metadata=meta)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    if dataclasses.is_dataclass(default):
        return field(default_factory=type(default), metadata=meta)
    return field(default=default, metadata=meta)


def field_default(f: dataclasses.Field) -> Any:
    """A field's default value, or `REQUIRED`."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return REQUIRED


def show(value: Any) -> str:
    """A short one-line, TOML-flavoured rendering of a value for error messages."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, dict):
        return "a table"
    else:
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_setting(value: Any, meta: dict, label: str) -> None:
    """Apply a field's declarative checks to ``value`` (None passes: optionality is the
    type's business); the SettingError names ``label``."""
    if value is None or ("unset" in meta and value == meta["unset"]):
        return
    if isinstance(value, str) and "words" in meta:  # a number field that also takes a few words
        if value not in meta["words"]:
            raise SettingError(f"{label}: expected {' or '.join(map(repr, meta['words']))} or a number, got {show(value)}")
        return
    if "choices" in meta and value not in meta["choices"]:
        raise SettingError(f"{label}: expected one of {', '.join(meta['choices'])}; got {show(value)}")
    if "pattern" in meta and not meta["pattern"].fullmatch(value):
        raise SettingError(f"{label}: expected {meta['expected']}; got {show(value)}")
    if "ge" in meta and value < meta["ge"]:
        unset = f" (or {meta['unset']})" if "unset" in meta else ""
        raise SettingError(f"{label}: must be >= {meta['ge']}{unset}, got {show(value)}")
    if "gt" in meta and value <= meta["gt"]:
        interval = f"in ({meta['gt']}, {meta['le']}]" if "le" in meta else f"> {meta['gt']}"
        raise SettingError(f"{label}: must be {interval}, got {show(value)}")
    if "le" in meta and value > meta["le"]:
        interval = f"in ({meta['gt']}, {meta['le']}]" if "gt" in meta else f"<= {meta['le']}"
        raise SettingError(f"{label}: must be {interval}, got {show(value)}")
    if "multiple_of" in meta and value % meta["multiple_of"]:
        raise SettingError(f"{label}: must be a multiple of {meta['multiple_of']}, got {show(value)}")
    if "min_items" in meta and len(value) < meta["min_items"]:
        raise SettingError(f"{label}: expected at least {meta['min_items']} "
                           f"entr{'y' if meta['min_items'] == 1 else 'ies'}, got an empty array")
    if meta.get("nonblank") and not value.strip():
        raise SettingError(f"{label}: expected a non-empty string, got {show(value)}")
    if "item_choices" in meta:
        for i, item in enumerate(value):
            if item not in meta["item_choices"]:
                raise SettingError(f"{label}[{i}]: expected one of {', '.join(meta['item_choices'])}; "
                                   f"got {show(item)}")
    if meta.get("unique"):
        for i, item in enumerate(value):
            if item in value[:i]:
                raise SettingError(f"{label}[{i}]: {show(item)} is repeated (also at [{value.index(item)}])")


def check_settings(obj: Any, prefix: str) -> None:
    """`check_setting` on every field of the dataclass instance ``obj``, labelled
    ``prefix.name``: one-line errors up front for Python API callers."""
    for f in dataclasses.fields(obj):
        check_setting(getattr(obj, f.name), f.metadata, f"{prefix}.{f.name}")
