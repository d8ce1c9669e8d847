"""Pictures a person can judge: feature PCA, cross-attention heatmaps, labelled grids, atomic PNGs.

PIL + numpy only (no matplotlib). Every function is pure: tensors in, ``PIL.Image`` out;
:func:`save_png` is the only one that touches the disk, and it writes to a temporary file
in the target folder, then renames it, so a crash never leaves half a PNG.

    from diffperc import viz
    viz.save_png(viz.feature_pca_image(out.features[1][0], size=128), "pca.png")
    viz.save_png(viz.attention_grid(images[0], out.attention[16][0, :n], tokens), "attn.png")
    viz.save_png(viz.depth_to_image(pred[0], max_depth=10.0), "depth.png")      # with a colour bar
    viz.save_png(viz.mask_overlay(images[0], mask[0]), "mask.png")               # class colours over the image
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from ._io import atomic_file

__all__ = ["attention_grid", "colorize", "depth_to_image", "feature_pca", "feature_pca_image", "image_grid",
           "label_palette", "mask_overlay", "save_png", "to_pil"]

# matplotlib's "inferno" sampled at 9 evenly spaced points (dark = low, bright yellow = high).
_INFERNO = np.array(
    [[0, 0, 4], [31, 12, 72], [85, 15, 109], [136, 34, 106], [186, 54, 85],
     [227, 89, 51], [249, 140, 10], [249, 201, 50], [252, 255, 164]], dtype=np.float32,
) / 255.0


def _font(size: int = 12) -> ImageFont.ImageFont:
    """PIL's default font (scalable where FreeType is available, else the bitmap font)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sizes
        return ImageFont.load_default()


def to_pil(image: Tensor | np.ndarray) -> Image.Image:
    """(3, H, W) or (1, H, W) or (H, W) floats in [0, 1] -> RGB image (values are clipped)."""
    arr = image.detach().float().cpu().numpy() if isinstance(image, Tensor) else np.asarray(image, dtype=np.float32)
    if arr.ndim == 3 and arr.shape[0] in (1, 3):
        arr = arr.transpose(1, 2, 0)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"image must be (3, H, W), (1, H, W) or (H, W) in [0, 1], got shape {image.shape}")
    return Image.fromarray((np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8))


def colorize(values: np.ndarray) -> np.ndarray:
    """Map (H, W) values in [0, 1] to (H, W, 3) RGB floats with the inferno colour map."""
    x = np.clip(np.asarray(values, dtype=np.float32), 0, 1) * (len(_INFERNO) - 1)
    lo = np.floor(x).astype(int).clip(0, len(_INFERNO) - 2)
    frac = (x - lo)[..., None]
    return _INFERNO[lo] * (1 - frac) + _INFERNO[lo + 1] * frac


def _robust_unit(x: Tensor, q: float = 0.01) -> Tensor:
    """Scale each row of (K, N) to [0, 1] between its q and 1-q quantiles (constant rows -> 0.5)."""
    lo = torch.quantile(x, q, dim=1, keepdim=True)
    hi = torch.quantile(x, 1 - q, dim=1, keepdim=True)
    span = hi - lo
    out = (x - lo) / span.clamp_min(1e-12)
    return torch.where(span > 1e-12, out, torch.full_like(x, 0.5)).clamp(0, 1)


def feature_pca(features: Tensor, n_components: int = 3, fit_border: int = 0) -> Tensor:
    """Project feature maps onto their first principal components, fitted over all pixels.

    Fitting one PCA over a whole batch gives every image the same colours for the same
    feature directions, so maps of different images can be compared.

    Args:
        features: (C, h, w) or (N, C, h, w) feature maps.
        n_components: components to keep (3 for RGB). Missing ones (C < n) are 0.5 grey.
        fit_border: leave this many pixels at each edge out of the fit (all pixels are still
            projected). Zero padding makes edge features outliers that can take over the
            first components of small maps; 1 keeps them from doing so.

    Returns:
        (N, n_components, h, w) floats in [0, 1] (N = 1 for a single map); each component
        is scaled between its 1st and 99th percentile. Signs are fixed (largest loading
        positive), so the output is deterministic.
    """
    if features.ndim == 3:
        features = features[None]
    if features.ndim != 4:
        raise ValueError(f"features must be (C, h, w) or (N, C, h, w), got shape {tuple(features.shape)}")
    n, c, h, w = features.shape
    if fit_border < 0 or 2 * fit_border >= min(h, w):
        raise ValueError(f"fit_border must be in [0, {(min(h, w) - 1) // 2}] for {h}x{w} maps, got {fit_border}")
    feats = features.detach().double().cpu()
    if not torch.isfinite(feats).all():
        raise ValueError("features contain NaN or Inf")
    b = fit_border
    fit = feats[..., b : h - b, b : w - b].permute(0, 2, 3, 1).reshape(-1, c)  # (pixels, C)
    mean = fit.mean(0)
    fit = fit - mean
    x = feats.permute(0, 2, 3, 1).reshape(-1, c) - mean  # (N*h*w, C)
    eigvals, eigvecs = torch.linalg.eigh(fit.T @ fit)  # ascending
    k = min(n_components, c)
    comps = eigvecs[:, torch.argsort(eigvals, descending=True)[:k]]  # (C, k)
    signs = torch.sign(comps.gather(0, comps.abs().argmax(0, keepdim=True)))  # largest loading > 0
    proj = (x @ (comps * signs)).T  # (k, N*h*w)
    out = torch.full((n_components, proj.shape[1]), 0.5, dtype=torch.float64)
    out[:k] = _robust_unit(proj)
    return out.reshape(n_components, n, h, w).transpose(0, 1).float()


def feature_pca_image(feat: Tensor, size: int | tuple[int, int] = 128, resample: int = Image.NEAREST) -> Image.Image:
    """First 3 PCA components of one feature map as an RGB picture.

    Args:
        feat: (C, h, w) feature map.
        size: output side (int) or (width, height) in pixels.
        resample: PIL filter for upsampling; NEAREST (default) shows the true resolution.

    Returns:
        RGB image of ``size``.
    """
    if feat.ndim != 3:
        raise ValueError(f"feat must be one (C, h, w) feature map, got shape {tuple(feat.shape)}")
    size = (size, size) if isinstance(size, int) else tuple(size)
    return to_pil(feature_pca(feat)[0]).resize(size, resample)


def _overlay(base: np.ndarray, heat: np.ndarray, alpha: float) -> np.ndarray:
    """Blend a colour-mapped heat (H, W) in [0, 1] over a greyscale copy of base (H, W, 3)."""
    grey = base.mean(2, keepdims=True)
    return (1 - alpha) * grey + alpha * colorize(heat)


def attention_grid(
    image: Tensor, maps: Tensor, tokens: Sequence[str], size: int = 96, alpha: float = 0.8,
    scale: str = "minmax", show_input: bool = True, font_size: int = 12,
) -> Image.Image:
    """One panel per prompt token: its cross-attention map as a heatmap over the image.

    Each map is upsampled (bilinear) and stretched to the colour map on its own, so every
    panel shows *where* its token looks, however little attention it gets; the label gives
    the token and the map's value range, so weak and flat maps are recognisable as such.

    Args:
        image: (3, H, W) floats in [0, 1].
        maps: (L, h, w) attention values, one map per token.
        tokens: L token strings (labels).
        size: side of each panel in pixels.
        alpha: weight of the heatmap over a greyscale copy of the image (1 = heatmap only).
        scale: ``"minmax"`` maps each panel's [min, max] to the colour map (shows structure
            in near-uniform maps); ``"max"`` maps [0, max] (shows how peaked a map is).
        show_input: put the plain image first.
        font_size: label size.

    Returns:
        RGB image: one row of labelled panels.
    """
    if maps.ndim != 3 or len(tokens) != maps.shape[0]:
        raise ValueError(f"maps must be (L, h, w) with one token per map; got maps {tuple(maps.shape)} "
                         f"and {len(tokens)} tokens")
    if scale not in ("minmax", "max"):
        raise ValueError(f"scale must be 'minmax' or 'max', got {scale!r}")
    base = np.asarray(to_pil(image).resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
    maps = maps.detach().float().cpu()
    up = torch.nn.functional.interpolate(maps[None], size=(size, size), mode="bilinear", align_corners=False)[0]
    panels, labels = [], []
    if show_input:
        panels.append(to_pil(base))
        labels.append("input\n")
    for token, m, raw in zip(tokens, up, maps, strict=True):
        lo = raw.min().item() if scale == "minmax" else 0.0
        hi = raw.max().item()
        heat = ((m - lo) / (hi - lo)).clamp(0, 1).numpy() if hi > lo else np.zeros((size, size), np.float32)
        panels.append(to_pil(_overlay(base, heat, alpha)))
        labels.append(f"{token}\n{raw.min().item():.3f}-{hi:.3f}")
    return image_grid(panels, nrow=len(panels), labels=labels, font_size=font_size)


def image_grid(
    images: Sequence[Image.Image | Tensor], nrow: int, labels: Sequence[str] | None = None,
    pad: int = 4, font_size: int = 12, background: tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """Tile images row by row, ``nrow`` per row, with an optional label under each.

    Args:
        images: PIL images or (3, H, W) tensors in [0, 1]; cells are as large as the largest.
        nrow: images per row.
        labels: one string per image (``"\\n"`` for several lines), drawn in black under it.
        pad: pixels between cells.
        font_size: label size.
        background: RGB of the gaps.

    Returns:
        RGB image.
    """
    if not images:
        raise ValueError("image_grid needs at least one image")
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"got {len(labels)} labels for {len(images)} images")
    tiles = [im.convert("RGB") if isinstance(im, Image.Image) else to_pil(im) for im in images]
    font = _font(font_size)
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    boxes = [draw.multiline_textbbox((0, 0), t, font=font) for t in labels] if labels else []
    label_h = max((b[3] for b in boxes), default=0) + (pad if labels else 0)
    cell_w = max([t.width for t in tiles] + [b[2] for b in boxes])
    cell_h = max(t.height for t in tiles) + label_h
    ncol, nrows = min(nrow, len(tiles)), -(-len(tiles) // nrow)
    grid = Image.new("RGB", (ncol * cell_w + (ncol + 1) * pad, nrows * cell_h + (nrows + 1) * pad), background)
    draw = ImageDraw.Draw(grid)
    for i, tile in enumerate(tiles):
        x = pad + (i % nrow) * (cell_w + pad)
        y = pad + (i // nrow) * (cell_h + pad)
        grid.paste(tile, (x + (cell_w - tile.width) // 2, y))
        if labels:
            draw.multiline_text((x + (cell_w - boxes[i][2]) // 2, y + tile.height + pad // 2), labels[i],
                                fill=(0, 0, 0), font=font, align="center")
    return grid


def _as_2d(x: Tensor | np.ndarray, arg: str) -> np.ndarray:
    arr = x.detach().float().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise ValueError(f"{arg} must be (H, W) or (1, H, W), got shape {tuple(arr.shape)}")
    return arr


def depth_to_image(
    depth: Tensor | np.ndarray, max_depth: float, min_depth: float = 0.0, bar_width: int | None = None,
    font_size: int = 11, invalid_color: tuple[int, int, int] = (128, 128, 128),
) -> Image.Image:
    """A depth map in the inferno colour map (near = dark, far = bright) with a labelled colour bar.

    Args:
        depth: (H, W) or (1, H, W) depths in metres.
        max_depth, min_depth: the depths of the brightest and darkest colours (values outside are clipped).
        bar_width: width of the colour bar in pixels (default: max(6, W // 20)).
        font_size: size of the tick labels (max, middle and min depth, in metres).
        invalid_color: RGB of pixels that are not finite or <= 0 (no ground truth).

    Returns:
        RGB image of height H: the coloured map, then the bar and its labels on the right.
    """
    d = _as_2d(depth, "depth").astype(np.float32)
    if not max_depth > min_depth:
        raise ValueError(f"max_depth must be > min_depth, got {max_depth} and {min_depth}")
    h, w = d.shape
    valid = np.isfinite(d) & (d > 0)
    unit = np.where(valid, (np.nan_to_num(d) - min_depth) / (max_depth - min_depth), 0.0)
    rgb = (colorize(unit) * 255 + 0.5).astype(np.uint8)
    rgb[~valid] = invalid_color
    bar_w = bar_width or max(6, w // 20)
    font = _font(font_size)
    labels = [f"{v:.2f} m" for v in (max_depth, (max_depth + min_depth) / 2, min_depth)]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    boxes = [probe.textbbox((0, 0), t, font=font) for t in labels]
    gap = 4
    out = Image.new("RGB", (w + 2 * gap + bar_w + max(b[2] for b in boxes) + gap, h), (255, 255, 255))
    out.paste(Image.fromarray(rgb), (0, 0))
    ramp = colorize(np.linspace(1, 0, h, dtype=np.float32)[:, None].repeat(bar_w, 1))  # top = max
    out.paste(Image.fromarray((ramp * 255 + 0.5).astype(np.uint8)), (w + gap, 0))
    draw = ImageDraw.Draw(out)
    x = w + 2 * gap + bar_w
    for text, y in zip(labels, (0, (h - boxes[1][3]) // 2, h - boxes[2][3] - 1), strict=True):
        draw.text((x, max(0, y)), text, fill=(0, 0, 0), font=font)
    return out


def label_palette(n: int) -> np.ndarray:
    """(n, 3) uint8 colours for class ids 0 .. n-1: the PASCAL VOC bit-interleaved colour map of id + 1.

    Shifting by one keeps class 0 (ADE20K's wall, or a foreground) from being drawn black.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    ids = np.arange(1, n + 1)
    out = np.zeros((n, 3), dtype=np.int64)
    for shift in range(8):
        for ch in range(3):
            out[:, ch] |= ((ids >> (3 * shift + ch)) & 1) << (7 - shift)
    return out.astype(np.uint8)


def mask_overlay(
    image: Tensor | np.ndarray, mask: Tensor | np.ndarray, palette: Sequence[Sequence[int]] | np.ndarray | None = None,
    alpha: float = 0.5, ignore_index: int | None = 255, background: int | None = None,
) -> Image.Image:
    """Class colours of a label mask blended over the image.

    Args:
        image: (3, H, W) floats in [0, 1].
        mask: (H, W) or (1, H, W) integer class ids.
        palette: one RGB triplet (0-255) per class id; default :func:`label_palette` (256 colours).
        alpha: weight of the class colour (0 = image only, 1 = colours only).
        ignore_index: id drawn as the plain image (255, the "ignore" label), or None.
        background: another id drawn as the plain image (e.g. 0 for a referring mask), or None.

    Returns:
        RGB image (W, H).
    """
    base = np.asarray(to_pil(image), dtype=np.float32)  # (H, W, 3)
    m = _as_2d(mask, "mask")
    if m.shape != base.shape[:2]:
        raise ValueError(f"mask must match the image's (H, W) = {base.shape[:2]}, got {m.shape}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    m = m.astype(np.int64)
    pal = label_palette(256) if palette is None else np.asarray(palette, dtype=np.float32).reshape(-1, 3)
    keep = np.ones_like(m, dtype=bool)
    for skip in (ignore_index, background):
        if skip is not None:
            keep &= m != skip
    bad = keep & ((m < 0) | (m >= len(pal)))
    if bad.any():
        raise ValueError(f"mask has class ids {np.unique(m[bad])[:8].tolist()} outside the palette's 0..{len(pal) - 1}")
    colours = pal[np.where(keep, m, 0)].astype(np.float32)  # (H, W, 3)
    blended = np.where(keep[..., None], (1 - alpha) * base + alpha * colours, base)
    return Image.fromarray(np.clip(blended + 0.5, 0, 255).astype(np.uint8))


def save_png(img: Image.Image, path: str | os.PathLike) -> Path:
    """Write ``img`` as PNG atomically (temp file in the same folder, then rename); returns the path."""
    path = Path(path)
    with atomic_file(path) as tmp:
        img.save(tmp, format="PNG")
    return path
