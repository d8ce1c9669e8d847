"""SD3 backbone (issue 13 items 1 and 4): the MMDiT run by hand with hooks, the pipeline's encode_prompt,
flow-matching noising against the scheduler, joint-attention maps, taps, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from dit_helpers import L_T5, PROMPTS, clean_latents, run_with_taps  # tests/dit_helpers.py
from dit_helpers import images as _images
from dit_helpers import rel as _rel

from diffperc import create_backbone
from diffperc.backbones import DiffusionBackbone, SD3Backbone
from diffperc.backbones.tiny import tiny_sd3_components


def _pipe(parts: dict):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(**parts)


@torch.no_grad()
def _by_hand(parts: dict, images: torch.Tensor, prompts: list[str], taps: list[str], sigma: float,
             noise: torch.Tensor) -> dict[str, torch.Tensor]:
    """The SD3 pipeline's steps written out: encode_prompt, (z - shift) * scale, x_t, the transformer with hooks."""
    vae, tr = parts["vae"], parts["transformer"]
    embeds, _, pooled, _ = _pipe(parts).encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None,
                                                      do_classifier_free_guidance=False, max_sequence_length=L_T5)
    x0 = clean_latents(vae, images)
    xt = sigma * noise + (1 - sigma) * x0
    got = run_with_taps(tr, taps, lambda: tr(hidden_states=xt, timestep=torch.full((len(xt),), sigma * 1000),
                                             encoder_hidden_states=embeds, pooled_projections=pooled))
    hw = (images.shape[-2] // 4, images.shape[-1] // 4)
    return {n: v.transpose(1, 2) if n.endswith(":context") else v.transpose(1, 2).reshape(len(v), -1, *hw)
            for n, v in got.items()}


def test_sd3_features_equal_the_transformer_run_by_hand() -> None:
    parts = tiny_sd3_components(seed=2)
    taps = ["transformer_blocks.0", "transformer_blocks.1:context", "transformer_blocks.2:input"]
    bb = SD3Backbone(**parts, layers=taps, timestep=300, max_sequence_length=L_T5)
    images, noise = _images(), torch.randn(2, 4, 8, 12)
    out = bb(images, prompts=PROMPTS, noise=noise)
    ref = _by_hand(parts, images, PROMPTS, taps, 0.3, noise)
    for f, n in zip(out.features, taps, strict=True):
        assert f.shape == ref[n].shape
        assert _rel(f, ref[n]) <= 1e-4, n
    assert [i.reduction for i in bb.feature_info] == [4, 0, 4]
    assert out.features[1].shape == (2, 16, 77 + L_T5)  # text stream (B, C, L)


def test_encode_prompt_equals_the_pipeline_with_and_without_t5() -> None:
    for t5 in (True, False):
        parts = tiny_sd3_components(seed=0, t5=t5)
        bb = SD3Backbone(**parts, max_sequence_length=L_T5)
        e, p = bb.encode_prompt(PROMPTS)
        re, _, rp, _ = _pipe(parts).encode_prompt(prompt=PROMPTS, prompt_2=None, prompt_3=None,
                                                  do_classifier_free_guidance=False, max_sequence_length=L_T5)
        # per-prompt (cached) vs batched encoding: equal up to float rounding of batched matmuls
        torch.testing.assert_close(e, re, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(p, rp, rtol=1e-5, atol=1e-6)
        assert e.shape == (2, 77 + L_T5, 48) and p.shape == (2, 32)
        assert t5 or e[:, 77:].abs().sum() == 0  # no T5: zeros in its place, as the pipeline


def test_flow_noising_is_the_schedulers_scale_noise_and_shift() -> None:
    parts = tiny_sd3_components(seed=1)
    sched = parts["scheduler"]
    k = 400
    sigma = float(sched.sigmas[k])
    bb = SD3Backbone(**parts, sigma=sigma, layers=[0], max_sequence_length=L_T5)
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    xt, s = bb._noised(x0, eps)
    ref = sched.scale_noise(x0, sched.timesteps[k : k + 1].expand(2), eps)
    torch.testing.assert_close(xt, ref, rtol=1e-5, atol=1e-6)
    # shifted=True: t / 1000 through SD3's static shift 3 (the training grid's sigma at the same t / 1000)
    sh = SD3Backbone(**parts, timestep=500, shifted=True, layers=[0], max_sequence_length=L_T5)
    assert math.isclose(sh.sigmas_for(16)[0], 3 * 0.5 / (1 + 2 * 0.5))
    plain = SD3Backbone(**parts, timestep=500, layers=[0], max_sequence_length=L_T5)
    assert plain.sigmas_for(16) == [0.5]


@torch.no_grad()
def test_joint_attention_maps_equal_softmax_of_projections_by_hand() -> None:
    parts = tiny_sd3_components(seed=3)
    bb = SD3Backbone(**parts, layers=[2], attention=True, timestep=200, max_sequence_length=L_T5)
    images, noise = _images(1, 16, 16), torch.randn(1, 4, 8, 8)
    out = bb(images, prompts="a cat", noise=noise)
    # by hand: every joint block's image queries and text keys (to_q, add_k_proj outputs), per-head softmax
    tr, qs, ks = parts["transformer"], {}, {}
    hooks = []
    for i, blk in enumerate(tr.transformer_blocks):
        hooks.append(blk.attn.to_q.register_forward_hook(lambda m, a, o, i=i: qs.__setitem__(i, o)))
        hooks.append(blk.attn.add_k_proj.register_forward_hook(lambda m, a, o, i=i: ks.__setitem__(i, o)))
    _by_hand(parts, images, ["a cat"], ["transformer_blocks.2"], 0.2, noise)
    for h in hooks:
        h.remove()
    maps = []
    for i in qs:
        q, k = qs[i].view(1, -1, 2, 8).transpose(1, 2), ks[i].view(1, -1, 2, 8).transpose(1, 2)
        maps.append(torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1).mean(1))  # (1, N, L)
    ref = torch.stack(maps).mean(0).transpose(1, 2).reshape(1, -1, 4, 4)
    assert set(out.attention) == {4}
    assert _rel(out.attention[4], ref) <= 1e-4
    torch.testing.assert_close(out.attention[4].sum(1), torch.ones(1, 4, 4))
    # capturing leaves the features unchanged
    plain = SD3Backbone(**tiny_sd3_components(seed=3), layers=[2], timestep=200, max_sequence_length=L_T5)
    torch.testing.assert_close(plain(images, prompts="a cat", noise=noise).features[0], out.features[0])


def test_early_stop_ensemble_timesteps_and_latents() -> None:
    parts = tiny_sd3_components(seed=4)
    images = _images(2, 16, 16)
    lat = SD3Backbone(**parts, max_sequence_length=L_T5).encode_images(images)
    full = SD3Backbone(**parts, layers=[0, 2], timestep=[100, 500], max_sequence_length=L_T5)
    early = SD3Backbone(**parts, layers=[0], timestep=[100, 500], max_sequence_length=L_T5)
    noise = torch.randn(2, 4, 8, 8)
    f_full = full(latents=lat, noise=noise).features
    f_early = early(images, noise=noise).features  # images and latents= agree
    assert [i.name for i in early.feature_info] == ["transformer_blocks.0@t100", "transformer_blocks.0@t500"]
    torch.testing.assert_close(f_early[0], f_full[0])
    torch.testing.assert_close(f_early[1], f_full[2])
    assert early._stop_after == "transformer_blocks.0"
    ens = SD3Backbone(**parts, layers=[1], ensemble_size=2, max_sequence_length=L_T5)
    n2 = torch.randn(4, 4, 8, 8)
    got = ens(latents=lat, noise=n2).features[0]
    one = SD3Backbone(**parts, layers=[1], max_sequence_length=L_T5)
    a = one(latents=lat, noise=n2[0::2]).features[0]
    b = one(latents=lat, noise=n2[1::2]).features[0]
    torch.testing.assert_close(got, (a + b) / 2, rtol=1e-4, atol=1e-5)


def test_registry_round_trip_trainable_and_pad(tmp_path) -> None:
    bb = create_backbone("test_sd3", layers=[1], t5=False)
    assert isinstance(bb, SD3Backbone) and bb.text_encoder_3 is None
    assert not any(p.requires_grad for p in bb.parameters())
    bb.save_pretrained(tmp_path / "sd3")
    back = DiffusionBackbone.from_pretrained(tmp_path / "sd3", layers=[1], max_sequence_length=16, sigma=0.26)
    assert isinstance(back, SD3Backbone) and back.text_encoder_3 is None and back.timestep == 260
    with pytest.raises(TypeError, match="'sigmaa'.*did you mean 'sigma'"):
        SD3Backbone.from_pretrained(tmp_path / "sd3", sigmaa=0.2)
    x, noise = _images(1, 16, 16), torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(back(x, prompts="a", noise=noise).features[0], bb(x, prompts="a", noise=noise).features[0])
    padded = create_backbone("test_sd3", layers=[1], pad=True)
    assert padded(_images(1, 14, 18)).features[0].shape == (1, 16, 4, 5)
    tr = create_backbone("test_sd3", layers=[1], trainable=True)
    tr(x).features[0].sum().backward()
    assert tr.transformer.transformer_blocks[0].attn.to_q.weight.grad is not None
    assert tr.text_encoder.text_model.embeddings.token_embedding.weight.grad is None


def test_sd3_bad_input() -> None:
    parts = tiny_sd3_components(seed=0)
    with pytest.raises(ValueError, match="needs both CLIP text encoders.*text_encoder_2"):
        SD3Backbone(**{**parts, "text_encoder_2": None})
    with pytest.raises(ValueError, match=r"Valid block indices: 0\.\.2"):
        SD3Backbone(**parts, layers=["transformer_blocks.7"])
    with pytest.raises(ValueError, match=r"out of range.*3 blocks"):
        SD3Backbone(**parts, layers=[5])
    with pytest.raises(ValueError, match=r"integers t in \[0, 1000\).*t = 1000 \* sigma.*sigma="):
        SD3Backbone(**parts, timestep=1000)
    with pytest.raises(ValueError, match="look like sigmas"):
        SD3Backbone(**parts, timestep=0.3)
    with pytest.raises(ValueError, match=r"sigma must be noise levels in \[0, 1\]"):
        SD3Backbone(**parts, sigma=1.5)
    bb = SD3Backbone(**parts, layers=[0])
    with pytest.raises(ValueError, match="not a multiple of 4"):
        bb(_images(1, 18, 16))
    with pytest.raises(ValueError, match="needs pooled_prompt_embeds"):
        bb(_images(1, 16, 16), prompt_embeds=torch.zeros(1, 5, 48))
    with pytest.raises(ValueError, match="no context stream output"):
        _ = SD3Backbone(**parts, layers=["transformer_blocks.2:context"]).feature_info
