"""Foreground / background masks of support images: pluggable instance proposers + the released selection.

karazijal/sdov ``sample_support_set.py:222-268``: an instance proposer (CutLER there) gives masks;
a background region (pixels in no instance) is put first; each region is weighted by its mean
heatmap; the regions are sorted by weight and every pixel takes the heaviest region covering it.
Foreground = the top region; background = the lowest-ranked region present, intersected with
heatmap < 0.2 and eroded once (3x3 cross, borders kept: skimage's ``binary_erosion``). With no
instance (fewer than two regions) the released fallback applies: fg = heatmap > 0.5,
bg = heatmap < 0.2.

Proposers (``MaskProposer``: ``(3, H, W)`` image in [0, 1] -> ``(K, H, W)`` bool instance masks):
``"threshold"`` (no instances: always the fallback), ``"maskcut"`` (:mod:`.maskcut` on DINO
ViT-B/8 keys; ``"maskcut:test_dino"`` for a tiny random ViT), or ``"module:function"``: any
importable callable, the hook for CutLER, SAM or another detector a user has installed.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .support import SupportSet

__all__ = ["CallableProposer", "MaskCutProposer", "MaskProposer", "ThresholdProposer", "load_proposer",
           "select_fg_bg", "support_masks"]


class MaskProposer(Protocol):
    """Instance masks of an image: ``proposer(image (3, H, W) in [0, 1]) -> (K, H, W) bool``."""

    key: str

    def __call__(self, image: Tensor) -> Tensor: ...


class ThresholdProposer:
    """No instances, so :func:`select_fg_bg` uses the released fallback (fg > 0.5, bg < 0.2)."""

    key = "threshold"

    def __call__(self, image: Tensor) -> Tensor:
        return torch.zeros(0, *image.shape[-2:], dtype=torch.bool)


class MaskCutProposer:
    """MaskCut on DINO keys (:func:`~diffperc.zeroshot.ovseg.maskcut.maskcut`).

    Args:
        extractor: a :class:`~diffperc.zeroshot.ovseg.extractors.ViTKeyExtractor` (DINO ViT-B/8).
        num_masks, tau: CutLER's ``--N 3 --tau 0.15``.
        fixed_size: images are resized (LANCZOS) to this square first (CutLER's 480).
        backend: eigen-solver (``"auto"``, ``"scipy"``, ``"torch"``).
    """

    def __init__(self, extractor, num_masks: int = 3, tau: float = 0.15, fixed_size: int = 480,
                 backend: str = "auto") -> None:
        self.extractor, self.num_masks, self.tau, self.fixed_size, self.backend = (
            extractor, num_masks, tau, fixed_size, backend)
        self.key = f"maskcut-{extractor.key}-n{num_masks}-tau{tau:g}-s{fixed_size}"

    def __call__(self, image: Tensor) -> Tensor:
        from PIL import Image

        from .maskcut import maskcut

        h, w = image.shape[-2:]
        pil = Image.fromarray((image.clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy())
        pil = pil.resize((self.fixed_size, self.fixed_size), Image.LANCZOS)
        x = torch.from_numpy(np.array(pil)).permute(2, 0, 1).float()[None] / 255
        feats = self.extractor.keys(self.extractor.normalise(x.to(self.extractor.device)))[0]
        masks = maskcut(feats, self.num_masks, self.tau, self.backend).float()
        if not len(masks):
            return torch.zeros(0, h, w, dtype=torch.bool)
        return F.interpolate(masks[:, None], size=(h, w), mode="nearest")[:, 0].bool().cpu()


class CallableProposer:
    """Wrap any ``fn(image (3, H, W) in [0, 1]) -> (K, H, W)`` masks (CutLER, SAM, ...)."""

    def __init__(self, fn, key: str) -> None:
        self.fn, self.key = fn, key

    def __call__(self, image: Tensor) -> Tensor:
        masks = torch.as_tensor(self.fn(image))
        if masks.ndim != 3 or masks.shape[-2:] != image.shape[-2:]:
            raise ValueError(f"mask proposer {self.key!r} must return (K, H, W) masks for an image of size "
                             f"{tuple(image.shape[-2:])}, got {tuple(masks.shape)}")
        return masks.bool().cpu()


def load_proposer(spec: str, device: torch.device | str | None = None) -> MaskProposer:
    """``"threshold"``, ``"maskcut"`` (DINO ViT-B/8), ``"maskcut:<vit name>"`` or ``"package.module:function"``."""
    if spec == "threshold":
        return ThresholdProposer()
    if spec == "maskcut" or spec.startswith("maskcut:"):
        from .extractors import ViTKeyExtractor, create_vit

        name = spec.partition(":")[2] or "dino_vitb8"
        model, _ = create_vit(name)
        if device is not None:
            model = model.to(device)
        # tiny test ViTs see 32 px (a 4x4 grid) instead of CutLER's 480
        return MaskCutProposer(ViTKeyExtractor(model, layer=-1, name=name), fixed_size=32 if name.startswith("test_") else 480)
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"mask_proposer must be 'threshold', 'maskcut', 'maskcut:<vit>' or 'package.module:function', "
                         f"got {spec!r}")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"mask_proposer {spec!r}: cannot import {attr!r} from {module!r} ({err})") from err
    return CallableProposer(fn, key=spec.replace(":", "."))


def _erode(mask: Tensor) -> Tensor:
    """One binary erosion with a 3x3 cross, pixels beyond the border count as set (skimage 0.19)."""
    from scipy import ndimage

    structure = ndimage.generate_binary_structure(2, 1)
    return torch.from_numpy(ndimage.binary_erosion(mask.cpu().numpy(), structure=structure, border_value=1))


def select_fg_bg(instances: Tensor, heatmap: Tensor, fg_thresh: float = 0.5, bg_thresh: float = 0.2) -> tuple[Tensor, Tensor]:
    """Foreground and background masks of one support image (``sample_support_set.py:227-268``).

    Args:
        instances: (K, H, W) bool instance masks (K = 0: the threshold fallback).
        heatmap: (H, W) the class tokens' attention in [0, 1].
        fg_thresh, bg_thresh: the fallback thresholds (released 0.5, 0.2; bg_thresh also trims
            the background region).

    Returns:
        fg, bg: (H, W) bool.
    """
    hm = heatmap.float().cpu()
    inst = instances.bool().cpu()
    inst = inst[inst.flatten(1).any(1)] if len(inst) else inst
    if len(inst) == 0:  # r.shape[0] < 2: no instance besides the background
        return hm > fg_thresh, hm < bg_thresh
    regions = torch.cat([~inst.any(0, keepdim=True), inst]).float()  # background region first
    regions = regions[regions.flatten(1).sum(1) > 0]  # an empty region would weigh 0/0 (not in the released data)
    weights = (regions * hm / regions.sum((-1, -2), keepdim=True)).sum((-1, -2))  # mean heatmap per region
    order = torch.argsort(weights, descending=True)
    regions, weights = regions[order], weights[order]
    assigned = (regions * weights[:, None, None]).argmax(0)
    fg = assigned == 0
    bg = (assigned == assigned.max()) & (hm < bg_thresh)
    return fg, _erode(bg)


def support_masks(support: SupportSet, proposer: MaskProposer, fg_thresh: float = 0.5, bg_thresh: float = 0.2,
                  progress: bool = False) -> tuple[Tensor, Tensor]:
    """fg and bg masks (N, S, S) bool of a support set, cached as PNGs beside its images.

    Cached under ``<class folder>/masks/<proposer key>/`` (``fg_00000.png``, ``bg_00000.png``) so a
    user can look at them; a complete folder is read back instead of recomputed.
    """
    folder = None
    if support.folder is not None:
        key = f"{proposer.key}-fg{fg_thresh:g}-bg{bg_thresh:g}".replace("/", "+")
        folder = Path(support.folder) / "masks" / key
        n = len(support.images)
        if (folder / "complete").exists():
            fg = torch.stack([_read_mask(folder / f"fg_{i:05d}.png") for i in range(n)])
            bg = torch.stack([_read_mask(folder / f"bg_{i:05d}.png") for i in range(n)])
            return fg, bg
    from tqdm.auto import tqdm

    images = support.float_images()
    fgs, bgs = [], []
    for i in tqdm(range(len(images)), desc=f"masks <{support.category}>", disable=not progress, leave=False):
        fg, bg = select_fg_bg(proposer(images[i]), support.heatmaps[i, 0], fg_thresh, bg_thresh)
        fgs.append(fg)
        bgs.append(bg)
        if folder is not None:
            _write_mask(fg, folder / f"fg_{i:05d}.png")
            _write_mask(bg, folder / f"bg_{i:05d}.png")
    if folder is not None:
        from ..._io import write_text_atomic

        write_text_atomic(folder / "complete", "")
    return torch.stack(fgs), torch.stack(bgs)


def _write_mask(mask: Tensor, path: Path) -> None:
    from PIL import Image

    from ..._io import atomic_file

    with atomic_file(path) as tmp:
        Image.fromarray(mask.numpy().astype(np.uint8) * 255).save(tmp, format="PNG")


def _read_mask(path: Path) -> Tensor:
    from PIL import Image

    with Image.open(path) as img:
        return torch.from_numpy(np.array(img) > 127)
