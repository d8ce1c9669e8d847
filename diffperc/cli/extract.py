"""``diffperc extract IMAGES_DIR --out FILE|DIR [--sharded --trainer.devices N]``: features to safetensors
(``diffperc.extract.extract_features``; ``--sharded``: ``diffperc.extract_sharded.extract_features_sharded``)."""

from __future__ import annotations

import argparse

from ._options import DTYPES, add_device_options, add_model_option, fail

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "extract", help="write backbone features of a folder of images to safetensors",
        description="Features of every image in IMAGES_DIR (sorted by relative path), fitted to --size x --size "
        "by --resize. --out FILE.safetensors: one file, keys '<name>/<layer>'. --out DIR: one "
        "DIR/<name>.safetensors per image, keys '<layer>'. <name> is the image's relative path without suffix. "
        "Each image's noise is seeded by --seed and its relative path, so its features do not depend on the "
        "other images. Tensors are (C, size/r, size/r); the metadata records the model, layers, reductions, "
        "timestep, prompt(s), resize mode and each original size. Written as it goes (memory stays flat). "
        "Unreadable images are reported and counted (or stop the run with --strict).")
    p.add_argument("images_dir", help="folder of .jpg/.jpeg/.png/.bmp/.gif/.webp/.tif images")
    add_model_option(p)
    p.add_argument("--layers", default="vpd", help="'vpd', 'dift' or comma-separated UNet module paths")
    p.add_argument("--timestep", type=int, default=None, help="default: the backbone's (261)")
    p.add_argument("--add-noise", action=argparse.BooleanOptionalAction, default=None,
                   help="noise latents to the timestep (default: the backbone's, yes)")
    p.add_argument("--ensemble-size", type=int, default=1)
    p.add_argument("--prompt", default="", help="prompt for every image (default: empty)")
    p.add_argument("--prompt-file", default=None, metavar="FILE",
                   help="one prompt per image: '<relative path>\\t<prompt>' lines (instead of --prompt)")
    p.add_argument("--size", type=int, default=None, help="square side; default: the model's native size")
    p.add_argument("--resize", choices=("stretch", "crop", "pad"), default="stretch",
                   help="stretch to the square (default), crop: short side to --size + centre crop, "
                   "pad: long side to --size + grey bars")
    p.add_argument("--recursive", "-r", action="store_true", help="include images in subfolders")
    p.add_argument("--batch-size", type=int, default=8)
    add_device_options(p)
    p.add_argument("--save-dtype", choices=DTYPES, default=None, help="dtype of the stored tensors (default: --dtype)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise (with each image's relative path)")
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable image")
    p.add_argument("--out", required=True, help="FILE.safetensors (one file) or a folder (one file per image; "
                   "with --sharded, one file per rank)")
    g = p.add_argument_group(
        "sharded (many GPUs or nodes)",
        "--sharded runs the extract as a Lightning predict loop: each rank (process) takes its block of the sorted "
        "images and writes --out/shard-RANK-of-WORLD.safetensors (keys '<name>/<layer>'), then rank 0 writes "
        "--out/index.json (image -> shard, keys). Rerunning the same command computes only the images that are in "
        "no complete shard. Read the folder with diffperc.extract.load_features. docs/distributed.md.")
    g.add_argument("--sharded", action="store_true", help="one shard file per rank + index.json, resumable")
    for name, default, helptext in _TRAINER_FLAGS:
        g.add_argument(f"--trainer.{name}", dest=f"trainer_{name}", default=None, metavar=name.upper(),
                       help=f"{helptext} (default: {default})")
    g.add_argument("--num-workers", type=int, default=0, help="image-reading processes per rank (default: 0)")
    g.add_argument("--shard-size", type=int, default=0, metavar="N",
                   help="close a rank's shard every N images and open the next, so a crash loses at most N images "
                   "per rank (default: 0, one shard per rank per run)")


_TRAINER_FLAGS = (("accelerator", "auto", "Lightning accelerator: cpu, gpu, auto"),
                  ("devices", "auto", "processes per node: N, a list like 0,1, or auto"),
                  ("num_nodes", "1", "number of nodes"),
                  ("strategy", "auto", "Lightning strategy: auto, ddp, ..."))


def _run_sharded(args: argparse.Namespace) -> int:
    from ..extract_sharded import extract_features_sharded

    if args.device is not None:
        raise ValueError("--device is for one process; with --sharded use --trainer.accelerator and "
                         "--trainer.devices")
    trainer = {n: getattr(args, f"trainer_{n}") or d for n, d, _ in _TRAINER_FLAGS}
    try:
        trainer["num_nodes"] = int(trainer["num_nodes"])
    except ValueError:
        raise ValueError(f"--trainer.num_nodes must be an integer, got {trainer['num_nodes']!r}") from None
    summary = extract_features_sharded(
        args.images_dir, args.out, model=args.model, layers=args.layers, timestep=args.timestep,
        add_noise=args.add_noise, ensemble_size=args.ensemble_size, prompt=args.prompt,
        prompt_file=args.prompt_file, size=args.size, resize=args.resize, recursive=args.recursive,
        batch_size=args.batch_size, torch_dtype=args.dtype, save_dtype=args.save_dtype, seed=args.seed,
        strict=args.strict, num_workers=args.num_workers, shard_size=args.shard_size, **trainer)
    return 1 if summary.total == 0 else 0


def run(args: argparse.Namespace) -> int:
    try:
        if args.sharded:
            return _run_sharded(args)
        given = [f"--trainer.{n}" for n, _, _ in _TRAINER_FLAGS if getattr(args, f"trainer_{n}") is not None]
        given += [f for f, v in (("--num-workers", args.num_workers), ("--shard-size", args.shard_size)) if v]
        if given:
            raise ValueError(f"{', '.join(given)} only apply with --sharded")
        from ..devices import resolve_device
        from ..extract import extract_features

        summary = extract_features(
            args.images_dir, args.out, model=args.model, layers=args.layers, timestep=args.timestep,
            add_noise=args.add_noise, ensemble_size=args.ensemble_size, prompt=args.prompt,
            prompt_file=args.prompt_file, size=args.size, resize=args.resize, recursive=args.recursive,
            batch_size=args.batch_size, device=resolve_device(args.device), torch_dtype=args.dtype,
            save_dtype=args.save_dtype, seed=args.seed, strict=args.strict)
        return 0 if summary.written else 1
    except (ValueError, FileNotFoundError, NotADirectoryError) as err:  # UnreadableImageError is a ValueError
        return fail("extract", err)
