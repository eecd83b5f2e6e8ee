"""Pick the compute device: CUDA when present, CPU otherwise."""

from __future__ import annotations

import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda")
DEVICE_FORMS = "auto, cpu, cuda or cuda:N (N a GPU index: 0, 1, ...)"


def check_device_name(name: str) -> str:
    """``name`` if it has the form of a device, else ValueError saying what is allowed.

    Only the spelling is checked (no GPU is touched), so the command line, the service's
    settings and :func:`select_device` can share one rule and reject ``cuda:x`` or
    ``cuda:-1`` before any work starts.
    """
    index = name.removeprefix("cuda:") if name.startswith("cuda:") else None
    if name in DEVICE_CHOICES or (index is not None and index.isascii() and index.isdigit()):
        return name
    raise ValueError(f"device must be {DEVICE_FORMS}, got {name!r}")


def select_device(name: str = "auto") -> torch.device:
    """Resolve ``auto``/``cpu``/``cuda``/``cuda:N`` to a device.

    On CPU, denormal floats are flushed to zero: Langevin and EBM steps produce many
    tiny gradients, and denormal arithmetic made them about 5x slower.

    On CUDA, convolutions run in full float32 (PyTorch's default is TF32, 10 mantissa
    bits) and cuDNN picks deterministic algorithms: thresholds calibrated on one device
    must hold on another, and ``/sample`` promises the same images for the same seed
    (benchmarks/cuda_check.py measures both).
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(check_device_name(name))
    if device.type == "cuda":
        _check_cuda_index(name, device)
    if device.type == "cpu":
        torch.set_flush_denormal(True)
    else:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.deterministic = True
    return device


def _check_cuda_index(name: str, device: torch.device) -> None:
    """Refuse a CUDA device that is not there now, rather than fail at the first tensor."""
    if not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    count = torch.cuda.device_count()
    if device.index is not None and count and device.index >= count:
        raise ValueError(
            f"device {name!r} requested but only {count} CUDA device(s) are visible (cuda:0 to "
            f"cuda:{count - 1})"
        )
