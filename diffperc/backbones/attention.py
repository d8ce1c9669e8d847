"""Cross-attention capture for diffusers UNets.

Only the cross-attention layers (``Attention.is_cross_attention``: ``attn2`` in SD) get the
:class:`StoreCrossAttnProcessor`; every other layer keeps its own processor (SDPA). While the
shared :class:`AttentionStore` is recording, the processor computes exactly what diffusers'
``AttnProcessor`` computes (``attn.get_attention_scores``: softmax(QK^T * scale), honouring
``upcast_attention`` / ``upcast_softmax`` and masks) and hands the probabilities, averaged over
heads, to the store; otherwise, or for a resolution nobody asked for, it runs the stock
``AttnProcessor2_0``. The UNet's output is the same either way up to float rounding.

The store averages the maps over all layers of one spatial resolution and keys them by the
reduction r = image size / map size (VPD, ANCHORS.md section 1; prompt-to-prompt style).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["AttentionStore", "StoreCrossAttnProcessor", "install_attention_capture", "cross_attention_names"]


class AttentionStore:
    """Running sums of head-averaged cross-attention probabilities, per reduction.

    Call :meth:`begin` before a UNet forward, read :meth:`maps` after it.
    """

    def __init__(self) -> None:
        self.active = False
        self.latent_hw: tuple[int, int] = (0, 0)
        self.vae_factor = 1
        self.keep: set[int] | None = None
        self._sums: dict[int, Tensor] = {}
        self._counts: dict[int, int] = {}

    def begin(self, latent_hw: tuple[int, int], vae_factor: int, keep: set[int] | None = None) -> None:
        """Start recording for latents of size ``latent_hw``; keep only reductions in ``keep``."""
        self.active, self.latent_hw, self.vae_factor, self.keep = True, latent_hw, vae_factor, keep
        self._sums, self._counts = {}, {}

    def end(self) -> None:
        self.active = False

    def reduction_of(self, seq_len: int) -> int:
        """Image reduction of a layer whose queries are ``seq_len`` latent pixels."""
        h, w = self.latent_hw
        return self.vae_factor * round(math.sqrt(h * w / seq_len))

    def wants(self, seq_len: int) -> bool:
        return self.active and (self.keep is None or self.reduction_of(seq_len) in self.keep)

    def add(self, probs: Tensor) -> None:
        """Add one layer's probabilities (B, HW, L), already averaged over heads."""
        r = self.reduction_of(probs.shape[1])
        probs = probs.float()
        if r in self._sums:
            self._sums[r] += probs
            self._counts[r] += 1
        else:
            self._sums[r], self._counts[r] = probs.clone(), 1

    def maps(self) -> dict[int, Tensor]:
        """reduction r -> (B, L, h / r', w / r') mean over layers (float32), r' = r / vae_factor."""
        h, w = self.latent_hw
        out = {}
        for r, total in sorted(self._sums.items()):
            rl = r // self.vae_factor
            mean = total / self._counts[r]  # (B, HW, L)
            out[r] = mean.transpose(1, 2).reshape(mean.shape[0], mean.shape[2], h // rl, w // rl)
        return out


class StoreCrossAttnProcessor:
    """``AttnProcessor`` arithmetic that also reports softmax probabilities to a store."""

    def __init__(self, store: AttentionStore) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.store = store
        self.fallback = AttnProcessor2_0()

    def __call__(
        self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None, temb: Tensor | None = None, **kwargs,
    ) -> Tensor:
        seq_len = hidden_states.shape[1] if hidden_states.ndim == 3 else hidden_states[0, 0].numel()
        if encoder_hidden_states is None or not self.store.wants(seq_len):
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, key_len, _ = encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, key_len, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(attn.head_to_batch_dim(query), key, attention_mask)  # (B*heads, HW, L)
        self.store.add(probs.view(batch, attn.heads, *probs.shape[1:]).mean(1))
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def cross_attention_names(unet: nn.Module) -> list[str]:
    """Module paths of the cross-attention layers of a UNet, in registration order."""
    from diffusers.models.attention_processor import Attention

    return [name for name, m in unet.named_modules() if isinstance(m, Attention) and m.is_cross_attention]


def install_attention_capture(unet: nn.Module, store: AttentionStore) -> list[str]:
    """Give every cross-attention layer a :class:`StoreCrossAttnProcessor`; return their paths."""
    names = cross_attention_names(unet)
    processor = StoreCrossAttnProcessor(store)
    for name in names:
        unet.get_submodule(name).set_processor(processor)
    return names
