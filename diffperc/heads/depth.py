"""VPD depth head: multi-scale fusion to one map, then the GLPDepth-style deconvolution decoder.

VPD (Zhao et al., ICCV 2023, arXiv 2303.02153; github.com/wl-zhao/VPD depth/models_depth/model.py)
fuses the four UNet decoder maps of SD at 1/8, 1/16, 1/32, 1/64 on the 1/32 grid: the 1/8 map goes
down by two stride-2 3x3 convs (GroupNorm + ReLU between), the 1/16 map by one, the 1/64 map is
upsampled 2x (nearest); [1/8, 1/16, 1/32, 1/64] are concatenated in that order and projected by a
1x1 conv to 1536 channels, GroupNorm, ReLU. For a padded input (VPD pads 480 crops to 512) the
fused map is cropped to the image's share (15 x 15 of 16 x 16) **before** decoding. The decoder
(GLPDepth / "simple baseline" deconvs) has 3 stride-2 transposed convs (kernel 2, 32 filters, BN,
ReLU), a 3x3 conv (with bias) to 192 channels, BN, ReLU, two 2x bilinear upsamplings
(align_corners False), and a 3x3 conv - ReLU - 3x3 conv to one channel; depth = sigmoid(.) *
max_depth. On VPD's sizes the output is exactly the image (15 * 8 * 4 = 480).

Generalised here to any set of reductions: the fusion grid is the second-deepest map's reduction
(the deepest when there is one map); finer maps go down by log2(ratio) stride-2 convs, coarser
maps are resized (nearest). Where the decoder's upscaling (2^num_deconv * 2^num_upsample) does not
equal the fusion reduction, the decoded map is resized (bilinear) to the cropped region.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .vpd import check_features, levels_by_reduction

__all__ = ["VPDDepthHead"]


def _groups(channels: int, groups: int = 16) -> int:
    """VPD uses GroupNorm(16, C); small test widths get the largest divisor of C that divides 16."""
    return math.gcd(groups, channels)


def _downsampler(channels: int, steps: int) -> nn.Module:
    """``steps`` stride-2 3x3 convs, GroupNorm + ReLU between them (VPD's layer1 / layer2)."""
    layers: list[nn.Module] = []
    for k in range(steps):
        if k > 0:
            layers += [nn.GroupNorm(_groups(channels), channels), nn.ReLU()]
        layers.append(nn.Conv2d(channels, channels, 3, stride=2, padding=1))
    return nn.Sequential(*layers) if layers else nn.Identity()


class VPDDepthHead(nn.Module):
    """Metric depth from multi-scale features (VPD's fusion + GLPDepth deconv decoder).

    Args:
        in_channels: channels of each feature map, in the order the maps are passed
            (``bb.feature_info.channels()``).
        reductions: image size / map size of each map (``bb.feature_info.reductions()``).
        neck_channels: width of the fused map (VPD: 1536 = 192 * 8).
        deconv_channels: filters of each transposed conv (VPD: 32).
        num_deconv: number of stride-2 transposed convs (VPD: 3).
        max_depth: output range is (0, max_depth) metres (VPD NYUv2: 10).
        decoder_channels: width after the deconvs and of the last convs (VPD: 192).
        num_upsample: 2x bilinear upsamplings after the decoder conv (VPD: 2).
    """

    def __init__(
        self, in_channels: Sequence[int], reductions: Sequence[int], neck_channels: int = 1536,
        deconv_channels: int = 32, num_deconv: int = 3, max_depth: float = 10.0, decoder_channels: int = 192,
        num_upsample: int = 2,
    ) -> None:
        super().__init__()
        order = levels_by_reduction(in_channels, reductions, "VPDDepthHead")
        if max_depth <= 0:
            raise ValueError(f"VPDDepthHead: max_depth must be > 0, got {max_depth}")
        if min(neck_channels, deconv_channels, decoder_channels) < 1 or min(num_deconv, num_upsample) < 0:
            raise ValueError("VPDDepthHead: neck_channels, deconv_channels, decoder_channels must be >= 1 and "
                             f"num_deconv, num_upsample >= 0, got {neck_channels}, {deconv_channels}, "
                             f"{decoder_channels}, {num_deconv}, {num_upsample}")
        self.in_channels, self.reductions = list(in_channels), list(reductions)
        self.order = order  # finest first: VPD concatenates [1/8, 1/16, 1/32, 1/64]
        self.num_upsample = num_upsample
        self.max_depth = float(max_depth)
        # fuse on the grid of the second-deepest map (VPD: 1/32 of 8, 16, 32, 64)
        self.fuse_reduction = self.reductions[order[-2] if len(order) > 1 else order[-1]]
        self.down = nn.ModuleList(
            _downsampler(c, max(0, round(math.log2(self.fuse_reduction / r))))
            for c, r in zip(self.in_channels, self.reductions, strict=True)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(sum(self.in_channels), neck_channels, 1), nn.GroupNorm(_groups(neck_channels), neck_channels),
            nn.ReLU(),
        )
        deconvs: list[nn.Module] = []
        c = neck_channels
        for _ in range(num_deconv):
            deconvs += [nn.ConvTranspose2d(c, deconv_channels, 2, stride=2, bias=False),
                        nn.BatchNorm2d(deconv_channels), nn.ReLU()]
            c = deconv_channels
        self.deconv = nn.Sequential(*deconvs)
        # mmcv build_conv_layer(Conv2d) keeps the bias (VPD's Decoder.conv_layers)
        self.conv = nn.Sequential(nn.Conv2d(c, decoder_channels, 3, padding=1),
                                  nn.BatchNorm2d(decoder_channels), nn.ReLU())
        self.last = nn.Sequential(nn.Conv2d(decoder_channels, decoder_channels, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(decoder_channels, 1, 3, padding=1))
        self._init_weights()

    def _init_weights(self) -> None:
        # VPD: truncated normal (std 0.02) in the fusion; normal std 1e-3 in the decoder, so the
        # initial prediction is close to max_depth / 2 everywhere.
        for m in [*self.down.modules(), *self.neck.modules()]:
            if isinstance(m, nn.Conv2d):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        for m in [*self.deconv.modules(), *self.conv.modules(), *self.last.modules()]:
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.normal_(m.weight, std=1e-3)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def fuse(self, features: list[Tensor]) -> Tensor:
        """Features -> (B, neck_channels, h, w) on the grid of the second-deepest map."""
        size = features[self.reductions.index(self.fuse_reduction)].shape[-2:]
        maps = []
        for i in self.order:  # finest first, as VPD's torch.cat([layer1(f8), layer2(f16), f32, up(f64)])
            x = self.down[i](features[i])
            if x.shape[-2:] != size:  # coarser maps (VPD: the 1/64 one), or odd sizes after striding
                x = F.interpolate(x, size=size, mode="nearest")
            maps.append(x)
        return self.neck(torch.cat(maps, dim=1))

    def decode(self, fused: Tensor) -> Tensor:
        """(B, neck_channels, h, w) -> (B, decoder_channels, h * 2^(num_deconv + num_upsample), ...)."""
        x = self.conv(self.deconv(fused))
        for _ in range(self.num_upsample):
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        return x

    def forward(self, features: list[Tensor], size: tuple[int, int]) -> Tensor:
        """Depth in metres.

        Args:
            features: one (B, C_i, h_i, w_i) map per ``in_channels`` entry, in that order, of the
                image padded at the bottom/right (or not padded).
            size: (H, W) of the image before padding. The fused map is cropped to
                ceil(H / r) x ceil(W / r) (r = ``fuse_reduction``) before decoding, as VPD crops
                16 x 16 to 15 x 15 for a 480 crop padded to 512.

        Returns:
            (B, 1, H, W) depth in (0, max_depth).
        """
        check_features(features, self.in_channels, "VPDDepthHead")
        h, w = int(size[0]), int(size[1])
        if h < 1 or w < 1:
            raise ValueError(f"VPDDepthHead: size must be positive (H, W), got {tuple(size)}")
        fused = self.fuse(features)
        r = self.fuse_reduction
        hc, wc = min(-(-h // r), fused.shape[-2]), min(-(-w // r), fused.shape[-1])
        x = self.decode(fused[..., :hc, :wc])
        if x.shape[-2:] != (hc * r, wc * r):  # decoder upscaling other than r (not VPD's sizes)
            x = F.interpolate(x, size=(hc * r, wc * r), mode="bilinear", align_corners=False)
        x = x[..., :h, :w]
        if x.shape[-2:] != (h, w):  # size beyond the features' extent
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        return torch.sigmoid(self.last(x)) * self.max_depth
