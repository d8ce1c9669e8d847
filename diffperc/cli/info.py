"""``diffperc info MODEL``: feature layers, attention layers, sizes (``diffperc._commands.model_info``)."""

from __future__ import annotations

import argparse

from ._options import add_device_options, device_kwargs, fail

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("info", help="print a model's feature layers, attention layers and sizes")
    p.add_argument("model", help="preset name, diffusers folder, single file or hub id")
    p.add_argument("--layers", default="vpd", help="layers to describe (default: vpd)")
    add_device_options(p)


def run(args: argparse.Namespace) -> int:
    try:
        from .._commands import model_info

        print(model_info(args.model, layers=args.layers, **device_kwargs(args)))
        return 0
    except (ValueError, FileNotFoundError, NotADirectoryError) as err:
        return fail("info", err)
