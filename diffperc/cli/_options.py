"""Options shared by the plain commands. Importing this module imports nothing heavy (no torch)."""

from __future__ import annotations

import argparse

__all__ = ["DTYPES", "add_device_options", "add_model_option", "device_kwargs", "fail"]

DTYPES = ("float32", "float16", "bfloat16")  # = diffperc.devices.DTYPES, repeated here so parsers stay light


def add_device_options(parser: argparse.ArgumentParser, dtype_help: str = "") -> None:
    """``--device`` (default: cuda when available, else cpu) and ``--dtype`` (compute precision)."""
    parser.add_argument("--device", default=None, metavar="DEVICE",
                        help="where the model runs: cpu, cuda, cuda:N, mps (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="compute precision of the model weights (default: float32)" + dtype_help)


def add_model_option(parser: argparse.ArgumentParser, default: str = "digits", extra: str = "") -> None:
    parser.add_argument("--model", default=default,
                        help=f"preset name, diffusers folder, single file or hub id (default: {default}{extra})")


def device_kwargs(args: argparse.Namespace) -> dict[str, object]:
    """``{"device": ..., "torch_dtype": ...}`` of parsed options, resolved (errors name the option)."""
    from ..devices import resolve_device, resolve_dtype

    return {"device": resolve_device(args.device), "torch_dtype": resolve_dtype(args.dtype)}


def fail(command: str, err: BaseException) -> int:
    """Print ``diffperc COMMAND: error: ...`` on stderr; returns exit code 1."""
    import sys

    print(f"diffperc {command}: error: {err}", file=sys.stderr)
    return 1
