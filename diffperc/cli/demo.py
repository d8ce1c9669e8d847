"""``diffperc demo``: PNGs of feature PCA and per-token cross-attention maps (``diffperc._commands.run_demo``)."""

from __future__ import annotations

import argparse

from ._options import add_device_options, add_model_option, device_kwargs, fail

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="write PNGs of feature PCA and per-token cross-attention maps",
                              description="Run a model on held-out digits captioned with their class and write "
                              "PNGs: the PCA of each feature layer, and each prompt token's cross-attention map.")
    add_model_option(p)
    p.add_argument("--out", default="diffperc_demo", help="output folder (default: ./diffperc_demo)")
    p.add_argument("--n", type=int, default=8, help="number of images (default: 8, one per class up to 10)")
    p.add_argument("--timestep", type=int, default=1, help="UNet timestep (default: 1, as VPD)")
    p.add_argument("--add-noise", action=argparse.BooleanOptionalAction, default=False,
                   help="noise the latents to the timestep (default: no, as VPD)")
    p.add_argument("--size", type=int, default=None, help="image side (default: the model's native size)")
    p.add_argument("--prompt", default="a photo of the digit {}",
                   help="prompt; '{}' becomes the class word (default: 'a photo of the digit {}')")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    add_device_options(p)


def run(args: argparse.Namespace) -> int:
    try:
        from .._commands import run_demo

        run_demo(args.model, args.out, n=args.n, timestep=args.timestep, add_noise=args.add_noise, size=args.size,
                 prompt=args.prompt, batch_size=args.batch_size, seed=args.seed, **device_kwargs(args))
        return 0
    except (ValueError, FileNotFoundError, NotADirectoryError) as err:
        return fail("demo", err)
