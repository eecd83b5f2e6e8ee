"""Export a training run's last iterate of the energy as a checkpoint of its own.

With ``--ema-decay`` a run publishes a moving average of the energy's weights; the paper
publishes the last iterate, which training keeps in ``train_state_ebm.pt``. This writes a
checkpoint with the run's frozen VAE and that last iterate, so that the benchmark scripts
can measure what the average changed:

    python benchmarks/last_iterate.py --run runs/blur-w4 --out runs/blur-w4-last-iterate

The run directory is only read. The new checkpoint records the step it was taken at under
``training.ebm.published`` and has no calibration (run ``vaebm calibrate`` on it to serve).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from model.checkpoint import load_checkpoint, save_checkpoint
from training.runtime import load_state
from training.train_ebm import STATE_NAME


def export_last_iterate(run: Path, out: Path) -> str:
    """Write the last iterate of ``run``'s energy with its VAE into ``out``; returns the
    new weights' sha256. Refuses an ``out`` that already holds a checkpoint."""
    if (out / "config.json").exists():
        raise FileExistsError(f"{out} already holds a checkpoint; choose a new directory")
    state = load_state(run / STATE_NAME)
    model, info = load_checkpoint(run)  # weights are written from host memory anyway
    model.energy.load_state_dict(state["energy"])
    ebm = info.training.get("ebm", {})
    info.training = {
        **info.training,
        "ebm": {**ebm, "published": f"last iterate, step {state['step']}"},
    }
    out.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(out, model, info)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a run directory with its state")
    parser.add_argument("--out", type=Path, required=True, help="a new checkpoint directory")
    args = parser.parse_args()
    digest = export_last_iterate(args.run, args.out)
    print(f"{args.out}: last iterate of {args.run}, weights {digest[:16]}")


if __name__ == "__main__":
    main()
