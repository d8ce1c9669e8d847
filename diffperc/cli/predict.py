"""``diffperc predict IMAGES_DIR --ckpt_path CKPT --out DIR``: dense predictions on a plain folder.

Depth, semantic and referring segmentation checkpoints (``diffperc.predict.predict_folder``).
``diffperc predict --config RECIPE ...`` (options first, no folder) is LightningCLI's predict loop.
"""

from __future__ import annotations

import argparse

from ._options import add_device_options, fail

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict", help="predict depth / semantic / referring segmentation on a folder with a checkpoint "
        "(or a task's predict loop: `diffperc predict --config ...`)",
        description="Run a trained depth, semseg or refseg checkpoint on every image of IMAGES_DIR and write "
        "PNGs under --out with the images' relative paths: <name>.png (coloured) and the raw map "
        "(<name>_depth_mm.png 16-bit millimetres, <name>_labels.png class ids, <name>_mask.png 0/255). "
        "For LightningCLI's predict loop on a datamodule, give options first: `diffperc predict --config "
        "RECIPE --ckpt_path CKPT` (`diffperc fit --help` lists those options).")
    p.add_argument("images_dir", help="folder of images (no labels needed)")
    p.add_argument("--ckpt_path", "--ckpt-path", dest="ckpt_path", required=True, help="checkpoint written by `diffperc fit`")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--task", choices=("depth", "semseg", "refseg"), default=None,
                   help="the checkpoint's task (default: read from the checkpoint)")
    p.add_argument("--sentences", default=None, metavar="FILE",
                   help="refseg: '<relative path>\\t<sentence>' lines, one per image")
    p.add_argument("--size", type=int, default=None, help="resize the short side to this first (default: as is)")
    p.add_argument("--recursive", "-r", action="store_true", help="include images in subfolders")
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable image")
    add_device_options(p)


def run(args: argparse.Namespace) -> int:
    try:
        from ..devices import resolve_device
        from ..predict import predict_folder

        summary = predict_folder(args.ckpt_path, args.images_dir, args.out, task=args.task, sentences=args.sentences,
                                 recursive=args.recursive, size=args.size, device=resolve_device(args.device),
                                 torch_dtype=args.dtype, strict=args.strict)
        return 0 if summary.written else 1
    except (ValueError, FileNotFoundError, NotADirectoryError, KeyError) as err:
        return fail("predict", err)
