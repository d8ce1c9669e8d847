"""MLLM vision towers and fusion on test_sd + a tiny random CLIP vision model: values vs independent runs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffperc import create_backbone
from diffperc.mllm.encoder import VisionEncoder, build_projector
from diffperc.mllm.towers import (
    MUSTAFAR_TAP,
    CLIPTower,
    DiffusionTower,
    PixelPatchTower,
    tiny_clip_vision_config,
)

PROMPTS = ["is the cat on the left", "what color is the car"]


@pytest.fixture(scope="module")
def tower():
    return DiffusionTower("test_sd", timestep=50, guidance_scale=4.0, image_size=32)


def _by_hand(bb, images, prompt, noise):
    """The tap's output from a full UNet forward with our own hook, noise added by hand."""
    got = {}
    h = bb.unet.get_submodule(MUSTAFAR_TAP).register_forward_hook(lambda m, a, o: got.setdefault("x", o))
    with torch.no_grad():
        lat = bb.vae.encode(images * 2 - 1).latent_dist.mean * bb.vae.config.scaling_factor
        t = torch.full((len(images),), 50, dtype=torch.long)
        x = bb.scheduler.add_noise(lat, noise, t)
        emb = bb.text_encoder(bb.tokenizer([prompt] * len(images), padding="max_length", max_length=77,
                                           return_tensors="pt").input_ids).last_hidden_state
        bb.unet(x, t, encoder_hidden_states=emb)
    h.remove()
    tok = got["x"]  # (B, N, C)
    side = int(tok.shape[1] ** 0.5)
    return tok.transpose(1, 2).reshape(len(images), -1, side, side)


def test_guidance_matches_separate_runs_in_one_batched_call(tower):
    images = torch.rand(2, 3, 32, 32)
    bb = tower.backbone
    calls = []
    h = bb.unet.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    out = tower(images, PROMPTS, generator=torch.Generator().manual_seed(3))
    h.remove()
    assert calls == [4]  # empty + question branches of both images in one UNet call
    noise = torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(3))
    f0 = torch.cat([_by_hand(bb, images[i : i + 1], "", noise[i : i + 1]) for i in range(2)])
    fq = torch.cat([_by_hand(bb, images[i : i + 1], PROMPTS[i], noise[i : i + 1]) for i in range(2)])
    assert out.shape == (2, tower.out_channels, 4, 4) == f0.shape
    assert torch.allclose(out, f0 + 4.0 * (fq - f0), atol=1e-4)
    assert not torch.allclose(f0, fq, atol=1e-4)  # the question changes the features


def test_scale_one_and_empty_prompt_run_a_single_branch(tower):
    images = torch.rand(2, 3, 32, 32)
    bb = tower.backbone
    calls = []
    h = bb.unet.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    un = tower(images, None, generator=torch.Generator().manual_seed(1))
    tower.guidance_scale = 1.0
    try:
        cond = tower(images, PROMPTS, generator=torch.Generator().manual_seed(1))
    finally:
        tower.guidance_scale = 4.0
    h.remove()
    assert calls == [2, 2]
    noise = torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(un, _by_hand(bb, images, "", noise), atol=1e-5)
    assert torch.allclose(cond[1:], _by_hand(bb, images[1:], PROMPTS[1], noise[1:]), atol=1e-5)


def test_unet_stops_after_the_tap(tower):
    ran = []
    later = tower.backbone.unet.up_blocks[2]
    h = later.register_forward_hook(lambda m, a, o: ran.append(1))
    tower(torch.rand(1, 3, 32, 32), "a question")
    h.remove()
    assert ran == []


def test_prompt_embeddings_are_cached(tower):
    bb = tower.backbone
    tower(torch.rand(2, 3, 32, 32), ["same question"] * 2)
    misses = bb.prompt_cache_stats["misses"]
    tower(torch.rand(2, 3, 32, 32), ["same question"] * 2)
    assert bb.prompt_cache_stats["misses"] == misses


def test_tower_bad_input():
    with pytest.raises(ValueError, match="one layer"):
        DiffusionTower(create_backbone("test_sd", layers="vpd"))
    t = DiffusionTower("test_sd", image_size=32)
    with pytest.raises(ValueError, match="prompts"):
        t(torch.rand(2, 3, 32, 32), ["only one", "two", "three"])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        t(torch.rand(1, 3, 32, 32) * 255)


def test_clip_tower_is_the_penultimate_patch_tokens():
    tower = CLIPTower(tiny_clip_vision_config(image_size=32, patch_size=8))
    images = torch.rand(2, 3, 48, 48)
    out = tower(images)
    assert out.shape == (2, 16, 4, 4)
    x = F.interpolate(images, size=(32, 32), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        hs = tower.model((x - mean) / std, output_hidden_states=True).hidden_states
    assert len(hs) == 4  # embeddings + 3 layers: -2 is the output of layer 2 of 3
    ref = hs[-2][:, 1:].transpose(1, 2).reshape(2, 16, 4, 4)
    assert torch.allclose(out, ref, atol=1e-6)
    assert not any(p.requires_grad for p in tower.parameters())


def test_pixel_patches():
    images = torch.rand(1, 3, 16, 16)
    out = PixelPatchTower(patch_size=8)(images)
    assert out.shape == (1, 192, 2, 2)
    assert torch.equal(out[0, :, 1, 0].view(3, 8, 8), images[0, :, 8:, :8])


def test_projector_is_llava_mlp2x_gelu():
    p = build_projector("mlp2x_gelu", 5, 7)
    assert [type(m) for m in p] == [nn.Linear, nn.GELU, nn.Linear]
    assert (p[0].in_features, p[0].out_features, p[2].out_features) == (5, 7, 7)
    assert isinstance(build_projector("linear", 5, 7), nn.Linear)
    assert len(build_projector("mlp3x_gelu", 5, 7)) == 5
    with pytest.raises(ValueError, match="mlp2x_gelu"):
        build_projector("mlp_relu", 5, 7)


class _Fixed(nn.Module):
    """A tower that returns a fixed map (to check the fusion arithmetic alone)."""

    def __init__(self, maps):
        super().__init__()
        self.maps, self.out_channels = maps, maps.shape[1]

    def grid(self, size):
        return tuple(self.maps.shape[-2:])

    def forward(self, images, prompts=None, generator=None):
        return self.maps


@pytest.mark.parametrize("fusion", ["concat_tokens", "concat_channels", "cross_attention"])
def test_fusion_modes(fusion):
    diff, clip = torch.randn(2, 6, 2, 2), torch.randn(2, 4, 4, 4)
    enc = VisionEncoder(12, _Fixed(diff), _Fixed(clip), fusion=fusion, cross_attention_heads=2)
    out = enc(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, enc.num_tokens(32), 12)
    ct, dt = clip.flatten(2).transpose(1, 2), diff.flatten(2).transpose(1, 2)
    if fusion == "concat_tokens":
        assert out.shape[1] == 16 + 4
        assert torch.allclose(out, torch.cat([enc.projector_clip(ct), enc.projector(dt)], 1))
    elif fusion == "concat_channels":
        up = F.interpolate(diff, size=(4, 4), mode="bilinear", align_corners=False)
        assert torch.allclose(out, enc.projector(torch.cat([clip, up], 1).flatten(2).transpose(1, 2)))
    else:  # gate 0 at init: exactly the CLIP-only LLaVA tokens; the gate then opens with training
        assert torch.allclose(out, enc.projector(ct), atol=1e-6)
        out.sum().backward()
        assert enc.cross_attention.gate.grad is not None and enc.cross_attention.gate.grad.abs() > 0
        with torch.no_grad():
            enc.cross_attention.gate.fill_(0.5)
        assert not torch.allclose(enc(torch.rand(2, 3, 32, 32)), enc.projector(ct), atol=1e-4)


def test_cross_attention_reverse_direction_keeps_diffusion_tokens():
    diff, clip = torch.randn(1, 6, 2, 2), torch.randn(1, 4, 4, 4)
    enc = VisionEncoder(8, _Fixed(diff), _Fixed(clip), fusion="cross_attention",
                        cross_attention_query="diffusion", cross_attention_heads=2)
    assert enc(torch.rand(1, 3, 32, 32)).shape == (1, 4, 8) and enc.num_tokens(32) == 4
    with pytest.raises(ValueError, match="fusion"):
        VisionEncoder(8, _Fixed(diff), fusion="sum")


def test_encoder_on_real_towers_trains_only_the_projector():
    tower = DiffusionTower("test_sd", image_size=32, guidance_scale=2.0)
    clip = CLIPTower(tiny_clip_vision_config(image_size=32, patch_size=8))
    enc = VisionEncoder(16, tower, clip, fusion="concat_channels")
    out = enc(torch.rand(2, 3, 32, 32), PROMPTS)
    assert out.shape == (2, 16, 16)
    out.square().mean().backward()
    trained = {n for n, p in enc.named_parameters() if p.grad is not None}
    assert trained and all(n.startswith("projector") for n in trained)
