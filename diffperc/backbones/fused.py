"""Stable Diffusion + DINOv2 fused features (SD-DINO).

SD-DINO: Zhang et al., "A Tale of Two Features: Stable Diffusion Complements DINO for
Zero-Shot Semantic Correspondence", NeurIPS 2023, arXiv 2305.15347; origin repo
Junyi42/sd-dino (pck_spair_pascal.py, utils/utils_correspondence.py). DINOv2: Oquab et al.,
arXiv 2304.07193.

Recipe (ANCHORS.md section 2b): SD 1.5 at t=100, decoder outputs s5 (1/32), s4 (1/16),
s3 (1/8) = diffusers ``up_blocks.0..2``; DINOv2 ViT-B/14 block 11 on an 840 px image (60x60).
The SD levels are resampled to one grid and concatenated into one SD descriptor; the SD and
DINOv2 descriptors are each L2-normalised over channels, weighted (0.5 / 0.5 in the paper)
and concatenated. Pairwise co-PCA of SD features (:func:`co_pca`) is a two-image operation
and belongs to the correspondence task; this module provides it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._base import BackboneOutput, FeatureInfo, FeatureInfoList
from ._checks import check_images
from .dinov2 import _as_hw, resize_images
from .registry import create_backbone, register_backbone

__all__ = ["FusedBackbone", "co_pca", "fuse_features"]

SD_DINO_LAYERS = ("up_blocks.0", "up_blocks.1", "up_blocks.2")  # LDM output_blocks 2, 5, 8 (s5, s4, s3)


def fuse_features(sd_maps: Sequence[Tensor], dino_map: Tensor, size: tuple[int, int],
                  weights: tuple[float, float] = (0.5, 0.5)) -> Tensor:
    """SD-DINO fusion of one image batch's maps.

    Args:
        sd_maps: SD feature maps (B, C_i, h_i, w_i); resampled to ``size`` and concatenated.
        dino_map: (B, C_d, h, w) DINOv2 patch map, resampled to ``size``.
        size: output grid (h, w); bilinear, align_corners=False.
        weights: (SD, DINOv2) multipliers after each part is L2-normalised over channels.

    Returns:
        (B, sum C_i + C_d, *size): per pixel, the SD part has norm ``weights[0]`` and the
        DINOv2 part norm ``weights[1]``.
    """
    def grid(x: Tensor) -> Tensor:
        same = tuple(x.shape[-2:]) == tuple(size)
        return x if same else F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    sd = torch.cat([grid(m.float()) for m in sd_maps], dim=1)  # (B, sum C_i, h, w)
    dino = grid(dino_map.float())  # (B, C_d, h, w)
    parts = [F.normalize(sd, dim=1) * weights[0], F.normalize(dino, dim=1) * weights[1]]
    return torch.cat(parts, dim=1).to(dino_map.dtype)


def co_pca(feat_a: Tensor, feat_b: Tensor, dim: int, niter: int = 2) -> tuple[Tensor, Tensor]:
    """SD-DINO's joint PCA of two images' features.

    For each batch item the two maps' pixels are stacked along space, centred with their joint
    mean, projected on the top ``dim`` principal directions (``torch.pca_lowrank``, randomised
    with ``niter`` power iterations; exact when the spectrum has a gap) and split back.

    Args:
        feat_a: (B, C, Ha, Wa) features of the first images.
        feat_b: (B, C, Hb, Wb) features of the second images (same B and C).
        dim: output channels, at most min(C, Ha*Wa + Hb*Wb).
        niter: power iterations of ``torch.pca_lowrank`` (its default, as in SD-DINO).

    Returns:
        (B, dim, Ha, Wa) and (B, dim, Hb, Wb), in the inputs' dtype (computed in float32).
    """
    if feat_a.ndim != 4 or feat_b.ndim != 4 or feat_a.shape[:2] != feat_b.shape[:2]:
        raise ValueError(f"feat_a and feat_b must be (B, C, H, W) with the same B and C, "
                         f"got {tuple(feat_a.shape)} and {tuple(feat_b.shape)}")
    (b, c, ha, wa), (hb, wb) = feat_a.shape, feat_b.shape[-2:]
    n = ha * wa + hb * wb
    if not 1 <= dim <= min(c, n):
        raise ValueError(f"dim must be in [1, min(channels {c}, pixels {n})], got {dim}")
    outs_a, outs_b = [], []
    for i in range(b):
        x = torch.cat([feat_a[i].flatten(1), feat_b[i].flatten(1)], dim=1).T.float()  # (Na + Nb, C)
        x = x - x.mean(dim=0, keepdim=True)
        _, _, v = torch.pca_lowrank(x, q=dim, center=False, niter=niter)
        y = (x @ v[:, :dim]).T  # (dim, Na + Nb)
        outs_a.append(y[:, : ha * wa].reshape(dim, ha, wa))
        outs_b.append(y[:, ha * wa :].reshape(dim, hb, wb))
    return torch.stack(outs_a).to(feat_a.dtype), torch.stack(outs_b).to(feat_b.dtype)


class FusedBackbone(nn.Module):
    """SD UNet features and DINOv2 patch tokens fused per SD-DINO into one map.

    Args:
        sd: a :class:`~diffperc.backbones.diffusion.DiffusionBackbone` (its ``layers`` give the levels).
        dino: a :class:`~diffperc.backbones.dinov2.DINOv2Backbone`.
        sd_index: which SD feature level(s) to use (indices into ``sd.feature_info``); several
            levels are concatenated into one SD descriptor before normalisation, as in SD-DINO.
        weights: (SD, DINOv2) weights of the two L2-normalised parts (paper: 0.5 / 0.5).
        dino_size: resize the image to this size (int or (h, w), multiples of 14) for DINOv2
            only (SD-DINO: 840, with SD at 960); None = DINOv2 sees the image as is.
        grid: output size (h, w); None = the DINOv2 patch grid.

    ``feature_info`` has one entry whose reduction, 14, is relative to DINOv2's input (the
    image, or the image resized to ``dino_size``); a fixed ``grid`` sets the size instead.
    """

    def __init__(self, sd: nn.Module, dino: nn.Module, sd_index: int | Sequence[int] = 0,
                 weights: tuple[float, float] = (0.5, 0.5), dino_size: int | tuple[int, int] | None = None,
                 grid: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.sd, self.dino = sd, dino
        n_levels = len(sd.feature_info)
        idx = [sd_index] if isinstance(sd_index, int) else list(sd_index)
        if not idx or not all(isinstance(i, int) and -n_levels <= i < n_levels for i in idx):
            raise ValueError(f"sd_index must be an int or ints in [{-n_levels}, {n_levels}) "
                             f"(sd.feature_info: {sd.feature_info.names()}), got {sd_index!r}")
        self.sd_index = [i % n_levels for i in idx]
        if len(weights) != 2 or any(w < 0 for w in weights) or not any(weights):
            raise ValueError(f"weights must be two non-negative numbers (SD, DINOv2), not both 0, got {weights!r}")
        self.weights = (float(weights[0]), float(weights[1]))
        self.dino_size = None if dino_size is None else _as_hw(dino_size, "dino_size", dino.patch_size)
        self.grid = None if grid is None else _as_hw(grid, "grid")
        sd_multiple = getattr(sd, "size_multiple", 1)
        self.size_multiple = sd_multiple if self.dino_size else math.lcm(sd_multiple, dino.size_multiple)
        self.config = {"sd_index": self.sd_index, "weights": self.weights, "dino_size": self.dino_size,
                       "grid": self.grid, "sd": getattr(sd, "config", None), "dino": getattr(dino, "config", None)}

    @property
    def feature_info(self) -> FeatureInfoList:
        """One entry: the SD layer names and the DINOv2 block joined by ``+``, channels summed."""
        sd_info, dino_info = self.sd.feature_info, self.dino.feature_info[0]
        names = [sd_info[i].name for i in self.sd_index] + [dino_info.name]
        channels = sum(sd_info[i].channels for i in self.sd_index) + dino_info.channels
        return FeatureInfoList([FeatureInfo("+".join(names), channels, dino_info.reduction)])

    def forward(self, images: Tensor, prompts: str | Sequence[str] | None = None,
                prompt_embeds: Tensor | None = None, noise: Tensor | None = None,
                generator: torch.Generator | None = None) -> BackboneOutput:
        """Fused SD + DINOv2 map of a batch.

        Args:
            images: (B, 3, H, W) floats in [0, 1]; H, W multiples of ``size_multiple`` (SD's
                multiple, and 14 unless ``dino_size`` is set).
            prompts, prompt_embeds: SD conditioning (see ``DiffusionBackbone.forward``); default "".
            noise, generator: SD noise (B*E, C, h, w), or a generator to seed it.

        Returns:
            BackboneOutput: ``features`` = [(B, C_sd + C_dino, h, w)] on the DINOv2 grid (or
            ``grid``); ``attention`` = the SD backbone's maps (None unless it captures them).
        """
        images = check_images(images, 1)
        self._check_size(*images.shape[-2:])
        sd_out = self.sd(images, prompts=prompts, prompt_embeds=prompt_embeds, noise=noise, generator=generator)
        dino_in = images if self.dino_size is None else resize_images(images, self.dino_size)
        dino_map = self.dino(dino_in).features[0]  # (B, C_d, h, w)
        size = self.grid or tuple(dino_map.shape[-2:])
        fused = fuse_features([sd_out.features[i] for i in self.sd_index], dino_map, size, self.weights)
        return BackboneOutput(features=[fused], attention=sd_out.attention)

    def _check_size(self, h: int, w: int) -> None:
        """Fail before running either model: SD's multiple (unless it pads), and 14 for DINOv2."""
        sd_multiple = 1 if getattr(self.sd, "pad", False) else getattr(self.sd, "size_multiple", 1)
        dino_multiple = 1 if self.dino_size else self.dino.size_multiple
        m = math.lcm(sd_multiple, dino_multiple)
        if h % m or w % m:
            raise ValueError(
                f"image size {h}x{w} is not a multiple of {m} (SD needs {sd_multiple}, DINOv2 with patch size "
                f"{self.dino.patch_size} needs {dino_multiple}): resize to e.g. {max(m, h // m * m)}x{max(m, w // m * m)}"
                + (", or set dino_size= to resize DINOv2's input only" if self.dino_size is None else "")
            )

    def extra_repr(self) -> str:
        return f"sd_index={self.sd_index}, weights={self.weights}, dino_size={self.dino_size}, grid={self.grid}"


# ---------------------------------------------------------------------- presets
@register_backbone("test_sd_dinov2")
def test_sd_dinov2(seed: int = 0, pretrained: bool = False, timestep: int = 100, sd_kwargs: dict[str, Any] | None = None,
                   dino_kwargs: dict[str, Any] | None = None, **kw: Any) -> FusedBackbone:
    """Tiny random SD-DINO: ``test_sd`` (``up_blocks.0..2``, t=100) + ``test_dinov2``; images multiples of 112.

    ``sd_kwargs`` / ``dino_kwargs`` go to the two backbones, ``kw`` to :class:`FusedBackbone`.
    """
    if pretrained:
        raise ValueError("test_sd_dinov2 is random and has no pretrained weights; use sd15_dinov2b for real ones")
    sd_kwargs = {"layers": list(SD_DINO_LAYERS), **(sd_kwargs or {})}
    sd = create_backbone("test_sd", seed=seed, timestep=timestep, **sd_kwargs)
    dino = create_backbone("test_dinov2", seed=seed, **(dino_kwargs or {}))
    kw.setdefault("sd_index", list(range(len(sd.layers))))  # every SD level, as SD-DINO
    return FusedBackbone(sd, dino, **kw)


@register_backbone("sd15_dinov2b")
def sd15_dinov2b(timestep: int = 100, dino_layer: int = 11, dino_size: int | tuple[int, int] | None = 840,
                 weights: tuple[float, float] = (0.5, 0.5), sd_kwargs: dict[str, Any] | None = None,
                 dino_kwargs: dict[str, Any] | None = None, **kw: Any) -> FusedBackbone:
    """SD-DINO: SD 1.5 ``up_blocks.0..2`` at t=100 + DINOv2 ViT-B/14 block 11 at 840 px, weights 0.5/0.5.

    Feed 960 px images (SD side, as in SD-DINO); the output is the 60x60 DINOv2 grid,
    1280 + 1280 + 640 + 768 = 3968 channels. Needs both models' weights (see README).
    ``sd_kwargs`` / ``dino_kwargs`` go to the two backbones, ``kw`` to :class:`FusedBackbone`.
    """
    sd_kwargs = {"layers": list(SD_DINO_LAYERS), **(sd_kwargs or {})}
    sd = create_backbone("sd15", timestep=timestep, **sd_kwargs)
    dino = create_backbone("dinov2_vitb14", layer=dino_layer, **(dino_kwargs or {}))
    kw.setdefault("sd_index", list(range(len(sd.layers))))  # every SD level, as SD-DINO
    return FusedBackbone(sd, dino, weights=weights, dino_size=dino_size, **kw)
