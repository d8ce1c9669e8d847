"""Dense feature extractors of OVDiff: SD cross-attention queries, DINO ViT-B/8 keys, CLIP ViT-B/16 keys.

Each extractor turns support images into feature maps for prototypes (``support_features``) and a
test crop into one feature map (``crop_features``), with the resizing the released code uses at
each stage (karazijal/sdov):

- ``sd``: the ``attn2.to_q`` outputs of the nine released cross-attention layers (``sd.py``
  ``LAYERS`` at indices "0,6:13,15": down_blocks.0.attentions.0, mid_block, the three of
  up_blocks.1 and up_blocks.2, up_blocks.3.attentions.2), empty prompt, t=200, each map resized
  (bilinear) to the latent size (64x64 for SD 1.5) and concatenated (``sd.py`` FeatStore,
  ``extract_features``). Support images (512 px): VAE posterior sample and noise both drawn from
  a generator seeded 43, so the two draws are the same numbers (``gen_proto_sd.py:247-257``).
  Test crops are resized to 512x512 first (``predict.py`` SDFeats.resize).
- ``dino_vitb8`` / ``clip_vitb16``: the key facet (``qkv`` of the block's attention, cls token
  dropped) of the last (DINO) or second-to-last (CLIP) block, position embeddings resized
  bicubically with DINO's +0.1 (``utils/extractor.py``), images normalised with ImageNet's mean
  and std for both models (``gen_vit_features.py:140``, ``predict.py`` ViTFeats.forward). Support
  images keep their size (a multiple of the stride); test crops: DINO keeps crops up to 448 and
  resizes larger ones to short side 448 (long side <= 800), CLIP resizes every crop to 448x448.

Models load by name through timm (``vit_base_patch8_224.dino``,
``vit_base_patch16_clip_quickgelu_224.openai``); ``test_dino`` / ``test_clip`` are tiny random
ViTs for offline tests. For non-SD UNets (the bundled digits model, tiny ones without SD's block
layout) ``sd`` takes every cross-attention layer's ``to_q``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "SD_QUERY_LAYERS", "SDQueryExtractor", "ViTKeyExtractor",
           "create_extractor", "create_vit", "ovdiff_query_layers", "resize_short_side"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# sd.py LAYERS[0], LAYERS[6:13], LAYERS[15]: the cross-attention layers whose queries OVDiff uses
SD_QUERY_LAYERS = (
    "down_blocks.0.attentions.0", "mid_block.attentions.0",
    "up_blocks.1.attentions.0", "up_blocks.1.attentions.1", "up_blocks.1.attentions.2",
    "up_blocks.2.attentions.0", "up_blocks.2.attentions.1", "up_blocks.2.attentions.2",
    "up_blocks.3.attentions.2",
)
VIT_NAMES = {"dino_vitb8": ("vit_base_patch8_224.dino", -1), "clip_vitb16": ("vit_base_patch16_clip_quickgelu_224.openai", -2)}


def ovdiff_query_layers(unet: nn.Module) -> list[str]:
    """The released nine ``...attn2.to_q`` paths when the UNet has SD's layout, else every cross-attention ``to_q``."""
    names = dict(unet.named_modules())
    sd = [f"{p}.transformer_blocks.0.attn2.to_q" for p in SD_QUERY_LAYERS]
    if all(n in names for n in sd):
        return sd
    from ...backbones.attention import cross_attention_names

    def run_order(name: str) -> tuple[int, ...]:  # down blocks, mid block, up blocks: the order they run in
        parts = name.split(".")
        section = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}.get(parts[0], 3)
        return (section, *[int(p) for p in parts if p.isdigit()])

    return [f"{n}.to_q" for n in sorted(cross_attention_names(unet), key=run_order)]


def resize_short_side(h: int, w: int, size: int, max_size: int | None = None) -> tuple[int, int]:
    """torchvision's ``resize(img, size, max_size)`` output size for an int ``size`` (short side -> size)."""
    short, long = (h, w) if h <= w else (w, h)
    new_short, new_long = size, int(size * long / short)
    if max_size is not None and new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    return (new_short, new_long) if h <= w else (new_long, new_short)


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Tensor bilinear resize without antialiasing (torchvision 0.13's tensor default, as released)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=False)


def _fingerprint(module: nn.Module, *extra: Any) -> str:
    h = hashlib.sha1(repr(extra).encode())
    params = list(module.parameters())
    for p in (params[0], params[-1]):
        h.update(str(tuple(p.shape)).encode())
        h.update(p.detach().flatten()[:64].float().cpu().numpy().tobytes())
    return h.hexdigest()[:10]


# ---------------------------------------------------------------------------- SD
class SDQueryExtractor:
    """Concatenated cross-attention query maps of the UNet at t=200 (see the module docstring).

    Args:
        backbone: a DiffusionBackbone; a sibling backbone over the same modules taps the layers.
        layers: UNet module paths, or ``"ovdiff"`` (:func:`ovdiff_query_layers`).
        timestep: released 200.
        feat_size: side of the concatenated maps; default the native latent size (64 for SD 1.5).
        input_size: side test crops are resized to; default the native image size (512).
        seed: seeds the support images' VAE sample and noise (released 43).
    """

    name = "sd"

    def __init__(self, backbone: nn.Module, layers: str | Sequence[str] = "ovdiff", timestep: int = 200,
                 feat_size: int | None = None, input_size: int | None = None, seed: int = 43) -> None:
        from ...backbones.diffusion import DiffusionBackbone
        from .support import model_fingerprint, native_size

        resolved = ovdiff_query_layers(backbone.unet) if layers == "ovdiff" else list(layers)
        self.bb = DiffusionBackbone.from_components(
            backbone.vae, backbone.unet, backbone.text_encoder, backbone.tokenizer, backbone.scheduler,
            layers=resolved, timestep=timestep, add_noise=True, latent_sample="sample")
        self.layers, self.timestep, self.seed = resolved, timestep, seed
        self.input_size = input_size or native_size(backbone)
        self.feat_size = feat_size or self.input_size // self.bb.vae_factor
        lkey = hashlib.sha1("|".join(resolved).encode()).hexdigest()[:6]
        self.key = f"sd-{model_fingerprint(backbone)}-{lkey}-t{timestep}-f{self.feat_size}-s{seed}"

    @property
    def device(self) -> torch.device:
        return self.bb.device

    def _features(self, latents: Tensor, noise: Tensor) -> Tensor:
        """(B, C, h, w) scaled latents + noise -> (B, D, f, f) concatenated query maps."""
        feats = self.bb(latents=latents, noise=noise, prompts=[""] * latents.shape[0]).features
        size = (self.feat_size, self.feat_size)
        return torch.cat([_resize(f.float(), size) for f in feats], dim=1)

    def _encode(self, images: Tensor, eps: Tensor) -> Tensor:
        vae = self.bb.vae
        dist = vae.encode((images * 2 - 1).to(vae.device, vae.dtype)).latent_dist
        return (dist.mean + dist.std * eps.to(dist.mean)) * vae.config.scaling_factor

    @torch.no_grad()
    def support_features(self, images: Tensor, batch_size: int = 8) -> Tensor:
        """(N, 3, S, S) in [0, 1] -> (N, D, f, f); every image gets the same seeded draws (released)."""
        out = []
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size].to(self.device)
            shape = (1, self.bb.unet.config.in_channels, x.shape[-2] // self.bb.vae_factor,
                     x.shape[-1] // self.bb.vae_factor)
            gen = torch.Generator(self.device).manual_seed(self.seed)
            eps = torch.randn(shape, generator=gen, device=self.device, dtype=self.bb.vae.dtype)
            latents = self._encode(x, eps.expand(len(x), -1, -1, -1))
            gen = torch.Generator(self.device).manual_seed(self.seed)
            noise = torch.randn(shape, generator=gen, device=self.device, dtype=latents.dtype)
            out.append(self._features(latents, noise.expand_as(latents)).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def crop_features_batch(self, crops: Sequence[Tensor], generator: torch.Generator | None = None,
                            batch_size: int = 32) -> list[Tensor]:
        """Crops (3, h_i, w_i) in [0, 1] -> (D, f, f) each: resized to ``input_size`` (bilinear), one
        VAE posterior sample and one noise per crop drawn from ``generator``, ``batch_size`` per UNet call."""
        side = self.input_size // self.bb.vae_factor
        out = []
        for start in range(0, len(crops), batch_size):
            x = torch.cat([_resize(c[None].to(self.device, torch.float32), (self.input_size, self.input_size))
                           for c in crops[start : start + batch_size]]).clamp(0, 1)
            shape = (len(x), self.bb.unet.config.in_channels, side, side)
            eps = torch.randn(shape, generator=generator, device=self.device, dtype=self.bb.vae.dtype)
            latents = self._encode(x, eps)
            noise = torch.randn(shape, generator=generator, device=self.device, dtype=latents.dtype)
            out.extend(self._features(latents, noise).unbind(0))
        return out

    def crop_features(self, crop: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """(3, h, w) in [0, 1] -> (D, f, f) (:meth:`crop_features_batch` of one crop)."""
        return self.crop_features_batch([crop], generator)[0]


# ---------------------------------------------------------------------------- ViT
def create_vit(name: str, pretrained: bool = True) -> tuple[nn.Module, int]:
    """A timm ViT and the block whose keys OVDiff uses: ``dino_vitb8`` (-1), ``clip_vitb16`` (-2),
    ``test_dino`` / ``test_clip`` (tiny random, offline), or any timm model name (last block)."""
    try:
        import timm
        from timm.models.vision_transformer import VisionTransformer
    except ImportError as err:
        raise ImportError("OVDiff's DINO/CLIP extractors and MaskCut need timm: pip install 'diffperc[ovseg]'") from err
    if name in ("test_dino", "test_clip"):
        with torch.random.fork_rng():
            torch.manual_seed(0 if name == "test_dino" else 1)
            clip = name == "test_clip"
            model = VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=0,
                                      pre_norm=clip, act_layer="quick_gelu" if clip else None)
        return model.eval(), -2 if clip else -1
    timm_name, layer = VIT_NAMES.get(name, (name, -1))
    try:
        model = timm.create_model(timm_name, pretrained=pretrained, num_classes=0)
    except Exception as err:  # no weights offline, unknown name
        raise RuntimeError(f"could not load the ViT {timm_name!r} through timm ({err}). The weights download from "
                           "the Hugging Face hub once; offline, pre-download them or use 'test_dino'/'test_clip'") from err
    return model.eval(), layer


class ViTKeyExtractor:
    """Key-facet patch features of a timm ViT block (DINO / CLIP as OVDiff uses them).

    Args:
        model: a timm ``VisionTransformer`` with a class token and absolute position embeddings.
        layer: block index (negative from the end).
        name: the extractor's name (``dino_vitb8``, ``clip_vitb16``, ...), part of its cache key.
        square: test crops are resized to ``size`` x ``size`` (CLIP); else crops up to ``size`` are
            kept and larger ones get short side ``size``, long side <= ``max_size`` (DINO).
        size, max_size: released 448 and 800.
    """

    def __init__(self, model: nn.Module, layer: int = -1, name: str = "vit", square: bool = False,
                 size: int = 448, max_size: int = 800) -> None:
        self.model, self.name, self.square, self.size, self.max_size = model.eval(), name, square, size, max_size
        self.layer = layer % len(model.blocks)
        self.patch = model.patch_embed.proj.kernel_size[0]
        self.stride = model.patch_embed.proj.stride[0]
        self.key = f"{name}-{_fingerprint(model, self.layer, square)}"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _pos_embed(self, gh: int, gw: int) -> Tensor:
        """Position embeddings for a gh x gw grid: bicubic with DINO's +0.1 (``utils/extractor.py:_fix_pos_enc``)."""
        pos = self.model.pos_embed
        n = pos.shape[1] - 1
        if n == gh * gw and gh == gw:
            return pos
        side, dim = int(math.sqrt(n)), pos.shape[-1]
        grid = pos[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((gh + 0.1) / side, (gw + 0.1) / side), mode="bicubic",
                             align_corners=False, recompute_scale_factor=False)
        if grid.shape[-2:] != (gh, gw):
            raise RuntimeError(f"position embedding resized to {tuple(grid.shape[-2:])}, expected {(gh, gw)}")
        return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, gh * gw, dim)], dim=1)

    @torch.no_grad()
    def keys(self, x: Tensor) -> Tensor:
        """Normalised images (B, 3, H, W) -> keys (B, C, gh, gw) of block ``layer`` (cls token dropped)."""
        m = self.model
        tokens = m.patch_embed.proj(x.to(self.device, m.pos_embed.dtype))  # (B, C, gh, gw)
        b, _, gh, gw = tokens.shape
        tokens = m.patch_embed.norm(tokens.flatten(2).transpose(1, 2))
        tokens = torch.cat([m.cls_token.expand(b, -1, -1), tokens], dim=1) + self._pos_embed(gh, gw)
        tokens = m.norm_pre(m.patch_drop(m.pos_drop(tokens)))
        for block in m.blocks[: self.layer]:
            tokens = block(tokens)
        block = m.blocks[self.layer]
        qkv = block.attn.qkv(block.norm1(tokens))  # (B, 1 + N, 3C); key = the middle third
        c = qkv.shape[-1] // 3
        k = qkv[:, 1:, c : 2 * c]
        return k.transpose(1, 2).reshape(b, c, gh, gw).float()

    @staticmethod
    def normalise(x: Tensor) -> Tensor:
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(-1, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(-1, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def support_features(self, images: Tensor, batch_size: int = 8) -> Tensor:
        """(N, 3, S, S) in [0, 1] -> (N, C, S/stride, S/stride) (sizes made multiples of the stride, LANCZOS)."""
        images = _patch_resize(images, self.stride)
        return torch.cat([self.keys(self.normalise(images[i : i + batch_size].to(self.device))).cpu()
                          for i in range(0, len(images), batch_size)])

    @torch.no_grad()
    def crop_features(self, crop: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """(3, h, w) in [0, 1] -> (C, gh, gw) with the released test-time resizing."""
        x = crop[None].to(self.device, torch.float32)
        h, w = x.shape[-2:]
        if self.square:
            x = _resize(x, (self.size, self.size))
        elif h > self.size or w > self.size:
            x = _resize(x, resize_short_side(h, w, self.size, self.max_size))
        return self.keys(self.normalise(x))[0]


def _patch_resize(images: Tensor, stride: int) -> Tensor:
    """``PatchResize`` (utils/extractor.py): sides rounded to multiples of ``stride``, LANCZOS through PIL."""
    h, w = images.shape[-2:]
    nh, nw = int(round(h / stride) * stride), int(round(w / stride) * stride)
    if (nh, nw) == (h, w):
        return images
    from PIL import Image

    out = []
    for img in images:
        pil = Image.fromarray((img.clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy())
        arr = torch.from_numpy(np.array(pil.resize((nw, nh), Image.LANCZOS)))
        out.append(arr.permute(2, 0, 1).float() / 255)
    return torch.stack(out)


def create_extractor(name: str, backbone: nn.Module | None = None, **kwargs: Any) -> SDQueryExtractor | ViTKeyExtractor:
    """``"sd"`` (needs ``backbone``; kwargs go to :class:`SDQueryExtractor`), ``"dino_vitb8"``,
    ``"clip_vitb16"``, ``"test_dino"``, ``"test_clip"`` or a timm name (kwargs: ``size``, ``max_size``)."""
    if name == "sd":
        if backbone is None:
            raise ValueError("the 'sd' extractor needs the diffusion backbone")
        return SDQueryExtractor(backbone, **kwargs)
    model, layer = create_vit(name)
    if backbone is not None:
        model = model.to(backbone.device)
    return ViTKeyExtractor(model, layer=layer, name=name, square="clip" in name, **kwargs)
