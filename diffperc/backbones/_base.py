"""Shared backbone types: :class:`FeatureInfo`, :class:`FeatureInfoList`, :class:`BackboneOutput`.

Every backbone in diffperc (diffusion UNet, DINOv2, SD+DINOv2 fusion) returns a
:class:`BackboneOutput` and describes its feature maps with a :class:`FeatureInfoList`,
so heads can size themselves with ``backbone.feature_info.channels()`` (timm style).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["BackboneOutput", "FeatureInfo", "FeatureInfoList"]


@dataclass(frozen=True)
class FeatureInfo:
    """One feature map: the module it comes from, its channels and its reduction.

    ``reduction`` r means the map of an (H, W) image is (H / r, W / r).
    """

    name: str
    channels: int
    reduction: int


class FeatureInfoList(list):
    """A list of :class:`FeatureInfo` with timm-style accessors."""

    def channels(self) -> list[int]:
        return [f.channels for f in self]

    def reductions(self) -> list[int]:
        return [f.reduction for f in self]

    def names(self) -> list[str]:
        return [f.name for f in self]


@dataclass
class BackboneOutput:
    """What a backbone returns.

    Attributes:
        features: one (B, C_i, H / r_i, W / r_i) tensor per ``feature_info`` entry.
        attention: reduction r -> (B, L, H / r, W / r) cross-attention probabilities over the
            L prompt tokens (each pixel sums to 1 over L), or None when not captured.
    """

    features: list[Tensor]
    attention: dict[int, Tensor] | None = None
