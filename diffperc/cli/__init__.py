"""The ``diffperc`` command: one small module per command, each a thin adapter over a library function.

    diffperc fit|validate|test --config RECIPE|FILE.yaml                 # LightningCLI (cli/lightning.py)
    diffperc predict IMAGES_DIR --ckpt_path CKPT --out DIR               # depth/semseg/refseg PNGs (cli/predict.py)
    diffperc recipes list | show NAME                                     # packaged YAML recipes
    diffperc demo    [--model digits] [--out diffperc_demo] [--n 8]       # PNGs of features and attention
    diffperc extract IMAGES_DIR --model NAME|PATH --out FILE.safetensors|DIR  # features to safetensors
    diffperc info    MODEL                                                # layers, sizes, parameters
    diffperc classify IMAGE|DIR --classes "cat,dog" [--out res.json|.csv] # diffusion classifier
    diffperc correspond SRC TRG|DIR [--points "x,y;x,y"] --out match.png|DIR  # DIFT matches, drawn
    diffperc index build|add|query|stats ...  /  diffperc serve --index DIR  # origin identification

Every module here defines ``add_parser(subparsers)`` and ``run(args) -> exit code``; building
the parsers imports no torch or Lightning (``diffperc --help`` is quick), the work is imported
inside ``run``. Plain commands take ``--device`` / ``--dtype``; Lightning ones keep
``--trainer.accelerator`` / ``--trainer.precision``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .lightning import LIGHTNING_SUBCOMMANDS, cli_main

__all__ = ["COMMANDS", "LIGHTNING_SUBCOMMANDS", "build_parser", "cli_main", "main"]

# command -> module (each with add_parser(subparsers) and run(args)); one module may add several commands
COMMANDS = {
    "predict": "diffperc.cli.predict",
    "recipes": "diffperc.cli.recipes",
    "demo": "diffperc.cli.demo",
    "extract": "diffperc.cli.extract",
    "info": "diffperc.cli.info",
    "classify": "diffperc.cli.classify",
    "correspond": "diffperc.cli.correspond",
    "index": "diffperc.cli.index",
    "serve": "diffperc.cli.index",
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand (the Lightning ones only as names, for ``--help``)."""
    from .. import __version__
    from .lightning import add_parsers

    parser = argparse.ArgumentParser(prog="diffperc", description="Text-to-image diffusion models as perception "
                                     "backbones: features, cross-attention maps, task heads.")
    parser.add_argument("--version", action="version", version=f"diffperc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_parsers(sub)
    for module in dict.fromkeys(COMMANDS.values()):
        importlib.import_module(module).add_parser(sub)
    return parser


def _is_lightning(argv: list[str]) -> bool:
    """fit/validate/test always; predict unless it is given a folder (``diffperc predict DIR ...``) or -h."""
    if not argv or argv[0] not in LIGHTNING_SUBCOMMANDS:
        return False
    if argv[0] != "predict":
        return True
    return len(argv) > 1 and argv[1].startswith("-") and argv[1:] not in (["-h"], ["--help"])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``diffperc`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if _is_lightning(argv):
        from .lightning import run

        return run(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return importlib.import_module(COMMANDS[args.command]).run(args)
    except BrokenPipeError:  # `diffperc recipes list | head`: the reader left; not an error of ours
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
