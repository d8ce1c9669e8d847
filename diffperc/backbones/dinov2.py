"""DINOv2 ViT patch tokens as a perception backbone.

DINOv2: Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision", arXiv
2304.07193; origin repo facebookresearch/dinov2 (Apache-2.0). The network comes from timm
(``vit_{small,base,large,giant}_patch14_dinov2``, weights ``timm/<name>.lvd142m`` on the Hub)
or from transformers (``Dinov2Model`` / ``Dinov2WithRegistersModel``, e.g.
``facebook/dinov2-base``). The feature is the token output of one block, CLS and register
tokens dropped, reshaped to the (H/14, W/14) patch grid.

SD-DINO (Zhang et al., "A Tale of Two Features", NeurIPS 2023, arXiv 2305.15347, repo
Junyi42/sd-dino) takes block 11 of ViT-B/14 (23 of L, 39 of g), facet "token" (no final
norm), on an 840 px image: a 60x60 map (extractor_dino.py:190-197, 308-332). It loads the
network with ``torch.hub.load("facebookresearch/dinov2", ...)``, whose position embeddings are
resized to the input grid with a bicubic *scale factor* (n + 0.1) / M and no antialiasing
(facebookresearch/dinov2 dinov2/models/vision_transformer.py:180-212); timm and transformers
resize to the grid size (timm also antialiases), which gives other embeddings for the same
weights. ``pos_interpolation="hub"`` computes the hub's. See ANCHORS.md section 2b and ``fused.py``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._base import BackboneOutput, FeatureInfo, FeatureInfoList
from ._checks import check_images
from .registry import register_backbone

__all__ = ["DINOv2Backbone", "IMAGENET_MEAN", "IMAGENET_STD", "TIMM_NAMES", "hub_pos_embed", "resize_images"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TIMM_NAMES = {
    "dinov2_vits14": "vit_small_patch14_dinov2",
    "dinov2_vitb14": "vit_base_patch14_dinov2",
    "dinov2_vitl14": "vit_large_patch14_dinov2",
    "dinov2_vitg14": "vit_giant_patch14_dinov2",
}


def _as_hw(size: int | tuple[int, int] | list[int], name: str, multiple: int = 1) -> tuple[int, int]:
    """An int (square) or (h, w) of positive multiples of ``multiple``; errors name ``name``."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if len(hw) != 2 or not all(isinstance(s, int) and s > 0 and s % multiple == 0 for s in hw):
        raise ValueError(f"{name} must be an int or (height, width) of positive multiples of {multiple}, got {size!r}")
    return hw


def resize_images(images: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Bilinearly resize (B, 3, H, W) images in [0, 1] to ``size`` (antialiased when shrinking)."""
    hw = _as_hw(size, "size")
    if tuple(images.shape[-2:]) == hw:
        return images
    return F.interpolate(images, size=hw, mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)


def _load_error(what: str, hub: str, preset: str, err: Exception) -> str:
    return (
        f"could not load DINOv2 weights {what} ({type(err).__name__}: {str(err).splitlines()[0][:200]}).\n"
        f"- Download once where the Hub is reachable (`hf download {hub}`), then run with HF_HUB_OFFLINE=1 "
        "to use the cache (~/.cache/huggingface, or HF_HOME).\n"
        f"- Or load a local file: create_backbone({preset!r}, checkpoint_path='model.safetensors') (timm weights "
        "or the original facebookresearch/dinov2 *_pretrain.pth).\n"
        "- Offline tests and demos: create_backbone('test_dinov2') (tiny, random)."
    )


class DINOv2Backbone(nn.Module):
    """Patch tokens of one DINOv2 block as a (B, C, H/14, W/14) map.

    Args:
        model: a timm ``VisionTransformer`` (built with ``dynamic_img_size=True`` so any multiple
            of 14 works) or a transformers ``Dinov2Model`` / ``Dinov2WithRegistersModel``.
        layer: block whose output is the feature, 0-based; negative counts from the end;
            None = the last block (SD-DINO: 11 of ViT-B).
        image_size: resize every input to this size (int or (h, w), multiples of 14) first;
            None = use the image as is (its sides must be multiples of 14).
        norm: apply the final LayerNorm to the tokens (dinov2's ``get_intermediate_layers(norm=True)``);
            SD-DINO uses the raw block output (False).
        trainable: fine-tune the ViT; frozen and in eval mode otherwise.
        pos_interpolation: how the position embeddings are resized to the input's patch grid:
            ``"model"`` (the network's own code) or ``"hub"`` (as the torch.hub DINOv2 that
            SD-DINO loads: bicubic with scale factor (n + 0.1) / M, no antialiasing); ``"hub"``
            needs a timm ViT.
        name_or_path: where the weights came from (recorded in ``config``).
    """

    def __init__(self, model: nn.Module, layer: int | None = None, image_size: int | tuple[int, int] | None = None,
                 norm: bool = False, trainable: bool = False, pos_interpolation: str = "model",
                 name_or_path: str | None = None) -> None:
        super().__init__()
        self.model = model
        self.kind = self._detect_kind(model)
        if self.kind == "timm":
            depth, self.embed_dim, patch = len(model.blocks), model.embed_dim, model.patch_embed.patch_size[0]
        else:
            cfg = model.config
            depth, self.embed_dim, patch = cfg.num_hidden_layers, cfg.hidden_size, cfg.patch_size
            self.num_prefix_tokens = 1 + getattr(cfg, "num_register_tokens", 0)
        self.patch_size = int(patch)
        layer = depth - 1 if layer is None else int(layer)
        if not -depth <= layer < depth:
            raise ValueError(f"layer must be in [{-depth}, {depth}) for this {depth}-block ViT, got {layer}")
        self.layer = layer % depth
        self.image_size = None if image_size is None else _as_hw(image_size, "image_size", self.patch_size)
        if self.kind == "timm" and not getattr(model, "dynamic_img_size", False):
            native = tuple(model.patch_embed.img_size)
            if self.image_size != native:
                raise ValueError(f"this timm ViT has a fixed input size {native}: build it with "
                                 f"dynamic_img_size=True, or pass image_size={native}")
        self.size_multiple = self.patch_size if self.image_size is None else 1
        if pos_interpolation not in ("model", "hub"):
            raise ValueError(f"pos_interpolation must be 'model' or 'hub', got {pos_interpolation!r}")
        if pos_interpolation == "hub" and (self.kind != "timm" or getattr(model, "reg_token", None) is not None
                                           or getattr(model, "no_embed_class", False)):
            raise ValueError("pos_interpolation='hub' needs a timm DINOv2 ViT without registers "
                             "(DINOv2Backbone.from_timm('vit_base_patch14_dinov2', ...))")
        self.pos_interpolation = pos_interpolation
        self.norm, self.trainable = norm, trainable
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.config = {"name_or_path": name_or_path, "layer": self.layer, "image_size": self.image_size,
                       "norm": norm, "trainable": trainable, "pos_interpolation": pos_interpolation}
        model.requires_grad_(trainable)
        self.train(False)

    @staticmethod
    def _detect_kind(model: nn.Module) -> str:
        if hasattr(model, "forward_intermediates") and hasattr(model, "blocks"):
            return "timm"
        if hasattr(model, "embeddings") and hasattr(model, "encoder") and hasattr(model, "config"):
            return "transformers"
        raise TypeError(f"model must be a timm VisionTransformer or a transformers Dinov2Model, "
                        f"got {type(model).__name__}")

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_timm(cls, name: str = "vit_base_patch14_dinov2", pretrained: bool = True,
                  checkpoint_path: str | Path | None = None, model_kwargs: dict[str, Any] | None = None,
                  **kwargs: Any) -> DINOv2Backbone:
        """Build a timm DINOv2 ViT (``dynamic_img_size=True``).

        Args:
            name: timm model name, e.g. ``"vit_base_patch14_dinov2"`` (``TIMM_NAMES`` maps presets).
            pretrained: load the LVD-142M weights (from the Hub cache, or ``checkpoint_path``).
            checkpoint_path: a local weights file (timm or original dinov2 format) instead of the Hub.
            model_kwargs: extra ``timm.create_model`` arguments (``depth``, ``embed_dim``, ...).
            **kwargs: backbone options (``layer``, ``image_size``, ``norm``, ``trainable``).
        """
        try:
            import timm
        except ImportError as err:
            raise ImportError("DINOv2 backbones need timm: pip install 'diffperc[dinov2]' (or pip install timm)") from err
        model_kwargs = {"dynamic_img_size": True, **(model_kwargs or {})}
        preset = next((k for k, v in TIMM_NAMES.items() if v == name), name)
        if checkpoint_path is not None:
            path = Path(checkpoint_path).expanduser()
            if not path.is_file():
                raise FileNotFoundError(_load_error(str(path), f"timm/{name}.lvd142m", preset,
                                                    FileNotFoundError(f"no such file: {path}")))
            model_kwargs["pretrained_cfg_overlay"] = {"file": str(path)}
            pretrained = True
        try:
            model = timm.create_model(name, pretrained=pretrained, **model_kwargs)
        except OSError as err:  # hub cache miss, no network, unreadable file
            raise FileNotFoundError(_load_error(f"{name} (timm)", f"timm/{name}.lvd142m", preset, err)) from err
        source = str(checkpoint_path) if checkpoint_path is not None else (f"timm/{name}" if pretrained else None)
        return cls(model, name_or_path=source, **kwargs)

    @classmethod
    def from_transformers(cls, name_or_path: str | Path = "facebook/dinov2-base", revision: str | None = None,
                          local_files_only: bool | None = None, **kwargs: Any) -> DINOv2Backbone:
        """Load a transformers ``Dinov2Model`` (or the with-registers variant) from the Hub or a folder."""
        from transformers import AutoModel

        from ._loading import is_offline

        offline = is_offline() if local_files_only is None else local_files_only
        try:
            model = AutoModel.from_pretrained(str(name_or_path), revision=revision, local_files_only=offline)
        except OSError as err:
            raise FileNotFoundError(_load_error(f"{name_or_path} (transformers)", str(name_or_path),
                                                "dinov2_vitb14", err)) from err
        if model.config.model_type not in ("dinov2", "dinov2_with_registers"):
            raise ValueError(f"{name_or_path} is a {model.config.model_type!r} model, not DINOv2")
        return cls(model, name_or_path=str(name_or_path), **kwargs)

    # ------------------------------------------------------------------ mode and info
    def train(self, mode: bool = True) -> DINOv2Backbone:
        """Only a trainable ViT follows train mode."""
        super().train(mode)
        self.model.train(mode and self.trainable)
        return self

    @property
    def device(self) -> torch.device:
        return self.mean.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def feature_info(self) -> FeatureInfoList:
        """One entry: ``blocks.{layer}``, ``embed_dim`` channels, reduction 14 (of the ViT's input)."""
        return FeatureInfoList([FeatureInfo(f"blocks.{self.layer}", self.embed_dim, self.patch_size)])

    # ------------------------------------------------------------------ forward
    def forward(self, images: Tensor) -> BackboneOutput:
        """Patch-token map of a batch.

        Args:
            images: (B, 3, H, W) floats in [0, 1]; H, W multiples of 14 unless ``image_size`` is set.

        Returns:
            BackboneOutput: ``features`` = [(B, embed_dim, H'/14, W'/14)] with (H', W') the ViT's
            input size; ``attention`` None.
        """
        images = check_images(images, self.patch_size, pad=True, dtype=self.dtype)  # size checked below
        if self.image_size is not None:
            images = resize_images(images, self.image_size)
        h, w = images.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            p = self.patch_size
            raise ValueError(f"image size {h}x{w} is not a multiple of the DINOv2 patch size {p}: resize to e.g. "
                             f"{max(p, h // p * p)}x{max(p, w // p * p)}, or build the backbone with image_size=")
        x = (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)  # ImageNet normalisation
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            if self.kind == "transformers":
                fmap = self._transformers_map(x)
            else:
                fmap = self._timm_map(x) if self.pos_interpolation == "model" else self._timm_hub_map(x)
        return BackboneOutput(features=[fmap], attention=None)

    def _timm_map(self, x: Tensor) -> Tensor:
        return self.model.forward_intermediates(x, indices=[self.layer], norm=self.norm, stop_early=True,
                                                output_fmt="NCHW", intermediates_only=True)[0]  # (B, C, h, w)

    def _timm_hub_map(self, x: Tensor) -> Tensor:
        """The timm ViT's modules run as torch.hub DINOv2's ``prepare_tokens_with_masks`` + blocks."""
        m, (h, w) = self.model, (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        patches = m.patch_embed.norm(m.patch_embed.proj(x).flatten(2).transpose(1, 2))  # (B, h*w, C): hub PatchEmbed
        tokens = torch.cat([m.cls_token.expand(len(x), -1, -1), patches], dim=1)
        tokens = tokens + hub_pos_embed(m.pos_embed, h, w).to(tokens.dtype)
        tokens = m.norm_pre(m.patch_drop(tokens))
        for block in m.blocks[: self.layer + 1]:
            tokens = block(tokens)
        if self.norm:
            tokens = m.norm(tokens)
        return tokens[:, m.num_prefix_tokens :].transpose(1, 2).reshape(len(x), -1, h, w)

    def _transformers_map(self, x: Tensor) -> Tensor:
        tokens = self.model(pixel_values=x, output_hidden_states=True).hidden_states[self.layer + 1]  # (B, T, C)
        if self.norm:
            tokens = self.model.layernorm(tokens)
        patches = tokens[:, self.num_prefix_tokens :]  # drop CLS and register tokens
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        return patches.transpose(1, 2).reshape(x.shape[0], -1, h, w)

    def extra_repr(self) -> str:
        return (f"kind={self.kind}, layer={self.layer}, image_size={self.image_size}, norm={self.norm}, "
                f"pos_interpolation={self.pos_interpolation}")


def hub_pos_embed(pos_embed: Tensor, h: int, w: int, offset: float = 0.1) -> Tensor:
    """facebookresearch/dinov2's ``interpolate_pos_encoding`` for an h x w patch grid.

    Args:
        pos_embed: (1, 1 + M*M, C) class + patch position embeddings of an M x M grid.
        h, w: patch grid of the input.
        offset: the hub's ``interpolate_offset`` (0.1).

    Returns:
        (1, 1 + h*w, C) float32: unchanged when h*w == M*M and h == w, else the patch part
        resized bicubically with scale factors ((h + offset) / M, (w + offset) / M), no antialias.
    """
    n = pos_embed.shape[1] - 1
    if h * w == n and h == w:
        return pos_embed.float()
    m = int(math.sqrt(n))
    if m * m != n:
        raise ValueError(f"pos_embed has {n} patch positions, not a square grid")
    grid = pos_embed[:, 1:].float().reshape(1, m, m, -1).permute(0, 3, 1, 2)  # (1, C, M, M)
    grid = F.interpolate(grid, scale_factor=(float(h + offset) / m, float(w + offset) / m), mode="bicubic",
                         antialias=False)
    if tuple(grid.shape[-2:]) != (h, w):
        raise ValueError(f"hub interpolation of an {m}x{m} grid gave {tuple(grid.shape[-2:])}, not ({h}, {w})")
    return torch.cat([pos_embed[:, :1].float(), grid.permute(0, 2, 3, 1).reshape(1, h * w, -1)], dim=1)


# ---------------------------------------------------------------------- presets
@register_backbone("test_dinov2", accepts=(DINOv2Backbone.__init__,), exclude=("model",))
def test_dinov2(seed: int = 0, pretrained: bool = False, **kw: Any) -> DINOv2Backbone:
    """Tiny random 2-block timm DINOv2 ViT (32 channels, patch 14; offline, milliseconds)."""
    if pretrained:
        raise ValueError("test_dinov2 is random and has no pretrained weights; use dinov2_vits14 for real ones")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        # init_values=1.0: layer scale as in DINOv2 but large enough that each block changes the tokens
        model_kwargs = {"depth": 2, "embed_dim": 32, "num_heads": 2, "img_size": 56, "init_values": 1.0}
        return DINOv2Backbone.from_timm("vit_small_patch14_dinov2", pretrained=False, model_kwargs=model_kwargs, **kw)


def _timm_preset(preset: str) -> Any:
    def build(pretrained: bool = True, checkpoint_path: str | Path | None = None, **kw: Any) -> DINOv2Backbone:
        return DINOv2Backbone.from_timm(TIMM_NAMES[preset], pretrained=pretrained, checkpoint_path=checkpoint_path, **kw)

    build.__doc__ = f"DINOv2 {preset}: timm {TIMM_NAMES[preset]}.lvd142m (needs the weights; see README)."
    return build


for _preset in TIMM_NAMES:
    register_backbone(_preset, accepts=(DINOv2Backbone.from_timm, DINOv2Backbone.__init__),
                      exclude=("model", "name", "model_kwargs"))(_timm_preset(_preset))
