"""Semantic FPN segmentation head (FPN neck + FPNHead), as VPD uses it on ADE20K.

Semantic FPN: Kirillov et al., "Panoptic Feature Pyramid Networks", CVPR 2019 (arXiv 1901.02446);
FPN: Lin et al., CVPR 2017 (arXiv 1612.03144). VPD (github.com/wl-zhao/VPD,
segmentation/configs/fpn_vpd_sd1-5_512x512_gpu8x2.py) runs mmsegmentation 0.30's ``FPN`` neck
(in_channels [320, 790, 1430, 1280] = SD taps + 150 attention channels at 1/16 and 1/32,
out_channels 256) and ``FPNHead`` with VPD's own ``segmentation/configs/_base_/models/fpn_r50.py``:
**256** channels (mmseg's copy of that file says 128), SyncBN, dropout 0.1, align_corners False.

Neck: 1x1 lateral convs to ``channels``, top-down pathway (coarser level upsampled by nearest
neighbour and added), a 3x3 conv on each level (convs with bias, Xavier-uniform init as mmseg).
Head: on each level, max(1, log2(r_i / r_0)) blocks of 3x3 conv-BN-ReLU (no conv bias, Kaiming
init) each followed by 2x bilinear upsampling (none on the finest level), the levels summed on the
finest grid, dropout, 1x1 conv to K classes (normal init, std 0.01), bilinear resize to the output size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .vpd import check_features, levels_by_reduction

__all__ = ["SemanticFPNHead"]


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class SemanticFPNHead(nn.Module):
    """Per-pixel class logits from multi-scale features (FPN neck + Semantic FPN head).

    Args:
        in_channels: channels of each feature map, in the order the maps are passed (with VPD,
            after :func:`~diffperc.heads.vpd.concat_attention`; see ``vpd_in_channels``).
        reductions: image size / map size of each map.
        num_classes: K.
        channels: FPN neck width (VPD: 256).
        dropout: Dropout2d probability before the classifier (mmseg: 0.1).
        head_channels: width of the per-level scale heads; None = ``channels`` (VPD's fpn_r50.py:
            256; mmseg's own copy: 128).
    """

    def __init__(
        self, in_channels: Sequence[int], reductions: Sequence[int], num_classes: int, channels: int = 256,
        dropout: float = 0.1, head_channels: int | None = None,
    ) -> None:
        super().__init__()
        self.order = levels_by_reduction(in_channels, reductions, "SemanticFPNHead")
        if num_classes < 1:
            raise ValueError(f"SemanticFPNHead: num_classes must be >= 1, got {num_classes}")
        if not 0 <= dropout < 1:
            raise ValueError(f"SemanticFPNHead: dropout must be in [0, 1), got {dropout}")
        head_channels = channels if head_channels is None else head_channels
        if channels < 1 or head_channels < 1:
            raise ValueError(f"SemanticFPNHead: channels and head_channels must be >= 1, got {channels}, "
                             f"{head_channels}")
        self.in_channels, self.reductions = list(in_channels), list(reductions)
        self.num_classes = num_classes
        sorted_in = [self.in_channels[i] for i in self.order]  # finest first
        sorted_red = [self.reductions[i] for i in self.order]
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in sorted_in)
        self.fpn = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in sorted_in)
        self.scale_heads = nn.ModuleList()
        for r in sorted_red:
            ups = round(math.log2(r / sorted_red[0]))
            blocks: list[nn.Module] = []
            for k in range(max(1, ups)):
                blocks.append(_conv_bn_relu(channels if k == 0 else head_channels, head_channels))
                if ups > 0:
                    blocks.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads.append(nn.Sequential(*blocks))
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(head_channels, num_classes, 1)
        self._init_weights()

    def _init_weights(self) -> None:
        # mmseg 0.30: FPN init_cfg Xavier(uniform) on its convs, bias 0; ConvModule + norm: Kaiming
        # normal (fan_out, relu), norm weight 1 / bias 0; BaseDecodeHead: conv_seg Normal(std 0.01), bias 0
        for m in [*self.lateral, *self.fpn]:
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        for m in self.scale_heads.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def neck(self, features: list[Tensor]) -> list[Tensor]:
        """FPN: (B, C_i, h_i, w_i) in the given order -> (B, channels, h_i, w_i), finest first."""
        lat = [conv(features[i]) for conv, i in zip(self.lateral, self.order, strict=True)]
        for j in range(len(lat) - 1, 0, -1):  # top-down, coarse to fine
            lat[j - 1] = lat[j - 1] + F.interpolate(lat[j], size=lat[j - 1].shape[-2:], mode="nearest")
        return [conv(x) for conv, x in zip(self.fpn, lat, strict=True)]

    def forward(self, features: list[Tensor], size: tuple[int, int]) -> Tensor:
        """Class logits.

        Args:
            features: one (B, C_i, h_i, w_i) map per ``in_channels`` entry, in that order.
            size: output (H, W), usually the image size.

        Returns:
            (B, K, H, W) logits.
        """
        check_features(features, self.in_channels, "SemanticFPNHead")
        pyramid = self.neck(features)
        out = self.scale_heads[0](pyramid[0])
        for head, x in zip(self.scale_heads[1:], pyramid[1:], strict=True):
            y = head(x)
            if y.shape[-2:] != out.shape[-2:]:  # odd sizes
                y = F.interpolate(y, size=out.shape[-2:], mode="bilinear", align_corners=False)
            out = out + y
        logits = self.classifier(self.dropout(out))
        return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
