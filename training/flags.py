"""Checks of the values the ``vaebm`` commands take: one rule per kind of value.

Each check takes the text argparse hands over (or the value a settings dataclass was
built with in code) and returns it parsed, or raises :class:`FlagError` saying what is
allowed. The same check is the flag's argparse ``type=`` and validates a dataclass
built in code (:func:`validate_fields`), so a value is judged by one rule however it
arrives, and a bad one is refused before any work starts, with the flag named.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from model.calibration_file import MAX_IWAE_K
from model.device import check_device_name

Check = Callable[[Any], Any]
MAX_SAMPLE_N = 1024  # images in one `vaebm sample` grid; the service's largest cap too
REPORT_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


class FlagError(ValueError):
    """A flag's value is not allowed; the message says what was given and what is."""


def _number(value: Any, kind: type) -> int | float:
    """``value`` as ``kind`` (int or float), from text or a number, never from a bool."""
    what = "an integer" if kind is int else "a number"
    usable = isinstance(value, str | int | float) and not isinstance(value, bool)
    try:
        if usable and not (kind is int and isinstance(value, float)):  # no silent rounding
            return kind(value)
    except ValueError:
        pass
    raise FlagError(f"must be {what}, got {value!r}")


def _bounds_text(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    """The bounds as an error message states what is allowed: "in (0, 0.5]", ">= 1"."""
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    return f"{'<' if high_open else '<='} {high:g}" if high is not None else ""


def in_range(
    kind: type,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    bounds: str = "",
) -> Check:
    """A check of an int or a finite float within bounds (closed unless ``*_open``).

    Floats must be finite everywhere: NaN slips through every comparison, and NaN or
    infinity in a setting also ends up in config.json, which JSON cannot hold.
    """
    what = "an integer" if kind is int else "a finite number"
    allowed = f"{what} {bounds or _bounds_text(low, high, low_open, high_open)}".strip()

    def check(value: Any) -> int | float:
        number = _number(value, kind)
        too_low = low is not None and (number <= low if low_open else number < low)
        too_high = high is not None and (number >= high if high_open else number > high)
        if too_low or too_high or (kind is float and not math.isfinite(number)):
            raise FlagError(f"must be {allowed}, got {value!r}")
        return number

    check.__name__ = allowed
    return check


positive_int = in_range(int, 1)
non_negative_int = in_range(int, 0)
seed = in_range(int, 0, 2**63, high_open=True, bounds="in [0, 2**63)")  # a signed 64-bit int
iwae_k = in_range(int, 1, MAX_IWAE_K)
sample_count = in_range(int, 1, MAX_SAMPLE_N)
positive_float = in_range(float, 0, low_open=True)
non_negative_float = in_range(float, 0)
probability = in_range(float, 0, 1)
fraction_below_one = in_range(float, 0, 1, high_open=True)
open_fraction = in_range(float, 0, 1, low_open=True, high_open=True)
# Larger Langevin steps only blow the chains up (1e300 gives NaN images); 0 keeps them.
sample_step_size = in_range(float, 0, 1)


def one_of(*choices: Any) -> Check:
    """A check that the value (text or value) is one of ``choices``; returns the choice."""
    allowed = ", ".join(map(repr, choices))

    def check(value: Any) -> Any:
        for choice in choices:
            if not isinstance(value, bool) and str(value) == str(choice):
                return choice
        raise FlagError(f"must be one of {allowed}, got {value!r}")

    check.__name__ = f"one of {allowed}"
    return check


def device(value: Any) -> str:
    """auto, cpu, cuda or cuda:N (spelling only: whether that GPU exists is checked when
    the device is selected, still before any work)."""
    try:
        return check_device_name(str(value))
    except ValueError as exc:
        raise FlagError(str(exc)) from None


def report_name(value: Any) -> str:
    """A name that becomes part of file names (an OOD set's ``roc-NAME.png``): ASCII letters,
    digits, ``-``, ``_`` and ``.``, not starting with a dot, so it can neither leave the
    output directory nor hide there."""
    text = str(value)
    if not REPORT_NAME.fullmatch(text):
        raise FlagError(
            f"must be ASCII letters, digits, '-', '_' or '.', not starting with '.', got {text!r}"
        )
    return text


def data_spec(value: Any) -> str:
    """A data source spec (training/data.py) that can load: its syntax, a synthetic
    count, that a path exists and has a supported format; nothing is read, so a later
    stage's data (``train all --ebm-data``) is refused before the first stage runs."""
    from training.data import DataError, check_spec  # numpy and Pillow: not for --help

    try:
        check_spec(str(value))
    except DataError as exc:
        raise FlagError(str(exc)) from None
    return str(value)


def data_spec_or_empty(value: Any) -> str:
    """A data spec as :func:`data_spec`, or empty for the default one (the EBM's: the
    data the VAE was trained on)."""
    return "" if str(value) == "" else data_spec(value)


def checked(default: Any, check: Check) -> Any:
    """A dataclass field whose values ``check`` validates, on the command line (as the
    flag's argparse type) and in code (:func:`validate_fields`)."""
    return dataclasses.field(default=default, metadata={"check": check})


def checked_required(check: Check) -> Any:
    """A dataclass field without default (a required flag) whose values ``check``
    validates, as :func:`checked`."""
    return dataclasses.field(metadata={"check": check})


def flag_name(field: str, prefix: str = "") -> str:
    """The flag of a settings field: ``batch_size`` -> ``--batch-size`` (``--ebm-...``)."""
    return "--" + (prefix + field).replace("_", "-")


def validate_fields(settings: Any, prefix: str = "") -> None:
    """Run each checked field's check on its value (each item of a tuple).

    Raises
    ------
    FlagError
        Naming the first bad field by its flag.
    """
    for f in dataclasses.fields(settings):
        check = f.metadata.get("check")
        if check is None:
            continue
        value = getattr(settings, f.name)
        for item in value if isinstance(value, tuple | list) else [value]:
            try:
                check(item)
            except FlagError as exc:
                raise FlagError(f"{flag_name(f.name, prefix)}: {exc}") from None


def argparse_type(check: Check) -> Callable[[str], Any]:
    """``check`` as an argparse ``type=``: its message becomes argparse's error line,
    which names the flag (``argument --batch-size: must be an integer >= 1, got '0'``)."""

    def parse(text: str) -> Any:
        try:
            return check(text)
        except FlagError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = getattr(check, "__name__", "value")
    return parse


def check_writable_directory(path: str | Path, flag: str) -> None:
    """Refuse now, naming the flag, a directory that cannot be created or written into:
    a run must not find out at its first save, minutes or hours in."""
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    where = f"{flag} {path}" if existing == path else f"{flag} {path}: {existing}"
    if not existing.is_dir():
        raise FlagError(f"{where} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise FlagError(f"{where} is not writable ({exc.strerror or exc})") from None


def check_writable_file(path: str | Path, flag: str) -> None:
    """Refuse now a file path that is a directory or whose directory cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise FlagError(f"{flag} {path} is a directory, not a file")
    check_writable_directory(path.parent, flag)


def check_outside(path: str | Path, directory: str | Path, flag: str, directory_flag: str) -> None:
    """Refuse a file path inside ``directory`` (links resolved): an output written there
    would replace a file the directory needs, such as a checkpoint's config.json."""
    target, inside = Path(path).resolve(), Path(directory).resolve()
    if target == inside or inside in target.parents:
        raise FlagError(
            f"{flag} {path} is inside {directory_flag} {directory}; write it elsewhere "
            "so that no file of it is replaced"
        )


def check_output_files(directory: str | Path, names: Iterable[str], flag: str) -> None:
    """Refuse, before any work, a file a command will write into ``directory`` that is a
    directory there: found only at the end, it would leave some outputs new and others
    old, after all the scoring."""
    for name in names:
        path = Path(directory) / name
        if path.is_dir():
            raise FlagError(
                f"{flag}: {path} is a directory, but the command writes a file there; "
                "move or remove it"
            )
