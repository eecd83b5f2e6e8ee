"""What both training stages share: distributed context, batches, resumable state.

Batches are a pure function of (seed, step), so a resumed run draws exactly the
batches the uninterrupted run would have drawn; the only other randomness is the
global torch RNG, saved with the training state.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from model.checkpoint import atomic_write_bytes
from model.device import select_device

log = logging.getLogger(__name__)


class DivergenceError(RuntimeError):
    """Training produced NaN/inf or an exploding energy; the last good checkpoint is kept."""


@dataclass(frozen=True)
class DistContext:
    """Rank and world size under torchrun (a single process otherwise)."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(device_name: str) -> DistContext:
    """Join the process group when launched by torchrun (gloo on CPU, NCCL on GPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world_size == 1:
        return DistContext(0, 1, select_device(device_name))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = select_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistContext(rank, world_size, device)


def teardown_distributed(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def batch_indices(
    num_items: int, batch_size: int, step: int, seed: int, ctx: DistContext
) -> torch.Tensor:
    """Indices of this rank's share of global batch ``step``.

    Each epoch is a fresh permutation seeded by (seed, epoch); a global batch is a
    contiguous slice of it, split between ranks by striding.
    """
    per_epoch = max(num_items // batch_size, 1)
    epoch, within = divmod(step, per_epoch)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(num_items, generator=generator)
    batch = perm[within * batch_size : (within + 1) * batch_size]
    return batch[ctx.rank :: ctx.world_size]


def random_horizontal_flip(images: torch.Tensor) -> torch.Tensor:
    """Mirror each image (N, C, H, W) left to right with probability 1/2 (the global RNG,
    which a resumed run restores), as the paper does to its training images."""
    flip = torch.rand(len(images), device=images.device) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(3), images)


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Write a resumable training state atomically (loadable with weights_only=True)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_state(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def check_finite(step: int, **values: float) -> None:
    """Raise DivergenceError if any logged value is NaN or infinite."""
    bad = {k: v for k, v in values.items() if not torch.isfinite(torch.tensor(v))}
    if bad:
        raise DivergenceError(f"step {step}: non-finite values {bad}")


def all_reduce_mean(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Average a scalar across ranks (for logging the same number everywhere)."""
    if ctx.distributed:
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= ctx.world_size
    return value


def dataclass_dict(obj: Any) -> dict[str, Any]:
    """A dataclass as a JSON-friendly dict (tuples become lists)."""
    out = {}
    for f in fields(obj):
        v = getattr(obj, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out
