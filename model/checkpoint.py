"""Checkpoint directories: safetensors weights plus a config.json that rebuilds the model.

Layout of a checkpoint directory::

    config.json                    architecture, image shape, data, training args,
                                   metrics, package version, weights file + sha256
    weights-<sha256[:16]>.safetensors
    calibration.json               (optional, written by `vaebm calibrate`)

Every file is written atomically (temp file, fsync, rename). The weights file
carries its hash in its name and config.json is written last, so a crash at any
moment leaves the previous config pointing at intact weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from model.energy import EnergyConfig, EnergyNet
from model.vae import VAE, VAEConfig
from model.vaebm import VAEBM

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
REQUIRED_KEYS = ("format_version", "name", "vae", "energy", "weights_file", "weights_sha256")
OPTIONAL_SECTIONS = ("data", "training", "metrics")  # JSON objects when present
STAGES = ("vae", "ebm")  # each an object in training and metrics when present


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing, truncated or inconsistent."""


@dataclass
class CheckpointInfo:
    """Everything config.json says besides the architecture."""

    name: str
    version: str = "0.1.0"
    data: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    weights_sha256: str = ""

    @property
    def langevin_step_size(self) -> float:
        """The Langevin step size the energy was trained with: the default for sampling."""
        return float(self.training.get("ebm", {}).get("step_size", 1e-4))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            # mkstemp makes 0600 files; checkpoints must stay readable by other users
            # (a container's service user reading a mounted checkpoint, say).
            os.fchmod(f.fileno(), 0o644)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def save_checkpoint(directory: str | os.PathLike, model: VAEBM, info: CheckpointInfo) -> str:
    """Write the model's weights and config.json into ``directory``; returns the weights sha256."""
    directory = Path(directory)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    blob = save(tensors)
    digest = sha256_bytes(blob)
    weights_file = f"weights-{digest[:16]}.safetensors"
    atomic_write_bytes(directory / weights_file, blob)
    info.weights_sha256 = digest
    config = {
        "format_version": FORMAT_VERSION,
        "name": info.name,
        "version": info.version,
        "package_version": _package_version(),
        "vae": model.vae.config.to_dict(),
        "energy": model.energy.config.to_dict(),
        "image_shape": list(model.vae.image_shape),
        "preprocessing": "uint8 levels mapped to [-1, 1] by x * 2/255 - 1; channel-first",
        "data": info.data,
        "training": info.training,
        "metrics": info.metrics,
        "weights_file": weights_file,
        "weights_sha256": digest,
    }
    atomic_write_json(directory / CONFIG_NAME, config)
    for old in directory.glob("weights-*.safetensors"):
        if old.name != weights_file:
            old.unlink(missing_ok=True)
    return digest


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """Read and check config.json of a checkpoint directory."""
    path = Path(directory) / CONFIG_NAME
    if Path(directory).is_file():
        raise CheckpointError(f"checkpoint directory {directory} is a file, not a directory")
    if not Path(directory).is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: not a checkpoint directory")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); the file is corrupt") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in config]
    if missing:
        raise CheckpointError(f"{path} lacks required keys {missing}")
    for key in ("name", "weights_file", "weights_sha256", "version"):
        if key in config and not isinstance(config[key], str):
            raise CheckpointError(f"{path}: {key} must be a string, got {config[key]!r}")
    if config["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format_version {config['format_version']}, expected {FORMAT_VERSION}"
        )
    _check_sections(path, config)
    return config


def _check_sections(path: Path, config: dict[str, Any]) -> None:
    """The optional sections' types, and the few of their values that code reads (the
    split, the Langevin step size), so that a hand-edited config.json is refused here,
    naming the key, instead of failing with a traceback wherever the value is used."""
    for key in OPTIONAL_SECTIONS:
        _expect(path, key, config.get(key, {}), dict, "a JSON object")
    for key in ("training", "metrics"):
        for stage in STAGES:
            _expect(path, f"{key}.{stage}", config.get(key, {}).get(stage, {}), dict, "an object")
    data = config.get("data", {})
    _expect(path, "data.source", data.get("source", ""), str, "a string")
    fraction = data.get("val_fraction", 0.0)
    if not _is_number(fraction) or not 0 <= fraction < 1:
        raise CheckpointError(f"{path}: data.val_fraction must be in [0, 1), got {fraction!r}")
    split_seed = data.get("split_seed", 0)
    if not _is_int(split_seed) or split_seed < 0:
        raise CheckpointError(
            f"{path}: data.split_seed must be an integer >= 0, got {split_seed!r}"
        )
    step_size = config.get("training", {}).get("ebm", {}).get("step_size", 0.0)
    if not _is_number(step_size) or not 0 <= step_size < math.inf:
        raise CheckpointError(
            f"{path}: training.ebm.step_size must be a finite number >= 0, got {step_size!r}"
        )


def _expect(path: Path, key: str, value: Any, kind: type, what: str) -> None:
    if not isinstance(value, kind):
        raise CheckpointError(f"{path}: {key} must be {what}, got {value!r}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return (_is_int(x) or isinstance(x, float)) and math.isfinite(x)


def _architecture(
    path: Path, config: dict[str, Any], key: str, cls: type[VAEConfig] | type[EnergyConfig]
) -> Any:
    """``cls`` (VAEConfig or EnergyConfig) from config.json's section ``key``, each field
    checked against its type first: a string where a channel count belongs would
    otherwise fail deep in torch with a message naming neither the file nor the key."""
    section = config[key]
    _expect(path, key, section, dict, "a JSON object")
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(section) - set(hints))
    if unknown:
        raise CheckpointError(f"{path}: invalid architecture in {key}: unknown fields {unknown}")
    for name, value in section.items():
        expected = _expected_kind(hints[name], value)
        if expected:
            raise CheckpointError(
                f"{path}: invalid architecture: {key}.{name} must be {expected}, got {value!r}"
            )
    try:
        return cls.from_dict(section)
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(
            f"{path}: invalid architecture in {key} ({describe_exception(exc)})"
        ) from exc


def _expected_kind(kind: Any, value: Any) -> str:
    """What an architecture field of type ``kind`` must be, if ``value`` is not; else ""."""
    if kind is str:
        return "" if isinstance(value, str) else "a string"
    if kind is int:
        return "" if _is_int(value) and value >= 0 else "an integer >= 0"
    ok = isinstance(value, list) and value and all(_is_int(v) and v >= 0 for v in value)
    return "" if ok else "a list of integers >= 0"  # a tuple of ints, as JSON writes it


def load_state_strictly(module: torch.nn.Module, state: Mapping[str, Any], what: str) -> None:
    """``module.load_state_dict(state, strict=True)``; a state of another architecture is
    a CheckpointError ``"{what}: <one-line summary>"`` instead of torch's line per tensor.

    The summary is worked out only on failure, so a load that fits (every start-up)
    builds no second state dict for it.
    """
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        mismatch = describe_mismatch(module.state_dict(), state) or describe_exception(exc)
        raise CheckpointError(f"{what}: {mismatch}") from exc


def describe_mismatch(expected: Mapping[str, Any], got: Mapping[str, Any]) -> str:
    """How a saved state dict differs from a model's, in one line ("" when it fits):
    counts of missing, unexpected and reshaped tensors, with the first example of each,
    instead of torch's line per tensor."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    reshaped = [k for k in expected if k in got and tuple(expected[k].shape) != tuple(got[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensors missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})")
    if reshaped:
        k = reshaped[0]
        parts.append(
            f"{len(reshaped)} tensors of another shape (e.g. {k}: saved "
            f"{tuple(got[k].shape)}, expected {tuple(expected[k].shape)})"
        )
    return "; ".join(parts)


def describe_exception(exc: BaseException, limit: int = 160) -> str:
    """An exception's type and the first sentence of its message, shortened: torch's
    messages run to paragraphs, and an error must stay one line."""
    lines = str(exc).strip().splitlines()
    text = lines[0].split(". ")[0].rstrip(".") if lines else ""
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def load_checkpoint(
    directory: str | os.PathLike, device: torch.device | str = "cpu"
) -> tuple[VAEBM, CheckpointInfo]:
    """Rebuild the model from a checkpoint directory, checking every file on the way.

    Raises
    ------
    CheckpointError
        The directory, config.json or weights are missing, corrupt, truncated, or
        do not match each other (hash, tensor names or shapes).
    """
    directory = Path(directory)
    config = read_config(directory)
    weights = directory / config["weights_file"]
    if not weights.is_file():
        raise CheckpointError(f"weights file {weights} named in config.json is missing")
    actual = sha256_file(weights)
    if actual != config["weights_sha256"]:
        raise CheckpointError(
            f"{weights} has sha256 {actual[:16]}..., config.json expects "
            f"{config['weights_sha256'][:16]}...: the file is truncated, corrupt or replaced"
        )
    path = directory / CONFIG_NAME
    vae_config = _architecture(path, config, "vae", VAEConfig)
    energy_config = _architecture(path, config, "energy", EnergyConfig)
    try:
        model = VAEBM(VAE(vae_config), EnergyNet(energy_config))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: invalid architecture ({describe_exception(exc)})") from exc
    try:
        state = load_file(weights)
    except SafetensorError as exc:
        raise CheckpointError(
            f"{weights} does not match the architecture: not a safetensors file ({exc})"
        ) from exc
    load_state_strictly(model, state, f"{weights} does not match the architecture")
    info = CheckpointInfo(
        name=config["name"],
        version=config.get("version", "0.1.0"),
        data=config.get("data", {}),
        training=config.get("training", {}),
        metrics=config.get("metrics", {}),
        weights_sha256=config["weights_sha256"],
    )
    model.eval().requires_grad_(False)
    return model.to(device), info


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("vaebm-ood")
    except Exception:  # not installed (running from a source tree)
        return "unknown"
