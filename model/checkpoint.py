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
import os
import tempfile
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
    return config


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
    try:
        vae = VAE(VAEConfig.from_dict(config["vae"]))
        energy = EnergyNet(EnergyConfig.from_dict(config["energy"]))
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{directory / CONFIG_NAME}: invalid architecture ({exc})") from exc
    model = VAEBM(vae, energy)
    try:
        state = load_file(weights)
        model.load_state_dict(state, strict=True)
    except (SafetensorError, RuntimeError) as exc:
        raise CheckpointError(f"{weights} does not match the architecture: {exc}") from exc
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
