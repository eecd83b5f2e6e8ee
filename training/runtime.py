"""What both training stages share: distributed context, batches, resumable state.

Batches are a pure function of (seed, step), so a resumed run draws exactly the
batches the uninterrupted run would have drawn; the only other randomness is the
global torch RNG, saved with the training state.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from model.checkpoint import (
    CONFIG_NAME,
    CheckpointError,
    atomic_write_bytes,
    describe_exception,
    read_config,
)
from model.device import select_device
from model.likelihood import to_unit_range
from training.flags import FlagError, flag_name

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
    # Modulo 2**64, the seeds a generator takes: any seed below 2**63 is allowed.
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**64)
    perm = torch.randperm(num_items, generator=generator)
    batch = perm[within * batch_size : (within + 1) * batch_size]
    return batch[ctx.rank :: ctx.world_size]


def training_batch(
    images: torch.Tensor, step: int, batch_size: int, seed: int, flip: bool, ctx: DistContext
) -> torch.Tensor:
    """This rank's share of training batch ``step`` (:func:`batch_indices`) of the uint8
    ``images``, on the device in the model's unit range, randomly mirrored when ``flip``:
    the positives both stages train on."""
    idx = batch_indices(len(images), batch_size, step, seed, ctx)
    batch = to_unit_range(images[idx].to(ctx.device))
    return random_horizontal_flip(batch) if flip else batch


def check_batches(num_items: int, batch_size: int, ctx: DistContext, prefix: str = "") -> None:
    """Refuse batches that leave a process without images (under torchrun): its mean
    over nothing would be NaN, and the run would stop as a false divergence."""
    per_batch = min(num_items, batch_size)
    if per_batch < ctx.world_size:
        raise FlagError(
            f"{flag_name('batch_size', prefix)} {batch_size} with {num_items} training "
            f"images gives batches of {per_batch}, fewer than the {ctx.world_size} "
            "processes: use a larger batch or more images"
        )


def progress_bar(**kwargs: Any) -> tqdm:
    """A tqdm progress bar that, written to a file or a pipe rather than a terminal,
    redraws every 30 s instead of ten times a second: a log keeps the progress, not
    thousands of bar lines."""
    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", 30.0)
        kwargs.setdefault("maxinterval", kwargs["mininterval"])  # tqdm's monitor: 10 s
    return tqdm(**kwargs)


def random_horizontal_flip(images: torch.Tensor) -> torch.Tensor:
    """Mirror each image (N, C, H, W) left to right with probability 1/2 (the global RNG,
    which a resumed run restores), as the paper does to its training images."""
    flip = torch.rand(len(images), device=images.device) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(3), images)


STATE_DIGEST = "sha256"  # the entry of a saved state that holds state_digest() of the rest


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Write a resumable training state atomically (loadable with weights_only=True),
    with the digest of its content, which :func:`load_state` checks: torch.load checks
    no checksum, so a flipped byte in a tensor would otherwise be resumed from silently."""
    buffer = io.BytesIO()
    torch.save({**state, STATE_DIGEST: state_digest(state)}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_state(path: Path) -> dict[str, Any]:
    """Read a training state written by :func:`save_state` (without its digest).

    Raises
    ------
    CheckpointError
        Naming the file and the cause, whatever torch.load raised: a truncated, empty or
        foreign file surfaces there as almost any exception type (RuntimeError,
        EOFError, KeyError, UnpicklingError, OSError "Invalid argument", ...); or a
        content that does not match its digest (a state saved before digests were
        recorded has none, and is read unchecked).
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path} cannot be read as a training state ({describe_exception(exc)}): it is "
            "truncated or corrupt; restore it, or train afresh without --resume"
        ) from exc
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{path} is not a training state (it holds no step)")
    expected = state.pop(STATE_DIGEST, None)
    if expected is not None and expected != state_digest(state):
        raise CheckpointError(
            f"{path} does not match the checksum saved in it: it is corrupt; restore it, "
            "or train afresh without --resume"
        )
    return state


def state_digest(state: Any) -> str:
    """sha256 of a training state's content: every tensor's dtype, shape and bytes, and
    every other value's repr, in the nesting and order torch.save keeps."""
    digest = hashlib.sha256()
    _feed(digest, state)
    return digest.hexdigest()


def _feed(digest: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"T{t.dtype}{tuple(value.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        digest.update(f"D{len(value)}".encode())
        for key, item in value.items():
            _feed(digest, key)
            _feed(digest, item)
    elif isinstance(value, list | tuple):
        digest.update(f"{type(value).__name__}{len(value)}".encode())
        for item in value:
            _feed(digest, item)
    else:
        digest.update(f"{type(value).__name__}:{value!r};".encode())


CHECKPOINT_FILES = (CONFIG_NAME, "weights-*.safetensors")  # what training publishes
# Each stage's resumable training state, beside the checkpoint (both stages share a folder
# by default).
STATE_NAMES = {"vae": "train_state_vae.pt", "ebm": "train_state_ebm.pt"}


def remove_stale_temp_files(out: Path, names: Sequence[str]) -> None:
    """Delete the temp files a command killed while saving left in ``out``, those of the
    files ``names`` (glob patterns allowed) that it writes; atomic writes keep them from
    being read, but nothing else would ever remove them. Call before the command writes
    anything: a temp file of its own saves would be in use."""
    for name in names:
        for stale in out.glob(f".{name}.*.tmp"):
            log.info("removing %s, left by a run killed while saving", stale)
            stale.unlink(missing_ok=True)


@contextlib.contextmanager
def restoring(path: Path) -> Iterator[None]:
    """Report a training state that reads but does not fit this run (a missing entry, an
    optimizer of other parameters, ...) as a CheckpointError naming the file."""
    try:
        yield
    except (CheckpointError, torch.OutOfMemoryError):  # the device's fault, not the file's
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        raise CheckpointError(
            f"{path} does not fit this run ({describe_exception(exc)}); train afresh "
            "without --resume, or into another --out"
        ) from exc


def check_resumable(
    out: Path, state_name: str, stage: str, args: Any, names: Sequence[str], prefix: str = ""
) -> None:
    """Refuse ``--resume`` without a training state in ``out``, or with an architecture
    flag that differs from the saved run's (recorded in config.json), naming the flags.

    Checked before any work: resuming is explicit, so a missing state is an error rather
    than a silent fresh start, and a changed architecture cannot load the saved weights.
    """
    if not (out / state_name).is_file():
        raise FlagError(
            f"--resume: there is no training state {state_name} in {out}, so nothing to "
            "resume; leave out --resume to start afresh"
        )
    saved = _saved_settings(out, stage)
    changed = [
        f"{flag_name(name, prefix)} {_shown(getattr(args, name))} "
        f"(saved run: {_shown(saved[name])})"
        for name in names
        if name in saved and not _same(saved[name], getattr(args, name))
    ]
    if changed:
        verb = "differs" if len(changed) == 1 else "differ"
        raise FlagError(
            f"--resume: {', '.join(changed)} {verb} from the run saved in {out}; resume "
            "with the saved values, or train afresh into another --out"
        )


def check_resume_or_overwrite(args: Any) -> None:
    """Refuse ``--resume`` with ``--overwrite``: one continues the saved run, the other
    replaces it."""
    if args.resume and args.overwrite:
        raise FlagError(
            "--resume continues the saved run and --overwrite replaces it: pass one of them"
        )


def check_fresh_output(out: Path, state_name: str, stage: str, flag: str) -> None:
    """Refuse to start a run afresh in a directory that holds one of this stage: its
    training state, or a checkpoint that publishes the stage (a trained VAE, or energy).
    A fresh run would replace it without a word; ``--resume`` continues it and
    ``--overwrite`` says to replace it. ``flag`` names where ``out`` came from."""
    held = []
    if (out / state_name).is_file():
        held.append(f"a training state ({state_name})")
    if completed_steps(out, stage) is not None:
        held.append(f"a checkpoint with a trained {'VAE' if stage == 'vae' else 'energy'}")
    if held:
        raise FlagError(
            f"{flag} {out} already holds {' and '.join(held)}, which a fresh run would "
            "replace: pass --resume to continue it, --overwrite to replace it, or choose "
            f"another {flag}"
        )


def completed_steps(out: Path, stage: str) -> int | None:
    """The steps of ``stage`` ("vae" or "ebm") that the checkpoint in ``out`` publishes;
    None without a readable checkpoint. A training state ahead of it is a run killed
    between its two saves (the state is written first)."""
    try:
        return read_config(out).get("training", {}).get(stage, {}).get("completed_steps")
    except CheckpointError:
        return None


def _saved_settings(out: Path, stage: str) -> dict[str, Any]:
    """The settings config.json in ``out`` records for ``stage``; {} when there is no
    config.json (a run killed before its first checkpoint: the state file alone is then
    checked). A config.json that cannot be read is an error: resuming past it would skip
    these checks and then overwrite it."""
    if not (out / CONFIG_NAME).exists():
        return {}
    try:
        return read_config(out).get("training", {}).get(stage, {})
    except CheckpointError as exc:
        raise CheckpointError(
            f"--resume: {exc}; restore it, or train afresh without --resume"
        ) from exc


def _same(saved: Any, given: Any) -> bool:
    """Equal as settings: JSON turned tuples into lists, and 0 and 0.0 are one value."""
    if isinstance(saved, list | tuple) and isinstance(given, list | tuple):
        return len(saved) == len(given) and all(map(_same, saved, given))
    if isinstance(saved, int | float) and isinstance(given, int | float):
        return float(saved) == float(given)
    return saved == given


def _shown(value: Any) -> str:
    """A setting as the command line writes it (a tuple as its items, 1e-05 as 1e-05)."""
    return " ".join(map(str, value)) if isinstance(value, list | tuple) else str(value)


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


def check_gradients(step: int, grad_norm: torch.Tensor) -> None:
    """Raise DivergenceError on a NaN gradient norm, before the update would make every
    weight NaN. An infinite norm (finite gradients whose squares overflow) is left to
    the clipping, which scales such gradients to zero, as before this check."""
    if torch.isnan(grad_norm):
        raise DivergenceError(f"step {step}: the gradient norm is NaN")


def check_finite_weights(step: int, module: nn.Module) -> None:
    """Raise DivergenceError if a weight is NaN or infinite, before it is saved: a
    checkpoint must never publish weights that score every image NaN. Every rank runs
    it (DDP keeps the weights equal), so all ranks stop together."""
    bad = [name for name, p in module.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise DivergenceError(f"step {step}: non-finite weights in {', '.join(bad[:3])}")


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
