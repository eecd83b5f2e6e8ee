"""Pick the compute device: CUDA when present, CPU otherwise."""

from __future__ import annotations

import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda")


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
    if not (name in DEVICE_CHOICES or name.startswith("cuda:")):
        raise ValueError(f"device must be one of {DEVICE_CHOICES} or cuda:N, got {name!r}")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    if device.type == "cpu":
        torch.set_flush_denormal(True)
    else:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.deterministic = True
    return device
