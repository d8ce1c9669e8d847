"""``diffperc fit|validate|test|predict --config RECIPE``: LightningCLI, with recipe names resolved.

LightningCLI runs in subclass mode for model and data (any ``class_path`` works); device and
precision are Lightning's own ``--trainer.accelerator`` / ``--trainer.precision``. A ``--config``
value that is not a file is looked up among the packaged recipes (``diffperc recipes list``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

__all__ = ["LIGHTNING_SUBCOMMANDS", "add_parsers", "cli_main", "resolve_configs", "run"]

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
_HELP = {
    "fit": "train a task from a YAML recipe (LightningCLI; `diffperc fit --help` for its options)",
    "validate": "run a task's validation loop (LightningCLI)",
    "test": "evaluate a task on its test set (LightningCLI)",
    "predict": "predict on a folder of images with a checkpoint (or a task's predict loop with --config)",
}


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Placeholders so that ``diffperc --help`` lists the Lightning subcommands (LightningCLI parses them)."""
    for name in LIGHTNING_SUBCOMMANDS:
        if name != "predict":  # predict has its own parser (cli/predict.py) for the folder mode
            subparsers.add_parser(name, help=_HELP[name], add_help=False)


def resolve_configs(args: Sequence[str]) -> list[str]:
    """``--config NAME`` / ``--config=NAME`` / ``-c NAME`` with a recipe name -> the packaged YAML's path."""
    from ..recipes import resolve_config

    out, i = [], 0
    args = list(args)
    while i < len(args):
        a = args[i]
        if a in ("--config", "-c") and i + 1 < len(args):
            out += [a, resolve_config(args[i + 1])]
            i += 2
            continue
        if a.startswith("--config="):
            a = "--config=" + resolve_config(a.split("=", 1)[1])
        out.append(a)
        i += 1
    return out


@contextmanager
def _argv(args: Sequence[str]) -> Iterator[None]:
    """Put the resolved arguments in ``sys.argv`` for the call: LightningCLI parses ``sys.argv`` (given
    ``args`` beside a full ``sys.argv`` it warns), and Lightning's DDP launcher re-runs ``sys.argv`` in
    every child process, which must see the same (resolved) command."""
    saved = sys.argv
    sys.argv = [saved[0] if saved else "diffperc", *args]
    try:
        yield
    finally:
        sys.argv = saved


def cli_main(args: Sequence[str] | None = None, run: bool = True) -> Any:
    """Run ``LightningCLI`` on ``args`` (default ``sys.argv[1:]``), e.g. ``["fit", "--config", "x.yaml"]``.

    Model and data are given by ``class_path`` (``--model=diffperc.tasks.probe.ProbeTask``);
    the optimizer is the task's own ``--model.init_args.optimizer`` (see ``PerceptionTask``).
    A ``--config`` that is not a file is a recipe name (``depth/nyu_vpd_sd15``).

    Returns:
        the ``LightningCLI`` object (its ``.model``, ``.datamodule``, ``.trainer``).
    """
    from lightning.pytorch import LightningDataModule, LightningModule
    from lightning.pytorch.cli import LightningCLI

    args = resolve_configs(sys.argv[1:] if args is None else args)
    with _argv(args):
        return LightningCLI(
            LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
            args=None, run=run, save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,  # tasks build their own parameter groups from `optimizer`
        )


def run(argv: Sequence[str]) -> int:
    """``diffperc fit ...`` etc.; an unknown recipe name is a one-line error (exit 1)."""
    try:
        argv = resolve_configs(argv)
    except (ValueError, FileNotFoundError) as err:
        print(f"diffperc {argv[0]}: error: {err}", file=sys.stderr)
        return 1
    cli_main(argv)
    return 0
