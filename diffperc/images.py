"""The one image loader of diffperc: every command and folder dataset opens images here.

:func:`open_image` reads a file or bytes with an allow-list of decoders (PNG, JPEG, WebP, BMP,
TIFF, GIF: first frame), refuses images whose header declares more than ``max_pixels`` before
anything is decoded (a small file can declare a huge image), applies the EXIF orientation and
converts every mode to one of two:

- ``"RGB"`` (8 bits per channel): palette, greyscale, CMYK, YCbCr, ... converted by Pillow;
  alpha (``RGBA``, ``LA``, palette transparency) composited over ``background`` (white);
- ``"F"`` (one float channel in [0, 1]): 16-bit greyscale scaled by 1/65535, 32-bit integer
  greyscale by 1/(2^32 - 1) unless its values fit 16 bits, float greyscale kept if inside
  [0, 1] and divided by its maximum otherwise (never clipped, so a 16-bit PNG does not turn white).

:func:`to_tensor` makes (3, H, W) float32 in [0, 1] of either; :func:`fit` resizes to a square
by ``stretch``, ``crop`` (short side to the size, centre crop) or ``pad`` (long side to the
size, grey padding). Nothing else in the library calls ``PIL.Image.open`` on user images.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["ALLOWED_FORMATS", "DEFAULT_MAX_PIXELS", "IMAGE_SUFFIXES", "RESIZE_MODES", "UnreadableImageError",
           "fit", "fit_box", "load_image", "open_image", "to_rgb8", "to_tensor"]

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF")  # Pillow format names; no EPS, ICO, PSD, ...
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DEFAULT_MAX_PIXELS = 64_000_000  # 8000 x 8000: far above any photo, far below a decompression bomb
RESIZE_MODES = ("stretch", "crop", "pad")
PAD_VALUE = 0.5  # grey: 0 in [-1, 1], as VPD pads


class UnreadableImageError(OSError, ValueError):
    """A file or upload that is not a usable image: not an allowed format, truncated, corrupt or too large."""


def _check_pixels(name: str, size: tuple[int, int], max_pixels: int) -> None:
    w, h = size
    if w * h > max_pixels:
        raise UnreadableImageError(f"{name}: {w}x{h} = {w * h / 1e6:.0f} MP exceeds the limit of "
                                   f"{max_pixels / 1e6:.0f} MP (decompression bomb?); resize it first")


def _high_depth_to_float(im: Image.Image) -> Image.Image:
    """A single-channel image of more than 8 bits (I;16*, I, F) -> mode ``"F"`` in [0, 1]."""
    a = np.asarray(im)
    if im.mode.startswith("I;16"):
        scale = 65535.0
    elif im.mode == "I":  # Pillow opens 16-bit greyscale PNGs as "I"
        scale = 65535.0 if a.size == 0 or (a.min() >= 0 and a.max() <= 65535) else 4294967295.0
        a = a - a.min() if a.size and a.min() < 0 else a
    else:  # "F"
        a = np.nan_to_num(a.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 1.0)
        scale = 1.0 if lo >= 0 and hi <= 1 else max(hi, 1e-12)
        a = a - lo if lo < 0 else a
    return Image.fromarray((a.astype(np.float64) / scale).astype(np.float32), mode="F")


def _to_rgb_or_float(im: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _high_depth_to_float(im)
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, I;16 RGB rawmodes


def open_image(source: str | os.PathLike | bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
               background: tuple[int, int, int] = (255, 255, 255), name: str | None = None) -> Image.Image:
    """Decode an image (first frame), EXIF orientation applied; mode ``"RGB"`` or ``"F"`` (see module docstring).

    Args:
        source: a file path or the encoded bytes.
        max_pixels: images whose header declares more pixels are refused before decoding.
        background: colour under transparent pixels.
        name: how errors name the image (default: the path, or "upload").

    Raises:
        FileNotFoundError: the path does not exist.
        UnreadableImageError: not an allowed format, truncated, corrupt or too large.
    """
    if isinstance(source, (bytes, bytearray)):
        name, stream = name or "upload", io.BytesIO(source)
    else:
        path = Path(source).expanduser()
        label = name or f"image {path}"
        name = name or str(path)
        if not path.is_file():
            raise FileNotFoundError(f"{label} does not exist" if not path.exists() else f"{label} is not a file")
        stream = path
    try:
        with Image.open(stream, formats=ALLOWED_FORMATS) as im:  # reads the header only
            _check_pixels(name, im.size, max_pixels)
            im.seek(0)
            im.load()  # decodes the first frame: a truncated file fails here, not later
            im = ImageOps.exif_transpose(im) or im
            return _to_rgb_or_float(im, background)
    except UnreadableImageError:
        raise
    except Image.DecompressionBombError as err:
        raise UnreadableImageError(f"{name}: decompression bomb: {err}") from err
    except UnidentifiedImageError as err:
        raise UnreadableImageError(f"{name}: not an image of an allowed format ({', '.join(ALLOWED_FORMATS)}); "
                                   "convert it to PNG or JPEG") from err
    except (OSError, SyntaxError, ValueError, EOFError, TypeError) as err:
        raise UnreadableImageError(f"{name}: truncated or corrupt image ({type(err).__name__}: {err})") from err


def to_rgb8(im: Image.Image) -> Image.Image:
    """An :func:`open_image` result as 8-bit RGB (for drawing, or code that needs ``uint8``)."""
    if im.mode == "F":
        return Image.fromarray(np.clip(np.asarray(im) * 255.0 + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def to_tensor(im: Image.Image) -> Any:
    """An :func:`open_image` result (RGB or F) -> (3, H, W) float32 tensor in [0, 1]."""
    import torch

    a = np.asarray(im)
    if im.mode == "F":
        return torch.from_numpy(np.array(a, dtype=np.float32))[None].expand(3, -1, -1).contiguous()
    return torch.from_numpy(np.array(to_rgb8(im), dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)


def fit_box(width: int, height: int, size: int, mode: str) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """Where an image lands in a ``size`` x ``size`` square.

    Returns:
        (resized width, height) and the box (left, top, right, bottom): for ``stretch`` the whole
        square; for ``crop`` the crop taken from the resized image; for ``pad`` where the resized
        image is pasted in the square.
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"--resize must be one of {', '.join(RESIZE_MODES)}, got {mode!r}")
    if mode == "stretch":
        return (size, size), (0, 0, size, size)
    scale = size / (min(width, height) if mode == "crop" else max(width, height))
    rw, rh = max(1, round(width * scale)), max(1, round(height * scale))
    if mode == "crop":
        rw, rh = max(rw, size), max(rh, size)
        left, top = (rw - size) // 2, (rh - size) // 2
        return (rw, rh), (left, top, left + size, top + size)
    rw, rh = min(rw, size), min(rh, size)
    left, top = (size - rw) // 2, (size - rh) // 2
    return (rw, rh), (left, top, left + rw, top + rh)


def fit(im: Image.Image, size: int, mode: str = "stretch") -> Image.Image:
    """Resize an :func:`open_image` result to ``size`` x ``size`` (bilinear): stretch, crop or pad (grey)."""
    (rw, rh), box = fit_box(im.width, im.height, size, mode)
    resized = im.resize((rw, rh), Image.BILINEAR)
    if mode == "stretch":
        return resized
    if mode == "crop":
        return resized.crop(box)
    fill: float | tuple[int, ...] = PAD_VALUE if im.mode == "F" else (128, 128, 128)
    canvas = Image.new(im.mode, (size, size), fill)
    canvas.paste(resized, box[:2])
    return canvas


def load_image(source: str | os.PathLike | bytes, size: int | Sequence[int] | None = None, mode: str = "stretch",
               max_pixels: int = DEFAULT_MAX_PIXELS) -> Any:
    """:func:`open_image` -> optionally :func:`fit` to ``size`` -> (3, H, W) float32 tensor in [0, 1]."""
    im = open_image(source, max_pixels=max_pixels)
    if size is not None:
        im = fit(im, int(size if isinstance(size, int) else size[0]), mode)
    return to_tensor(im)
