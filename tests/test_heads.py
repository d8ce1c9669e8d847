"""Dense heads (VPD depth, Semantic FPN, referring decoder) and the VPD text/attention helpers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffperc.backbones._base import FeatureInfo
from diffperc.heads import (
    RefSegDecoder,
    SemanticFPNHead,
    TextAdapter,
    VPDDepthHead,
    concat_attention,
    vpd_in_channels,
)

K = 3  # prompt tokens appended as attention channels in the SD-like layout
# SD 1.5 VPD taps (1280, 1280, 640, 320 at 64, 32, 16, 8, deepest first) scaled down for speed;
# the 1/16 and 1/32 maps carry K attention channels as in VPD.
SD_LIKE = ([24, 24 + K, 12 + K, 8], [64, 32, 16, 8])
TINY_SD = ([16, 16, 8, 8], [16, 8, 4, 2])  # test_sd "vpd" taps
TWO_TAPS = ([12, 6], [8, 4])  # like the bundled digits model (2 up blocks)
LAYOUTS = {"sd_like": SD_LIKE, "tiny_sd": TINY_SD, "two_taps": TWO_TAPS}


def _features(channels: list[int], reductions: list[int], size: int = 128, batch: int = 2) -> list[torch.Tensor]:
    return [torch.randn(batch, c, size // r, size // r) for c, r in zip(channels, reductions, strict=True)]


def _heads(channels: list[int], reductions: list[int]) -> dict[str, torch.nn.Module]:
    return {
        "depth": VPDDepthHead(channels, reductions, neck_channels=32, decoder_channels=16, max_depth=10.0),
        "semseg": SemanticFPNHead(channels, reductions, num_classes=5, channels=16),
        "refseg": RefSegDecoder(channels, reductions, hidden=16),
    }


OUT_CHANNELS = {"depth": 1, "semseg": 5, "refseg": 2}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", ["depth", "semseg", "refseg"])
def test_head_shapes_and_gradients(layout: str, kind: str) -> None:
    channels, reductions = LAYOUTS[layout]
    head = _heads(channels, reductions)[kind].train()
    feats = [f.requires_grad_() for f in _features(channels, reductions)]
    out = head(feats, (120, 100))  # any output size, not only the input's
    assert out.shape == (2, OUT_CHANNELS[kind], 120, 100)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feats)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_depth_in_range(layout: str) -> None:
    channels, reductions = LAYOUTS[layout]
    head = VPDDepthHead(channels, reductions, neck_channels=32, decoder_channels=16, max_depth=7.5).eval()
    with torch.no_grad():
        d = head(_features(channels, reductions), (64, 64))
    assert (d > 0).all() and (d < 7.5).all()
    # VPD's decoder init (std 1e-3) starts every prediction near max_depth / 2
    assert torch.allclose(d, torch.full_like(d, 3.75), atol=0.05)
    with torch.no_grad():  # large weights saturate the sigmoid but stay inside the range
        for m in head.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                m.weight.normal_(std=1.0)
        d = head(_features(channels, reductions), (64, 64))
    assert (d >= 0).all() and (d <= 7.5).all() and d.max() - d.min() > 1.0


def test_depth_fusion_follows_vpd() -> None:
    """On SD reductions VPD fuses at 1/32: [down2(f8), down1(f16), f32, up2x(f64)] concatenated in that order;
    the fused map is cropped to the unpadded image, decoded, upsampled 2x twice (bilinear)."""
    channels, reductions = SD_LIKE
    head = VPDDepthHead(channels, reductions, neck_channels=32, decoder_channels=16).eval()
    assert head.fuse_reduction == 32
    strided = [sum(isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2) for m in d.modules()) for d in head.down]
    assert strided == [0, 0, 1, 2]  # for reductions 64, 32, 16, 8
    feats = _features(channels, reductions)  # of a 128 x 128 (padded) image
    with torch.no_grad():
        f64, f32, f16, f8 = feats
        maps = [head.down[3](f8), head.down[2](f16), f32, f64.repeat_interleave(2, -1).repeat_interleave(2, -2)]
        expected = head.neck(torch.cat(maps, dim=1))
        assert torch.allclose(head.fuse(feats), expected, atol=1e-6)
        # a 96 x 120 image padded to 128: the 4 x 4 fused map is cropped to 3 x 4 (= ceil(96/32) x ceil(120/32))
        x = head.conv(head.deconv(expected[..., :3, :4]))
        assert x.shape[-2:] == (3 * 8, 4 * 8)
        for _ in range(2):
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        ref = torch.sigmoid(head.last(x[..., :96, :120])) * head.max_depth
        assert torch.allclose(head(feats, (96, 120)), ref, atol=1e-6)


def test_semantic_fpn_matches_manual_fpn() -> None:
    channels, reductions = SD_LIKE
    head = SemanticFPNHead(channels, reductions, num_classes=4, channels=8).eval()
    feats = _features(channels, reductions, size=64)
    finest_first = feats[::-1]
    with torch.no_grad():
        lat = [conv(f) for conv, f in zip(head.lateral, finest_first, strict=True)]
        for j in (3, 2, 1):  # top-down: nearest 2x upsampling, added
            lat[j - 1] = lat[j - 1] + lat[j].repeat_interleave(2, -1).repeat_interleave(2, -2)
        pyr = [conv(x) for conv, x in zip(head.fpn, lat, strict=True)]
        for got, want in zip(head.neck(feats), pyr, strict=True):
            assert torch.allclose(got, want, atol=1e-6)
        # scale heads: 1, 1, 2, 3 conv blocks for r/r0 = 1, 2, 4, 8; each coarse block upsamples 2x
        convs = [sum(isinstance(m, torch.nn.Conv2d) for m in h.modules()) for h in head.scale_heads]
        assert convs == [1, 1, 2, 3]
        summed = sum(h(x) for h, x in zip(head.scale_heads, pyr, strict=True))
        ref = F.interpolate(head.classifier(summed), size=(64, 64), mode="bilinear")
        assert torch.allclose(head(feats, (64, 64)), ref, atol=1e-5)


def test_refseg_decoder_top_down() -> None:
    channels, reductions = SD_LIKE
    head = RefSegDecoder(channels, reductions, hidden=8).eval()
    feats = _features(channels, reductions, size=64)
    with torch.no_grad():
        x = feats[0]
        for block, finer in zip(head.blocks, feats[1:], strict=True):  # deepest first, as LAVT/VPD
            x = F.interpolate(x, size=finer.shape[-2:], mode="bilinear", align_corners=True)
            x = block(torch.cat([x, finer], dim=1))
        ref = F.interpolate(head.classifier(x), size=(64, 64), mode="bilinear", align_corners=True)
        assert torch.allclose(head(feats, (64, 64)), ref, atol=1e-6)
    # VPD: first block fuses c4 + c3, then + c2, then + c1
    assert [b[0].in_channels for b in head.blocks] == [24 + 24 + K, 8 + 12 + K, 8 + 8]


@pytest.mark.parametrize("kind", ["depth", "semseg", "refseg"])
def test_heads_accept_any_level_order(kind: str) -> None:
    channels, reductions = TINY_SD
    head = _heads(channels[::-1], reductions[::-1])[kind].eval()  # finest first instead of deepest first
    with torch.no_grad():
        out = head(_features(channels[::-1], reductions[::-1], size=64), (64, 64))
    assert out.shape == (2, OUT_CHANNELS[kind], 64, 64)


def test_heads_on_test_sd_backbone() -> None:
    """feature_info -> vpd_in_channels -> concat_attention -> heads, end to end on the tiny SD backbone."""
    from diffperc import create_backbone

    bb = create_backbone("test_sd", layers="vpd", timestep=1, add_noise=False, attention=True,
                         attention_resolutions=[4, 8])
    out = bb(torch.rand(2, 3, 64, 64), prompts=["a room", "a kitchen"])
    tokens = next(iter(out.attention.values())).shape[1]
    in_ch = vpd_in_channels(bb.feature_info, tokens, attention_reductions=[4, 8])
    feats = concat_attention(out.features, out.attention, bb.feature_info.reductions())
    assert [f.shape[1] for f in feats] == in_ch == [16, 16 + tokens, 8 + tokens, 8]
    reds = bb.feature_info.reductions()
    for head in _heads(in_ch, reds).values():
        y = head(feats, (64, 64))
        assert y.shape[-2:] == (64, 64) and torch.isfinite(y).all()


def test_text_adapter_near_identity_at_init() -> None:
    D = 16
    ad = TextAdapter(D)
    assert ad.gamma.shape == (D,) and torch.all(ad.gamma == 1e-4)
    ad.double()  # float64 so out - t is not lost to rounding against |t|
    t = torch.randn(2, 5, D, dtype=torch.float64)
    out = ad(t)
    mlp = ad.mlp(t)
    assert out.shape == t.shape
    assert torch.allclose(out - t, 1e-4 * mlp, atol=1e-13)
    assert ((out - t).norm(dim=-1) <= 1e-4 * mlp.norm(dim=-1) * (1 + 1e-6)).all()
    out.sum().backward()
    assert ad.gamma.grad is not None and ad.gamma.grad.abs().sum() > 0
    assert all(p.grad is not None for p in ad.mlp.parameters())
    assert TextAdapter(8, hidden=4, gamma_init=0.5)(torch.randn(3, 8)).shape == (3, 8)  # (L, D) also works
    with pytest.raises(ValueError, match=r"\(\.\.\., L, 16\)"):
        ad(torch.randn(2, 5, 8, dtype=torch.float64))


def test_concat_attention_matches_cat() -> None:
    feats = [torch.randn(2, 6, 4, 4), torch.randn(2, 5, 8, 8), torch.randn(2, 3, 16, 16)]
    attn = {8: torch.rand(2, 7, 8, 8), 4: torch.rand(2, 7, 16, 16), 2: torch.rand(2, 7, 32, 32)}  # 2: no feature
    out = concat_attention(feats, attn, [16, 8, 4])
    assert out[0] is feats[0]
    assert torch.equal(out[1], torch.cat([feats[1], attn[8]], dim=1))
    assert torch.equal(out[2], torch.cat([feats[2], attn[4]], dim=1))
    assert concat_attention(feats, None, [16, 8, 4]) == feats
    with pytest.raises(ValueError, match=r"attention\[8\]"):
        concat_attention(feats, {8: torch.rand(2, 7, 4, 4)}, [16, 8, 4])
    with pytest.raises(ValueError, match="3 features but 2 reductions"):
        concat_attention(feats, attn, [16, 8])


def test_vpd_in_channels_sd15_example() -> None:
    info = [FeatureInfo("a", 1280, 64), FeatureInfo("b", 1280, 32), FeatureInfo("c", 640, 16),
            FeatureInfo("d", 320, 8)]
    assert vpd_in_channels(info, 150, [16, 32]) == [1280, 1430, 790, 320]  # VPD's FPN in_channels, reversed
    assert vpd_in_channels(info, 40, []) == [1280, 1280, 640, 320]


@pytest.mark.parametrize("cls", [VPDDepthHead, SemanticFPNHead, RefSegDecoder])
def test_bad_input_errors(cls: type) -> None:
    extra = {"num_classes": 3} if cls is SemanticFPNHead else {}
    with pytest.raises(ValueError, match=r"in_channels \(2 entries.*reductions \(3 entries"):
        cls([8, 8], [16, 8, 4], **extra)
    with pytest.raises(ValueError, match="distinct"):
        cls([8, 8], [8, 8], **extra)
    with pytest.raises(ValueError, match="empty"):
        cls([], [], **extra)
    head = cls([8, 4], [8, 4], **extra)
    with pytest.raises(ValueError, match=r"expected 2 feature maps \(channels \[8, 4\]\), got 1"):
        head([torch.randn(1, 8, 4, 4)], (32, 32))
    with pytest.raises(ValueError, match=r"feature 1 must be \(B, 4, h, w\), got \(1, 5, 8, 8\)"):
        head([torch.randn(1, 8, 4, 4), torch.randn(1, 5, 8, 8)], (32, 32))
    with pytest.raises(TypeError, match="list of"):
        head(torch.randn(1, 8, 4, 4), (32, 32))
