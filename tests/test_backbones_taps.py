"""Taps anywhere (issue 13 item 2): module inputs, the cross_q / ovdiff_q presets, early stop on an input."""

from __future__ import annotations

import pytest
import torch

from diffperc import DiffusionBackbone, create_backbone
from diffperc.backbones.tiny import tiny_sd_components


def _images(b: int = 2, size: int = 32) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _by_hand(parts: dict, images: torch.Tensor, inputs: list[str], outputs: list[str]) -> dict[str, torch.Tensor]:
    """VAE mean x scaling, clean latents at t=1, empty prompt, full UNet forward; pre-hooks and hooks read tensors."""
    vae, unet, te, tok = (parts[k] for k in ("vae", "unet", "text_encoder", "tokenizer"))
    x0 = vae.encode(images * 2 - 1).latent_dist.mean * vae.config.scaling_factor
    emb = te(tok([""] * len(images), padding="max_length", return_tensors="pt").input_ids).last_hidden_state
    got: dict[str, torch.Tensor] = {}
    hooks = [unet.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: got.__setitem__(n + ":input", a[0]))
             for n in inputs]
    hooks += [unet.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: got.__setitem__(n, o)) for n in outputs]
    unet(x0, torch.full((len(x0),), 1), encoder_hidden_states=emb)
    for h in hooks:
        h.remove()
    return got


def test_module_input_taps_match_pre_hooks_and_are_the_skip_concat() -> None:
    parts = tiny_sd_components(seed=2)
    taps = ["up_blocks.1.resnets.0:input", "up_blocks.2.resnets.1:input", "up_blocks.1"]
    bb = DiffusionBackbone(**parts, layers=taps, timestep=1, add_noise=False)
    images = _images()
    out = bb(images).features
    ref = _by_hand(parts, images, ["up_blocks.1.resnets.0", "up_blocks.2.resnets.1"], ["up_blocks.0", "down_blocks.2"])
    torch.testing.assert_close(out[0], ref["up_blocks.1.resnets.0:input"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[1], ref["up_blocks.2.resnets.1:input"], rtol=1e-4, atol=1e-5)
    # the input of up_blocks.1's first resnet is [output of up_blocks.0, the skip of down_blocks.2's 2nd layer]
    torch.testing.assert_close(out[0][:, :16], ref["up_blocks.0"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[0][:, 16:], ref["down_blocks.2"][1][1], rtol=1e-4, atol=1e-5)
    assert bb.feature_info.channels() == [32, 16, 16] and bb.feature_info.names() == taps
    assert bb.feature_info.reductions() == [8, 4, 4]  # up_blocks.1's output is upsampled


def test_early_stop_before_a_module_whose_input_is_tapped() -> None:
    bb = create_backbone("test_sd", layers=["up_blocks.2.resnets.0:input"], timestep=1, add_noise=False)
    _ = bb.feature_info
    ran = []
    bb.unet.up_blocks[2].resnets[0].register_forward_hook(lambda *a: ran.append(1))
    feat = bb(_images()).features[0]
    assert ran == [], "the tapped module ran although only its input was requested"
    assert feat.shape == (2, 24, 8, 8)  # 16 channels from up_blocks.1 + an 8-channel skip, reduction 4


def test_cross_q_and_ovdiff_presets() -> None:
    parts = tiny_sd_components(seed=3)
    bb = DiffusionBackbone(**parts, layers="cross_q", timestep=1, add_noise=False)
    assert bb.layers == ["up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_q"]  # Mustafar's tap
    images = _images()
    ref = _by_hand(parts, images, [], bb.layers)[bb.layers[0]]  # (B, h*w, C) tokens
    got = bb(images).features[0]
    assert got.shape == (2, 16, 4, 4)
    torch.testing.assert_close(got, ref.transpose(1, 2).reshape(2, 16, 4, 4), rtol=1e-4, atol=1e-5)
    ov = create_backbone("test_sd", layers="ovdiff_q").layers
    q = "transformer_blocks.0.attn2.to_q"
    assert ov == [f"down_blocks.0.attentions.0.{q}", f"mid_block.attentions.0.{q}"] + \
        [f"up_blocks.{b}.attentions.{i}.{q}" for b in (1, 2) for i in range(3)] + [f"up_blocks.3.attentions.2.{q}"]


def test_bad_taps_say_what_is_valid() -> None:
    with pytest.raises(ValueError, match="must be one of \\['output', 'input'\\]"):
        create_backbone("test_sd", layers=["up_blocks.1:inptu"])
    with pytest.raises(ValueError, match="unknown UNet layer 'up_blocks.9'.*':input'"):
        create_backbone("test_sd", layers=["up_blocks.9:input"])
    with pytest.raises(ValueError, match="duplicates"):
        create_backbone("test_sd", layers=["up_blocks.1", "up_blocks.1"])
