"""Taps on the two streams of DiT blocks, and joint-attention capture (used by :mod:`~diffperc.backbones.dit`).

A joint block returns ``(encoder_hidden_states, hidden_states)``; its attention returns
``(hidden_states, encoder_hidden_states)``; any other module's token output is read as image tokens
(a joint [text, image] sequence is cut to its image part). Hooks are persistent and inactive until
:meth:`StreamTaps.start`; the last tap raises :class:`~diffperc.backbones._taps.StopForward`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from ._taps import TapRecorder, first_tensor, split_tap
from .attention import AttentionStore

__all__ = ["JointAttentionCapture", "StreamTaps", "split_stream_tap"]

_KINDS = ("output", "input", "context", "context_input")

def _is_block(module: nn.Module) -> bool:
    """Joint/single transformer blocks return (encoder_hidden_states, hidden_states)."""
    return type(module).__name__.endswith("TransformerBlock")


class StreamTaps(TapRecorder):
    """Persistent hooks that read the image or the text stream of DiT modules (see module docstring).

    ``n_img`` (set per run) is the number of image tokens, used to cut joint sequences.
    """

    def __init__(self, root: nn.Module, names: Sequence[str]) -> None:
        super().__init__(names)
        self.n_img = 0
        for name in self.names:
            path, kind = split_stream_tap(name)
            m = root.get_submodule(path)
            if kind.endswith("input"):
                self.handles.append(m.register_forward_pre_hook(partial(self._pre, name, kind), with_kwargs=True))
            else:
                self.handles.append(m.register_forward_hook(partial(self._post, name, kind, _is_block(m))))

    def _pre(self, name: str, kind: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self.active:
            return
        key, pos = ("encoder_hidden_states", 1) if kind == "context_input" else ("hidden_states", 0)
        x = kwargs.get(key, args[pos] if len(args) > pos else None)
        if x is None:
            raise ValueError(f"tap {name!r}: the module got no {key}")
        self._keep(name, x if kind == "context_input" else self._image(x))

    def _post(self, name: str, kind: str, block: bool, module: nn.Module, args: tuple, output: Any) -> None:
        if not self.active:
            return
        if isinstance(output, tuple) and len(output) == 2:
            context, image = output if block else output[::-1]
            x = context if kind == "context" else image
            if x is None:
                raise ValueError(f"tap {name!r}: this module has no {kind} stream output (SD3's last block is "
                                 "context_pre_only: tap its ':context_input' instead)")
        elif kind == "context":
            raise ValueError(f"tap {name!r}: ':context' needs a module with two streams (a transformer block or "
                             "its attention)")
        else:
            x = self._image(first_tensor(output))
        self._keep(name, x)

    def _image(self, x: Tensor) -> Tensor:
        return x[:, -self.n_img :] if x.ndim == 3 and x.shape[1] > self.n_img > 0 else x

    def start(self, stop_after: str | None, n_img: int) -> None:
        """As :meth:`TapRecorder.start`; ``n_img``: this run's number of image tokens."""
        self.n_img = n_img
        super().start(stop_after)


def split_stream_tap(name: str) -> tuple[str, str]:
    """``"a.b:context"`` -> ("a.b", "context"); no suffix means the image-stream output."""
    return split_tap(name, _KINDS)


class JointAttentionCapture:
    """Wraps a joint-attention processor; while the store records, adds image->text probabilities.

    The module's output is the wrapped processor's, unchanged. The map is the image-query ->
    text-key block of the joint softmax, renormalised over the text tokens (= softmax of
    q_img k_text^T / sqrt(d) over the text keys alone: the joint denominator cancels), averaged
    over heads: (B, N_img, L), each pixel summing to 1 over L. Queries and keys are computed as
    the processors do (projections, per-head QK-norm, FLUX's RoPE on the joint sequence
    [text, image]).
    """

    def __init__(self, store: AttentionStore, inner: Any) -> None:
        self.store, self.inner = store, inner

    def __call__(self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        if encoder_hidden_states is not None and self.store.wants(hidden_states.shape[1]):
            rope = kwargs.get("image_rotary_emb", args[0] if args else None)  # FluxAttention passes it positionally
            self.store.add(self.probs(attn, hidden_states, encoder_hidden_states, rope))
        return out

    @staticmethod
    def probs(attn: nn.Module, hidden: Tensor, context: Tensor, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        """(B, N, C) image, (B, L, C) text -> (B, N, L) head-averaged image->text probabilities."""
        heads = attn.heads
        q = attn.to_q(hidden).unflatten(-1, (heads, -1))  # (B, N, H, D)
        k = attn.add_k_proj(context).unflatten(-1, (heads, -1))  # (B, L, H, D)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_added_k is not None:
            k = attn.norm_added_k(k)
        if rope is not None:  # FLUX: one rotary table over [text, image]
            from diffusers.models.embeddings import apply_rotary_emb

            n_txt = context.shape[1]
            q = apply_rotary_emb(q, tuple(r[n_txt:] for r in rope), sequence_dim=1)
            k = apply_rotary_emb(k, tuple(r[:n_txt] for r in rope), sequence_dim=1)
        logits = torch.einsum("bnhd,blhd->bhnl", q.float(), k.float()) / math.sqrt(q.shape[-1])
        return logits.softmax(-1).mean(1)
