"""Command-line flags generated from a dataclass of defaults.

One ``--flag`` per field: its type and check from the field (``metadata["check"]``, see
training/flags.py), its default from the field's default, and its help text from the
class docstring's numpydoc ``Parameters`` section, so each is written once.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import typing
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from training.flags import argparse_type, flag_name

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = ["add_dataclass_arguments", "dataclass_from_args", "field_descriptions"]

DataclassT = TypeVar("DataclassT", bound="DataclassInstance")


def field_descriptions(cls: type) -> dict[str, str]:
    """Each field's description from the class docstring's ``Parameters`` section.

    The numpydoc layout scikit-learn uses: a line ``name : type``, then the
    description indented below it. Raises ValueError for a field the section does not
    describe, or for a description of a field the class does not have, so the help
    text cannot fall behind the code.
    """
    lines = inspect.cleandoc(cls.__doc__ or "").splitlines()
    start = next((i + 2 for i, line in enumerate(lines) if line.strip() == "Parameters"), None)
    descriptions: dict[str, list[str]] = {}
    current: list[str] = []
    for line in lines[start or len(lines) :]:
        if line and not line.startswith(" "):
            if " : " not in line:  # the next section's title
                break
            current = descriptions.setdefault(line.split(" : ")[0].strip(), [])
        elif line.strip():
            current.append(line.strip())
    fields = {f.name for f in dataclasses.fields(cls)}
    missing, unknown = fields - descriptions.keys(), descriptions.keys() - fields
    if missing or unknown:
        raise ValueError(
            f"{cls.__name__}'s docstring: undocumented fields {sorted(missing)}, "
            f"descriptions of unknown fields {sorted(unknown)}"
        )
    return {name: " ".join(words) for name, words in descriptions.items()}


def prefixed_references(text: str, names: set[str], prefix: str) -> str:
    """``text`` with its ``--flag`` cross-references to ``names`` given the prefix: in
    ``train all`` the EBM's "--steps" is ``--ebm-steps`` (``--steps`` is the VAE's)."""

    def swap(match: re.Match) -> str:
        name = match.group(1).replace("-", "_")
        return flag_name(name, prefix) if name in names else match.group(0)

    return re.sub(r"--([a-z][a-z0-9-]*)", swap, text)


def add_dataclass_arguments(
    parser: argparse.ArgumentParser, cls: type, prefix: str = "", exclude: tuple[str, ...] = ()
) -> None:
    """One ``--flag`` per dataclass field, typed, checked and defaulted from the field
    (required when it has no default).

    With a prefix (``ebm_``), flags become ``--ebm-steps`` and so on, so that two
    stages with fields of the same name can share one command line.
    """
    hints = typing.get_type_hints(cls)
    descriptions = field_descriptions(cls)
    flagged = {f.name for f in dataclasses.fields(cls)} - set(exclude)
    for f in dataclasses.fields(cls):
        if f.name not in flagged:
            continue
        text = prefixed_references(descriptions[f.name], flagged, prefix).replace("%", "%%")
        options = _argument_options(f, hints[f.name])
        action = parser.add_argument(
            flag_name(f.name, prefix), dest=prefix + f.name, help=text, **options
        )
        help_text = action.help or ""
        if options.get("required"):
            action.help = help_text + " (required)"
        elif "%(default)" not in help_text:  # older BooleanOptionalActions add it themselves
            default = options["default"]
            shown = " ".join(map(str, default)) if isinstance(default, list) else repr(default)
            action.help = help_text + f" (default: {shown})".replace("%", "%%")


def _argument_options(f: dataclasses.Field, kind: Any) -> dict[str, Any]:
    """argparse options of one field: its action or type (the field's check, so a bad
    value fails in argparse with the flag named), nargs, and default or required."""
    if f.default is not dataclasses.MISSING:
        default = f.default
    elif f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    else:
        return {"type": _parse_type(f, kind), "required": True}
    if kind is bool:
        return {"action": argparse.BooleanOptionalAction, "default": default}
    if typing.get_origin(kind) is tuple:
        return {"type": _parse_type(f, int), "nargs": "+", "default": list(default)}
    return {"type": _parse_type(f, kind), "default": default}


def _parse_type(f: dataclasses.Field, kind: Any) -> Callable[[str], Any]:
    check = f.metadata.get("check")
    return argparse_type(check) if check is not None else kind


def dataclass_from_args(
    cls: type[DataclassT], ns: argparse.Namespace, prefix: str = "", **overrides: Any
) -> DataclassT:
    """Build ``cls`` from the parsed flags that ``add_dataclass_arguments`` added
    (a list of ``nargs="+"`` becomes the field's tuple)."""
    values = {
        f.name: getattr(ns, prefix + f.name)
        for f in dataclasses.fields(cls)
        if f.name not in overrides
    }
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return cls(**{**values, **overrides})
