"""Match points of one image into another with diffusion features and draw the matches (``diffperc correspond``).

DIFT matching (Tang et al., NeurIPS 2023, arXiv 2306.03881, repo Tsingularity/dift): both
images are resized to ``--size``, run through the backbone (default ``sd21``, ``up_blocks.1``,
t=261), the feature maps are upsampled to each image's original size and every source point
goes to the target pixel of highest cosine similarity.

    diffperc correspond cat1.jpg cat2.jpg --points "120,80;200,150" --out match.png
    diffperc correspond cat1.jpg cat2.jpg --model test_sd --size 64 --out match.png   # offline smoke run

Without ``--points`` a grid of source points is laid over the foreground: grid cells whose
features differ most from the mean feature of the image border (isodata threshold). The
picture shows source | target side by side, each match in its own colour, numbered, joined by
a line. PIL only. A folder of targets: :func:`correspond_many`. The command is ``diffperc/cli/correspond.py``.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from ..images import open_image, to_rgb8
from .correspondence import match_points, mutual_nn

__all__ = ["correspond", "correspond_many", "draw_matches", "foreground_grid", "parse_points"]

_GAP = 16  # pixels between the two pictures
_DISPLAY_HEIGHT = 512


def parse_points(text: str) -> Tensor:
    """``"x,y;x,y"`` -> (N, 2) float tensor (x, y)."""
    points = []
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        try:
            x, y = (float(v) for v in part.split(","))
        except ValueError:
            raise ValueError(f"--points must look like 'x,y;x,y' (pixels of SRC), got {part!r} in {text!r}") from None
        points.append((x, y))
    if not points:
        raise ValueError(f"--points has no points: {text!r}; expected 'x,y;x,y'")
    return torch.tensor(points, dtype=torch.float32)


def foreground_grid(feat: Tensor, size: Sequence[int], grid: int = 6) -> Tensor:
    """Centres of a ``grid`` x ``grid`` lattice over the image, kept where the features look like foreground.

    Foreground = cosine distance to the mean feature of the border cells above an isodata
    threshold (the midpoint of the two class means). Falls back to all centres when fewer
    than 3 are foreground.

    Args:
        feat: (C, h, w) feature map of the image.
        size: image size (H, W).
        grid: lattice cells per side.

    Returns:
        (N, 2) float32 (x, y) pixel centres, row-major.
    """
    if feat.ndim != 3 or grid < 1:
        raise ValueError(f"feat must be (C, h, w) and grid >= 1, got {tuple(feat.shape)} and {grid}")
    f = F.normalize(feat.float(), dim=0)
    border = torch.cat([f[:, 0], f[:, -1], f[:, :, 0], f[:, :, -1]], dim=1).mean(1)  # (C,)
    saliency = 1 - torch.einsum("chw,c->hw", f, F.normalize(border, dim=0))  # (h, w)
    thr = saliency.mean()
    for _ in range(20):  # isodata: threshold at the midpoint of the two class means
        hi, lo = saliency[saliency > thr], saliency[saliency <= thr]
        if len(hi) == 0 or len(lo) == 0:
            break
        thr = (hi.mean() + lo.mean()) / 2
    h, w = int(size[0]), int(size[1])
    ys, xs = torch.meshgrid((torch.arange(grid) + 0.5) * h / grid, (torch.arange(grid) + 0.5) * w / grid, indexing="ij")
    centres = torch.stack([xs.flatten(), ys.flatten()], dim=1)  # (grid^2, 2)
    cells_y = (centres[:, 1] * feat.shape[1] / h).long().clamp(max=feat.shape[1] - 1)
    cells_x = (centres[:, 0] * feat.shape[2] / w).long().clamp(max=feat.shape[2] - 1)
    keep = saliency[cells_y, cells_x] > thr
    return (centres[keep] if keep.sum() >= 3 else centres).float()


def _colours(n: int) -> list[tuple[int, int, int]]:
    """n well-separated saturated colours (golden-ratio hue steps)."""
    out = []
    for i in range(n):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.9, 1.0 if i % 2 == 0 else 0.8)
        out.append((int(r * 255), int(g * 255), int(b * 255)))
    return out


def draw_matches(
    src: Image.Image, trg: Image.Image, points_src: Tensor, points_trg: Tensor, gt_trg: Tensor | None = None,
    correct: Tensor | None = None, title: str | None = None, height: int | None = None,
) -> Image.Image:
    """Source | target side by side; match i is a numbered dot of colour i on both sides, joined by a line.

    Args:
        src, trg: the two images (any sizes).
        points_src, points_trg: (N, 2) (x, y) in pixels of ``src`` and ``trg``.
        gt_trg: (N, 2) ground-truth target points, drawn as rings of the match's colour.
        correct: (N,) bool; target dots get a green (True) or red (False) outline.
        title: a line of text above the pictures.
        height: display height of both pictures (aspect kept); None = the taller image's, within [256, 512].
    """
    n = len(points_src)
    if points_trg.shape != (n, 2) or (gt_trg is not None and gt_trg.shape != (n, 2)):
        raise ValueError(f"points_src, points_trg (and gt_trg) must all be (N, 2), got {tuple(points_src.shape)}, "
                         f"{tuple(points_trg.shape)}, {None if gt_trg is None else tuple(gt_trg.shape)}")
    height = height or min(max(src.height, trg.height, _DISPLAY_HEIGHT // 2), _DISPLAY_HEIGHT)
    s_scale, t_scale = height / src.height, height / trg.height
    src_d = src.convert("RGB").resize((max(1, round(src.width * s_scale)), height), Image.BICUBIC)
    trg_d = trg.convert("RGB").resize((max(1, round(trg.width * t_scale)), height), Image.BICUBIC)
    font = ImageFont.load_default()
    top = 22 if title else 0
    title_w = int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(title, font=font)) + 8 if title else 0
    canvas = Image.new("RGB", (max(src_d.width + _GAP + trg_d.width, title_w), height + top), "white")
    canvas.paste(src_d, (0, top))
    canvas.paste(trg_d, (src_d.width + _GAP, top))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 4), title, fill="black", font=font)
    r = max(3, height // 80)
    off = src_d.width + _GAP
    ps = [(float(x) * s_scale, float(y) * s_scale + top) for x, y in points_src.tolist()]
    pt = [(float(x) * t_scale + off, float(y) * t_scale + top) for x, y in points_trg.tolist()]
    for i, colour in enumerate(_colours(n)):  # lines first, dots on top
        draw.line([ps[i], pt[i]], fill=colour, width=max(1, r // 2))
    for i, colour in enumerate(_colours(n)):
        if gt_trg is not None:
            gx, gy = float(gt_trg[i, 0]) * t_scale + off, float(gt_trg[i, 1]) * t_scale + top
            draw.ellipse([gx - 2 * r, gy - 2 * r, gx + 2 * r, gy + 2 * r], outline=colour, width=2)
        outline = "black" if correct is None else ("#00c000" if bool(correct[i]) else "#ff0000")
        for (x, y), edge in ((ps[i], "black"), (pt[i], outline)):
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colour, outline=edge, width=max(1, r // 3))
            draw.text((x + r + 1, y - r - 1), str(i), fill=colour, font=font, stroke_width=1, stroke_fill="black")
    return canvas


def _backbone(model: str, layers: str, timestep: int, ensemble_size: int, **placement: Any) -> torch.nn.Module:
    """A DiffusionBackbone preset/folder with these options; fused SD + DINOv2 presets get them as ``sd_kwargs``.
    ``placement``: ``device`` and ``torch_dtype`` (see :func:`diffperc.devices.load_backbone`)."""
    from ..devices import load_backbone

    layer_arg: str | list[str] = layers if layers in ("dift", "vpd") else [n.strip() for n in layers.split(",")]
    try:
        return load_backbone(model, layers=layer_arg, timestep=timestep, ensemble_size=ensemble_size, **placement)
    except TypeError:  # a fused preset: its SD part takes the diffusion options
        return load_backbone(model, timestep=timestep, sd_kwargs={"ensemble_size": ensemble_size}, **placement)


def _open(path: str | Path, what: str) -> Image.Image:
    return to_rgb8(open_image(path, name=f"{what} {path}"))


def _features(bb: torch.nn.Module, images: list[Image.Image], size: int, prompt: str, seed: int) -> Tensor:
    """(N, C, h, w) features of images resized (bicubic) to size x size."""
    x = torch.stack([torch.from_numpy(np.asarray(im.resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0)
                     .permute(2, 0, 1) for im in images])  # (N, 3, S, S)
    param = next(bb.parameters())
    with torch.no_grad():
        return bb(x.to(param.device, param.dtype), prompts=prompt,
                  generator=torch.Generator(param.device).manual_seed(seed)).features[0].float()


def _side(bb: torch.nn.Module, model: str, size: int | None) -> int:
    from .._commands import native_size

    multiple = bb.size_multiple
    size = size or -(-native_size(bb.sd if hasattr(bb, "sd") else bb) // multiple) * multiple
    if size % multiple:
        raise ValueError(f"--size must be a multiple of {multiple} for {model!r}, got {size}: try "
                         f"{max(multiple, round(size / multiple) * multiple)}")
    return size


def correspond(
    src_path: str | Path, trg_path: str | Path, points: Tensor | None = None, model: str = "sd21",
    size: int | None = None, layers: str = "dift", timestep: int = 261, ensemble_size: int = 1, prompt: str = "",
    grid: int = 6, seed: int = 0, device: str | torch.device | None = None,
    torch_dtype: str | torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor, Image.Image]:
    """Match points of SRC into TRG; returns source points, target points (N, 2), mutual flags (N,) and the picture.

    Args:
        src_path, trg_path: image files.
        points: (N, 2) (x, y) in SRC pixels; None = :func:`foreground_grid`.
        model: backbone preset or diffusers folder.
        size: square side both images are resized to for the backbone (a multiple of the
            model's ``size_multiple``); None = the model's native size.
        layers, timestep, ensemble_size: backbone options (DIFT: "dift", 261, 8).
        prompt: prompt for both images.
        grid: lattice size of the automatic points.
        seed: seeds the diffusion noise.
        device, torch_dtype: where and in which precision the model runs (default: cuda when available, fp32).
    """
    src, trg = _open(src_path, "SRC image"), _open(trg_path, "TRG image")
    bb = _backbone(model, layers, timestep, ensemble_size, device=device, torch_dtype=torch_dtype)
    feats = _features(bb, [src, trg], _side(bb, model, size), prompt, seed)
    return _match(src, trg, feats[0], feats[1], points, grid, model)


def _match(src: Image.Image, trg: Image.Image, feat_src: Tensor, feat_trg: Tensor, points: Tensor | None, grid: int,
           model: str) -> tuple[Tensor, Tensor, Tensor, Image.Image]:
    feats = (feat_src, feat_trg)
    size_src, size_trg = (src.height, src.width), (trg.height, trg.width)
    if points is None:
        points = foreground_grid(feats[0], size_src, grid)
    matched = match_points(feats[0], feats[1], points, size_src, size_trg)
    mutual = mutual_nn(feats[0], feats[1], points, matched, size_src, size_trg)
    title = f"{model}: {len(points)} points, {int(mutual.sum())} mutual (green outline)"
    return points, matched, mutual, draw_matches(src, trg, points, matched, correct=mutual, title=title)


def correspond_many(
    src_path: str | Path, root: str | Path, targets: Sequence[str], points: Tensor | None = None,
    model: str = "sd21", size: int | None = None, layers: str = "dift", timestep: int = 261, ensemble_size: int = 1,
    prompt: str = "", grid: int = 6, seed: int = 0, device: str | torch.device | None = None,
    torch_dtype: str | torch.dtype | None = None, picture_dir: str | Path | None = None, err: Any = None,
) -> tuple[list[dict[str, Any]], list[Path], list[tuple[str, str]]]:
    """Match SRC's points into every ``root/<target>``; the model and SRC's features are computed once.

    Args:
        picture_dir: where each target's picture goes, as ``<target path>.png`` (None: no pictures).
        others: see :func:`correspond`.

    Returns:
        rows ({"target", "point", "src_x", "src_y", "trg_x", "trg_y", "mutual"}, one per point and target),
        the pictures written, and the skipped (target, reason) pairs (unreadable images).
    """
    import sys

    from tqdm.auto import tqdm

    from ..images import UnreadableImageError
    from ..viz import save_png

    err = err or sys.stderr
    src = _open(src_path, "SRC image")
    bb = _backbone(model, layers, timestep, ensemble_size, device=device, torch_dtype=torch_dtype)
    side = _side(bb, model, size)
    feat_src = _features(bb, [src], side, prompt, seed)[0]
    rows, pictures, skipped = [], [], []
    for rel in tqdm(targets, desc="correspond", unit="img", file=err):
        try:
            trg = to_rgb8(open_image(Path(root) / rel, name=rel))
        except UnreadableImageError as e:
            skipped.append((rel, str(e)))
            tqdm.write(f"skipped unreadable image {e}", file=err)
            continue
        pts, matched, mutual, picture = _match(src, trg, feat_src, _features(bb, [trg], side, prompt, seed)[0],
                                               points, grid, model)
        if picture_dir is not None:
            pictures.append(save_png(picture, Path(picture_dir) / f"{rel.rsplit('.', 1)[0]}.png"))
        rows += [{"target": rel, "point": i, "src_x": sx, "src_y": sy, "trg_x": tx, "trg_y": ty, "mutual": bool(m)}
                 for i, ((sx, sy), (tx, ty), m) in enumerate(zip(pts.tolist(), matched.tolist(), mutual.tolist(),
                                                                  strict=True))]
    return rows, pictures, skipped
