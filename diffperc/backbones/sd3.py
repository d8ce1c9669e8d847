"""Stable Diffusion 3 (MMDiT, rectified flow) as a perception backbone.

Esser et al., "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis", ICML 2024,
arXiv 2403.03206; weights ``stabilityai/stable-diffusion-3-medium-diffusers`` (SD3 licence, gated).
What is SD3's own, beside the DiT base (:mod:`~diffperc.backbones.dit`):

- text: CLIP-L and CLIP-G penultimate hidden states concatenated over channels, zero-padded to
  the T5 width, then concatenated with T5's last hidden state along tokens (77 + 256 tokens);
  pooled = both CLIP projections concatenated; without T5 (``text_encoder_3=None``) its part is
  zeros, as the pipeline does. Source: diffusers 0.42.1
  ``pipelines/stable_diffusion_3/pipeline_stable_diffusion_3.py`` ``_get_t5_prompt_embeds``
  :233-287 (zeros without T5 :247), ``_get_clip_prompt_embeds`` :289-342, ``encode_prompt``
  :344-466 (the concatenations :450-464).
- taps: ``transformer_blocks.N`` (image stream), ``transformer_blocks.N:context`` (text stream;
  the last block is ``context_pre_only`` and has none), block indices over ``transformer_blocks``.
- the transformer gets t = 1000 sigma (the pipeline passes ``scheduler.timesteps``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dit import DiTBackbone

__all__ = ["SD3Backbone"]


class SD3Backbone(DiTBackbone):
    """SD3 MMDiT features, joint-attention maps and the SD3 text conditioning.

    Args:
        vae, transformer, scheduler: ``AutoencoderKL``, ``SD3Transformer2DModel``, ``FlowMatchEulerDiscreteScheduler``.
        text_encoder, text_encoder_2, tokenizer, tokenizer_2: CLIP-L and CLIP-G
            (``CLIPTextModelWithProjection``) and their tokenizers.
        text_encoder_3, tokenizer_3: T5 (``T5EncoderModel``), optional: None gives zeros in its place.
        max_sequence_length: T5 tokens (256, the pipeline's default).
        **kwargs: every :class:`~diffperc.backbones.dit.DiTBackbone` option (``layers``, ``timestep``, ...).
    """

    pipeline_class = "StableDiffusion3Pipeline"
    family = "sd3"
    text_parts = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")

    def __init__(self, vae: nn.Module, transformer: nn.Module, scheduler: Any, text_encoder: nn.Module | None = None,
                 text_encoder_2: nn.Module | None = None, tokenizer: Any = None, tokenizer_2: Any = None,
                 text_encoder_3: nn.Module | None = None, tokenizer_3: Any = None, max_sequence_length: int = 256,
                 **kwargs: Any) -> None:
        missing = [n for n, v in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2),
                                  ("tokenizer", tokenizer), ("tokenizer_2", tokenizer_2)) if v is None]
        if missing:
            raise ValueError(f"SD3Backbone needs both CLIP text encoders and tokenizers; missing {missing}. A diffusers "
                             "SD3 folder has text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/ (only the T5 "
                             "parts text_encoder_3/tokenizer_3 may be dropped)")
        if (text_encoder_3 is None) != (tokenizer_3 is None):
            raise ValueError("text_encoder_3 and tokenizer_3 (T5) come together: pass both or neither")
        if type(transformer).__name__ != "SD3Transformer2DModel":
            raise ValueError(f"SD3Backbone needs an SD3Transformer2DModel, got {type(transformer).__name__} "
                             "(FLUX goes to FluxBackbone)")
        super().__init__(vae, transformer, scheduler, **kwargs)
        self.text_encoder, self.text_encoder_2, self.text_encoder_3 = text_encoder, text_encoder_2, text_encoder_3
        self.tokenizer, self.tokenizer_2, self.tokenizer_3 = tokenizer, tokenizer_2, tokenizer_3
        for te in (text_encoder, text_encoder_2, text_encoder_3):
            if te is not None:
                te.requires_grad_(False).eval()
        self.max_sequence_length = int(max_sequence_length)
        self.config["max_sequence_length"] = self.max_sequence_length
        self.train(False)

    @torch.no_grad()
    def _clip(self, tok: Any, te: nn.Module, prompt: str) -> tuple[Tensor, Tensor]:
        """``_get_clip_prompt_embeds`` :303-332: penultimate hidden states (1, 77, D) and the projection (1, P)."""
        self._warn_truncation(tok, prompt)
        # both CLIPs pad to the pipeline's tokenizer_max_length (:221, the first tokenizer's)
        ids = tok([prompt], padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        out = te(ids.to(te.device), output_hidden_states=True)
        return out.hidden_states[-2], out[0]  # :328 (clip_skip None), :325

    @torch.no_grad()
    def _t5(self, prompt: str) -> Tensor:
        """``_get_t5_prompt_embeds`` :247-277: T5 last hidden state (1, max_sequence_length, D), or zeros without T5."""
        if self.text_encoder_3 is None:
            dim = self.transformer.config.joint_attention_dim
            return torch.zeros(1, self.max_sequence_length, dim, device=self.device, dtype=self.text_encoder.dtype)
        tok, te = self.tokenizer_3, self.text_encoder_3
        ids = tok([prompt], padding="max_length", max_length=self.max_sequence_length, truncation=True,
                  add_special_tokens=True, return_tensors="pt").input_ids
        return te(ids.to(te.device))[0]

    @torch.no_grad()
    def _encode_text(self, prompt: str) -> tuple[Tensor, Tensor]:
        """One prompt -> ((1, 77 + T5 tokens, D_T5) prompt_embeds, (1, P_L + P_G) pooled), as ``encode_prompt``."""
        h1, p1 = self._clip(self.tokenizer, self.text_encoder, prompt)
        h2, p2 = self._clip(self.tokenizer_2, self.text_encoder_2, prompt)
        clip = torch.cat([h1, h2], dim=-1)  # :450
        t5 = self._t5(prompt).to(clip.device)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # :459-461
        return torch.cat([clip, t5.to(clip.dtype)], dim=-2).detach(), torch.cat([p1, p2], dim=-1).detach()  # :463-464

    def _denoise(self, x: Tensor, sigma: Tensor, cond: dict[str, Tensor]) -> Any:
        t = (sigma * self.scheduler.config.num_train_timesteps).to(self.dtype)  # the pipeline's scheduler.timesteps
        return self.transformer(hidden_states=x.to(self.dtype), timestep=t,
                                encoder_hidden_states=cond["encoder_hidden_states"],
                                pooled_projections=cond["pooled_projections"], return_dict=False)

    def _probe_cond(self) -> dict[str, Tensor]:
        cfg = self.transformer.config
        return {"encoder_hidden_states": torch.zeros(1, 1, cfg.joint_attention_dim, device=self.device, dtype=self.dtype),
                "pooled_projections": torch.zeros(1, cfg.pooled_projection_dim, device=self.device, dtype=self.dtype)}

    def forward(self, images: Tensor | None = None, prompts: str | Sequence[str] | None = None,
                prompt_embeds: Tensor | None = None, pooled_prompt_embeds: Tensor | None = None,
                latents: Tensor | None = None, noise: Tensor | None = None,
                generator: torch.Generator | None = None) -> Any:
        """See :meth:`DiTBackbone.forward`; ``prompt_embeds`` (B, L, 4096 on SD3) with ``pooled_prompt_embeds`` (B, 2048)."""
        return self._forward(images, latents, noise, generator, prompts, prompt_embeds, pooled_prompt_embeds)
