"""Input validation at the backbone boundary: messages name the argument, what came, what is expected."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["check_images", "check_latents", "check_prompt_embeds", "check_prompts", "pad_to_multiple"]

_RANGE_TOL = 1e-3


def check_images(images: Tensor, multiple: int, pad: bool = False, dtype: torch.dtype | None = None) -> Tensor:
    """Validate (B, 3, H, W) float images in [0, 1]; return them cast to ``dtype``."""
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor (B, 3, H, W) in [0, 1], got {type(images).__name__}")
    if images.ndim == 3:
        raise ValueError(f"images must be a batch (B, 3, H, W); got one image {tuple(images.shape)}: "
                         "use images.unsqueeze(0)")
    if images.ndim != 4 or images.shape[1] != 3:
        hint = " (channels last? use images.permute(0, 3, 1, 2))" if images.ndim == 4 and images.shape[-1] == 3 else ""
        raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}{hint}")
    if images.shape[0] == 0:
        raise ValueError("images is an empty batch (B = 0)")
    if not images.is_floating_point():
        raise TypeError(f"images must be floats in [0, 1], got dtype {images.dtype}: "
                        "use images.float() / 255 for 8-bit images")
    if torch.compiler.is_compiling():
        # inside torch.compile: a tensor-only assert (no .item(), no data-dependent branch, so no graph break)
        ok = torch.isfinite(images).all() & (images.amin() >= -_RANGE_TOL) & (images.amax() <= 1 + _RANGE_TOL)
        torch._assert_async(ok, "images must be finite and in [0, 1] (run eagerly once for the values)")
        lo = hi = 0.0
    elif not torch.isfinite(images).all():
        raise ValueError("images contain NaN or Inf")
    else:
        lo, hi = images.min().item(), images.max().item()
    if lo < -_RANGE_TOL or hi > 1 + _RANGE_TOL:
        hint = " (looks like [-1, 1]: use (images + 1) / 2)" if lo < -0.5 else ""
        hint = " (looks like 0-255: divide by 255)" if hi > 2 else hint
        raise ValueError(f"images must be in [0, 1], got values in [{lo:.3g}, {hi:.3g}]{hint}")
    h, w = images.shape[-2:]
    if not pad and (h % multiple or w % multiple):
        raise ValueError(
            f"image size {h}x{w} is not a multiple of {multiple} (VAE factor x UNet downsampling): "
            f"resize to e.g. {max(multiple, h // multiple * multiple)}x{max(multiple, w // multiple * multiple)}, "
            "or build the backbone with pad=True"
        )
    return images.clamp(0, 1).to(dtype) if dtype is not None else images.clamp(0, 1)


def pad_to_multiple(images: Tensor, multiple: int) -> Tensor:
    """Zero-pad (B, C, H, W) at the bottom and right up to multiples of ``multiple``."""
    h, w = images.shape[-2:]
    return F.pad(images, (0, (-w) % multiple, 0, (-h) % multiple))


def check_latents(latents: Tensor, channels: int, multiple: int, dtype: torch.dtype | None = None) -> Tensor:
    """Validate (B, C, h, w) latents (as ``encode_images`` returns them)."""
    if not isinstance(latents, Tensor) or latents.ndim != 4 or latents.shape[1] != channels:
        shape = tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__
        raise ValueError(f"latents must have shape (B, {channels}, h, w), got {shape}")
    if latents.shape[0] == 0:
        raise ValueError("latents is an empty batch (B = 0)")
    if not latents.is_floating_point():
        raise ValueError(f"latents must be finite floats, got dtype {latents.dtype}")
    if torch.compiler.is_compiling():  # tensor-only inside torch.compile (no graph break)
        torch._assert_async(torch.isfinite(latents).all(), "latents must be finite")
    elif not torch.isfinite(latents).all():
        raise ValueError("latents contain NaN or Inf")
    h, w = latents.shape[-2:]
    if h % multiple or w % multiple:
        raise ValueError(f"latent size {h}x{w} is not a multiple of the UNet's downsampling {multiple}")
    return latents.to(dtype) if dtype is not None else latents


def check_prompts(prompts: str | Sequence[str] | None, batch: int) -> list[str]:
    """One prompt for all images, or exactly one per image; None means the empty prompt."""
    if prompts is None:
        return [""] * batch
    if isinstance(prompts, str):
        return [prompts] * batch
    prompts = list(prompts)
    if not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a string or a list of strings")
    if len(prompts) != batch:
        raise ValueError(f"got {len(prompts)} prompts for a batch of {batch} images: "
                         "pass one string for all images or one prompt per image")
    return prompts


def check_prompt_embeds(embeds: Tensor, batch: int, dim: int) -> Tensor:
    """(B, L, D) or (1, L, D) (shared by the batch) with D the UNet's cross_attention_dim."""
    if not isinstance(embeds, Tensor) or embeds.ndim != 3:
        shape = tuple(embeds.shape) if isinstance(embeds, Tensor) else type(embeds).__name__
        raise ValueError(f"prompt_embeds must have shape (B, L, {dim}), got {shape}")
    if embeds.shape[-1] != dim:
        raise ValueError(f"prompt_embeds last dim must be the UNet's cross_attention_dim {dim}, got {embeds.shape[-1]}")
    if embeds.shape[1] == 0:
        raise ValueError("prompt_embeds has no tokens (L = 0)")
    if embeds.shape[0] == 1 and batch > 1:
        return embeds.expand(batch, -1, -1)
    if embeds.shape[0] != batch:
        raise ValueError(f"prompt_embeds has batch {embeds.shape[0]}, images have {batch}: pass B or 1")
    return embeds
