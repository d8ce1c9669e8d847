"""VPD building blocks: the text adapter, cross-attention concatenation, multi-scale input checks.

VPD (Zhao et al., "Unleashing Text-to-Image Diffusion Models for Visual Perception", ICCV 2023,
arXiv 2303.02153, github.com/wl-zhao/VPD, MIT) conditions the UNet on text refined by a small
residual MLP (``t + gamma * MLP(t)``, gamma a per-channel vector initialised at 1e-4) and, for
segmentation and referring segmentation, appends the averaged cross-attention maps (one channel
per prompt token) to the UNet feature of the same resolution before the task head.

The helpers at the bottom are shared by every dense head in this package: heads take
``in_channels`` and ``reductions`` (one entry per feature map, in the backbone's order, i.e.
``bb.feature_info``) and accept the maps in that order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["TextAdapter", "check_features", "concat_attention", "levels_by_reduction", "vpd_in_channels"]


class TextAdapter(nn.Module):
    """Residual text refinement ``t + gamma * MLP(t)`` (VPD's TextAdapter).

    MLP = Linear(D, hidden) - GELU - Linear(hidden, D); gamma is a learnable (D,) vector
    initialised at ``gamma_init``, so at initialisation the adapter is the identity up to
    ``gamma_init * |MLP(t)|`` and the pretrained text embeddings reach the UNet unchanged.

    Args:
        dim: embedding size D (768 for SD 1.x's CLIP ViT-L/14).
        hidden: MLP width; None = D (as VPD).
        gamma_init: initial value of every entry of gamma (VPD: 1e-4).
    """

    def __init__(self, dim: int, hidden: int | None = None, gamma_init: float = 1e-4) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"TextAdapter: dim must be >= 1, got {dim}")
        hidden = dim if hidden is None else hidden
        if hidden < 1:
            raise ValueError(f"TextAdapter: hidden must be >= 1 or None, got {hidden}")
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.gamma = nn.Parameter(torch.full((dim,), float(gamma_init)))

    def forward(self, t: Tensor) -> Tensor:
        """(..., L, D) text embeddings -> (..., L, D) adapted embeddings."""
        if t.shape[-1] != self.dim:
            raise ValueError(f"TextAdapter: expected embeddings (..., L, {self.dim}), got {tuple(t.shape)}")
        return t + self.gamma * self.mlp(t)


def concat_attention(features: list[Tensor], attention: dict[int, Tensor] | None,
                     reductions: Sequence[int]) -> list[Tensor]:
    """Append cross-attention maps to the feature map of the same reduction (VPD, channel-wise).

    Args:
        features: one (B, C_i, h_i, w_i) map per entry of ``reductions``.
        attention: reduction r -> (B, L, h, w) attention probabilities (``BackboneOutput.attention``),
            or None (features are returned unchanged). Maps whose reduction matches no feature are
            ignored (VPD drops the 1/8-latent maps the same way).
        reductions: the reduction of each feature (``bb.feature_info.reductions()``).

    Returns:
        list of (B, C_i + L, h_i, w_i) where a map of reduction r_i exists, else the feature itself.
    """
    if len(features) != len(reductions):
        raise ValueError(f"concat_attention: got {len(features)} features but {len(reductions)} reductions")
    if not attention:
        return list(features)
    out = []
    for i, (f, r) in enumerate(zip(features, reductions, strict=True)):
        a = attention.get(int(r))
        if a is None:
            out.append(f)
            continue
        if a.ndim != 4 or a.shape[0] != f.shape[0] or a.shape[-2:] != f.shape[-2:]:
            raise ValueError(f"concat_attention: attention[{r}] has shape {tuple(a.shape)} but feature {i} "
                             f"(reduction {r}) is {tuple(f.shape)}; expected (B, L, h, w) with the same B, h, w")
        out.append(torch.cat([f, a.to(f.dtype)], dim=1))
    return out


def vpd_in_channels(feature_info: Sequence, num_tokens: int, attention_reductions: Sequence[int]) -> list[int]:
    """Channels of each feature after :func:`concat_attention`.

    Args:
        feature_info: ``bb.feature_info`` (items with ``channels`` and ``reduction``).
        num_tokens: L, the number of prompt tokens (= attention channels).
        attention_reductions: the reductions that get attention maps appended.

    Returns:
        one int per feature, ``channels + num_tokens`` where the reduction gets maps.

    Example: SD 1.5 VPD taps (320, 640, 1280, 1280 at 8, 16, 32, 64), 150 class tokens on
    reductions (16, 32) -> [320, 790, 1430, 1280] as in VPD's segmentation FPN.
    """
    if num_tokens < 0:
        raise ValueError(f"vpd_in_channels: num_tokens must be >= 0, got {num_tokens}")
    keep = {int(r) for r in attention_reductions}
    return [f.channels + (num_tokens if f.reduction in keep else 0) for f in feature_info]


# ---- shared by the dense heads -------------------------------------------------------------


def levels_by_reduction(in_channels: Sequence[int], reductions: Sequence[int], head: str) -> list[int]:
    """Validate a head's per-level sizes; return the level indices sorted finest (smallest r) first."""
    in_channels, reductions = list(in_channels), list(reductions)
    if len(in_channels) != len(reductions):
        raise ValueError(f"{head}: in_channels ({len(in_channels)} entries: {in_channels}) and reductions "
                         f"({len(reductions)} entries: {reductions}) must have one entry per feature map")
    if not in_channels:
        raise ValueError(f"{head}: in_channels is empty; give one entry per feature map (bb.feature_info)")
    if any(c < 1 for c in in_channels) or any(r < 1 for r in reductions):
        raise ValueError(f"{head}: in_channels and reductions must be positive, got {in_channels} and {reductions}")
    if len(set(reductions)) != len(reductions):
        raise ValueError(f"{head}: reductions must be distinct (one map per resolution), got {reductions}")
    return sorted(range(len(reductions)), key=lambda i: reductions[i])


def check_features(features: Sequence[Tensor], in_channels: Sequence[int], head: str) -> None:
    """Raise a clear error when ``features`` do not match the channels a head was built for."""
    if not isinstance(features, (list, tuple)):
        raise TypeError(f"{head}: features must be a list of (B, C, h, w) tensors, got {type(features).__name__}")
    if len(features) != len(in_channels):
        raise ValueError(f"{head}: expected {len(in_channels)} feature maps (channels {list(in_channels)}), "
                         f"got {len(features)}")
    for i, (f, c) in enumerate(zip(features, in_channels, strict=True)):
        if not isinstance(f, Tensor) or f.ndim != 4 or f.shape[1] != c:
            shape = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
            raise ValueError(f"{head}: feature {i} must be (B, {c}, h, w), got {shape}")
        if f.shape[0] != features[0].shape[0]:
            raise ValueError(f"{head}: feature {i} has batch {f.shape[0]}, feature 0 has {features[0].shape[0]}")
