"""DINOv2 backbone, SD-DINO fusion and co-PCA: shapes, values against independent computations, errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from diffperc import create_backbone, list_backbones
from diffperc.backbones.dinov2 import IMAGENET_MEAN, IMAGENET_STD, DINOv2Backbone
from diffperc.backbones.fused import FusedBackbone, co_pca

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def _block_tokens(blocks: torch.nn.Module, layer: int, x: torch.Tensor, call) -> torch.Tensor:
    """Output tokens (B, T, C) of ``blocks[layer]`` during ``call(x)``, read with a forward hook."""
    seen = {}
    hook = blocks[layer].register_forward_hook(lambda m, a, out: seen.__setitem__("x", out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            call(x)
    finally:
        hook.remove()
    return seen["x"]


def _to_map(tokens: torch.Tensor, prefix: int, h: int, w: int) -> torch.Tensor:
    return tokens[:, prefix:].transpose(1, 2).reshape(tokens.shape[0], -1, h, w)


# ---------------------------------------------------------------------- DINOv2
@pytest.mark.parametrize("layer", [None, 0, -1])
def test_dinov2_map_matches_feature_info_and_block_tokens(layer: int | None) -> None:
    bb = create_backbone("test_dinov2", layer=layer)
    images = torch.rand(2, 3, 56, 42)
    out = bb(images)
    (info,) = bb.feature_info
    expected_layer = 1 if layer in (None, -1) else layer
    assert info.name == f"blocks.{expected_layer}" and info.reduction == 14
    assert out.attention is None and len(out.features) == 1
    fmap = out.features[0]
    assert fmap.shape == (2, info.channels, 56 // 14, 42 // 14)
    # independent: ImageNet-normalise by hand, run the whole timm forward, hook the block, drop the CLS token
    tokens = _block_tokens(bb.model.blocks, expected_layer, (images - MEAN) / STD, bb.model.forward_features)
    torch.testing.assert_close(fmap, _to_map(tokens, bb.model.num_prefix_tokens, 4, 3), rtol=1e-5, atol=1e-5)


def test_dinov2_layers_differ_and_norm_option() -> None:
    images = torch.rand(1, 3, 28, 28)
    first, last = (create_backbone("test_dinov2", layer=i)(images).features[0] for i in (0, 1))
    assert not torch.allclose(first, last, atol=1e-3)
    normed = create_backbone("test_dinov2", norm=True)
    torch.testing.assert_close(normed(images).features[0],
                               normed.model.norm(last.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(last.shape))


def test_dinov2_applies_imagenet_normalisation() -> None:
    bb = create_backbone("test_dinov2")
    mean_image = MEAN.expand(1, 3, 28, 28).clone()  # normalises to exactly zero
    tokens = _block_tokens(bb.model.blocks, 1, torch.zeros(1, 3, 28, 28), bb.model.forward_features)
    torch.testing.assert_close(bb(mean_image).features[0], _to_map(tokens, 1, 2, 2), rtol=1e-5, atol=1e-5)
    raw = _block_tokens(bb.model.blocks, 1, mean_image, bb.model.forward_features)
    assert not torch.allclose(bb(mean_image).features[0], _to_map(raw, 1, 2, 2), atol=1e-3)


def test_dinov2_image_size_resizes_input() -> None:
    bb = create_backbone("test_dinov2", image_size=42)
    assert bb.size_multiple == 1
    images = torch.rand(2, 3, 50, 61)
    resized = F.interpolate(images, size=(42, 42), mode="bilinear", align_corners=False, antialias=True)
    plain = create_backbone("test_dinov2")
    torch.testing.assert_close(bb(images).features[0], plain(resized).features[0])
    assert bb(images).features[0].shape == (2, 32, 3, 3)


@pytest.mark.parametrize(("images", "match"), [
    (torch.rand(1, 3, 50, 56), "multiple of the DINOv2 patch size 14"),
    (torch.rand(1, 1, 56, 56), r"\(B, 3, H, W\)"),
    (torch.rand(1, 56, 56, 3), "channels last"),
    (torch.rand(1, 3, 56, 56) * 255, "divide by 255"),
    (torch.rand(3, 56, 56), "unsqueeze"),
])
def test_dinov2_bad_images(images: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        create_backbone("test_dinov2")(images)


def test_dinov2_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"layer must be in \[-2, 2\)"):
        create_backbone("test_dinov2", layer=2)
    with pytest.raises(ValueError, match="image_size must be .* multiples of 14"):
        create_backbone("test_dinov2", image_size=50)
    with pytest.raises(ValueError, match="no pretrained weights"):
        create_backbone("test_dinov2", pretrained=True)
    with pytest.raises(TypeError, match="timm VisionTransformer or a transformers Dinov2Model"):
        DINOv2Backbone(torch.nn.Linear(2, 2))


def test_dinov2_frozen_eval_no_grad() -> None:
    bb = create_backbone("test_dinov2").train()
    assert not any(p.requires_grad for p in bb.parameters())
    assert not bb.model.training
    assert not bb(torch.rand(1, 3, 28, 28, requires_grad=True)).features[0].requires_grad


def test_dinov2_transformers_with_registers_drops_prefix_tokens() -> None:
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    cfg = Dinov2WithRegistersConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    image_size=56, patch_size=14, num_register_tokens=4)
    model = Dinov2WithRegistersModel(cfg).eval()
    bb = DINOv2Backbone(model, layer=0)
    images = torch.rand(2, 3, 42, 56)
    fmap = bb(images).features[0]
    assert fmap.shape == (2, 32, 3, 4) and bb.feature_info.names() == ["blocks.0"]
    tokens = _block_tokens(model.encoder.layer, 0, (images - MEAN) / STD, lambda x: model(pixel_values=x))
    assert tokens.shape[1] == 1 + 4 + 12  # CLS + registers + patches
    torch.testing.assert_close(fmap, _to_map(tokens, 5, 3, 4), rtol=1e-5, atol=1e-5)


def test_dinov2_checkpoint_file_round_trip(tmp_path) -> None:
    from safetensors.torch import save_file

    bb = create_backbone("test_dinov2")
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in bb.model.state_dict().items()}, str(path))
    tiny = {"depth": 2, "embed_dim": 32, "num_heads": 2, "img_size": 56}
    loaded = DINOv2Backbone.from_timm("vit_small_patch14_dinov2", checkpoint_path=path, model_kwargs=tiny)
    images = torch.rand(1, 3, 28, 42)
    torch.testing.assert_close(loaded(images).features[0], bb(images).features[0])
    with pytest.raises(FileNotFoundError, match=r"(?s)hf download timm/vit_small_patch14_dinov2.*HF_HUB_OFFLINE"):
        DINOv2Backbone.from_timm("vit_small_patch14_dinov2", checkpoint_path=tmp_path / "missing.safetensors")


# ---------------------------------------------------------------------- fusion
@pytest.fixture(scope="module")
def parts() -> tuple[torch.nn.Module, DINOv2Backbone]:
    """One tiny SD (three block outputs, t=100, attention on) and DINOv2, shared: building costs seconds."""
    sd = create_backbone("test_sd", layers=["up_blocks.0", "up_blocks.1", "up_blocks.2"], timestep=100, attention=True)
    return sd, create_backbone("test_dinov2")


def test_fused_preset_shape_matches_feature_info() -> None:
    bb = create_backbone("test_sd_dinov2")
    assert bb.size_multiple == 112 and bb.sd.timestep == 100 and bb.sd_index == [0, 1, 2]
    # LDM output_blocks 2, 5, 8 before the skip concat; channels finest first, as SD-DINO concatenates them
    assert bb.sd.layers == ["up_blocks.0.resnets.1", "up_blocks.1.attentions.1", "up_blocks.2.attentions.1"]
    assert bb.sd.feature_info.reductions() == [16, 8, 4]  # SD 1.5 on its 8x VAE: 64, 32, 16
    assert bb.feature_info[0].name == "up_blocks.2.attentions.1+up_blocks.1.attentions.1+up_blocks.0.resnets.1+blocks.1"
    out = bb(torch.rand(1, 3, 112, 112))
    (info,) = bb.feature_info
    assert info.channels == sum(bb.sd.feature_info.channels()) + 32 and info.reduction == 14
    assert out.features[0].shape == (1, info.channels, 8, 8)
    assert not any(p.requires_grad for p in bb.parameters())
    bb.train()
    assert not bb.sd.unet.training and not bb.dino.model.training


@pytest.mark.parametrize(("sd_index", "weights"), [(0, (0.5, 0.5)), ((0, 2), (0.3, 1.0))])
def test_fused_equals_recomputation_and_part_norms(parts, sd_index, weights) -> None:
    bb = FusedBackbone(*parts, sd_index=sd_index, weights=weights, dino_size=56)
    images = torch.rand(2, 3, 64, 48)  # DINOv2 sees a 56x56 resize: a 4x4 grid
    noise = torch.randn(2, 4, 32, 24)  # (B*E, C, H/2, W/2): the tiny VAE downsamples 2x
    out = bb(images, prompts="a cat", noise=noise)
    fused = out.features[0]
    # independent: run both backbones, resample, normalise, weight, concatenate
    sd_out = bb.sd(images, prompts="a cat", noise=noise)
    small = F.interpolate(images, size=(56, 56), mode="bilinear", align_corners=False, antialias=True)
    dino = bb.dino(small).features[0]  # (2, 32, 4, 4)
    def up(x, like):
        return F.interpolate(x, size=tuple(like.shape[-2:]), mode="bilinear", align_corners=False)

    if isinstance(sd_index, int):
        sd = sd_out.features[sd_index]
    else:  # SD-DINO's chain: the coarse level to the fine level's grid, put after it, then to the 4x4 grid
        coarse, fine = sd_out.features[sd_index[0]], sd_out.features[sd_index[1]]
        sd = torch.cat([fine, up(coarse, fine)], dim=1)
    sd = up(sd, dino)
    expected = torch.cat([sd / sd.norm(dim=1, keepdim=True) * weights[0],
                          dino / dino.norm(dim=1, keepdim=True) * weights[1]], dim=1)
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-6)
    c_sd = sd.shape[1]
    assert fused.shape == (2, c_sd + 32, 4, 4) == (2, bb.feature_info.channels()[0], 4, 4)
    torch.testing.assert_close(fused[:, :c_sd].norm(dim=1), torch.full((2, 4, 4), weights[0]))
    torch.testing.assert_close(fused[:, c_sd:].norm(dim=1), torch.full((2, 4, 4), weights[1]))
    assert out.attention is not None and out.attention.keys() == sd_out.attention.keys()
    for r, maps in out.attention.items():
        torch.testing.assert_close(maps, sd_out.attention[r])


def test_fused_grid_without_dino_size(parts) -> None:
    bb = FusedBackbone(*parts, grid=(3, 5))
    images = torch.rand(1, 3, 112, 112)
    fused = bb(images).features[0]
    assert fused.shape == (1, bb.feature_info.channels()[0], 3, 5)
    dino = F.interpolate(bb.dino(images).features[0], size=(3, 5), mode="bilinear", align_corners=False)
    torch.testing.assert_close(fused[:, -32:], F.normalize(dino, dim=1) * 0.5, rtol=1e-5, atol=1e-6)


def test_fused_bad_input_and_arguments(parts) -> None:
    bb = FusedBackbone(*parts)
    assert bb.size_multiple == 112 and FusedBackbone(*parts, dino_size=28).size_multiple == 16
    with pytest.raises(ValueError, match=r"not a multiple of 112 .*14.*dino_size="):
        bb(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        bb(torch.rand(1, 4, 112, 112))
    with pytest.raises(ValueError, match="sd_index"):
        FusedBackbone(*parts, sd_index=3)
    with pytest.raises(ValueError, match="weights"):
        FusedBackbone(*parts, weights=(0.5, -1.0))
    with pytest.raises(ValueError, match="dino_size .* multiples of 14"):
        FusedBackbone(*parts, dino_size=40)
    with pytest.raises(ValueError, match="no pretrained weights"):
        create_backbone("test_sd_dinov2", pretrained=True)


def test_sd_levels_are_the_inputs_of_the_next_resnets_before_the_skip_concat() -> None:
    """ODISE decoder_only (ldm.py:654-663): h entering output_blocks 2, 5, 8, before cat([h, skip])."""
    bb = create_backbone("test_sd_dinov2")
    images, noise = torch.rand(1, 3, 64, 64), torch.randn(1, 4, 32, 32)
    levels, _ = bb.sd_levels(images, prompts="a cat", noise=noise)
    seen = {}
    hooks = [bb.sd.unet.up_blocks[k].resnets[2].register_forward_pre_hook(
        lambda m, a, kw, k=k: seen.__setitem__(k, (a[0] if a else kw["input_tensor"])[:, : m.out_channels]),
        with_kwargs=True) for k in range(3)]
    t = torch.tensor([100])
    try:  # the full UNet by hand (the backbone stops early, before these modules run)
        noisy = bb.sd.scheduler.add_noise(bb.sd.encode_images(images), noise, t)
        with torch.no_grad():
            bb.sd.unet(noisy, t, encoder_hidden_states=bb.sd.encode_prompt(["a cat"]))
    finally:
        for h in hooks:
            h.remove()
    for k, level in enumerate(levels):
        torch.testing.assert_close(level, seen[k])


def test_sliding_window_places_by_stride_and_averages_overlaps() -> None:
    from diffperc.backbones._window import sliding_window, window_boxes

    images = torch.rand(2, 3, 60, 44)
    calls = []

    def run(crops):  # average-pooled crops: stitched = pooled canvas when offsets are multiples of the cells
        calls.append(crops.shape)
        return [F.avg_pool2d(crops, 4) * 10, F.avg_pool2d(crops, 2)]

    out = sliding_window(run, images, 32, [4, 2])
    assert calls == [(2 * len(window_boxes(60, 44, 32)), 3, 32, 32)] and window_boxes(60, 44, 32) == [
        (0, 0, 32, 32), (0, 12, 32, 44), (28, 0, 60, 32), (28, 12, 60, 44)]
    torch.testing.assert_close(out[0], F.avg_pool2d(images, 4) * 10)
    torch.testing.assert_close(out[1], F.avg_pool2d(images, 2))

    def shifted(crops):  # each crop adds its index: overlapped cells get the mean of the crops covering them
        return [torch.stack([torch.full((1, 16, 16), float(k // 2)) for k in range(len(crops))])]

    avg = sliding_window(shifted, images, 32, [2])[0]
    assert avg[0, 0, 0, 0] == 0 and avg[0, 0, 0, 10] == 0.5 and avg[0, 0, 15, 10] == 1.5 and avg[0, 0, 29, 21] == 3
    with pytest.raises(ValueError, match="multiples of 4"):
        sliding_window(run, torch.rand(1, 3, 62, 32), 32, [4, 2])  # the second row of crops starts at 30


def test_shared_noise_is_odise_seed_42() -> None:
    from diffperc.backbones._window import shared_noise

    ref = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(42))
    assert torch.equal(shared_noise((64, 64)), ref)
    torch.testing.assert_close(shared_noise((60, 90)), F.interpolate(ref, size=(60, 90), mode="bicubic",
                                                                      align_corners=False))


def test_fused_window_and_shared_noise_equal_a_manual_stitch(parts) -> None:
    sd = create_backbone("test_sd", layers=["up_blocks.0.resnets.1", "up_blocks.2.attentions.1"], timestep=100)
    bb = FusedBackbone(sd, parts[1], sd_index=[0, 1], sd_window=32, shared_noise_seed=42, shared_noise_size=16,
                       dino_size=42)
    images = torch.rand(1, 3, 48, 48)  # crops at 0 and 16 on both axes; reductions 16 and 4
    levels, attention = bb.sd_levels(images, prompts=["a dog"])
    noise = F.interpolate(torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(42)), size=(16, 16),
                          mode="bicubic", align_corners=False)
    total = [torch.zeros(1, 8 if i else 16, 48 // r, 48 // r) for i, r in enumerate((16, 4))]
    count = [torch.zeros(1, 1, 48 // r, 48 // r) for r in (16, 4)]
    for y, x in ((0, 0), (0, 16), (16, 0), (16, 16)):
        feats = sd(images[..., y : y + 32, x : x + 32], prompts="a dog", noise=noise).features
        for f, t, c, r in zip(feats, total, count, (16, 4), strict=True):
            t[..., y // r : y // r + 32 // r, x // r : x // r + 32 // r] += f
            c[..., y // r : y // r + 32 // r, x // r : x // r + 32 // r] += 1
    assert attention is None
    for ours, t, c in zip(levels, total, count, strict=True):
        torch.testing.assert_close(ours, t / c, rtol=1e-4, atol=1e-5)  # 4 crops in one batch vs one at a time
    assert bb(images, prompts="a dog").features[0].shape == (1, 16 + 8 + 32, 3, 3)
    with pytest.raises(ValueError, match="does not stitch attention"):
        FusedBackbone(*parts, sd_window=32)
    with pytest.raises(ValueError, match="sd_window must be a positive multiple of the SD size multiple 16"):
        FusedBackbone(sd, parts[1], sd_window=40)


def test_fused_dino_images_are_used_as_given(parts) -> None:
    bb = FusedBackbone(*parts, dino_size=56)
    images, dino_images = torch.rand(1, 3, 64, 64), torch.rand(1, 3, 42, 42)
    fused = bb(images, dino_images=dino_images).features[0]
    assert fused.shape[-2:] == (3, 3)  # the DINOv2 grid of the given 42 px images, not of a 56 px resize
    dino = bb.dino(dino_images).features[0]
    torch.testing.assert_close(fused[:, -32:], F.normalize(dino, dim=1) * 0.5, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- DINOv2 hub position embeddings
def test_dinov2_hub_pos_interpolation() -> None:
    """facebookresearch/dinov2 vision_transformer.py:180-233, against the timm modules run by hand."""
    model_bb = create_backbone("test_dinov2")
    hub_bb = create_backbone("test_dinov2", pos_interpolation="hub")
    m = hub_bb.model
    native = torch.rand(1, 3, 56, 56)  # the 4x4 grid of the position embeddings: no interpolation, same as timm
    torch.testing.assert_close(hub_bb(native).features[0], model_bb(native).features[0], rtol=1e-5, atol=1e-5)
    images = torch.rand(2, 3, 98, 70)  # a 7x5 grid
    x = (images - MEAN) / STD
    tokens = torch.cat([m.cls_token.expand(2, -1, -1), m.patch_embed.proj(x).flatten(2).transpose(1, 2)], dim=1)
    grid = F.interpolate(m.pos_embed[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2),
                         scale_factor=(7.1 / 4, 5.1 / 4), mode="bicubic")  # (w0 + 0.1) / M, no antialias
    tokens = tokens + torch.cat([m.pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, 35, -1)], dim=1)
    for blk in m.blocks:
        tokens = blk(tokens)
    ours = hub_bb(images).features[0]
    torch.testing.assert_close(ours, _to_map(tokens, 1, 7, 5), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, model_bb(images).features[0], atol=1e-4)  # timm resamples otherwise
    with pytest.raises(ValueError, match="pos_interpolation must be"):
        create_backbone("test_dinov2", pos_interpolation="bilinear")


# ---------------------------------------------------------------------- co-PCA
def _low_rank(b: int, c: int, h: int, w: int, basis: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    coeffs = torch.randn(b, h * w, len(scales)) * scales  # (B, N, k)
    x = coeffs @ basis + 1e-4 * torch.randn(b, h * w, c) + 3.0  # offset: co_pca must centre
    return x.transpose(1, 2).reshape(b, c, h, w)


def test_co_pca_matches_manual_svd() -> None:
    basis = torch.linalg.qr(torch.randn(16, 3))[0].T  # (3, 16) orthonormal directions
    scales = torch.tensor([10.0, 5.0, 2.0])
    feat_a, feat_b = _low_rank(2, 16, 5, 4, basis, scales), _low_rank(2, 16, 3, 6, basis, scales)
    out_a, out_b = co_pca(feat_a, feat_b, dim=3)
    assert out_a.shape == (2, 3, 5, 4) and out_b.shape == (2, 3, 3, 6)
    for i in range(2):
        x = torch.cat([feat_a[i].flatten(1), feat_b[i].flatten(1)], dim=1).T.double()  # (38, 16)
        xc = x - x.mean(0)
        proj = xc @ torch.linalg.svd(xc, full_matrices=False).Vh[:3].T  # (38, 3), signs arbitrary
        ours = torch.cat([out_a[i].flatten(1), out_b[i].flatten(1)], dim=1).T.double()
        signs = torch.sign((proj * ours).sum(0))
        torch.testing.assert_close(ours, proj * signs, rtol=1e-4, atol=1e-4)


def test_co_pca_errors() -> None:
    with pytest.raises(ValueError, match="same B and C"):
        co_pca(torch.rand(1, 8, 2, 2), torch.rand(1, 4, 2, 2), dim=2)
    with pytest.raises(ValueError, match=r"dim must be in \[1, min\(channels 8"):
        co_pca(torch.rand(1, 8, 2, 2), torch.rand(1, 8, 2, 2), dim=9)


# ---------------------------------------------------------------------- registry and imports
def test_registry_lists_and_suggests() -> None:
    assert {"test_dinov2", "test_sd_dinov2"} <= set(list_backbones("test_*"))
    assert {"dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "dinov2_vitg14", "sd15_dinov2b"} <= set(list_backbones())
    with pytest.raises(ValueError, match="Did you mean: .*test_dinov2"):
        create_backbone("test_dinov3")


def test_import_does_not_load_timm() -> None:
    code = "import sys, diffperc; print('timm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
