"""VAE taps (``vae.encoder.*``, ``vae.decoder.*``, outputs and ``:input``) against the same tiny model run by hand.

The hand computation registers plain forward hooks on the diffusers modules and runs
``vae.encode`` / ``vae.decode`` / the UNet itself: the encoder taps are read while the image is
encoded, the decoder taps while the clean latents (posterior mean x scaling factor, divided back)
are decoded (ODISE's encoder/decoder features).
"""

from __future__ import annotations

import pytest
import torch

from diffperc import DiffusionBackbone
from diffperc.backbones.registry import create_backbone
from diffperc.backbones.tiny import tiny_sd_components

TAPS = ["vae.encoder.down_blocks.0", "vae.encoder.mid_block:input", "up_blocks.1", "vae.decoder.up_blocks.0",
        "vae.decoder.up_blocks.1:input"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _by_hand(parts: dict, images: torch.Tensor, noise: torch.Tensor, t: int) -> dict[str, torch.Tensor]:
    """Every tap of TAPS computed with hooks on the raw diffusers modules."""
    vae, unet = parts["vae"], parts["unet"]
    got: dict[str, torch.Tensor] = {}

    def out_hook(name):
        return lambda m, a, o: got.__setitem__(name, o[0] if isinstance(o, tuple) else o)

    def in_hook(name):
        return lambda m, a: got.__setitem__(name, a[0])

    handles = [vae.encoder.down_blocks[0].register_forward_hook(out_hook("vae.encoder.down_blocks.0")),
               vae.encoder.mid_block.register_forward_pre_hook(in_hook("vae.encoder.mid_block:input")),
               vae.decoder.up_blocks[0].register_forward_hook(out_hook("vae.decoder.up_blocks.0")),
               vae.decoder.up_blocks[1].register_forward_pre_hook(in_hook("vae.decoder.up_blocks.1:input")),
               unet.up_blocks[1].register_forward_hook(out_hook("up_blocks.1"))]
    try:
        with torch.no_grad():
            sf = vae.config.scaling_factor
            x0 = vae.encode(images * 2 - 1).latent_dist.mean * sf
            vae.decode(x0 / sf)
            tok = parts["tokenizer"]
            ids = tok("", padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
            emb = parts["text_encoder"](ids).last_hidden_state.expand(len(images), -1, -1)
            from diffusers import DDPMScheduler

            sched = DDPMScheduler.from_config(parts["scheduler"].config)
            tt = torch.full((len(images),), t, dtype=torch.long)
            unet(sched.add_noise(x0, noise, tt), tt, encoder_hidden_states=emb)
    finally:
        for h in handles:
            h.remove()
    return got


def test_vae_taps_match_hooks_run_by_hand() -> None:
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    bb = DiffusionBackbone(**tiny_sd_components(seed=0), layers=TAPS, timestep=100)
    out = bb(images, noise=noise)
    ref = _by_hand(tiny_sd_components(seed=0), images, noise, 100)
    assert [f.name for f in bb.feature_info] == TAPS
    for name, f, info in zip(TAPS, out.features, bb.feature_info, strict=True):
        assert _rel(f, ref[name]) <= 1e-4, name
        assert f.shape[1] == info.channels and f.shape[-1] == 32 // info.reduction, name
    assert [f.reduction for f in bb.feature_info] == [2, 2, 4, 1, 1]


def test_early_stop_still_holds_for_unet_and_decoder_taps() -> None:
    bb = create_backbone("test_sd", layers=["vae.decoder.up_blocks.0", "up_blocks.1"], timestep=10)
    ran: list[str] = []
    for name, m in (("unet.up_blocks.3", bb.unet.up_blocks[3]), ("vae.decoder.conv_out", bb.vae.decoder.conv_out),
                    ("unet.up_blocks.1.resnets.0", bb.unet.up_blocks[1].resnets[0])):
        m.register_forward_hook(lambda mod, a, o, name=name: ran.append(name))
    assert bb.feature_info  # the probe runs everything once
    ran.clear()
    bb(torch.rand(1, 3, 32, 32))
    assert ran == ["unet.up_blocks.1.resnets.0"]  # the UNet stopped after up_blocks.1, the decoder after up_blocks.0


def test_only_vae_taps_skip_the_unet_and_latents_work_for_the_decoder() -> None:
    bb = create_backbone("test_sd", layers=["vae.decoder.up_blocks.0", "vae.encoder.down_blocks.1"])
    calls = []
    bb.unet.conv_in.register_forward_hook(lambda m, a, o: calls.append(1))
    assert bb.feature_info  # the probe runs the UNet once
    calls.clear()
    images = torch.rand(2, 3, 32, 32)
    out = bb(images)
    assert calls == [] and [tuple(f.shape) for f in out.features] == [(2, 8, 32, 32), (2, 8, 16, 16)]
    dec = create_backbone("test_sd", layers=["vae.decoder.up_blocks.0"])
    from_latents = dec(latents=dec.encode_images(images)).features[0]
    torch.testing.assert_close(from_latents, out.features[0])
    with pytest.raises(ValueError, match=r"VAE encoder taps \['vae.encoder.down_blocks.1'\] need images"):
        bb(latents=dec.encode_images(images))


def test_vae_taps_with_timesteps_ensembles_and_padding() -> None:
    images = torch.rand(1, 3, 32, 32)
    one = create_backbone("test_sd", layers=["up_blocks.1", "vae.encoder.down_blocks.0"], timestep=10)(images)
    multi = create_backbone("test_sd", layers=["up_blocks.1", "vae.encoder.down_blocks.0"], timestep=[10, 20])
    assert [f.name for f in multi.feature_info] == ["vae.encoder.down_blocks.0", "up_blocks.1@t10", "up_blocks.1@t20"]
    out = multi(images)
    torch.testing.assert_close(out.features[0], one.features[1])
    ens = create_backbone("test_sd", layers=["vae.decoder.up_blocks.0"], ensemble_size=3)(images).features[0]
    torch.testing.assert_close(ens, create_backbone("test_sd", layers=["vae.decoder.up_blocks.0"])(images).features[0])
    padded = create_backbone("test_sd", layers=["vae.decoder.up_blocks.1", "up_blocks.1"], pad=True)
    feats = padded(torch.rand(1, 3, 24, 40)).features
    assert [tuple(f.shape[-2:]) for f in feats] == [(24, 40), (6, 10)]


def test_unknown_vae_taps_list_the_valid_paths() -> None:
    with pytest.raises(ValueError, match=r"unknown VAE tap 'vae.encoder.down_block.0'. VAE blocks: "
                                         r"\['vae.encoder.down_blocks.0', 'vae.encoder.down_blocks.1', "
                                         r"'vae.encoder.mid_block', 'vae.decoder.up_blocks.0'"):
        create_backbone("test_sd", layers=["vae.encoder.down_block.0"])
    with pytest.raises(ValueError, match="unknown VAE tap 'vae.quant_conv'"):
        create_backbone("test_sd", layers=["vae.quant_conv"])
    with pytest.raises(ValueError, match=r"VAE taps start with 'vae.'"):
        create_backbone("test_sd", layers=["encoder.down_blocks.0"])
