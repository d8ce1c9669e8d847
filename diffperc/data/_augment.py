"""The training augmentations of the VPD recipes on uint8 images, as their libraries compute them.

VPD (Zhao et al., ICCV 2023, github.com/wl-zhao/VPD) trains depth with GLPDepth's pipeline
(``depth/dataset/base_dataset.py``: CutDepth, then albumentations ``HorizontalFlip``,
``RandomCrop``, ``RandomBrightnessContrast``, ``RandomGamma``, ``HueSaturationValue``) and
semantic segmentation with mmseg 0.x's ADE20K pipeline (``Resize``, ``RandomCrop``,
``RandomFlip``, ``PhotoMetricDistortion``). Those run on (H, W, 3) uint8 RGB arrays with
OpenCV's 8-bit colour conversions and lookup tables; this module does the same arithmetic in
numpy (no OpenCV), step for step, drawing random numbers in the libraries' order from the
generator it is given:

- ``rng`` of the albumentations/CutDepth functions: Python's ``random`` module or a
  ``random.Random`` (albumentations 1.x and GLPDepth draw from ``random``);
- ``rng`` of the mmseg functions: the ``numpy.random`` module or a ``numpy.random.RandomState``
  (mmseg 0.x draws from ``numpy.random``).

Lightning's ``seed_everything(workers=True)`` seeds both per data-loader worker.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "albu_brightness_contrast", "albu_gamma", "albu_shift_hsv", "cut_depth", "hsv_to_rgb_u8", "nyu_vpd_augment",
    "photo_metric_distortion", "resize_bilinear_u8", "resize_nearest", "rgb_to_hsv_u8",
]

_HSV_SHIFT = 12  # OpenCV's fixed-point precision of the 8-bit RGB -> HSV conversion
_SDIV = np.array([0] + [round((255 << _HSV_SHIFT) / i) for i in range(1, 256)], dtype=np.int64)
_HDIV180 = np.array([0] + [round((180 << _HSV_SHIFT) / (6.0 * i)) for i in range(1, 256)], dtype=np.int64)
# OpenCV's HSV -> RGB sector table: which of (v, p, q, t) goes to (b, g, r)
_CV_SIMD_PIXELS = 32  # pixels per vector-loop iteration of OpenCV's 8-bit HSV -> RGB (AVX2)
_SECTORS = np.array([[1, 3, 0], [1, 0, 2], [3, 0, 1], [0, 2, 1], [0, 1, 3], [2, 1, 0]])


# ---------------------------------------------------------------------------- colour spaces (OpenCV, 8 bit)
def rgb_to_hsv_u8(img: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> uint8 HSV with H in [0, 180): ``cv2.cvtColor(img, COLOR_RGB2HSV)``.

    OpenCV's integer algorithm (``RGB2HSV_b``): v = max, s = round(255 (v - min) / v) and
    h = round(30 * sector-relative difference / (v - min)) via 12-bit reciprocal tables.
    """
    x = img.astype(np.int64)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    v = np.maximum(np.maximum(b, g), r)
    vmin = np.minimum(np.minimum(b, g), r)
    diff = v - vmin
    half = 1 << (_HSV_SHIFT - 1)
    s = (diff * _SDIV[v] + half) >> _HSV_SHIFT
    h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * _HDIV180[diff] + half) >> _HSV_SHIFT  # arithmetic shift: floor, as C++ >> on int
    h = np.where(h < 0, h + 180, h)
    return np.stack([h, s, v], axis=-1).clip(0, 255).astype(np.uint8)


def _one_minus_product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float32 ``1 - a * b`` with one rounding, as the fused multiply-add OpenCV's AVX2 build computes."""
    return (1.0 - a.astype(np.float64) * b.astype(np.float64)).astype(np.float32)


def hsv_to_rgb_u8(hsv: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 HSV (H in [0, 180)) -> uint8 RGB: ``cv2.cvtColor(hsv, COLOR_HSV2RGB)``.

    OpenCV 4.x ``HSV2RGB_b``: float32 h * 6/180, s / 255, v / 255, the sector table, times 255.
    Its vector loop (blocks of 32 pixels per row on AVX2) truncates to uint8; the scalar loop on
    the last ``W mod 32`` pixels of each row rounds to nearest. Both are reproduced; the result
    equals opencv-python 4.10's on every HSV triple (checked once on all 180 x 256 x 256).
    """
    f32, one = np.float32, np.float32(1.0)
    h = hsv[..., 0].astype(f32) * f32(6.0 / 180.0)
    s = hsv[..., 1].astype(f32) * f32(1.0 / 255.0)
    v = hsv[..., 2].astype(f32) * f32(1.0 / 255.0)
    sector = np.floor(h)
    frac = (h - sector).astype(f32)
    tab = np.stack([v, v * (one - s), v * _one_minus_product(s, frac),
                    v * _one_minus_product(s, (one - frac).astype(f32))], axis=-1)
    bgr = np.take_along_axis(tab, _SECTORS[sector.astype(np.int64) % 6], axis=-1) * f32(255.0)
    rgb = bgr[..., ::-1]
    out = np.trunc(rgb)
    tail = hsv.shape[1] - hsv.shape[1] % _CV_SIMD_PIXELS
    if tail < hsv.shape[1]:  # scalar loop: s == 0 gives v exactly, saturate_cast rounds
        grey = np.where((s == 0)[..., None], (v * f32(255.0))[..., None], rgb)
        out[:, tail:] = np.rint(grey[:, tail:])
    return np.clip(out, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------- resizing (mmcv / OpenCV)
def _linear_taps(n_out: int, n_in: int, clamp: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """OpenCV's INTER_LINEAR source indices and 11-bit weights along one axis (``resize.cpp``).

    f = float32((d + 0.5) * in / out - 0.5), s = floor(f); weights round((1 - frac) * 2048) and
    round(frac * 2048). Horizontally (``clamp``) the fraction is 0 outside the image; vertically
    OpenCV keeps it and clips the row indices instead.
    """
    f = ((np.arange(n_out) + 0.5) * (1.0 / (n_out / n_in)) - 0.5).astype(np.float32)
    s = np.floor(f).astype(np.int64)
    frac = (f - s).astype(np.float32)
    if clamp:
        outside = (s < 0) | (s >= n_in - 1)
        frac[outside] = 0
        s = np.clip(s, 0, n_in - 1)
    w0 = np.rint((np.float32(1) - frac).astype(np.float64) * 2048).astype(np.int64)
    w1 = np.rint(frac.astype(np.float64) * 2048).astype(np.int64)
    return np.clip(s, 0, n_in - 1), np.clip(s + 1, 0, n_in - 1), w0, w1


def resize_bilinear_u8(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, C) uint8 -> (h, w, C) uint8 as mmcv's ``imresize`` (``cv2.resize``, INTER_LINEAR) computes it.

    OpenCV's fixed-point path: a horizontal pass with 11-bit weights into int32, then the vertical
    pass of its vector loop, ``(((D0 >> 4) * b0 >> 16) + ((D1 >> 4) * b1 >> 16) + 2) >> 2``. Equal to
    opencv-python 4.10 on the up- and down-scalings it was checked on (no antialiasing: mmseg's
    resize does none).
    """
    if img.shape[:2] == tuple(size):
        return img
    x = img.astype(np.int64).reshape(img.shape[0], img.shape[1], -1)
    xs0, xs1, a0, a1 = _linear_taps(size[1], img.shape[1], clamp=True)
    ys0, ys1, b0, b1 = _linear_taps(size[0], img.shape[0], clamp=False)
    rows = x[:, xs0] * a0[None, :, None] + x[:, xs1] * a1[None, :, None]  # (H, w, C), scaled by 2048
    top, bottom = rows[ys0] >> 4, rows[ys1] >> 4
    out = (((top * b0[:, None, None]) >> 16) + ((bottom * b1[:, None, None]) >> 16) + 2) >> 2
    return np.clip(out, 0, 255).astype(np.uint8).reshape(size[0], size[1], *img.shape[2:])


def resize_nearest(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) labels -> (h, w) with OpenCV's ``INTER_NEAREST``: source index floor(i * H / h) (no half pixel)."""
    h_in, w_in = labels.shape[:2]
    rows = np.minimum(np.floor(np.arange(size[0]) * (1.0 / (size[0] / h_in))).astype(np.int64), h_in - 1)
    cols = np.minimum(np.floor(np.arange(size[1]) * (1.0 / (size[1] / w_in))).astype(np.int64), w_in - 1)
    return labels[rows[:, None], cols[None, :]]


# ---------------------------------------------------------------------------- mmseg 0.x
def _convert(img: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """mmseg's ``PhotoMetricDistortion.convert``: float32 ``img * alpha + beta``, clipped, truncated to uint8."""
    return np.clip(img.astype(np.float32) * np.float32(alpha) + np.float32(beta), 0, 255).astype(np.uint8)


def photo_metric_distortion(img: np.ndarray, rng: Any = np.random, brightness_delta: int = 32,
                            contrast_range: Sequence[float] = (0.5, 1.5), saturation_range: Sequence[float] = (0.5, 1.5),
                            hue_delta: int = 18) -> np.ndarray:
    """mmseg 0.x ``PhotoMetricDistortion`` on (H, W, 3) uint8 RGB (mmseg runs it on BGR; HSV is the same).

    Brightness (+U(-32, 32)), contrast (x U(0.5, 1.5)) first or last (``mode``), saturation
    (x U(0.5, 1.5) on S), hue (+randint(-18, 18) mod 180), each with probability 1/2.
    """

    def contrast(x: np.ndarray) -> np.ndarray:
        return _convert(x, alpha=rng.uniform(*contrast_range)) if rng.randint(2) else x

    if rng.randint(2):
        img = _convert(img, beta=rng.uniform(-brightness_delta, brightness_delta))
    mode = rng.randint(2)
    if mode == 1:  # the code runs contrast first for mode 1 (its docstring says mode 0)
        img = contrast(img)
    if rng.randint(2):
        hsv = rgb_to_hsv_u8(img)
        hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(*saturation_range))
        img = hsv_to_rgb_u8(hsv)
    if rng.randint(2):
        hsv = rgb_to_hsv_u8(img)
        hsv[..., 0] = (hsv[..., 0].astype(np.int64) + rng.randint(-hue_delta, hue_delta)) % 180
        img = hsv_to_rgb_u8(hsv)
    if mode == 0:
        img = contrast(img)
    return img


# ---------------------------------------------------------------------------- albumentations 1.x / GLPDepth
def albu_brightness_contrast(img: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    """albumentations' uint8 ``brightness_contrast_adjust`` (beta by max): LUT clip(x * alpha + 255 beta), truncated."""
    lut = np.arange(256, dtype=np.float32)
    if alpha != 1:
        lut *= np.float32(alpha)
    if beta != 0:
        lut += np.float32(beta * 255)
    return np.clip(lut, 0, 255).astype(np.uint8)[img]


def albu_gamma(img: np.ndarray, gamma: float) -> np.ndarray:
    """albumentations' uint8 ``gamma_transform``: LUT ((i / 255) ** gamma) * 255, truncated."""
    table = (np.arange(0, 256.0 / 255, 1.0 / 255) ** gamma) * 255
    return table.astype(np.uint8)[img]


def albu_shift_hsv(img: np.ndarray, hue_shift: float, sat_shift: float, val_shift: float) -> np.ndarray:
    """albumentations' uint8 ``shift_hsv``: RGB -> HSV, LUT shifts (hue mod 180, S and V clipped), -> RGB."""
    if hue_shift == 0 and sat_shift == 0 and val_shift == 0:
        return img
    hsv = rgb_to_hsv_u8(img)
    base = np.arange(256, dtype=np.int16)
    if hue_shift != 0:
        hsv[..., 0] = np.mod(base + hue_shift, 180).astype(np.uint8)[hsv[..., 0]]
    if sat_shift != 0:
        hsv[..., 1] = np.clip(base + sat_shift, 0, 255).astype(np.uint8)[hsv[..., 1]]
    if val_shift != 0:
        hsv[..., 2] = np.clip(base + val_shift, 0, 255).astype(np.uint8)[hsv[..., 2]]
    return hsv_to_rgb_u8(hsv)


def cut_depth(img: np.ndarray, depth_mm: np.ndarray, rng: Any = random, p: float = 0.75) -> np.ndarray:
    """GLPDepth / VPD CutDepth: a full-height vertical strip of the image replaced by the depth map.

    ``l = int(alpha W)``, ``w = int(max((W - alpha W) beta p, 1))`` with alpha, beta ~ U(0, 1).
    VPD writes the float depth in **millimetres** into the uint8 image, so each strip pixel is
    numpy's float -> uint8 cast of the depth: trunc(mm) mod 256 on x86-64 (done explicitly here),
    not a depth scaled to the image range.

    Args:
        img: (H, W, 3) uint8 RGB (not modified).
        depth_mm: (H, W) float depth in millimetres (0 = missing).

    Returns:
        (H, W, 3) uint8, a copy.
    """
    out = img.copy()
    width = img.shape[1]
    alpha, beta = rng.random(), rng.random()
    left = int(alpha * width)
    w = int(max((width - alpha * width) * beta * p, 1))
    strip = (np.trunc(depth_mm[:, left : left + w]).astype(np.int64) % 256).astype(np.uint8)
    out[:, left : left + w, :] = strip[..., None]
    return out


def nyu_vpd_augment(img: np.ndarray, depth: np.ndarray, crop_size: tuple[int, int], rng: Any = random,
                    color_aug: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """VPD's albumentations ``Compose`` (flip, crop, brightness/contrast, gamma, HSV) on an image and its depth.

    Random numbers in albumentations 1.x order: the Compose's own draw, then per transform the
    probability draw followed by its parameters (``RandomCrop``: h_start, w_start; crop rows
    ``int((H - h + 1) h_start)``). Sides smaller than the crop are kept whole (albumentations
    raises instead). ``color_aug=False`` skips the three colour transforms (and their draws).

    Returns:
        the (h, w, 3) uint8 image and (h, w) depth, contiguous copies.
    """
    rng.random()  # Compose(p=1): need_to_run
    if rng.random() < 0.5:  # HorizontalFlip(p=0.5)
        img, depth = img[:, ::-1], depth[:, ::-1]
    rng.random()  # RandomCrop(p=1)
    h_start, w_start = rng.random(), rng.random()
    ch, cw = min(crop_size[0], img.shape[0]), min(crop_size[1], img.shape[1])
    top, left = int((img.shape[0] - ch + 1) * h_start), int((img.shape[1] - cw + 1) * w_start)
    img, depth = img[top : top + ch, left : left + cw], depth[top : top + ch, left : left + cw]
    if color_aug:
        if rng.random() < 0.5:  # RandomBrightnessContrast(0.2, 0.2): alpha (contrast) drawn first
            alpha = 1.0 + rng.uniform(-0.2, 0.2)
            beta = 0.0 + rng.uniform(-0.2, 0.2)
            img = albu_brightness_contrast(img, alpha, beta)
        if rng.random() < 0.5:  # RandomGamma((80, 120))
            img = albu_gamma(img, rng.uniform(80, 120) / 100.0)
        if rng.random() < 0.5:  # HueSaturationValue(20, 30, 20)
            hue, sat, val = rng.uniform(-20, 20), rng.uniform(-30, 30), rng.uniform(-20, 20)
            img = albu_shift_hsv(img, hue, sat, val)
    return np.ascontiguousarray(img), np.ascontiguousarray(depth)
