"""Cross-attention capture: maps equal softmax(QK^T * scale) computed by hand, UNet output unchanged."""

from __future__ import annotations

import math
from collections import defaultdict

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from diffperc import DiffusionBackbone, create_backbone
from diffperc.backbones.attention import AttentionStore, StoreCrossAttnProcessor
from diffperc.backbones.tiny import tiny_sd_components


def _images(b: int = 2, size: int = 64) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(2))


@torch.no_grad()
def _maps_by_hand(bb: DiffusionBackbone, images: torch.Tensor, prompts: list[str], noise: torch.Tensor) -> dict:
    """Hook every attn2 input, compute head-averaged softmax(q k^T / sqrt(d)) ourselves, average per size."""
    inputs = []
    unet = bb.unet
    unet.set_attn_processor(AttnProcessor2_0())
    hooks = [m.register_forward_pre_hook(lambda m, a, kw: inputs.append((m, a[0], kw["encoder_hidden_states"])),
                                         with_kwargs=True)
             for m in unet.modules() if isinstance(m, Attention) and m.is_cross_attention]
    x0 = bb.vae.encode(images * 2 - 1).latent_dist.mean * bb.vae.config.scaling_factor
    x = bb.scheduler.add_noise(x0, noise, torch.tensor([bb.timestep]))
    emb = bb.encode_prompt(prompts)
    unet(x, torch.full((len(x),), bb.timestep), encoder_hidden_states=emb)
    for h in hooks:
        h.remove()
    sums, counts = defaultdict(float), defaultdict(int)
    for m, hs, ctx in inputs:
        b, n, _ = hs.shape
        q = m.to_q(hs).view(b, n, m.heads, -1).transpose(1, 2)  # (B, heads, HW, d)
        k = m.to_k(ctx).view(b, ctx.shape[1], m.heads, -1).transpose(1, 2)
        p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1).mean(1)  # (B, HW, L)
        side = int(math.sqrt(n))
        r = images.shape[-1] // side
        sums[r] = sums[r] + p.transpose(1, 2).reshape(b, -1, side, side)
        counts[r] += 1
    return {r: sums[r] / counts[r] for r in sums}


def test_maps_equal_independent_computation_and_sum_to_one() -> None:
    bb = create_backbone("test_sd", layers="vpd", timestep=300, attention=True)
    images, prompts = _images(), ["a photo of a cat", "a red car"]
    noise = torch.randn(2, 4, 32, 32)
    out = bb(images, prompts=prompts, noise=noise)
    assert sorted(out.attention) == [2, 4, 8, 16]  # down, mid and up cross-attention layers
    for r, m in out.attention.items():
        assert m.shape == (2, 77, 64 // r, 64 // r)
        torch.testing.assert_close(m.sum(1), torch.ones_like(m.sum(1)), rtol=0, atol=1e-5)
    ref = _maps_by_hand(create_backbone("test_sd", timestep=300), images, prompts, noise)
    assert sorted(ref) == sorted(out.attention)
    for r in ref:
        torch.testing.assert_close(out.attention[r], ref[r], rtol=1e-4, atol=1e-6)


def test_capture_does_not_change_unet_output() -> None:
    parts = tiny_sd_components(seed=1)
    images, noise = _images(), torch.randn(2, 4, 32, 32)
    plain = DiffusionBackbone(**parts, layers=["conv_out"], timestep=500)(images, noise=noise).features[0]
    captured = DiffusionBackbone(**tiny_sd_components(seed=1), layers=["conv_out"], timestep=500, attention=True)
    out = captured(images, noise=noise)
    assert out.attention  # the capture path really ran
    torch.testing.assert_close(out.features[0], plain, rtol=1e-5, atol=1e-6)


def test_only_cross_attention_layers_get_the_capturing_processor() -> None:
    bb = create_backbone("test_sd", attention=True)
    for name, proc in bb.unet.attn_processors.items():
        assert isinstance(proc, StoreCrossAttnProcessor) == name.endswith("attn2.processor"), name


def test_attention_resolutions_filter_ensemble_and_custom_embeds() -> None:
    bb = create_backbone("test_sd", layers="vpd", attention=True, attention_resolutions=[8, 16],
                         ensemble_size=3, timestep=200)
    embeds = torch.randn(1, 5, 8)  # L = 5 class embeddings, as VPD passes
    noise = torch.randn(6, 4, 32, 32)
    out = bb(_images(), prompt_embeds=embeds, noise=noise)
    assert sorted(out.attention) == [8, 16]
    assert out.attention[8].shape == (2, 5, 8, 8)
    single = create_backbone("test_sd", layers="vpd", attention=True, attention_resolutions=[8, 16], timestep=200)
    runs = [single(_images(), prompt_embeds=embeds, noise=noise.view(2, 3, 4, 32, 32)[:, i]).attention[8]
            for i in range(3)]
    torch.testing.assert_close(out.attention[8], torch.stack(runs).mean(0), rtol=1e-5, atol=1e-6)


def test_early_stop_keeps_maps_of_layers_that_ran() -> None:
    bb = create_backbone("test_sd", layers=["down_blocks.1"], attention=True)
    out = bb(_images())
    assert sorted(out.attention) == [2, 4]  # down_blocks.0 (r=2) and down_blocks.1 (r=4) only


def test_store_inactive_falls_back_to_sdpa() -> None:
    store = AttentionStore()
    proc = StoreCrossAttnProcessor(store)
    attn = Attention(query_dim=8, cross_attention_dim=8, heads=2, dim_head=4)
    hs, ctx = torch.randn(1, 16, 8), torch.randn(1, 3, 8)
    ref = AttnProcessor2_0()(attn, hs, ctx)
    torch.testing.assert_close(proc(attn, hs, ctx), ref)
    store.begin((4, 4), vae_factor=8)
    torch.testing.assert_close(proc(attn, hs, ctx), ref, rtol=1e-5, atol=1e-6)
    maps = store.maps()
    assert list(maps) == [8] and maps[8].shape == (1, 3, 4, 4)


@pytest.mark.parametrize("sd2", [False, True])
def test_capture_on_sd1_and_sd2_flavours(sd2: bool) -> None:
    bb = DiffusionBackbone(**tiny_sd_components(sd2=sd2), layers="vpd", attention=True)
    out = bb(_images(1), prompts="a cat")
    assert all(torch.isfinite(m).all() for m in out.attention.values())
