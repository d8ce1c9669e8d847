"""``diffperc correspond SRC TRG|DIR``: DIFT point matches, drawn (``diffperc.zeroshot.correspond_images``).

    diffperc correspond cat1.jpg cat2.jpg --points "120,80;200,150" --out match.png
    diffperc correspond cat1.jpg more_cats/ --points "120,80" --out matches/      # PNG per target + matches.json
    diffperc correspond cat1.jpg more_cats/ --out matches.csv                     # the table only
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ._options import add_device_options, add_model_option, fail

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``correspond`` subcommand to ``diffperc``'s subparsers."""
    p = subparsers.add_parser(
        "correspond", help="match points of one image into another (or a folder) with DIFT and draw the matches",
        description="Match points of SRC into TRG by cosine similarity of diffusion features upsampled to each "
        "image's size (DIFT), and write a picture: SRC | TRG, one colour and number per match, joined by lines; "
        "green outlines mark mutual nearest neighbours. Without --points, a grid of points on SRC's foreground. "
        "TRG may be a folder: every image in it is matched; --out then names a folder (a PNG per target and "
        "matches.json) or a .json/.csv file (the table only).")
    p.add_argument("src", help="source image")
    p.add_argument("trg", help="target image, or a folder of target images")
    p.add_argument("--points", default=None, help="source points 'x,y;x,y' in SRC pixels (default: foreground grid)")
    add_model_option(p, default="sd21", extra=", as DIFT")
    p.add_argument("--size", type=int, default=None, help="square side for the backbone (DIFT: 768; default: native)")
    p.add_argument("--layers", default="dift", help="'dift' (up_blocks.1) or comma-separated UNet module paths")
    p.add_argument("--timestep", type=int, default=261, help="UNet timestep (default: 261, as DIFT)")
    p.add_argument("--ensemble-size", type=int, default=1, help="noisy copies averaged (DIFT: 8; default: 1)")
    p.add_argument("--prompt", default="", help="prompt for both images, e.g. 'a photo of a cat' (default: empty)")
    p.add_argument("--grid", type=int, default=6, help="automatic points: grid cells per side (default: 6)")
    p.add_argument("--seed", type=int, default=0, help="seed of the diffusion noise")
    p.add_argument("--recursive", "-r", action="store_true", help="with a TRG folder: include subfolders")
    p.add_argument("--out", required=True,
                   help="output: PNG (one pair), .json/.csv (the matches), or a folder (a PNG per target + matches.json)")
    add_device_options(p)
    return p


def _options(args: argparse.Namespace) -> dict[str, object]:
    from ..devices import resolve_device

    return {"model": args.model, "size": args.size, "layers": args.layers, "timestep": args.timestep,
            "ensemble_size": args.ensemble_size, "prompt": args.prompt, "grid": args.grid, "seed": args.seed,
            "device": resolve_device(args.device), "torch_dtype": args.dtype}


def _pair(args: argparse.Namespace, points) -> int:
    from .._results import write_rows
    from ..viz import save_png
    from ..zeroshot.correspond_images import correspond

    out = Path(args.out)
    src_pts, trg_pts, mutual, picture = correspond(args.src, args.trg, points, **_options(args))
    rows = [{"target": args.trg, "point": i, "src_x": sx, "src_y": sy, "trg_x": tx, "trg_y": ty, "mutual": bool(m)}
            for i, ((sx, sy), (tx, ty), m) in enumerate(zip(src_pts.tolist(), trg_pts.tolist(), mutual.tolist(),
                                                             strict=True))]
    for r in rows:
        print(f"{r['point']}: ({r['src_x']:.1f}, {r['src_y']:.1f}) -> ({r['trg_x']:.1f}, {r['trg_y']:.1f})"
              f"{'  mutual' if r['mutual'] else ''}")
    print(write_rows(rows, out) if out.suffix.lower() in (".json", ".csv") else save_png(picture, out))
    return 0


def _folder(args: argparse.Namespace, points) -> int:
    from .._results import write_rows
    from ..extract import list_image_files
    from ..zeroshot.correspond_images import correspond_many

    targets, _ = list_image_files(args.trg, args.recursive, what="TRG folder")
    if not targets:
        raise FileNotFoundError(f"no images in the TRG folder {args.trg!r}")
    out = Path(args.out)
    table = out.suffix.lower() in (".json", ".csv")
    if out.suffix.lower() == ".png":
        raise ValueError(f"--out {args.out!r}: with a TRG folder, give a folder (a PNG per target) or .json/.csv")
    rows, pictures, skipped = correspond_many(args.src, args.trg, targets, points,
                                              picture_dir=None if table else out, **_options(args))
    if rows:
        print(write_rows(rows, out if table else out / "matches.json"))
    n = len(targets) - len(skipped)
    print(f"correspond: matched {len(rows)} points into {n} of {len(targets)} images"
          + (f"; skipped {len(skipped)} unreadable: {', '.join(t for t, _ in skipped)}" if skipped else "")
          + (f"; {len(pictures)} pictures in {out}" if pictures else ""), file=sys.stderr)
    return 0 if rows else 1


def run(args: argparse.Namespace) -> int:
    """Run ``diffperc correspond``; prints one line per match (one pair) and what it wrote. Returns the exit code."""
    try:
        from ..zeroshot.correspond_images import parse_points

        points = parse_points(args.points) if args.points else None
        return (_folder if Path(args.trg).is_dir() else _pair)(args, points)
    except (ValueError, FileNotFoundError, NotADirectoryError, OSError) as err:
        return fail("correspond", err)
