"""The ``vaebm`` command: train, sample, calibrate, evaluate, serve.

Each subcommand's flags are generated from one dataclass of defaults, so a
default is written once (in the dataclass) and the help text shows it.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import typing
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger("vaebm")


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """One ``--flag`` per dataclass field, typed and defaulted from the field.

    With a prefix (``ebm_``), flags become ``--ebm-steps`` and so on, so that two
    stages with fields of the same name can share one command line.
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        dest = prefix + f.name
        flag = "--" + dest.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = hints[f.name]
        if kind is bool:
            parser.add_argument(
                flag, dest=dest, action=argparse.BooleanOptionalAction, default=default
            )
        elif typing.get_origin(kind) is tuple:
            parser.add_argument(flag, dest=dest, type=int, nargs="+", default=list(default))
        else:
            parser.add_argument(
                flag, dest=dest, type=kind, default=default, help=f"default: {default}"
            )


def dataclass_from_args(cls: type, ns: argparse.Namespace, prefix: str = "", **overrides: Any):
    """Build ``cls`` from the parsed flags that ``add_dataclass_arguments`` added."""
    values = {f.name: getattr(ns, prefix + f.name) for f in dataclasses.fields(cls)}
    return cls(**{**values, **overrides})


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
    add_dataclass_arguments(both, EBMTrainArgs, prefix="ebm_")
    train.set_defaults(func=_train)


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_build_train_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vaebm", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if ns.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(ns.func(ns) or 0)


if __name__ == "__main__":
    sys.exit(main())
