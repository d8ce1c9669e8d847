"""FLUX.1 (double- and single-stream DiT, rectified flow) as a perception backbone, with the DiTF recipe.

Black Forest Labs, FLUX.1 (weights ``black-forest-labs/FLUX.1-dev``, guidance-distilled, non-commercial
licence; ``FLUX.1-schnell``, Apache 2.0, no guidance embedding). What is FLUX's own, beside the DiT
base (:mod:`~diffperc.backbones.dit`), as diffusers 0.42.1 ``pipelines/flux/pipeline_flux.py`` does it:

- text: the CLIP ``pooler_output`` is the pooled projection (``_get_clip_prompt_embeds`` :267-310,
  :303), T5's last hidden state the prompt embeds (``_get_t5_prompt_embeds`` :217-265, :254);
  ``txt_ids`` are zeros (:387);
- latents are packed 2x2 into tokens (``_pack_latents`` :522-527) with position ids
  (``_prepare_latent_image_ids`` :508-520): a token map is (B, C, h/2, w/2);
- the transformer gets ``timestep = sigma`` (:903, it multiplies by 1000 itself) and, where
  ``guidance_embeds`` is set (dev), ``guidance = guidance_scale`` (:848);
- taps: ``transformer_blocks.N`` (double stream: image, or ``:context`` text) and
  ``single_transformer_blocks.N`` (joint stream; the image part is returned); block indices run
  over both lists (0..18 double, 19..56 single on FLUX.1), as DiTF counts them.

**DiTF** (Gan et al., "Unleashing Diffusion Transformers for Visual Correspondence by Modulating
Massive Activations", NeurIPS 2025; github.com/ganchaofan0000/DiTF; docs/fidelity/ditf.md):
``ditf=True`` takes the tensor entering block ``ditf_block`` (28 = ``single_transformer_blocks.9``),
zeroes its massive-activation channels (154, 1446), applies a LayerNorm without affine (eps 1e-6)
and the block's own AdaLN modulation (1 + scale) x + shift, shift/scale = that block's
``norm.linear(silu(temb))``. Sources: ``src/flux/model.py`` :174-184 (block 19 + i, its input
``x_feat`` and ``mod``), ``src/flux/modules/layers.py`` :291-312, ``eval_spair.py`` :146-164.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dit import DiTBackbone

__all__ = ["FluxBackbone", "DITF_MASSIVE_CHANNELS"]

DITF_MASSIVE_CHANNELS = (154, 1446)  # eval_spair.py :151-152 (FLUX.1-dev's massive-activation channels)
DITF_BLOCK = 28  # eval_spair.sh --k 28: single_transformer_blocks.9 (model.py :177, 19 + i)


def pack_latents(x: Tensor) -> Tensor:
    """(N, C, h, w) -> (N, (h/2)(w/2), 4C), as ``FluxPipeline._pack_latents`` (:522-527)."""
    n, c, h, w = x.shape
    x = x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, (h // 2) * (w // 2), c * 4)


def latent_image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(h * w, 3) position ids of an (h, w) token grid: (0, row, col), as ``_prepare_latent_image_ids``."""
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w)[None, :]
    return ids.reshape(h * w, 3).to(device=device, dtype=dtype)


class FluxBackbone(DiTBackbone):
    """FLUX features (double and single stream), joint-attention maps, and the DiTF recipe.

    Args:
        vae, transformer, scheduler: ``AutoencoderKL``, ``FluxTransformer2DModel``, ``FlowMatchEulerDiscreteScheduler``.
        text_encoder, tokenizer: CLIP (``CLIPTextModel``; its pooled output).
        text_encoder_2, tokenizer_2: T5 (``T5EncoderModel``).
        max_sequence_length: T5 tokens (512, FLUX.1-dev's and DiTF's).
        guidance_scale: the guidance embedding's value where the model has one (3.5, the pipeline's
            and DiTF's default); ignored by models without (schnell).
        ditf: the DiTF feature (see the module docstring); ``layers`` must then be left unset.
        ditf_block: global block index DiTF taps (must be a single-stream block).
        massive_channels: channels DiTF zeroes (FLUX.1-dev's 154 and 1446).
        **kwargs: every :class:`~diffperc.backbones.dit.DiTBackbone` option.
    """

    pipeline_class = "FluxPipeline"
    family = "flux"
    text_parts = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")

    def __init__(self, vae: nn.Module, transformer: nn.Module, scheduler: Any, text_encoder: nn.Module | None = None,
                 text_encoder_2: nn.Module | None = None, tokenizer: Any = None, tokenizer_2: Any = None,
                 max_sequence_length: int = 512, guidance_scale: float = 3.5, ditf: bool = False,
                 ditf_block: int = DITF_BLOCK, massive_channels: Sequence[int] = DITF_MASSIVE_CHANNELS,
                 **kwargs: Any) -> None:
        missing = [n for n, v in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2),
                                  ("tokenizer", tokenizer), ("tokenizer_2", tokenizer_2)) if v is None]
        if missing:
            raise ValueError(f"FluxBackbone needs CLIP (text_encoder, tokenizer) and T5 (text_encoder_2, tokenizer_2); "
                             f"missing {missing}. A diffusers FLUX folder has all four subfolders")
        if type(transformer).__name__ != "FluxTransformer2DModel":
            raise ValueError(f"FluxBackbone needs a FluxTransformer2DModel, got {type(transformer).__name__}")
        self.ditf, self.ditf_block = bool(ditf), int(ditf_block)
        self.massive_channels = tuple(int(c) for c in massive_channels)
        if ditf:
            if kwargs.get("layers") is not None:
                raise ValueError("ditf=True picks its own tap (the input of block ditf_block); leave layers unset")
            kwargs["layers"] = self._ditf_tap(transformer)
            dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
            bad = [c for c in self.massive_channels if not 0 <= c < dim]
            if bad:
                raise ValueError(f"massive_channels {bad} are outside the model's {dim} channels (FLUX.1's are "
                                 f"{DITF_MASSIVE_CHANNELS}; pass the ones of this model)")
        super().__init__(vae, transformer, scheduler, **kwargs)
        self.text_encoder, self.text_encoder_2, self.tokenizer, self.tokenizer_2 = (
            text_encoder, text_encoder_2, tokenizer, tokenizer_2)
        for te in (text_encoder, text_encoder_2):
            te.requires_grad_(False).eval()
        self.max_sequence_length, self.guidance_scale = int(max_sequence_length), float(guidance_scale)
        self.config.update(max_sequence_length=self.max_sequence_length, guidance_scale=self.guidance_scale,
                           ditf=self.ditf, ditf_block=self.ditf_block, massive_channels=list(self.massive_channels))
        self.train(False)

    def _ditf_tap(self, transformer: nn.Module) -> list[str]:
        n_double, n_single = len(transformer.transformer_blocks), len(transformer.single_transformer_blocks)
        j = self.ditf_block - n_double
        if not 0 <= j < n_single:
            raise ValueError(f"ditf_block {self.ditf_block} is not a single-stream block: this model has blocks "
                             f"{n_double}..{n_double + n_single - 1} single-stream (DiTF uses 28 on FLUX.1)")
        return [f"single_transformer_blocks.{j}:input"]

    # ------------------------------------------------------------------ family specifics
    @property
    def patch(self) -> int:
        return 2 * int(self.transformer.config.patch_size)

    @property
    def latent_channels(self) -> int:
        return int(self.transformer.config.in_channels) // 4

    @property
    def block_lists(self) -> tuple[str, ...]:
        return ("transformer_blocks", "single_transformer_blocks")

    def _presets(self) -> dict[str, list[str]]:
        n = len(self.transformer.transformer_blocks)
        if n + len(self.transformer.single_transformer_blocks) > DITF_BLOCK:
            return {"ditf": [f"single_transformer_blocks.{DITF_BLOCK - n}:input"]}
        return {}

    def _extra_taps(self) -> list[str]:
        if not self.ditf:
            return []
        return [self.layers[0].removesuffix(":input") + ".norm.linear"]  # AdaLayerNormZeroSingle: shift, scale, gate

    @torch.no_grad()
    def _encode_text(self, prompt: str) -> tuple[Tensor, Tensor]:
        """One prompt -> ((1, max_sequence_length, D_T5) T5 embeds, (1, D_CLIP) CLIP pooled output)."""
        tok, te = self.tokenizer, self.text_encoder
        self._warn_truncation(tok, prompt)
        ids = tok([prompt], padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        pooled = te(ids.to(te.device), output_hidden_states=False).pooler_output  # :302-303
        ids2 = self.tokenizer_2([prompt], padding="max_length", max_length=self.max_sequence_length, truncation=True,
                                return_tensors="pt").input_ids
        embeds = self.text_encoder_2(ids2.to(self.text_encoder_2.device), output_hidden_states=False)[0]  # :254
        return embeds.detach(), pooled.detach()

    def _denoise(self, x: Tensor, sigma: Tensor, cond: dict[str, Tensor]) -> Any:
        n, _, h, w = x.shape
        tokens = pack_latents(x.to(self.dtype))
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((n,), self.guidance_scale, device=x.device, dtype=torch.float32)  # :848-849
        embeds = cond["encoder_hidden_states"]
        return self.transformer(
            hidden_states=tokens, timestep=sigma.to(self.dtype), guidance=guidance, encoder_hidden_states=embeds,
            pooled_projections=cond["pooled_projections"],
            txt_ids=torch.zeros(embeds.shape[1], 3, device=x.device, dtype=self.dtype),
            img_ids=latent_image_ids(h // 2, w // 2, x.device, self.dtype), return_dict=False)

    def _probe_cond(self) -> dict[str, Tensor]:
        cfg = self.transformer.config
        return {"encoder_hidden_states": torch.zeros(1, 1, cfg.joint_attention_dim, device=self.device, dtype=self.dtype),
                "pooled_projections": torch.zeros(1, cfg.pooled_projection_dim, device=self.device, dtype=self.dtype)}

    # ------------------------------------------------------------------ DiTF
    def _postprocess(self, feats: list[Tensor]) -> list[Tensor]:
        if not self.ditf:
            return super()._postprocess(feats)
        out = []
        for x, mod in zip(feats[0::2], feats[1::2], strict=True):  # per timestep: (B, D, h, w), (B, 3D)
            out.append(ditf_modulate(x, mod, self.massive_channels))
        return out


def ditf_modulate(x: Tensor, mod: Tensor, massive_channels: Sequence[int]) -> Tensor:
    """DiTF's feature from a block input: zero the massive channels, LayerNorm (no affine), AdaLN modulate.

    Args:
        x: (B, D, h, w) ensemble-averaged tokens entering the block, as a map.
        mod: (B, 3D) the block's ``norm.linear(silu(temb))`` = (shift, scale, gate).
        massive_channels: channels set to 0 before the norm.

    Returns:
        (B, D, h, w) = (1 + scale) * LayerNorm(x) + shift.
    """
    x = x.clone()
    x[:, list(massive_channels)] = 0.0
    x = F.layer_norm(x.permute(0, 2, 3, 1).float(), (x.shape[1],), eps=1e-6).permute(0, 3, 1, 2)
    shift, scale, _ = mod.float().chunk(3, dim=1)
    return ((1 + scale[:, :, None, None]) * x + shift[:, :, None, None]).to(mod.dtype)
