"""Measure several checkpoints given as ``--run NAME=DIR`` into one JSON file of entries.

Shared by the study scripts that compare runs side by side (``energy_tail.py``,
``flip_cost.py``): each run is loaded, measured, and recorded under its name with its
directory, the sha256 of its weights and the command, other entries kept. The file is
rewritten atomically after every run, so an interrupted comparison keeps what it measured.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from model.checkpoint import CheckpointInfo, atomic_write_json, load_checkpoint
from model.vaebm import VAEBM


def parse_run(spec: str) -> tuple[str, str]:
    """``NAME=DIR`` -> (name, directory); exits with a clear message otherwise."""
    name, _, directory = spec.partition("=")
    if not name or not directory:
        sys.exit(f"--run wants NAME=DIR, got {spec!r}")
    return name, directory


def measure_runs(
    specs: Sequence[str],
    measure: Callable[[VAEBM, CheckpointInfo], dict],
    *,
    out: Path,
    command: str,
    device: torch.device,
) -> dict[str, dict]:
    """Load each ``NAME=DIR`` checkpoint, record ``measure(model, info)`` under NAME in
    ``out`` (with the run's directory, weights hash and ``command``); returns all entries."""
    runs = [parse_run(spec) for spec in specs]  # every spec checked before any work
    entries = json.loads(out.read_text()) if out.exists() else {}
    for name, directory in runs:
        model, info = load_checkpoint(directory, device)
        entries[name] = {
            **measure(model, info),
            "run": directory,
            "weights_sha256": info.weights_sha256,
            "command": command,
        }
        print(name, entries[name], flush=True)
        atomic_write_json(out, entries)
    return entries
