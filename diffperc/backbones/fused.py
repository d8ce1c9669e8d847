"""Stable Diffusion + DINOv2 fused features (SD-DINO).

SD-DINO: Zhang et al., "A Tale of Two Features: Stable Diffusion Complements DINO for
Zero-Shot Semantic Correspondence", NeurIPS 2023, arXiv 2305.15347; origin repo
Junyi42/sd-dino (pck_spair_pascal.py, extractor_sd.py, utils/utils_correspondence.py and its
vendored third_party/ODISE). DINOv2: Oquab et al., arXiv 2304.07193.

What the released code computes (docs/fidelity/sd_dino.md has the table with file:lines):

- SD 1.5 at t=100 on the image letterboxed to 960 px, run on 512 px crops at 0 and 448
  (``sd_window=512``, features averaged where crops overlap; ``_window.py``), with one fixed
  noise (seed 42, ``shared_noise_seed=42``) for every image and crop.
- SD levels: the tensors *entering* LDM output_blocks 2, 5, 8, before the skip
  concatenation (ODISE ldm.py:654-663 with ``decoder_only=True``), i.e. the outputs of
  diffusers ``up_blocks.0.resnets.1``, ``up_blocks.1.attentions.1``,
  ``up_blocks.2.attentions.1``: s5 1280 ch, s4 1280 ch, s3 640 ch at 15x15, 30x30, 60x60.
- The levels are chained (utils_correspondence.py:418-436): s5 is resampled to the s4 grid
  and put after s4, that pair is resampled to the s3 grid and put after s3: channels
  [s3, s4, s5] on the 60x60 grid (:func:`chain_levels`).
- DINOv2 ViT-B/14 block 11 tokens of the original image letterboxed to 840 px (60x60).
- Each part L2-normalised over channels, multiplied by its weight (the code's default 1 and
  1; the paper's 0.5 / 0.5 scales both alike and matches the same points), concatenated.

Pairwise co-PCA of the SD levels (:func:`co_pca`) is a two-image operation and belongs to the
correspondence task; this module provides it.
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
from ._window import shared_noise, sliding_window, window_boxes
from .dinov2 import _as_hw, resize_images
from .registry import create_backbone, register_backbone

__all__ = ["FusedBackbone", "chain_levels", "co_pca", "fuse_features"]

# LDM output_blocks 2, 5, 8 before the skip concat = these module outputs (s5, s4, s3)
SD_DINO_LAYERS = ("up_blocks.0.resnets.1", "up_blocks.1.attentions.1", "up_blocks.2.attentions.1")


def _chain_order(sizes: Sequence[int]) -> list[int]:
    """Indices of the levels coarse to fine (by number of cells; ties keep their order)."""
    return sorted(range(len(sizes)), key=lambda i: sizes[i])


def chain_levels(levels: Sequence[Tensor]) -> Tensor:
    """SD-DINO's resampling chain: coarsest level up to the next finer grid, concatenated after it, and so on.

    Args:
        levels: SD maps (B, C_i, h_i, w_i), e.g. s5, s4, s3.

    Returns:
        (B, sum C_i, h, w) on the finest grid, channels finest level first (SD-DINO: [s3, s4, s5]);
        each step is bilinear with align_corners=False (utils_correspondence.py:419-436).
    """
    order = _chain_order([m.shape[-2] * m.shape[-1] for m in levels])
    acc = levels[order[0]]
    for i in order[1:]:
        nxt = levels[i]
        if acc.shape[-2:] != nxt.shape[-2:]:
            acc = F.interpolate(acc, size=tuple(nxt.shape[-2:]), mode="bilinear", align_corners=False)
        acc = torch.cat([nxt, acc], dim=1)
    return acc


def fuse_features(sd_maps: Sequence[Tensor], dino_map: Tensor, size: tuple[int, int],
                  weights: tuple[float, float] = (1.0, 1.0)) -> Tensor:
    """SD-DINO fusion of one image batch's maps.

    Args:
        sd_maps: SD feature maps (B, C_i, h_i, w_i), chained with :func:`chain_levels`.
        dino_map: (B, C_d, h, w) DINOv2 patch map.
        size: output grid (h, w); the chained SD map and the DINOv2 map are resampled to it
            (bilinear, align_corners=False) where they differ.
        weights: (SD, DINOv2) multipliers after each part is L2-normalised over channels.

    Returns:
        (B, sum C_i + C_d, *size): per cell, the SD part has norm ``weights[0]`` and the
        DINOv2 part norm ``weights[1]`` (pck_spair_pascal.py:283-299).
    """
    def grid(x: Tensor) -> Tensor:
        same = tuple(x.shape[-2:]) == tuple(size)
        return x if same else F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    sd = grid(chain_levels([m.float() for m in sd_maps]))  # (B, sum C_i, h, w)
    dino = grid(dino_map.float())  # (B, C_d, h, w)
    parts = [F.normalize(sd, dim=1) * weights[0], F.normalize(dino, dim=1) * weights[1]]
    return torch.cat(parts, dim=1).to(dino_map.dtype)


def co_pca(feat_a: Tensor, feat_b: Tensor, dim: int, niter: int = 2) -> tuple[Tensor, Tensor]:
    """SD-DINO's joint PCA of two images' features (utils_correspondence.py:376-407).

    For each batch item the two maps' pixels are stacked along space, centred with their joint
    mean, projected on ``dim`` principal directions from ``torch.pca_lowrank`` (randomised:
    ``niter`` power iterations on a random start drawn from the global torch RNG, as in
    SD-DINO; seed it for reproducible runs) and split back.

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
        x = x - x.mean(dim=0, keepdim=True)  # utils_correspondence.py:398-399
        _, _, v = torch.pca_lowrank(x, q=dim, niter=niter)  # :400, which centres again (a no-op up to rounding)
        y = (x @ v[:, :dim]).T  # (dim, Na + Nb), :401-402
        outs_a.append(y[:, : ha * wa].reshape(dim, ha, wa))
        outs_b.append(y[:, ha * wa :].reshape(dim, hb, wb))
    return torch.stack(outs_a).to(feat_a.dtype), torch.stack(outs_b).to(feat_b.dtype)


class FusedBackbone(nn.Module):
    """SD UNet features and DINOv2 patch tokens fused per SD-DINO into one map.

    Args:
        sd: a :class:`~diffperc.backbones.diffusion.DiffusionBackbone` (its ``layers`` give the levels).
        dino: a :class:`~diffperc.backbones.dinov2.DINOv2Backbone`.
        sd_index: which SD feature level(s) to use (indices into ``sd.feature_info``); several
            levels are chained into one SD descriptor (:func:`chain_levels`) before normalisation.
        weights: (SD, DINOv2) weights of the two L2-normalised parts (SD-DINO's code: 1 and 1).
        dino_size: resize the image to this size (int or (h, w), multiples of 14) for DINOv2
            when no separate ``dino_images`` are given; None = DINOv2 sees the image as is.
        grid: output size (h, w); None = the DINOv2 patch grid.
        sd_window: run SD on square crops of this side and stitch them (ODISE's sliding
            window, ``_window.py``; SD-DINO: 512 on a 960 canvas); None = one pass.
        shared_noise_seed: noise every image and crop with the same fixed noise, ODISE's
            ``randn(1, C, s, s)`` from a CPU generator with this seed (SD-DINO: 42),
            bicubically resized to other latent sizes; None = the SD backbone's own noise.
        shared_noise_size: s, the side of that noise (ODISE: 64, SD 1.5's 512 px latent).

    ``feature_info`` has one entry whose reduction, 14, is relative to DINOv2's input (the
    image, or the image resized to ``dino_size``); a fixed ``grid`` sets the size instead.
    """

    def __init__(self, sd: nn.Module, dino: nn.Module, sd_index: int | Sequence[int] = 0,
                 weights: tuple[float, float] = (0.5, 0.5), dino_size: int | tuple[int, int] | None = None,
                 grid: tuple[int, int] | None = None, sd_window: int | None = None,
                 shared_noise_seed: int | None = None, shared_noise_size: int = 64) -> None:
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
        if sd_window is not None and (not isinstance(sd_window, int) or sd_window % sd.size_multiple or sd_window < 1):
            raise ValueError(f"sd_window must be a positive multiple of the SD size multiple {sd.size_multiple}, "
                             f"got {sd_window!r}")
        if sd_window is not None and getattr(sd, "attention", False):
            raise ValueError("sd_window does not stitch attention maps: build the SD backbone with attention=False")
        if shared_noise_size < 1:
            raise ValueError(f"shared_noise_size must be >= 1, got {shared_noise_size}")
        self.sd_window, self.shared_noise_seed, self.shared_noise_size = sd_window, shared_noise_seed, shared_noise_size
        sd_multiple = getattr(sd, "size_multiple", 1)
        self.size_multiple = sd_multiple if self.dino_size else math.lcm(sd_multiple, dino.size_multiple)
        self.config = {"sd_index": self.sd_index, "weights": self.weights, "dino_size": self.dino_size,
                       "grid": self.grid, "sd_window": sd_window, "shared_noise_seed": shared_noise_seed,
                       "shared_noise_size": shared_noise_size, "sd": getattr(sd, "config", None),
                       "dino": getattr(dino, "config", None)}

    @property
    def feature_info(self) -> FeatureInfoList:
        """One entry: the SD layer names (in channel order, finest first) and the DINOv2 block joined by ``+``."""
        sd_info, dino_info = self.sd.feature_info, self.dino.feature_info[0]
        levels = [sd_info[i] for i in self.sd_index]
        order = _chain_order([1 / f.reduction**2 for f in levels])[::-1]  # the channel order of chain_levels
        names = [levels[i].name for i in order] + [dino_info.name]
        channels = sum(f.channels for f in levels) + dino_info.channels
        return FeatureInfoList([FeatureInfo("+".join(names), channels, dino_info.reduction)])

    # ------------------------------------------------------------------ parts
    def sd_levels(self, images: Tensor, prompts: str | Sequence[str] | None = None,
                  prompt_embeds: Tensor | None = None, noise: Tensor | None = None,
                  generator: torch.Generator | None = None) -> tuple[list[Tensor], dict[int, Tensor] | None]:
        """The chosen SD levels of a batch, through the sliding window and shared noise if set.

        Args:
            images: (B, 3, H, W) in [0, 1].
            prompts, prompt_embeds: SD conditioning, one per image (see ``DiffusionBackbone.forward``).
            noise: explicit noise; with ``sd_window``, (n_crops * B * E, C, h, w), crop-major.
            generator: seeds the SD noise when neither ``noise`` nor ``shared_noise_seed`` is set.

        Returns:
            The levels [(B, C_i, H / r_i, W / r_i)] in ``sd_index`` order, and the attention maps.
        """
        if self.sd_window is None:
            if noise is None and self.shared_noise_seed is not None:
                noise = self._shared_noise(images, len(images))
            out = self.sd(images, prompts=prompts, prompt_embeds=prompt_embeds, noise=noise, generator=generator)
            return [out.features[i] for i in self.sd_index], out.attention
        reductions = self.sd.feature_info.reductions()
        n = len(window_boxes(images.shape[-2], images.shape[-1], self.sd_window))  # crops per image
        crop_prompts = prompts if prompts is None or isinstance(prompts, str) else list(prompts) * n
        crop_embeds = None if prompt_embeds is None or len(prompt_embeds) == 1 else prompt_embeds.repeat(n, 1, 1)

        def run(crops: Tensor) -> list[Tensor]:
            crop_noise = noise
            if crop_noise is None and self.shared_noise_seed is not None:
                crop_noise = self._shared_noise(crops, len(crops))
            embeds = prompt_embeds if crop_embeds is None else crop_embeds
            return self.sd(crops, prompts=crop_prompts, prompt_embeds=embeds, noise=crop_noise,
                           generator=generator).features

        feats = sliding_window(run, images, self.sd_window, reductions)
        return [feats[i] for i in self.sd_index], None

    def _shared_noise(self, images: Tensor, batch: int) -> Tensor:
        """(batch * E, C, h, w) copies of the shared noise for SD latents of these images."""
        f = self.sd.vae_factor
        latent_hw = (images.shape[-2] // f, images.shape[-1] // f)
        s = self.shared_noise_size
        noise = shared_noise(latent_hw, self.sd.unet.config.in_channels, self.shared_noise_seed, (s, s))
        return noise.to(images.device).expand(batch * self.sd.ensemble_size, -1, -1, -1)

    def dino_map(self, images: Tensor, prepared: bool = False) -> Tensor:
        """(B, C_d, h, w) DINOv2 map: of ``images`` resized to ``dino_size`` (if set), or as given when ``prepared``."""
        dino_in = images if prepared or self.dino_size is None else resize_images(images, self.dino_size)
        return self.dino(dino_in).features[0]

    def fuse(self, levels: Sequence[Tensor], dino: Tensor) -> Tensor:
        """Chain, resample, normalise, weight and concatenate: (B, C_sd + C_d, *grid)."""
        return fuse_features(levels, dino, self.grid or tuple(dino.shape[-2:]), self.weights)

    # ------------------------------------------------------------------ forward
    def forward(self, images: Tensor, prompts: str | Sequence[str] | None = None,
                prompt_embeds: Tensor | None = None, noise: Tensor | None = None,
                generator: torch.Generator | None = None, dino_images: Tensor | None = None) -> BackboneOutput:
        """Fused SD + DINOv2 map of a batch.

        Args:
            images: (B, 3, H, W) floats in [0, 1]; H, W multiples of ``size_multiple`` (SD's
                multiple, and 14 unless ``dino_size`` is set or ``dino_images`` are given).
            prompts, prompt_embeds: SD conditioning (see ``DiffusionBackbone.forward``); default "".
            noise, generator: SD noise (B*E, C, h, w), or a generator to seed it (unused with
                ``shared_noise_seed``).
            dino_images: (B, 3, H', W') the same images prepared for DINOv2 (SD-DINO: the
                original letterboxed to 840 px, not a resize of the SD canvas); None = ``images``.

        Returns:
            BackboneOutput: ``features`` = [(B, C_sd + C_dino, h, w)] on the DINOv2 grid (or
            ``grid``); ``attention`` = the SD backbone's maps (None unless it captures them).
        """
        images = check_images(images, 1)
        self._check_size(*images.shape[-2:], dino_images is not None)
        levels, attention = self.sd_levels(images, prompts, prompt_embeds, noise, generator)
        if dino_images is not None:
            dino_images = check_images(dino_images, self.dino.patch_size)
            if len(dino_images) != len(images):
                raise ValueError(f"dino_images has {len(dino_images)} images for {len(images)} SD images")
        dino = self.dino_map(images) if dino_images is None else self.dino_map(dino_images, prepared=True)
        return BackboneOutput(features=[self.fuse(levels, dino)], attention=attention)

    def _check_size(self, h: int, w: int, own_dino_images: bool = False) -> None:
        """Fail before running either model: SD's multiple (unless it pads), and 14 for DINOv2."""
        sd_multiple = 1 if getattr(self.sd, "pad", False) else getattr(self.sd, "size_multiple", 1)
        dino_multiple = 1 if self.dino_size or own_dino_images else self.dino.size_multiple
        m = math.lcm(sd_multiple, dino_multiple)
        if h % m or w % m:
            raise ValueError(
                f"image size {h}x{w} is not a multiple of {m} (SD needs {sd_multiple}, DINOv2 with patch size "
                f"{self.dino.patch_size} needs {dino_multiple}): resize to e.g. {max(m, h // m * m)}x{max(m, w // m * m)}"
                + (", or set dino_size= to resize DINOv2's input only" if self.dino_size is None else "")
            )

    def extra_repr(self) -> str:
        return (f"sd_index={self.sd_index}, weights={self.weights}, dino_size={self.dino_size}, grid={self.grid}, "
                f"sd_window={self.sd_window}, shared_noise_seed={self.shared_noise_seed}")


# ---------------------------------------------------------------------- presets
@register_backbone("test_sd_dinov2", accepts=(FusedBackbone.__init__,), exclude=("sd", "dino"))
def test_sd_dinov2(seed: int = 0, pretrained: bool = False, timestep: int = 100, sd_kwargs: dict[str, Any] | None = None,
                   dino_kwargs: dict[str, Any] | None = None, **kw: Any) -> FusedBackbone:
    """Tiny random SD-DINO: ``test_sd`` (SD-DINO's three layers, t=100) + ``test_dinov2``; images multiples of 112.

    ``sd_kwargs`` / ``dino_kwargs`` go to the two backbones, ``kw`` to :class:`FusedBackbone`.
    """
    if pretrained:
        raise ValueError("test_sd_dinov2 is random and has no pretrained weights; use sd15_dinov2b for real ones")
    sd_kwargs = {"layers": list(SD_DINO_LAYERS), **(sd_kwargs or {})}
    sd = create_backbone("test_sd", seed=seed, timestep=timestep, **sd_kwargs)
    dino = create_backbone("test_dinov2", seed=seed, **(dino_kwargs or {}))
    kw.setdefault("sd_index", list(range(len(sd.layers))))  # every SD level, as SD-DINO
    return FusedBackbone(sd, dino, **kw)


@register_backbone("sd15_dinov2b", accepts=(FusedBackbone.__init__,), exclude=("sd", "dino"))
def sd15_dinov2b(timestep: int = 100, dino_layer: int = 11, dino_size: int | tuple[int, int] | None = 840,
                 weights: tuple[float, float] = (1.0, 1.0), sd_window: int | None = 512,
                 shared_noise_seed: int | None = 42, sd_kwargs: dict[str, Any] | None = None,
                 dino_kwargs: dict[str, Any] | None = None, **kw: Any) -> FusedBackbone:
    """SD-DINO as its code runs: SD 1.5 at t=100 + DINOv2 ViT-B/14 block 11, weights 1 / 1.

    SD: LDM output_blocks 2, 5, 8 inputs (``up_blocks.0.resnets.1``, ``up_blocks.1.attentions.1``,
    ``up_blocks.2.attentions.1``) on 512 px crops of a 960 px canvas (``sd_window``), one shared
    noise (seed 42). DINOv2: the torch.hub position-embedding interpolation, on 840 px images
    (``dino_images=``, or the canvas resized to ``dino_size``). The output is the 60x60 grid,
    640 + 1280 + 1280 + 768 = 3968 channels. Needs both models' weights (see README).
    ``sd_kwargs`` / ``dino_kwargs`` go to the two backbones, ``kw`` to :class:`FusedBackbone`.
    """
    sd_kwargs = {"layers": list(SD_DINO_LAYERS), **(sd_kwargs or {})}
    sd = create_backbone("sd15", timestep=timestep, **sd_kwargs)
    dino_kwargs = {"pos_interpolation": "hub", **(dino_kwargs or {})}
    dino = create_backbone("dinov2_vitb14", layer=dino_layer, **dino_kwargs)
    kw.setdefault("sd_index", list(range(len(sd.layers))))  # every SD level, as SD-DINO
    return FusedBackbone(sd, dino, weights=weights, dino_size=dino_size, sd_window=sd_window,
                         shared_noise_seed=shared_noise_seed, **kw)
