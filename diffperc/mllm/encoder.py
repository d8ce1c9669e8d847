"""Visual tokens for the LLM: towers, fusion of diffusion and CLIP features, LLaVA-1.5's projector.

Fusion modes (Mustafar fuses CLIP with the question-conditioned diffusion features):

- ``concat_tokens``: each tower's tokens go through their own projector; the LLM sees the CLIP
  tokens followed by the diffusion tokens (N_clip + N_diff tokens).
- ``concat_channels``: the diffusion map is resampled (bilinear) to the CLIP grid and the two are
  concatenated channel-wise per token, then one projector (N_clip tokens).
- ``cross_attention``: by default the **CLIP tokens attend to the diffusion tokens** (queries from
  CLIP, keys/values from the diffusion map) and the result is added back through a tanh gate
  initialised at 0 (Flamingo's gated cross-attention). Why this direction: the LLM keeps
  LLaVA-1.5's token layout and count (576 at 336 px), the model starts exactly as CLIP-only
  LLaVA and lets the question-aware diffusion evidence in as far as it helps, and the diffusion
  map (16x16 at 512 px) can be coarser than the CLIP grid without losing CLIP's detail.
  ``cross_attention_query="diffusion"`` gives the reverse (diffusion tokens attend to CLIP; N_diff
  tokens).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FUSION_MODES", "GatedCrossAttention", "VisionEncoder", "build_projector"]

FUSION_MODES = ("concat_tokens", "concat_channels", "cross_attention")


def build_projector(kind: str, in_dim: int, hidden_size: int) -> nn.Module:
    """LLaVA's ``mm_projector``: ``"linear"`` or ``"mlp{N}x_gelu"`` (LLaVA-1.5: ``mlp2x_gelu``).

    ``mlpNx_gelu`` is Linear(in, hidden) then N-1 times (GELU, Linear(hidden, hidden)); applied per
    token: (B, N, in_dim) -> (B, N, hidden_size).
    """
    if kind == "linear":
        return nn.Linear(in_dim, hidden_size)
    match = re.fullmatch(r"mlp(\d+)x_gelu", kind)
    if not match or int(match.group(1)) < 1:
        raise ValueError(f"projector must be 'linear' or 'mlp<N>x_gelu' (LLaVA-1.5: 'mlp2x_gelu'), got {kind!r}")
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden_size)]
    for _ in range(int(match.group(1)) - 1):
        layers += [nn.GELU(), nn.Linear(hidden_size, hidden_size)]
    return nn.Sequential(*layers)


class GatedCrossAttention(nn.Module):
    """``x + tanh(gate) * MHA(LN(x), ctx, ctx)``; gate starts at 0, so it starts as the identity.

    Args:
        dim: channels of the query tokens x.
        context_dim: channels of the context tokens.
        heads: attention heads (must divide ``dim``).
    """

    def __init__(self, dim: int, context_dim: int, heads: int = 8) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"cross_attention_heads={heads} must divide the query channels {dim}")
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, kdim=context_dim, vdim=context_dim, batch_first=True)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        """x (B, N, dim), context (B, M, context_dim) -> (B, N, dim)."""
        out, _ = self.attn(self.norm(x), context, context, need_weights=False)
        return x + torch.tanh(self.gate) * out


def _tokens(maps: Tensor) -> Tensor:
    return maps.flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, h*w, C)


class VisionEncoder(nn.Module):
    """Images (and prompts) -> visual tokens (B, N, hidden_size) in the LLM's embedding space.

    Args:
        hidden_size: the LLM's hidden size.
        tower: the main tower (a :class:`~diffperc.mllm.towers.DiffusionTower`, or any tower).
        clip: an optional second tower (a :class:`~diffperc.mllm.towers.CLIPTower`) to fuse with.
        fusion: one of :data:`FUSION_MODES` (used only with two towers).
        projector: ``"mlp2x_gelu"`` (LLaVA-1.5), ``"linear"``, ``"mlp<N>x_gelu"``.
        cross_attention_query: ``"clip"`` (CLIP tokens attend to diffusion tokens) or ``"diffusion"``.
        cross_attention_heads: heads of the fusion attention.
    """

    def __init__(
        self, hidden_size: int, tower: nn.Module, clip: nn.Module | None = None, fusion: str = "concat_tokens",
        projector: str = "mlp2x_gelu", cross_attention_query: str = "clip", cross_attention_heads: int = 8,
    ) -> None:
        super().__init__()
        if fusion not in FUSION_MODES:
            raise ValueError(f"fusion must be one of {FUSION_MODES}, got {fusion!r}")
        if cross_attention_query not in ("clip", "diffusion"):
            raise ValueError(f"cross_attention_query must be 'clip' or 'diffusion', got {cross_attention_query!r}")
        self.tower, self.clip, self.fusion, self.query = tower, clip, fusion, cross_attention_query
        c_main = tower.out_channels
        self.cross_attention: GatedCrossAttention | None = None
        self.projector_clip: nn.Module | None = None
        if clip is None:
            self.projector = build_projector(projector, c_main, hidden_size)
        elif fusion == "concat_tokens":
            self.projector = build_projector(projector, c_main, hidden_size)
            self.projector_clip = build_projector(projector, clip.out_channels, hidden_size)
        elif fusion == "concat_channels":
            self.projector = build_projector(projector, c_main + clip.out_channels, hidden_size)
        else:
            q, kv = (clip.out_channels, c_main) if self.query == "clip" else (c_main, clip.out_channels)
            self.cross_attention = GatedCrossAttention(q, kv, cross_attention_heads)
            self.projector = build_projector(projector, q, hidden_size)

    def forward(self, images: Tensor, prompts: str | Sequence[str] | None = None,
                generator: torch.Generator | None = None) -> Tensor:
        """Images (B, 3, H, W) in [0, 1], B prompts for the diffusion tower -> (B, N, hidden_size)."""
        main = self.tower(images, prompts, generator=generator).float()  # (B, C, h, w)
        if self.clip is None:
            return self.projector(_tokens(main))
        clip = self.clip(images).float()  # (B, C_clip, g, g)
        if self.fusion == "concat_tokens":
            return torch.cat([self.projector_clip(_tokens(clip)), self.projector(_tokens(main))], dim=1)
        if self.fusion == "concat_channels":
            main = F.interpolate(main, size=clip.shape[-2:], mode="bilinear", align_corners=False)
            return self.projector(_tokens(torch.cat([clip, main], dim=1)))
        q, kv = (clip, main) if self.query == "clip" else (main, clip)
        return self.projector(self.cross_attention(_tokens(q), _tokens(kv)))

    def num_tokens(self, image_size: int) -> int:
        """Visual tokens per image of side ``image_size``."""
        n_main = int(torch.tensor(self.tower.grid(image_size)).prod())
        if self.clip is None:
            return n_main
        n_clip = int(torch.tensor(self.clip.grid(image_size)).prod())
        if self.fusion == "concat_tokens":
            return n_clip + n_main
        if self.fusion == "cross_attention" and self.query == "diffusion":
            return n_main
        return n_clip
