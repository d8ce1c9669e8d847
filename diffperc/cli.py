"""The ``diffperc`` command.

    diffperc fit|validate|test|predict --config configs/<task>/<recipe>.yaml   # LightningCLI
    diffperc demo    [--model digits] [--out diffperc_demo] [--n 8]       # PNGs of features and attention
    diffperc extract IMAGES_DIR --model NAME|PATH --out FILE.safetensors|DIR  # features to safetensors
    diffperc info    MODEL                                                # layers, sizes, parameters
    diffperc classify IMAGE --classes "cat,dog"                           # diffusion classifier
    diffperc correspond SRC TRG [--points "x,y;x,y"] --out match.png     # DIFT matches, drawn
    diffperc index build|add|query|stats ...  /  diffperc serve --index DIR  # origin identification

The four Lightning subcommands go to :func:`cli_main` (``LightningCLI`` in subclass mode for
model and data: any ``class_path`` works). ``demo``, ``extract`` and ``info`` are plain argparse commands,
implemented in ``diffperc/_commands.py``; the others live beside their feature (``_PLUGINS``). Heavy imports happen inside the commands, so
``diffperc --help`` is quick.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["LIGHTNING_SUBCOMMANDS", "build_parser", "cli_main", "main"]

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
_LIGHTNING_HELP = {
    "fit": "train a task from a YAML config (LightningCLI; `diffperc fit --help` for its options)",
    "validate": "run a task's validation loop (LightningCLI)",
    "test": "evaluate a task on its test set (LightningCLI)",
    "predict": "run a task's predict loop (LightningCLI)",
}


def cli_main(args: Sequence[str] | None = None, run: bool = True) -> Any:
    """Run ``LightningCLI`` on ``args`` (default ``sys.argv[1:]``), e.g. ``["fit", "--config", "x.yaml"]``.

    Model and data are given by ``class_path`` (``--model=diffperc.tasks.probe.ProbeTask``);
    the optimizer is the task's own ``--model.init_args.optimizer`` (see ``PerceptionTask``).

    Returns:
        the ``LightningCLI`` object (its ``.model``, ``.datamodule``, ``.trainer``).
    """
    from lightning.pytorch import LightningDataModule, LightningModule
    from lightning.pytorch.cli import LightningCLI

    return LightningCLI(
        LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
        args=None if args is None else list(args), run=run, save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,  # tasks build their own parameter groups from `optimizer`
    )


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: every subcommand (the Lightning ones only for ``--help``)."""
    from . import __version__

    parser = argparse.ArgumentParser(prog="diffperc", description="Text-to-image diffusion models as perception "
                                     "backbones: features, cross-attention maps, task heads.")
    parser.add_argument("--version", action="version", version=f"diffperc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in LIGHTNING_SUBCOMMANDS:
        sub.add_parser(name, help=_LIGHTNING_HELP[name], add_help=False)

    demo = sub.add_parser("demo", help="write PNGs of feature PCA and per-token cross-attention maps",
                          description="Run a model on held-out digits captioned with their class and write "
                          "PNGs: the PCA of each feature layer, and each prompt token's cross-attention map.")
    demo.add_argument("--model", default="digits", help="preset name or diffusers folder (default: digits)")
    demo.add_argument("--out", default="diffperc_demo", help="output folder (default: ./diffperc_demo)")
    demo.add_argument("--n", type=int, default=8, help="number of images (default: 8, one per class up to 10)")
    demo.add_argument("--timestep", type=int, default=1, help="UNet timestep (default: 1, as VPD)")
    demo.add_argument("--add-noise", action=argparse.BooleanOptionalAction, default=False,
                      help="noise the latents to the timestep (default: no, as VPD)")
    demo.add_argument("--size", type=int, default=None, help="image side (default: the model's native size)")
    demo.add_argument("--prompt", default="a photo of the digit {}",
                      help="prompt; '{}' becomes the class word (default: 'a photo of the digit {}')")
    demo.add_argument("--batch-size", type=int, default=8)
    demo.add_argument("--seed", type=int, default=0)

    ext = sub.add_parser("extract", help="write backbone features of a folder of images to safetensors",
                         description="Features of every image in IMAGES_DIR (sorted by name), resized to "
                         "--size x --size. --out FILE.safetensors: one file, keys '<image stem>/<layer>'. "
                         "--out DIR: one DIR/<image stem>.safetensors per image, keys '<layer>'. Each tensor "
                         "is (C, size/r, size/r); the metadata records the model, layers, reductions, timestep "
                         "and prompt. Unreadable images are reported and counted (or stop the run with --strict).")
    ext.add_argument("images_dir", help="folder of .jpg/.jpeg/.png/.bmp/.gif/.webp/.tif images")
    ext.add_argument("--model", default="digits", help="preset name or diffusers folder (default: digits)")
    ext.add_argument("--layers", default="vpd", help="'vpd', 'dift' or comma-separated UNet module paths")
    ext.add_argument("--timestep", type=int, default=None, help="default: the backbone's (261)")
    ext.add_argument("--add-noise", action=argparse.BooleanOptionalAction, default=None,
                     help="noise latents to the timestep (default: the backbone's, yes)")
    ext.add_argument("--ensemble-size", type=int, default=1)
    ext.add_argument("--prompt", default="", help="prompt for every image (default: empty)")
    ext.add_argument("--size", type=int, default=None, help="square side; default: the model's native size")
    ext.add_argument("--batch-size", type=int, default=8)
    ext.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    ext.add_argument("--seed", type=int, default=0, help="seed of the noise")
    ext.add_argument("--strict", action="store_true", help="stop at the first unreadable image")
    ext.add_argument("--out", required=True, help="FILE.safetensors (one file) or a folder (one file per image)")

    info = sub.add_parser("info", help="print a model's feature layers, attention layers and sizes")
    info.add_argument("model", help="preset name or diffusers folder")
    info.add_argument("--layers", default="vpd", help="layers to describe (default: vpd)")
    for module in _plugin_modules():
        module.add_parser(sub)
    return parser


# Subcommands that live beside their feature: each module has add_parser(subparsers) and
# run(args) -> exit code. Their heavy imports happen inside run().
_PLUGINS = {
    "classify": "diffperc.zeroshot.classify_cli",
    "correspond": "diffperc.zeroshot.correspond_cli",
    "index": "diffperc.retrieval.cli",
    "serve": "diffperc.retrieval.cli",
}


def _plugin_modules() -> list[Any]:
    import importlib

    return [importlib.import_module(name) for name in dict.fromkeys(_PLUGINS.values())]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``diffperc`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in LIGHTNING_SUBCOMMANDS:
        cli_main(argv)
        return 0
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command in _PLUGINS:
        import importlib

        return importlib.import_module(_PLUGINS[args.command]).run(args)
    from . import _commands

    try:
        if args.command == "demo":
            _commands.run_demo(args.model, args.out, n=args.n, timestep=args.timestep, add_noise=args.add_noise,
                               size=args.size, prompt=args.prompt, batch_size=args.batch_size, seed=args.seed)
            return 0
        if args.command == "extract":
            summary = _commands.run_extract(
                args.images_dir, args.out, model=args.model, layers=args.layers, timestep=args.timestep,
                add_noise=args.add_noise, ensemble_size=args.ensemble_size, prompt=args.prompt, size=args.size,
                batch_size=args.batch_size, dtype=args.dtype, seed=args.seed, strict=args.strict)
            return 0 if summary.written else 1
        print(_commands.model_info(args.model, layers=args.layers))
        return 0
    except (ValueError, FileNotFoundError, NotADirectoryError, _commands.UnreadableImageError) as err:
        print(f"diffperc {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
