"""Vision towers of the MLLM: question-conditioned diffusion features, CLIP patch features, raw pixel patches.

Mustafar (Agarwal et al., 2025, arXiv 2507.07106, "Towards Multimodal Understanding via Stable
Diffusion as a Task-Aware Feature Extractor"; project page vatsalag99.github.io/mustafar; no code
released) replaces or complements LLaVA-1.5's CLIP tower with the frozen SD 2.1 UNet: the image is
encoded by the VAE, noised to t = 50, and the UNet runs with the user's **question** as its prompt;
the visual tokens are the cross-attention queries of
``up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_q`` (16x16 tokens at 512 px). A guidance
scale s mixes conditional and unconditional features like classifier-free guidance:
``f = f("") + s * (f(q) - f(""))``; both branches share the noise and run in one batched UNet call.

Every tower maps images (B, 3, H, W) in [0, 1] to a feature map (B, C, h, w); the
:class:`~diffperc.mllm.encoder.VisionEncoder` flattens, fuses and projects them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones._checks import check_images, check_prompts

__all__ = ["CLIPTower", "DiffusionTower", "MUSTAFAR_TAP", "PixelPatchTower", "clip_vit_l14_336_config",
           "tiny_clip_vision_config"]

MUSTAFAR_TAP = "up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_q"
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _resize(images: Tensor, size: int | None) -> Tensor:
    if size is None or tuple(images.shape[-2:]) == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)


class DiffusionTower(nn.Module):
    """Diffusion UNet features of one tap as visual tokens, conditioned on a prompt (the question).

    Args:
        backbone: a diffperc preset name or folder (``"sd21"``, ``"digits"``, ``"test_sd"``), or a
            built :class:`~diffperc.backbones.diffusion.DiffusionBackbone` with exactly one layer.
        layer: the UNet module whose output are the tokens (Mustafar: :data:`MUSTAFAR_TAP`). The
            UNet stops right after it (up level 1 is the middle of SD's decoder).
        timestep: t of the noised latent (Mustafar: 50; 10-100 work, 500 fails).
        guidance_scale: s in ``f("") + s (f(q) - f(""))``. 1 = plain conditional features (one UNet
            pass); other values run the empty and the question branch in one batched call.
        image_size: images are resized to this square side first (512 for SD 2.1 as Mustafar);
            None keeps the input size.
        pool: average-pool the token grid by this factor (1 = keep 16x16 at 512 px).
        backbone_kwargs: more backbone options (``add_noise``, ``ensemble_size``, ...).
    """

    def __init__(
        self, backbone: str | nn.Module = "sd21", layer: str = MUSTAFAR_TAP, timestep: int = 50,
        guidance_scale: float = 1.0, image_size: int | None = 512, pool: int = 1,
        backbone_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if pool < 1:
            raise ValueError(f"pool must be >= 1, got {pool}")
        if isinstance(backbone, str):
            from ..backbones.registry import load_backbone

            backbone = load_backbone(backbone, layers=[layer], timestep=timestep, **(backbone_kwargs or {}))
        elif len(backbone.layers) != 1:
            raise ValueError(f"a DiffusionTower taps one layer; the backbone has {backbone.layers}: "
                             "build it with layers=[one module path]")
        self.backbone = backbone
        self.guidance_scale, self.image_size, self.pool = float(guidance_scale), image_size, pool
        self.out_channels = backbone.feature_info.channels()[0]
        self.reduction = backbone.feature_info.reductions()[0] * pool

    def grid(self, size: int) -> tuple[int, int]:
        """Token grid (h, w) for square input images of side ``size``."""
        side = (self.image_size or size) // self.reduction
        return side, side

    def forward(self, images: Tensor, prompts: str | Sequence[str] | None = None,
                generator: torch.Generator | None = None) -> Tensor:
        """Images (B, 3, H, W) in [0, 1] and B prompts (None: the empty prompt) -> (B, C, h, w)."""
        images = _resize(check_images(images, 1), self.image_size)
        prompts = check_prompts(prompts, images.shape[0])
        bb = self.backbone
        latents = bb.encode_images(images, generator)  # (B, c, h, w)
        b, e = latents.shape[0], bb.ensemble_size
        noise = torch.randn((b * e, *latents.shape[1:]), generator=generator, device=latents.device,
                            dtype=latents.dtype)
        s = self.guidance_scale
        if s == 0 or all(p == "" for p in prompts):
            feats = self._run(latents, [""] * b, noise)
        elif s == 1:
            feats = self._run(latents, prompts, noise)
        else:  # one batched call: [empty branch; question branch], the same noise for both
            both = self._run(torch.cat([latents, latents]), [""] * b + prompts, torch.cat([noise, noise]))
            uncond, cond = both[:b], both[b:]
            feats = uncond + s * (cond - uncond)
        return F.avg_pool2d(feats, self.pool) if self.pool > 1 else feats

    def _run(self, latents: Tensor, prompts: list[str], noise: Tensor) -> Tensor:
        return self.backbone(latents=latents, prompts=prompts, noise=noise).features[0]


class CLIPTower(nn.Module):
    """LLaVA-1.5's vision tower: ``CLIPVisionModel`` patch tokens of the penultimate layer.

    As LLaVA's ``CLIPVisionTower`` (``mm_vision_select_layer=-2``, ``select_feature="patch"``:
    the CLS token dropped). Images in [0, 1] are resized to the model's ``image_size`` (336 for
    ViT-L/14-336) and normalised with the OpenAI CLIP mean and std, as ``CLIPImageProcessor`` does.

    Args:
        model: a hub id or folder for ``CLIPVisionModel.from_pretrained`` (offline with
            ``HF_HUB_OFFLINE=1``), a ``CLIPVisionConfig`` (random weights: tests, benchmarks), or a
            built ``CLIPVisionModel``.
        select_layer: index into ``hidden_states`` (-2 = penultimate, as LLaVA-1.5).
        select_feature: ``"patch"`` (drop CLS) or ``"cls_patch"``.
    """

    def __init__(self, model: Any = "openai/clip-vit-large-patch14-336", select_layer: int = -2,
                 select_feature: str = "patch") -> None:
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModel

        if select_feature not in ("patch", "cls_patch"):
            raise ValueError(f"select_feature must be 'patch' or 'cls_patch', got {select_feature!r}")
        if isinstance(model, CLIPVisionConfig):
            model = CLIPVisionModel(model)
        elif isinstance(model, str):
            from ..backbones._loading import is_offline

            try:
                model = CLIPVisionModel.from_pretrained(model, local_files_only=is_offline())
            except OSError as err:
                raise OSError(f"could not load CLIP vision weights {model!r}: download them once where the Hub "
                              f"is reachable (`hf download {model}`), then run with HF_HUB_OFFLINE=1, or pass a "
                              "local folder; tests use tiny_clip_vision_config()") from err
        self.model = model.requires_grad_(False).eval()
        self.select_layer, self.select_feature = select_layer, select_feature
        cfg = model.config
        self.image_size, self.patch_size, self.out_channels = cfg.image_size, cfg.patch_size, cfg.hidden_size
        self.register_buffer("mean", torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> CLIPTower:
        super().train(mode)
        self.model.eval()  # frozen, as in both LLaVA stages
        return self

    def grid(self, size: int | None = None) -> tuple[int, int]:
        side = self.image_size // self.patch_size
        return side, side

    @torch.no_grad()
    def forward(self, images: Tensor, prompts: Any = None, generator: Any = None) -> Tensor:
        """Images (B, 3, H, W) in [0, 1] -> (B, C, g, g) patch features (g = image_size / patch)."""
        images = _resize(check_images(images, 1), self.image_size)
        x = (images - self.mean) / self.std
        out = self.model(pixel_values=x.to(self.model.dtype), output_hidden_states=True)
        tokens = out.hidden_states[self.select_layer]  # (B, 1 + g*g, C)
        if self.select_feature == "cls_patch":
            raise ValueError("cls_patch tokens have no grid; use select_feature='patch' inside a VisionEncoder")
        tokens = tokens[:, 1:]
        g = self.grid()[0]
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, g, g)


class PixelPatchTower(nn.Module):
    """Raw pixel patches as tokens (a baseline without any pretrained encoder).

    Args:
        patch_size: side p of the non-overlapping patches; a token has 3 p^2 values.
        image_size: resize images to this side first (None: keep); it must be a multiple of p.
    """

    def __init__(self, patch_size: int = 8, image_size: int | None = None) -> None:
        super().__init__()
        self.patch_size, self.image_size = patch_size, image_size
        self.out_channels = 3 * patch_size * patch_size
        self.reduction = patch_size

    def grid(self, size: int) -> tuple[int, int]:
        side = (self.image_size or size) // self.patch_size
        return side, side

    def forward(self, images: Tensor, prompts: Any = None, generator: Any = None) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 3 p^2, H / p, W / p)."""
        images = _resize(check_images(images, self.patch_size), self.image_size)
        p = self.patch_size
        b, _, h, w = images.shape
        patches = F.unfold(images, kernel_size=p, stride=p)  # (B, 3 p^2, h/p * w/p)
        return patches.view(b, self.out_channels, h // p, w // p)


def tiny_clip_vision_config(image_size: int = 32, patch_size: int = 8, hidden_size: int = 16, layers: int = 3) -> Any:
    """A tiny random ``CLIPVisionConfig`` for offline tests."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(image_size=image_size, patch_size=patch_size, hidden_size=hidden_size,
                            intermediate_size=2 * hidden_size, num_hidden_layers=layers, num_attention_heads=2,
                            projection_dim=hidden_size)


def clip_vit_l14_336_config(num_hidden_layers: int = 24) -> Any:
    """The architecture of ``openai/clip-vit-large-patch14-336`` (LLaVA-1.5's tower), for random weights."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                            num_hidden_layers=num_hidden_layers, num_attention_heads=16, projection_dim=768,
                            hidden_act="quick_gelu")
