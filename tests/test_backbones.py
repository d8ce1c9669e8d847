"""DiffusionBackbone against the same UNet run by hand: features, early stop, ensembles, loading."""

from __future__ import annotations

import pytest
import torch

from diffperc import DiffusionBackbone, create_backbone
from diffperc.backbones.tiny import tiny_sd_components

PROMPTS = ["a photo of a cat", "a photo of a dog"]


def _images(b: int = 2, size: int = 64) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _by_hand(parts: dict, images: torch.Tensor, prompts: list[str], layers: list[str], t: int,
             noise: torch.Tensor | None) -> list[torch.Tensor]:
    """Independent computation: VAE mean, DDPM noising from alphas_cumprod, full UNet forward, hooks."""
    vae, unet, te, tok, sched = (parts[k] for k in ("vae", "unet", "text_encoder", "tokenizer", "scheduler"))
    x0 = vae.encode(images * 2 - 1).latent_dist.mean * vae.config.scaling_factor
    if noise is not None:
        a = sched.alphas_cumprod[t]
        x0 = a.sqrt() * x0 + (1 - a).sqrt() * noise
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    emb = te(ids).last_hidden_state
    got = {}
    hooks = [unet.get_submodule(n).register_forward_hook(
        lambda m, a, o, n=n: got.__setitem__(n, o[0] if isinstance(o, tuple) else o)) for n in layers]
    unet(x0, torch.full((len(x0),), t), encoder_hidden_states=emb)
    for h in hooks:
        h.remove()
    return [got[n] for n in layers]


@pytest.mark.parametrize("name", ["test_sd", "test_sd2"])
def test_features_match_feature_info(name: str) -> None:
    bb = create_backbone(name, layers="vpd", timestep=1, add_noise=False)
    out = bb(_images())
    assert len(out.features) == len(bb.feature_info) == 4
    for f, ch, red in zip(out.features, bb.feature_info.channels(), bb.feature_info.reductions(), strict=True):
        assert f.shape == (2, ch, 64 // red, 64 // red)
        assert torch.isfinite(f).all()
    assert not any(p.requires_grad for p in bb.parameters())
    assert out.attention is None


def test_vpd_preset_is_ldm_output_blocks_1_4_7_11() -> None:
    bb = create_backbone("test_sd", layers="vpd")
    assert bb.layers == ["up_blocks.0.resnets.1", "up_blocks.1.attentions.1",
                         "up_blocks.2.attentions.1", "up_blocks.3.attentions.2"]
    assert create_backbone("test_sd", layers="dift").layers == ["up_blocks.1"]


@pytest.mark.parametrize("sd2", [False, True])
def test_features_equal_unet_run_by_hand(sd2: bool) -> None:
    parts = tiny_sd_components(seed=3, sd2=sd2)
    bb = DiffusionBackbone(**parts, layers="vpd", timestep=261)
    images = _images()
    noise = torch.randn(2, 4, 32, 32)
    out = bb(images, prompts=PROMPTS, noise=noise)
    ref = _by_hand(parts, images, PROMPTS, bb.layers, 261, noise)
    for f, r in zip(out.features, ref, strict=True):
        torch.testing.assert_close(f, r, rtol=1e-4, atol=1e-5)


def test_vpd_no_noise_uses_clean_latents() -> None:
    parts = tiny_sd_components(seed=4)
    bb = DiffusionBackbone(**parts, layers="vpd", timestep=1, add_noise=False)
    images = _images()
    ref = _by_hand(parts, images, ["", ""], bb.layers, 1, None)
    for f, r in zip(bb(images).features, ref, strict=True):
        torch.testing.assert_close(f, r, rtol=1e-4, atol=1e-5)


def test_unscaled_latents_as_vpd() -> None:
    """scale_latents=False feeds the UNet the posterior mode itself (VPD: encode(x).mode(), no factor)."""
    parts = tiny_sd_components(seed=4)
    parts["vae"].register_to_config(scaling_factor=0.3)
    bb = DiffusionBackbone(**parts, layers="vpd", timestep=1, add_noise=False, scale_latents=False)
    images = _images()
    with torch.no_grad():
        x0 = parts["vae"].encode(images * 2 - 1).latent_dist.mode()
    torch.testing.assert_close(bb.encode_images(images), x0)
    got = {}
    hooks = [parts["unet"].get_submodule(n).register_forward_hook(
        lambda m, a, o, n=n: got.__setitem__(n, o[0] if isinstance(o, tuple) else o)) for n in bb.layers]
    with torch.no_grad():
        emb = parts["text_encoder"](parts["tokenizer"](["", ""], padding="max_length", return_tensors="pt").input_ids)[0]
        parts["unet"](x0, torch.full((2,), 1), encoder_hidden_states=emb)
    for h in hooks:
        h.remove()
    for f, n in zip(bb(images).features, bb.layers, strict=True):
        torch.testing.assert_close(f, got[n], rtol=1e-4, atol=1e-5)
    scaled = _by_hand(parts, images, ["", ""], bb.layers, 1, None)
    assert not torch.allclose(scaled[0], got[bb.layers[0]], rtol=1e-3)


def test_sampled_latents_one_posterior_sample_per_copy() -> None:
    """latent_sample='sample' with an ensemble: the image is repeated E times, then sampled (DIFT)."""
    parts = tiny_sd_components(seed=6)
    e, t = 4, 261
    bb = DiffusionBackbone(**parts, layers=["up_blocks.1"], timestep=t, ensemble_size=e, latent_sample="sample")
    image = _images(1)
    out = bb(image, prompts="a cat", generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        dist = parts["vae"].encode(image.repeat(e, 1, 1, 1) * 2 - 1).latent_dist
        x0 = dist.sample(g) * parts["vae"].config.scaling_factor
        assert not torch.allclose(x0[0], x0[1])  # independent samples, not one sample repeated
        noise = torch.randn(x0.shape, generator=g)
    a = parts["scheduler"].alphas_cumprod[t]
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    got = {}
    h = parts["unet"].get_submodule("up_blocks.1").register_forward_hook(lambda m, i, o: got.__setitem__("f", o))
    with torch.no_grad():
        emb = parts["text_encoder"](parts["tokenizer"](["a cat"] * e, padding="max_length", return_tensors="pt").input_ids)[0]
        parts["unet"](xt, torch.full((e,), t), encoder_hidden_states=emb)
    h.remove()
    torch.testing.assert_close(out.features[0], got["f"].mean(0, keepdim=True), rtol=1e-4, atol=1e-5)


def test_early_stop_same_features_and_skips_rest() -> None:
    parts = tiny_sd_components(seed=5)
    bb = DiffusionBackbone(**parts, layers=["up_blocks.1"], timestep=100)
    _ = bb.feature_info  # the one-off full probe forward happens here, before counting
    ran = []
    handle = bb.unet.up_blocks[2].register_forward_hook(lambda *a: ran.append(1))
    images, noise = _images(), torch.randn(2, 4, 32, 32)
    feat = bb(images, noise=noise).features[0]
    handle.remove()
    assert ran == [], "up_blocks.2 ran although the last requested layer is up_blocks.1"
    ref = _by_hand(parts, images, ["", ""], ["up_blocks.1"], 100, noise)[0]
    torch.testing.assert_close(feat, ref, rtol=1e-4, atol=1e-5)
    # the same layers requested in another order stop after the one that runs last
    bb2 = DiffusionBackbone(**parts, layers=["up_blocks.1", "down_blocks.0"], timestep=100)
    assert [f.shape[1] for f in bb2(images, noise=noise).features] == [16, 8]


def test_ensemble_is_mean_of_single_runs_and_batched() -> None:
    parts = tiny_sd_components(seed=6)
    images, e = _images(), 3
    noise = torch.randn(2 * e, 4, 32, 32)
    calls = []
    parts["unet"].register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    ens = DiffusionBackbone(**parts, layers="vpd", timestep=261, ensemble_size=e)
    feats = ens(images, noise=noise).features
    assert calls[-1:] == [2 * e]  # one UNet call carries the whole ensemble
    single = DiffusionBackbone(**parts, layers="vpd", timestep=261)
    runs = [single(images, noise=noise.view(2, e, 4, 32, 32)[:, i]).features for i in range(e)]
    for k, f in enumerate(feats):
        torch.testing.assert_close(f, torch.stack([r[k] for r in runs]).mean(0), rtol=1e-4, atol=1e-5)
    calls.clear()
    chunked = DiffusionBackbone(**parts, layers="vpd", timestep=261, ensemble_size=e, ensemble_chunk=2)
    _ = chunked.feature_info  # the one-off probe forward that measures the layers
    calls.clear()
    for a, b in zip(chunked(images, noise=noise).features, feats, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert calls == [4, 2]


def test_generator_seeds_noise_and_bad_noise_shape() -> None:
    bb = create_backbone("test_sd", layers="dift", ensemble_size=2)
    images = _images()
    a = bb(images, generator=torch.Generator().manual_seed(7)).features[0]
    b = bb(images, generator=torch.Generator().manual_seed(7)).features[0]
    c = bb(images, generator=torch.Generator().manual_seed(8)).features[0]
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    with pytest.raises(ValueError, match=r"noise must have shape \(B\*E, C, h, w\) = \(4, 4, 32, 32\)"):
        bb(images, noise=torch.randn(2, 4, 32, 32))


def test_latents_input_skips_vae() -> None:
    bb = create_backbone("test_sd", layers="vpd", timestep=1, add_noise=False)
    images = _images()
    latents = bb.encode_images(images)
    assert latents.shape == (2, 4, 32, 32)
    for a, b in zip(bb(images).features, bb(latents=latents).features, strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="exactly one of images"):
        bb(images, latents=latents)


def test_prompt_cache_hits_and_embeds_of_any_length() -> None:
    bb = create_backbone("test_sd", layers="dift", timestep=1, add_noise=False)
    calls = []
    bb.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    images = _images()
    first = bb(images, prompts=PROMPTS).features[0]
    again = bb(images.flip(0), prompts=list(reversed(PROMPTS))).features[0]
    assert len(calls) == 2 and bb.prompt_cache_stats == {"hits": 2, "misses": 2}
    torch.testing.assert_close(first, again.flip(0))
    embeds = bb.encode_prompt(PROMPTS)
    torch.testing.assert_close(bb(images, prompt_embeds=embeds).features[0], first)
    short = torch.randn(1, 5, 8)  # L = 5, shared by the batch
    assert bb(images, prompt_embeds=short).features[0].shape == first.shape


def test_long_prompt_warns_truncation() -> None:
    bb = create_backbone("test_sd", layers="dift")
    with pytest.warns(UserWarning, match="truncated"):
        bb.encode_prompt(["word " * 100])


def test_save_pretrained_round_trip(tmp_path) -> None:
    bb = create_backbone("test_sd", layers="vpd", timestep=1, add_noise=False)
    bb.save_pretrained(tmp_path / "model")
    assert (tmp_path / "model" / "model_index.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp folder left behind"
    loaded = DiffusionBackbone.from_pretrained(tmp_path / "model", layers="vpd", timestep=1, add_noise=False)
    images = _images()
    for a, b in zip(bb(images, prompts="a cat").features, loaded(images, prompts="a cat").features, strict=True):
        torch.testing.assert_close(a, b)
    assert loaded.config["name_or_path"] == str(tmp_path / "model")


def test_pad_crops_back_to_image_size() -> None:
    bb = create_backbone("test_sd", layers="vpd", timestep=1, add_noise=False, pad=True)
    images = torch.rand(1, 3, 40, 56)
    out = bb(images)
    for f, r in zip(out.features, bb.feature_info.reductions(), strict=True):
        assert f.shape[-2:] == (-(-40 // r), -(-56 // r))
    padded = torch.zeros(1, 3, 48, 64)
    padded[..., :40, :56] = images
    ref = create_backbone("test_sd", layers="vpd", timestep=1, add_noise=False)(padded).features
    torch.testing.assert_close(out.features[-1], ref[-1][..., :20, :28])


def test_trainable_unet_gets_gradients_and_checkpointing_matches() -> None:
    images = _images()
    grads = []
    for ckpt in (False, True):
        bb = create_backbone("test_sd", seed=9, layers="vpd", timestep=1, add_noise=False, trainable=True,
                             gradient_checkpointing=ckpt).train()
        assert bb.unet.training and not bb.vae.training and not bb.text_encoder.training
        loss = sum(f.square().mean() for f in bb(images).features)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in bb.unet.parameters() if p.grad is not None]))
        assert not any(p.requires_grad for p in bb.vae.parameters())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    frozen = create_backbone("test_sd", layers="vpd")
    assert not frozen(images).features[0].requires_grad


def test_token_layers_become_maps() -> None:
    bb = create_backbone("test_sd", layers=["up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q"])
    assert bb.feature_info[0].channels == 16 and bb.feature_info[0].reduction == 8
    assert bb(_images()).features[0].shape == (2, 16, 8, 8)


def test_device_and_dtype_follow_module() -> None:
    bb = create_backbone("test_sd", layers="dift").to(torch.float64)
    out = bb(_images().double())
    assert out.features[0].dtype == torch.float64 and bb.dtype == torch.float64
