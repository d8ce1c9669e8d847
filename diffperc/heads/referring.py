"""Referring segmentation decoder: LAVT-style top-down fusion to 2-class logits, as in VPD.

LAVT (Yang et al., "LAVT: Language-Aware Vision Transformer for Referring Image Segmentation",
CVPR 2022, arXiv 2112.02244) decodes with ``SimpleDecoding``; VPD (github.com/wl-zhao/VPD,
refer/lib/mask_predictor.py, refer/models_refer/model.py) reuses it on the SD taps with the
sentence's cross-attention maps appended (neck dims [320, 680, 1320, 1280] for 40 tokens).

Starting from the deepest map, each step upsamples the running map (bilinear, align_corners=True)
to the next finer map, concatenates them and applies two 3x3 conv-BN-ReLU blocks; a 1x1 conv gives
the logits, resized bilinearly (align_corners=True) to the output size. VPD's hidden width is
dims[-1] // 2 = 640, half the deepest map's channels (the default here).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .vpd import check_features, levels_by_reduction

__all__ = ["RefSegDecoder"]


def _fusion_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
    )


class RefSegDecoder(nn.Module):
    """Foreground/background logits for a referred object from multi-scale features.

    Args:
        in_channels: channels of each feature map, in the order the maps are passed (with VPD,
            after :func:`~diffperc.heads.vpd.concat_attention` of the sentence's attention maps).
        reductions: image size / map size of each map.
        hidden: width of the fusion blocks; None = the deepest map's channels // 2 (VPD's
            ``SimpleDecoding(dims, factor=2)``: 1280 // 2 = 640).
        num_classes: output channels (2: background, referred object).
    """

    def __init__(self, in_channels: Sequence[int], reductions: Sequence[int], hidden: int | None = None,
                 num_classes: int = 2) -> None:
        super().__init__()
        self.order = levels_by_reduction(in_channels, reductions, "RefSegDecoder")[::-1]  # deepest first
        if hidden is None:
            hidden = max(1, list(in_channels)[self.order[0]] // 2)
        if hidden < 1 or num_classes < 1:
            raise ValueError(f"RefSegDecoder: hidden and num_classes must be >= 1, got {hidden}, {num_classes}")
        self.in_channels, self.reductions = list(in_channels), list(reductions)
        chans = [self.in_channels[i] for i in self.order]
        if len(chans) == 1:  # one map: a single block on it
            self.blocks = nn.ModuleList([_fusion_block(chans[0], hidden)])
        else:  # VPD/LAVT: deepest + next, then running map + each finer map
            cins = [chans[0] + chans[1]] + [hidden + c for c in chans[2:]]
            self.blocks = nn.ModuleList(_fusion_block(c, hidden) for c in cins)
        self.classifier = nn.Conv2d(hidden, num_classes, 1)

    def forward(self, features: list[Tensor], size: tuple[int, int]) -> Tensor:
        """Logits.

        Args:
            features: one (B, C_i, h_i, w_i) map per ``in_channels`` entry, in that order.
            size: output (H, W), usually the image size.

        Returns:
            (B, num_classes, H, W) logits (argmax over dim 1 = the mask).
        """
        check_features(features, self.in_channels, "RefSegDecoder")
        maps = [features[i] for i in self.order]
        x = maps[0]
        for block, finer in zip(self.blocks, maps[1:], strict=False):
            if x.shape[-2:] != finer.shape[-2:]:
                x = F.interpolate(x, size=finer.shape[-2:], mode="bilinear", align_corners=True)
            x = block(torch.cat([x, finer], dim=1))
        if len(maps) == 1:
            x = self.blocks[0](x)
        x = self.classifier(x)
        return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)
