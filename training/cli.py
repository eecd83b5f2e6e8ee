"""The ``vaebm`` command: train, sample, calibrate, evaluate, serve.

Each subcommand's flags are generated from one dataclass of defaults (training/arguments.py), so a
default is written once (in the dataclass), each flag's meaning once (in the
dataclass's numpydoc ``Parameters`` section), its allowed values once (the field's
check, see training/flags.py), and ``--help`` shows them.

Bad input of any kind (a flag, a file, a checkpoint) ends the command with exit
code 2 and one error line naming what was wrong; Ctrl-C with 130 and one line.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from training.arguments import add_dataclass_arguments, dataclass_from_args, field_descriptions
from training.entry import EXIT_INTERRUPTED, INTERRUPTED_BEFORE_START
from training.flags import FlagError, argparse_type

log = logging.getLogger("vaebm")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
EXIT_BAD_INPUT = 2
GLOBAL_FLAGS = ("-v", "--verbose")
SAMPLE_STEPS = 16  # `vaebm sample`'s Langevin steps when --steps is not given


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (the usage of ``vaebm train vae``
    alone runs to twenty), pointing at ``--help`` instead; exit code 2 as argparse's."""

    def error(self, message: str) -> typing.NoReturn:
        hint = f"see `{self.prog} --help`"
        if message.startswith("unrecognized arguments:") and set(message.split()) & set(
            GLOBAL_FLAGS
        ):
            hint = "-v goes before the command: `vaebm -v COMMAND ...`"
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} ({hint})\n")


# `train all` runs both stages on one checkpoint directory with one device and seed.
SHARED_BY_STAGES = ("checkpoint", "out", "device", "resume", "overwrite", "seed")


def _stage_args(ns: argparse.Namespace) -> tuple[Any, Any]:
    """The (VAE, EBM) settings of a ``train`` command line; None for a stage not run."""
    from training.train_ebm import EBMTrainArgs
    from training.train_vae import VAETrainArgs

    vae_args = dataclass_from_args(VAETrainArgs, ns) if ns.stage in ("vae", "all") else None
    if ns.stage == "ebm":
        return vae_args, dataclass_from_args(EBMTrainArgs, ns)
    if ns.stage == "all":
        shared = {name: getattr(ns, name) for name in SHARED_BY_STAGES if name != "checkpoint"}
        return vae_args, dataclass_from_args(EBMTrainArgs, ns, "ebm_", checkpoint=ns.out, **shared)
    return vae_args, None


def _train(ns: argparse.Namespace) -> int:
    from training import train_ebm, train_vae
    from training.runtime import (
        STATE_NAMES,
        DivergenceError,
        setup_distributed,
        teardown_distributed,
    )

    vae_args, ebm_args = _stage_args(ns)
    prefix = "ebm_" if ns.stage == "all" else ""
    # Every stage's flags before any work: `train all` must not meet a bad --ebm- flag
    # after its VAE stage.
    if vae_args is not None:
        train_vae.check_args(vae_args)
    if ebm_args is not None:
        train_ebm.check_args(ebm_args, prefix)
    ctx = setup_distributed(ns.device)
    stage, out, resumed = "vae", Path(ns.out), ns.resume
    started = time.time()
    try:
        if vae_args is not None:
            log.info("VAE stage done: %s", train_vae.train_vae(vae_args, ctx))
        if ebm_args is not None:
            stage, out = "ebm", Path(ebm_args.out or ebm_args.checkpoint)
            if ns.stage == "all":  # a finished or killed VAE stage leaves no EBM state yet
                ebm_args.resume = ns.resume and (out / train_ebm.STATE_NAME).is_file()
            resumed = ebm_args.resume
            log.info("EBM stage done: %s", train_ebm.train_ebm(ebm_args, ctx, prefix))
    except DivergenceError as exc:
        log.error("training diverged: %s. The last good checkpoint is kept.", exc)
        return 3
    except KeyboardInterrupt:
        vae_done = ns.stage == "all" and stage == "ebm"
        message = interrupted_training(
            stage,
            out,
            since=started,
            vae_done=vae_done,
            resumed=resumed,
            overwrite=ns.overwrite,
            state_name=STATE_NAMES[stage],
        )
        log.error("%s", message)
        return EXIT_INTERRUPTED
    finally:
        teardown_distributed(ctx)
    if ctx.is_main:
        log.info("%s", next_steps(out, energy_trained=ebm_args is not None))
    return 0


def next_steps(out: Path, *, energy_trained: bool) -> str:
    """Where the checkpoint is and what a user runs next (the service refuses a
    checkpoint without a calibration)."""
    calibrate = f"`vaebm calibrate --checkpoint {out} --data HELD_OUT_IMAGES`"
    if not energy_trained:
        return (
            f"checkpoint written to {out}; next: `vaebm train ebm --checkpoint {out}` for "
            f"the energy, then {calibrate}"
        )
    return (
        f"checkpoint written to {out}; next: {calibrate}, then `VAEBM_CHECKPOINT={out} vaebm serve`"
    )


def interrupted_training(
    stage: str,
    out: Path,
    *,
    since: float,
    vae_done: bool,
    resumed: bool = False,
    overwrite: bool = False,
    state_name: str = "",
) -> str:
    """One line for Ctrl-C in a training stage: what is saved, and how to go on.

    Only a checkpoint written since ``since`` (the command's start) counts: an older run
    in the same folder is not this one's progress, unless this stage ``resumed`` it.
    ``vae_done``: ``train all`` was in its EBM stage, so the finished VAE is kept, and
    ``--resume`` skips to the EBM stage. ``overwrite``: the command had --overwrite,
    which --resume replaces. ``state_name``: the stage's training state, which a run
    killed before its first checkpoint may have written already.
    """
    from model.checkpoint import CONFIG_NAME
    from training.runtime import completed_steps

    try:
        fresh = resumed or (out / CONFIG_NAME).stat().st_mtime >= since
    except OSError:  # no checkpoint
        fresh = False
    step = completed_steps(out, stage) if fresh else None
    name = stage.upper()
    resume = "with --resume" + (" in place of --overwrite" if overwrite else "")
    state = out / state_name
    if step is None and state_name and state.is_file() and state.stat().st_mtime >= since:
        return (
            f"interrupted in the {name} stage before its first checkpoint; {out} holds its "
            f"training state: run the same command {resume} to continue from there"
        )
    if step is None and resumed:  # killed before its first checkpoint, then resumed
        return (
            f"interrupted in the {name} stage: {out} holds the training state it resumed "
            "from; run the same command (with --resume) to continue from there"
        )
    if step is None and vae_done:
        return (
            f"interrupted in the {name} stage before its first checkpoint; the finished VAE "
            f"stage is saved in {out}: run the same command {resume} to keep it and "
            "start the EBM stage afresh"
        )
    if step is None:
        return (
            f"interrupted in the {name} stage before its first checkpoint: nothing of it is "
            f"saved in {out}; run the same command again to start over"
        )
    return (
        f"interrupted in the {name} stage: {out} holds its checkpoint and training state "
        f"of step {step}; run the same command {resume} to continue from there"
    )


def _build_train_parser(sub: argparse._SubParsersAction) -> None:
    from training.train_ebm import EBMTrainArgs
    from training.train_vae import VAETrainArgs

    train = sub.add_parser("train", help="train a checkpoint: stage vae, then ebm, or all")
    stages = train.add_subparsers(dest="stage", required=True)
    add_dataclass_arguments(stages.add_parser("vae", help="stage 1: the VAE"), VAETrainArgs)
    add_dataclass_arguments(
        stages.add_parser("ebm", help="stage 2: the energy network, VAE frozen"), EBMTrainArgs
    )
    both = stages.add_parser("all", help="both stages; EBM flags take an --ebm- prefix")
    add_dataclass_arguments(both, VAETrainArgs)
    add_dataclass_arguments(both, EBMTrainArgs, prefix="ebm_", exclude=SHARED_BY_STAGES)
    train.set_defaults(func=_train)


def _calibrate(ns: argparse.Namespace) -> int:
    from training.calibrate import CalibrateArgs, calibrate

    calibration = calibrate(dataclass_from_args(CalibrateArgs, ns))
    for name, c in calibration.scores.items():
        log.info(
            "%-20s threshold %10.4f  FPR on held-out %.4f [%.4f, %.4f]",
            name,
            c.threshold,
            c.achieved_fpr,
            c.fpr_ci_low,
            c.fpr_ci_high,
        )
    log.info("wrote %s/calibration.json and calibration_report.md", ns.checkpoint)
    return 0


def _evaluate(ns: argparse.Namespace) -> int:
    from training.evaluate import EvaluateArgs, evaluate, parse_named_specs

    ood = parse_named_specs(ns.ood)
    report = evaluate(dataclass_from_args(EvaluateArgs, ns, in_data=ns.in_data, ood=ood))
    for ood_name, per_score in report["metrics"].items():
        best = max(per_score, key=lambda s: per_score[s]["auroc"])
        log.info("%s: best AUROC %.4f (%s)", ood_name, per_score[best]["auroc"], best)
    log.info("wrote %s/metrics.json and report.md", ns.out)
    return 0


def _sample(ns: argparse.Namespace) -> int:
    from model.checkpoint import atomic_write_bytes, load_checkpoint
    from model.device import select_device
    from model.grid import encode_png, image_grid
    from model.likelihood import to_uint8
    from training.flags import check_outside, check_writable_file

    check_vae_only(ns)
    check_writable_file(ns.out, "--out")
    check_outside(ns.out, ns.checkpoint, "--out", "--checkpoint")
    model, info = load_checkpoint(ns.checkpoint, select_device(ns.device))
    steps = 0 if ns.vae_only else SAMPLE_STEPS if ns.steps is None else ns.steps
    # 0 is a step size too (the chains stay where they start, at the VAE's samples).
    step_size = info.langevin_step_size if ns.step_size is None else ns.step_size
    images = model.sample(ns.n, steps=steps, step_size=step_size, seed=ns.seed)
    grid = image_grid(to_uint8(images).cpu().numpy())
    atomic_write_bytes(ns.out, encode_png(grid))
    log.info("wrote %d %s samples to %s", ns.n, "VAE-only" if ns.vae_only else "VAEBM", ns.out)
    return 0


def check_vae_only(ns: argparse.Namespace) -> None:
    """Refuse --vae-only with Langevin settings: it runs no Langevin, so they would be
    silently ignored, and the user would think they had taken effect."""
    settings = (("--steps", ns.steps), ("--step-size", ns.step_size))
    given = [flag for flag, value in settings if value is not None]
    if ns.vae_only and given:
        raise FlagError(f"--vae-only runs no Langevin steps: leave out {' and '.join(given)}")


DEVICE_HELP = "auto (CUDA when present, CPU otherwise), cpu, cuda or cuda:N (default: auto)"


def _build_other_parsers(sub: argparse._SubParsersAction) -> None:
    import training.flags as flags
    from training.calibrate import CalibrateArgs
    from training.evaluate import IN_DISTRIBUTION, EvaluateArgs

    cal = sub.add_parser("calibrate", help="set OOD thresholds on held-out in-distribution data")
    add_dataclass_arguments(cal, CalibrateArgs)
    cal.set_defaults(func=_calibrate)

    ev = sub.add_parser("evaluate", help="AUROC/AUPR/FPR95 of every score against OOD sets")
    texts = field_descriptions(EvaluateArgs)
    ev.add_argument(
        "--in",
        dest="in_data",
        required=True,
        type=argparse_type(flags.data_spec),
        help=f"{texts['in_data']} (required)",
    )
    ev.add_argument(
        "--ood",
        action="append",
        required=True,
        metavar="NAME=PATH",
        help=f"{texts['ood']} The name takes ASCII letters, digits, '-', '_' and '.' (not "
        f"first), and is not {IN_DISTRIBUTION!r} (the --in set's). Repeat for several "
        "(required).",
    )
    add_dataclass_arguments(ev, EvaluateArgs, exclude=("in_data", "ood"))
    ev.set_defaults(func=_evaluate)

    sm = sub.add_parser("sample", help="write a PNG grid of samples")
    sm.add_argument("--checkpoint", required=True, help="checkpoint directory to sample from")
    sm.add_argument(
        "-n",
        type=argparse_type(flags.sample_count),
        default=64,
        help=f"images in the grid, 1 to {flags.MAX_SAMPLE_N} (default: %(default)s)",
    )
    sm.add_argument(
        "--steps",
        type=argparse_type(flags.non_negative_int),
        default=None,
        help=f"Langevin steps in noise space (default: {SAMPLE_STEPS}; not with --vae-only)",
    )
    sm.add_argument(
        "--step-size",
        type=argparse_type(flags.sample_step_size),
        default=None,
        help="Langevin step size, in [0, 1] (0 leaves the VAE's samples as they are); "
        "default: the one the energy was trained with; not with --vae-only",
    )
    sm.add_argument(
        "--seed",
        type=argparse_type(flags.seed),
        default=0,
        help="seed of the prior draws and the chains (default: %(default)s)",
    )
    sm.add_argument("--vae-only", action="store_true", help="VAE samples, no Langevin")
    sm.add_argument("--out", default="samples.png", help="PNG file to write (default: %(default)s)")
    sm.add_argument("--device", type=argparse_type(flags.device), default="auto", help=DEVICE_HELP)
    sm.set_defaults(func=_sample)

    # Listed for --help only: main() hands `serve ...` to service.main before parsing.
    sub.add_parser("serve", help="run the HTTP scoring service (settings from VAEBM_* env)")


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _build_train_parser,
    _build_other_parsers,
]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="vaebm",
        description="VAEBM out-of-distribution scores for images: train a checkpoint, "
        "calibrate its thresholds, evaluate it against OOD sets, sample from it, serve it.",
        epilog="`vaebm COMMAND --help` explains each command's flags.",
        allow_abbrev=False,  # `--verb serve` would reach `serve` past main()'s dispatch
    )
    parser.add_argument(
        *GLOBAL_FLAGS,
        action="store_true",
        dest="verbose",
        help="debug logging, before any command (for serve: VAEBM_LOG_LEVEL=DEBUG)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    _remember_parsers(parser)
    return parser


def _remember_parsers(parser: argparse.ArgumentParser) -> None:
    """Record in each (sub)command's defaults its own parser, so that an error found
    after parsing (an unknown flag) names and points at ``vaebm train vae --help``
    rather than at ``vaebm``'s."""
    parser.set_defaults(parser=parser)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _remember_parsers(child)


# Ctrl-C outside training: what running the command again does (calibrate and evaluate
# keep the scores computed so far in a cache; sample keeps nothing).
INTERRUPTED = {
    "sample": "interrupted: nothing was written; run the same command again to start over",
    "calibrate": "interrupted: run the same command again to resume from the scores cached so far",
    "evaluate": "interrupted: run the same command again to resume from the scores cached so far",
}


def user_errors() -> tuple[type[Exception], ...]:
    """The errors that mean bad input or bad files, not a bug: reported in one line.

    A function, so that ``except user_errors()`` imports the model (and torch) only
    when an error is on its way, and ``vaebm --help`` stays quick.
    """
    from model.calibration_file import CalibrationError
    from model.checkpoint import CheckpointError

    return (ValueError, OSError, CheckpointError, CalibrationError)


def one_line(exc: BaseException) -> str:
    """An error message as one line, whatever a library put in it."""
    return " ".join(str(exc).split("\n")) or type(exc).__name__


def split_global_flags(argv: list[str]) -> tuple[bool, list[str]]:
    """(verbose, the rest): the global flags that come before the command."""
    count = 0
    while count < len(argv) and argv[count] in GLOBAL_FLAGS:
        count += 1
    return count > 0, argv[count:]


def serve(argv: list[str], verbose: bool) -> int:
    """``vaebm [-v] serve ...``: the service parses its own flags (--host, --port, ...)
    and reports its own bad settings, so it is handed its arguments before argparse
    sees them; ``-v`` becomes its debug log level."""
    from service.main import serve as run_service
    from service.settings import ENV_PREFIX

    if verbose:
        os.environ[f"{ENV_PREFIX}LOG_LEVEL"] = "DEBUG"
    return run_service(argv)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run(argv)
    except KeyboardInterrupt:  # while the commands' modules load, before any work
        print(INTERRUPTED_BEFORE_START, file=sys.stderr)
        return EXIT_INTERRUPTED


def run(argv: Sequence[str] | None = None) -> int:
    """The command line's work; Ctrl-C during a command is answered by the command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose, command = split_global_flags(argv)
    if command[:1] == ["serve"]:
        return serve(command[1:], verbose)
    parser = build_parser()
    ns, unknown = parser.parse_known_args(argv)
    if unknown:  # named by the command's own parser (argparse's would name `vaebm`)
        ns.parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(level=logging.DEBUG if ns.verbose else logging.INFO, format=LOG_FORMAT)
    try:
        return int(ns.func(ns) or 0)
    except user_errors() as exc:  # bad input or files: one clear line, no traceback
        log.error("%s", one_line(exc))
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:  # training has its own message: what it saved
        log.error("%s", INTERRUPTED.get(ns.command, INTERRUPTED["sample"]))
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
