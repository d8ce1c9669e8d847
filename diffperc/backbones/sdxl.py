"""Stable Diffusion XL UNet as a perception backbone.

SDXL (Podell et al., arXiv 2307.01952; weights ``stabilityai/stable-diffusion-xl-base-1.0``) differs
from SD 1/2 only in its conditioning, which is all this file holds (the taps, noising, ensembles,
timesteps and attention capture are :class:`~diffperc.backbones.diffusion.DiffusionBackbone`'s):

- two CLIP text encoders; each prompt is tokenized by both, and the **penultimate** hidden states
  (``hidden_states[-2]``) are concatenated over channels (768 + 1280 = 2048 on SDXL);
- the **pooled** embedding of the second encoder (``CLIPTextModelWithProjection.text_embeds``);
- **added time ids** ``original_size + crops_coords_top_left + target_size`` (6 numbers), by
  default ``(H, W, 0, 0, H, W)`` of the input image, as ``StableDiffusionXLPipeline`` defaults them.

Source read: diffusers ``pipelines/stable_diffusion_xl/pipeline_stable_diffusion_xl.py``
(``encode_prompt`` lines 375-419, ``_get_add_time_ids`` 729-744, defaults 1033-1034, UNet call
1206-1218; commit 58eb52c0). The UNet forward is diffusers' own; nothing is copied.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .diffusion import DiffusionBackbone

__all__ = ["SDXLBackbone"]


class SDXLBackbone(DiffusionBackbone):
    """SDXL UNet features with both text encoders and the added conditions.

    Args:
        vae, unet, text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler: SDXL components
            (``CLIPTextModel`` and ``CLIPTextModelWithProjection``; the UNet has
            ``addition_embed_type="text_time"``).
        original_size, target_size: (h, w) for the added time ids; None = the input image's size.
        crops_coords_top_left: (top, left) crop coordinates for the time ids (default (0, 0)).
        **kwargs: every :class:`DiffusionBackbone` option (``layers``, ``timestep``, ...).
    """

    def __init__(self, vae: nn.Module, unet: nn.Module, text_encoder: nn.Module, text_encoder_2: nn.Module,
                 tokenizer: Any, tokenizer_2: Any, scheduler: Any, original_size: tuple[int, int] | None = None,
                 crops_coords_top_left: tuple[int, int] = (0, 0), target_size: tuple[int, int] | None = None,
                 **kwargs: Any) -> None:
        if getattr(unet.config, "addition_embed_type", None) != "text_time":
            raise ValueError("SDXLBackbone needs an SDXL UNet (addition_embed_type='text_time'); "
                             "SD 1/2 UNets go to DiffusionBackbone")
        self._check_dims(unet, text_encoder, text_encoder_2)
        super().__init__(vae, unet, text_encoder, tokenizer, scheduler, **kwargs)
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2.requires_grad_(False).eval(), tokenizer_2
        self.original_size = None if original_size is None else tuple(original_size)
        self.crops_coords_top_left = tuple(crops_coords_top_left)
        self.target_size = None if target_size is None else tuple(target_size)
        self.config.update(original_size=self.original_size, crops_coords_top_left=self.crops_coords_top_left,
                           target_size=self.target_size)

    @staticmethod
    def _check_dims(unet: nn.Module, te1: nn.Module, te2: nn.Module) -> None:
        cross = te1.config.hidden_size + te2.config.hidden_size
        if unet.config.cross_attention_dim != cross:
            raise ValueError(f"the UNet's cross_attention_dim {unet.config.cross_attention_dim} is not the sum of the "
                             f"text encoders' hidden sizes {te1.config.hidden_size} + {te2.config.hidden_size}")
        added = 6 * unet.config.addition_time_embed_dim + te2.config.projection_dim  # _get_add_time_ids :735
        if unet.config.projection_class_embeddings_input_dim != added:
            raise ValueError(f"the UNet expects {unet.config.projection_class_embeddings_input_dim} added-condition "
                             f"channels, text_encoder_2's projection and 6 time ids give {added}")

    def save_pretrained(self, folder: str | Path) -> None:
        """A diffusers SDXL folder (model_index.json names ``StableDiffusionXLPipeline``)."""
        from ._loading import save_components

        save_components(folder, self.vae, self.unet, self.text_encoder, self.tokenizer, self.scheduler,
                        pipeline="StableDiffusionXLPipeline", text_encoder_2=self.text_encoder_2,
                        tokenizer_2=self.tokenizer_2)

    def train(self, mode: bool = True) -> SDXLBackbone:
        super().train(mode)
        if hasattr(self, "text_encoder_2"):
            self.text_encoder_2.eval()
        return self

    # ------------------------------------------------------------------ text
    @torch.no_grad()
    def _encode_text(self, prompt: str) -> tuple[Tensor, Tensor]:
        """One prompt -> ((1, L, D1 + D2) penultimate hidden states of both encoders, (1, P) pooled)."""
        hidden = []
        pooled = None
        for tok, te in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            self._warn_truncation(tok, prompt)
            ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
            out = te(ids.to(te.device), output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:  # encode_prompt :408-409: the projected pooled output
                pooled = out[0]
            hidden.append(out.hidden_states[-2])  # :411-412 (clip_skip None)
        return torch.cat(hidden, dim=-1).detach(), pooled.detach()  # :419

    def encode_prompt(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Prompts -> ((B, L, D1 + D2) prompt_embeds, (B, P) pooled_prompt_embeds), cached by prompt."""
        pairs = self._cached_prompts(prompts)
        embeds = torch.cat([p[0] for p in pairs]).to(self.device, self.dtype)
        return embeds, torch.cat([p[1] for p in pairs]).to(self.device, self.dtype)

    def time_ids(self, batch: int, image_hw: tuple[int, int]) -> Tensor:
        """(B, 6) added time ids: original size, crop top-left, target size (pipeline defaults: the image size)."""
        ids = (self.original_size or tuple(image_hw)) + self.crops_coords_top_left + (self.target_size or tuple(image_hw))
        return torch.tensor([ids], device=self.device, dtype=self.dtype).expand(batch, -1)

    def _conditioning(self, batch: int, image_hw: tuple[int, int], prompts: str | Sequence[str] | None,
                      prompt_embeds: Tensor | None, pooled_prompt_embeds: Tensor | None = None) -> dict[str, Tensor]:
        if prompt_embeds is not None:
            if pooled_prompt_embeds is None:
                raise ValueError("SDXL needs pooled_prompt_embeds (B, P) with prompt_embeds: both come from "
                                 "bb.encode_prompt(prompts)")
            pooled = self._check_pooled(pooled_prompt_embeds, batch)
            embeds = self._embeds(batch, None, prompt_embeds)
        else:
            if pooled_prompt_embeds is not None:
                raise ValueError("pooled_prompt_embeds needs prompt_embeds too (or pass prompts)")
            embeds, pooled = self._embeds(batch, prompts, None)
        return {"encoder_hidden_states": embeds, "text_embeds": pooled, "time_ids": self.time_ids(batch, image_hw)}

    def _check_pooled(self, pooled: Tensor, batch: int) -> Tensor:
        dim = self.text_encoder_2.config.projection_dim
        if not isinstance(pooled, Tensor) or pooled.ndim != 2 or pooled.shape[-1] != dim:
            shape = tuple(pooled.shape) if isinstance(pooled, Tensor) else type(pooled).__name__
            raise ValueError(f"pooled_prompt_embeds must have shape (B, {dim}), got {shape}")
        if pooled.shape[0] == 1 and batch > 1:
            pooled = pooled.expand(batch, -1)
        if pooled.shape[0] != batch:
            raise ValueError(f"pooled_prompt_embeds has batch {pooled.shape[0]}, images have {batch}: pass B or 1")
        return pooled.to(self.device, self.dtype)

    def _denoise(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Any:
        added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}  # pipeline :1206
        return self.unet(x, t, encoder_hidden_states=cond["encoder_hidden_states"], added_cond_kwargs=added)

    def _probe_cond(self) -> dict[str, Any]:
        pooled = torch.zeros(1, self.text_encoder_2.config.projection_dim, device=self.device, dtype=self.dtype)
        return {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": self.time_ids(1, (8, 8))}}

    def forward(self, images: Tensor | None = None, prompts: str | Sequence[str] | None = None,
                prompt_embeds: Tensor | None = None, pooled_prompt_embeds: Tensor | None = None,
                latents: Tensor | None = None, noise: Tensor | None = None,
                generator: torch.Generator | None = None) -> Any:
        """As :meth:`DiffusionBackbone.forward`; ``prompt_embeds`` (B, L, D1 + D2) needs
        ``pooled_prompt_embeds`` (B, P) beside it (both from :meth:`encode_prompt`)."""
        return self._forward(images, latents, noise, generator, prompts=prompts, prompt_embeds=prompt_embeds,
                             pooled_prompt_embeds=pooled_prompt_embeds)
