"""absl flags generated from a frozen config dataclass, one flag per field.

The dataclass is the single source of truth: a field's type picks the flag kind, its
default is the flag default, and the comment lines above the field in the source become
the flag's help text. `--flagfile` works because these are ordinary absl flags. The same
metadata renders README's flag table (`markdown_table`), which a test keeps in sync.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any, TypeVar

from absl import flags

T = TypeVar("T")

_FIELD_LINE = re.compile(r"^\s{4}(\w+):\s*[\w\[\]|. ]+=")


def field_help(cls: type) -> dict[str, str]:
    """Maps each field to the comment block written directly above it in the class body.

    Base dataclasses are read first, so a phase's config inherits the shared fields' help;
    a field it redeclares (another default) takes its own comment if it has one.
    """
    helps: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        pending: list[str] = []
        for line in inspect.getsource(klass).splitlines():
            stripped = line.strip()
            if stripped.startswith("#"):
                pending.append(stripped.lstrip("# ").strip())
                continue
            match = _FIELD_LINE.match(line)
            if match and (pending or match.group(1) not in helps):
                helps[match.group(1)] = " ".join(pending)
            pending = []
    return helps


_DEFINERS = {"bool": flags.DEFINE_bool, "int": flags.DEFINE_integer, "float": flags.DEFINE_float, "str": flags.DEFINE_string}


def _define(field: dataclasses.Field, help_text: str, flag_values: flags.FlagValues) -> None:
    # "int | None" is an optional flag: None (its default) means "not given", e.g. --step.
    kind = field.type.removesuffix(" | None")
    if kind not in _DEFINERS:
        raise TypeError(f"field {field.name} has type {field.type!r}; only bool/int/float/str (or X | None) map to flags")
    _DEFINERS[kind](field.name, field.default, help_text or field.name, flag_values=flag_values)


def define_flags(cls: type, flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines one absl flag per field of `cls` (idempotent per FlagValues)."""
    helps = field_help(cls)
    for field in dataclasses.fields(cls):
        if field.name not in flag_values:
            _define(field, helps.get(field.name, ""), flag_values)


def config_from_flags(cls: type[T], flag_values: flags.FlagValues = flags.FLAGS) -> T:
    return cls(**{f.name: flag_values[f.name].value for f in dataclasses.fields(cls)})


def explicitly_set(cls: type, flag_values: flags.FlagValues = flags.FLAGS) -> set[str]:
    """Fields the user gave on the command line or in a flagfile."""
    return {f.name for f in dataclasses.fields(cls) if flag_values[f.name].present}


def _format_default(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def help_listing(cls: type) -> str:
    """`--help`'s listing: each flag with its default, then its help on the next line."""
    helps = field_help(cls)
    lines = []
    for field in dataclasses.fields(cls):
        lines.append(f"  --{field.name}  (default: {_format_default(field.default)})")
        lines.append(f"      {helps.get(field.name, '')}")
    return "\n".join(lines)


def markdown_table(cls: type) -> str:
    """The README flag table: | flag | default | meaning |."""
    helps = field_help(cls)
    rows = ["| flag | default | meaning |", "|---|---|---|"]
    for field in dataclasses.fields(cls):
        # A bare "|" in help text ("cosine | linear") would end the cell.
        meaning = helps.get(field.name, "").replace("|", "\\|")
        rows.append(f"| `--{field.name}` | `{_format_default(field.default)}` | {meaning} |")
    return "\n".join(rows)
