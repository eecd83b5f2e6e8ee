"""Continue a published energy: a training state that starts from a checkpoint's energy.

The shipped checkpoints keep only the published energy (the moving average of the
weights); the runs' training states are not in git. To try a change to the last stage of
the recipe without retraining 9000 iterations, this writes a run directory whose
training state holds the published energy as the current iterate, with a fresh Adam, a
fresh moving average and a fresh persistent buffer, at step ``--step`` (the checkpoint's
own completed steps by default). ``vaebm train ebm --checkpoint OUT --resume --steps N``
then trains from there, with whatever flags the study wants:

    python benchmarks/warm_start.py --checkpoint checkpoints/fashion-mnist --out runs/ws
    source benchmarks/shipped_ebm_flags.sh
    vaebm train ebm --checkpoint runs/ws "${SHIPPED_EBM_FLAGS[@]}" --resume --steps 10500 \\
      --lr 2e-5 --corruption-blur-min 1 --corruption-blur-max 13 --corruption-weight 4

The buffer size, moving-average decay and Adam settings must be those the resumed run
uses (the resume checks the state's shape against them). Comparisons belong against a
warm start without the change: the published energy's own state (its Adam moments, its
buffer, the average's history) is not what this starts from.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from command_line import this_command

from model.checkpoint import load_checkpoint, save_checkpoint
from model.vaebm import PersistentBuffer
from training.runtime import rng_state, save_state, state_digest
from training.train_ebm import STATE_NAME, VAE_DIGEST, averaged_energy, energy_optimizer


def warm_start(
    checkpoint: Path,
    out: Path,
    *,
    step: int | None,
    buffer_size: int,
    ema_decay: float,
    beta1: float,
    weight_decay: float,
    seed: int,
) -> int:
    """Write ``out`` (a copy of ``checkpoint``) and its training state; returns the step
    the state is at. Refuses an ``out`` that already holds a checkpoint."""
    if (out / "config.json").exists():
        raise FileExistsError(f"{out} already holds a checkpoint; choose a new directory")
    torch.manual_seed(seed)
    model, info = load_checkpoint(checkpoint)
    energy, vae = model.energy, model.vae
    ebm = info.training.get("ebm", {})
    at = int(ebm.get("completed_steps", 0)) if step is None else step
    optimizer = energy_optimizer(energy, 1e-5, beta1, weight_decay)  # lr: set every step
    state = {
        "energy": energy.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": rng_state(),
        "step": at,
        "seconds": 0.0,
        "metrics": dict(info.metrics.get("ebm", {})),
        VAE_DIGEST: state_digest(vae.state_dict()),
    }
    if buffer_size:
        state["buffer"] = PersistentBuffer(vae, buffer_size).state_dict()
    ema = averaged_energy(energy, ema_decay)
    if ema is not None:
        state["ema"] = ema.state_dict()
    # Beside "ebm", which the resumed run rewrites with its own arguments: kept after it.
    info.training = {
        **info.training,
        "ebm_warm_start": {"from": str(checkpoint), "step": at, "command": this_command()},
    }
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out, model, info)
    save_state(out / STATE_NAME, state)
    return at


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="a new run directory")
    parser.add_argument(
        "--step", type=int, default=None, help="default: the checkpoint's completed steps"
    )
    parser.add_argument("--buffer-size", type=int, default=10000)  # the shipped recipe's
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--beta1", type=float, default=0.99)
    parser.add_argument("--weight-decay", type=float, default=3e-5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    at = warm_start(
        args.checkpoint,
        args.out,
        step=args.step,
        buffer_size=args.buffer_size,
        ema_decay=args.ema_decay,
        beta1=args.beta1,
        weight_decay=args.weight_decay,
        seed=args.seed,
    )
    print(f"{args.out}: {args.checkpoint}'s energy as a training state at step {at}")


if __name__ == "__main__":
    main()
