"""The ``vaebm`` command: train, sample, calibrate, evaluate, serve.

Each subcommand's flags are generated from one dataclass of defaults, so a
default is written once (in the dataclass), each flag's meaning once (in the
dataclass's numpydoc ``Parameters`` section), and ``--help`` shows both.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import logging
import sys
import typing
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger("vaebm")


def field_descriptions(cls: type) -> dict[str, str]:
    """Each field's description from the class docstring's ``Parameters`` section.

    The numpydoc layout scikit-learn uses: a line ``name : type``, then the
    description indented below it. Raises ValueError for a field the section does not
    describe, or for a description of a field the class does not have, so the help
    text cannot fall behind the code.
    """
    lines = inspect.cleandoc(cls.__doc__ or "").splitlines()
    start = next((i + 2 for i, line in enumerate(lines) if line.strip() == "Parameters"), None)
    descriptions: dict[str, list[str]] = {}
    current: list[str] = []
    for line in lines[start or len(lines) :]:
        if line and not line.startswith(" "):
            if " : " not in line:  # the next section's title
                break
            current = descriptions.setdefault(line.split(" : ")[0].strip(), [])
        elif line.strip():
            current.append(line.strip())
    fields = {f.name for f in dataclasses.fields(cls)}
    missing, unknown = fields - descriptions.keys(), descriptions.keys() - fields
    if missing or unknown:
        raise ValueError(
            f"{cls.__name__}'s docstring: undocumented fields {sorted(missing)}, "
            f"descriptions of unknown fields {sorted(unknown)}"
        )
    return {name: " ".join(words) for name, words in descriptions.items()}


def add_dataclass_arguments(
    parser: argparse.ArgumentParser, cls: type, prefix: str = "", exclude: tuple[str, ...] = ()
) -> None:
    """One ``--flag`` per dataclass field, typed and defaulted from the field.

    With a prefix (``ebm_``), flags become ``--ebm-steps`` and so on, so that two
    stages with fields of the same name can share one command line.
    """
    hints = typing.get_type_hints(cls)
    descriptions = field_descriptions(cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        dest = prefix + f.name
        flag = "--" + dest.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = hints[f.name]
        text = descriptions[f.name].replace("%", "%%")
        if kind is bool:
            action = parser.add_argument(
                flag, dest=dest, action=argparse.BooleanOptionalAction, default=default, help=text
            )
        elif typing.get_origin(kind) is tuple:
            action = parser.add_argument(
                flag, dest=dest, type=int, nargs="+", default=list(default), help=text
            )
        else:
            action = parser.add_argument(flag, dest=dest, type=kind, default=default, help=text)
        if "%(default)" not in action.help:  # older BooleanOptionalActions add it themselves
            shown = " ".join(map(str, default)) if isinstance(default, tuple) else repr(default)
            action.help += f" (default: {shown})".replace("%", "%%")


def dataclass_from_args(cls: type, ns: argparse.Namespace, prefix: str = "", **overrides: Any):
    """Build ``cls`` from the parsed flags that ``add_dataclass_arguments`` added."""
    values = {
        f.name: getattr(ns, prefix + f.name)
        for f in dataclasses.fields(cls)
        if f.name not in overrides
    }
    return cls(**{**values, **overrides})


# `train all` runs both stages on one checkpoint directory with one device and seed.
SHARED_BY_STAGES = ("checkpoint", "out", "device", "resume", "seed")


def _train(ns: argparse.Namespace) -> int:
    from training.runtime import DivergenceError, setup_distributed, teardown_distributed
    from training.train_ebm import EBMTrainArgs, train_ebm
    from training.train_vae import VAETrainArgs, train_vae

    if ns.stage == "ebm":
        ebm_args = dataclass_from_args(EBMTrainArgs, ns)
    if ns.stage == "all":
        ebm_args = dataclass_from_args(
            EBMTrainArgs,
            ns,
            "ebm_",
            checkpoint=ns.out,
            out=ns.out,
            device=ns.device,
            resume=ns.resume,
            seed=ns.seed,
        )
    ctx = setup_distributed(ns.device)
    try:
        if ns.stage in ("vae", "all"):
            vae_args = dataclass_from_args(VAETrainArgs, ns)
            vae_args.latent_channels = tuple(vae_args.latent_channels)
            log.info("VAE stage done: %s", train_vae(vae_args, ctx))
        if ns.stage in ("ebm", "all"):
            log.info("EBM stage done: %s", train_ebm(ebm_args, ctx))
    except DivergenceError as exc:
        log.error("training diverged: %s. The last good checkpoint is kept.", exc)
        return 3
    finally:
        teardown_distributed(ctx)
    return 0


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

    args = EvaluateArgs(
        checkpoint=ns.checkpoint,
        in_data=ns.in_data,
        ood=parse_named_specs(ns.ood),
        out=ns.out,
        iwae_k=ns.iwae_k,
        batch_size=ns.batch_size,
        seed=ns.seed,
        device=ns.device,
    )
    report = evaluate(args)
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

    model, info = load_checkpoint(ns.checkpoint, select_device(ns.device))
    steps = 0 if ns.vae_only else ns.steps
    step_size = ns.step_size or info.langevin_step_size
    images = model.sample(ns.n, steps=steps, step_size=step_size, seed=ns.seed)
    grid = image_grid(to_uint8(images).cpu().numpy())
    atomic_write_bytes(ns.out, encode_png(grid))
    log.info("wrote %d %s samples to %s", ns.n, "VAE-only" if ns.vae_only else "VAEBM", ns.out)
    return 0


DEVICE_HELP = "auto (CUDA when present, CPU otherwise), cpu, cuda or cuda:N (default: auto)"


def _build_other_parsers(sub: argparse._SubParsersAction) -> None:
    from training.calibrate import CalibrateArgs

    cal = sub.add_parser("calibrate", help="set OOD thresholds on held-out in-distribution data")
    add_dataclass_arguments(cal, CalibrateArgs)
    cal.set_defaults(func=_calibrate)

    ev = sub.add_parser("evaluate", help="AUROC/AUPR/FPR95 of every score against OOD sets")
    ev.add_argument("--checkpoint", required=True, help="checkpoint directory to evaluate")
    ev.add_argument(
        "--in", dest="in_data", required=True, help="data spec of in-distribution test images"
    )
    ev.add_argument(
        "--ood",
        action="append",
        required=True,
        metavar="NAME=PATH",
        help="an OOD set: its name in the report and its data spec; repeat for several",
    )
    ev.add_argument(
        "--out",
        default="runs/evaluate",
        help="directory for metrics.json, report.md and the plots (default: %(default)s)",
    )
    ev.add_argument(
        "--iwae-k",
        type=int,
        default=16,
        help="importance samples of the IWAE bound behind iwae_bpd and vaebm_bpd "
        "(default: %(default)s)",
    )
    ev.add_argument(
        "--batch-size", type=int, default=64, help="images scored at once (default: %(default)s)"
    )
    ev.add_argument(
        "--seed", type=int, default=0, help="seed of the scores' sampling (default: %(default)s)"
    )
    ev.add_argument("--device", default="auto", help=DEVICE_HELP)
    ev.set_defaults(func=_evaluate)

    sm = sub.add_parser("sample", help="write a PNG grid of samples")
    sm.add_argument("--checkpoint", required=True, help="checkpoint directory to sample from")
    sm.add_argument("-n", type=int, default=64, help="images in the grid (default: %(default)s)")
    sm.add_argument(
        "--steps", type=int, default=16, help="Langevin steps in noise space (default: %(default)s)"
    )
    sm.add_argument(
        "--step-size",
        type=float,
        default=None,
        help="Langevin step size; default: the one the energy was trained with",
    )
    sm.add_argument("--seed", type=int, default=0, help="seed of the prior draws and the chains")
    sm.add_argument("--vae-only", action="store_true", help="VAE samples, no Langevin")
    sm.add_argument("--out", default="samples.png", help="PNG file to write (default: %(default)s)")
    sm.add_argument("--device", default="auto", help=DEVICE_HELP)
    sm.set_defaults(func=_sample)

    # Listed for --help only: main() hands `serve ...` to service.main before parsing.
    sub.add_parser("serve", help="run the HTTP scoring service (settings from VAEBM_* env)")


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _build_train_parser,
    _build_other_parsers,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vaebm",
        description="VAEBM out-of-distribution scores for images: train a checkpoint, "
        "calibrate its thresholds, evaluate it against OOD sets, sample from it, serve it.",
        epilog="`vaebm COMMAND --help` explains each command's flags.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def user_errors() -> tuple[type[Exception], ...]:
    """The errors that mean bad input or bad files, not a bug: reported in one line.

    A function, so that ``except user_errors()`` imports the model (and torch) only
    when an error is on its way, and ``vaebm --help`` stays quick.
    """
    from model.calibration_file import CalibrationError
    from model.checkpoint import CheckpointError

    return (ValueError, OSError, CheckpointError, CalibrationError)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:  # the service parses its own flags (--host, --port, ...)
        from service.main import serve

        return serve(argv[1:])
    parser = build_parser()
    ns = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if ns.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(ns.func(ns) or 0)
    except user_errors() as exc:  # bad input or files: one clear line, no traceback
        log.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
