"""FLUX backbone (issue 13 items 1 and 4): the transformer run by hand with hooks (packed latents, ids,
guidance), the pipeline's encode_prompt, double/single-stream taps, joint-attention maps, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from dit_helpers import L_T5, PROMPTS, clean_latents, run_with_taps  # tests/dit_helpers.py
from dit_helpers import images as _images
from dit_helpers import rel as _rel

from diffperc import create_backbone
from diffperc.backbones import DiffusionBackbone, FluxBackbone
from diffperc.backbones.tiny import tiny_flux_components


def _pipe(parts: dict):
    from diffusers import FluxPipeline

    return FluxPipeline(**parts)


@torch.no_grad()
def _by_hand(parts: dict, images: torch.Tensor, prompts: list[str], taps: list[str], sigma: float,
             noise: torch.Tensor, guidance: float | None = 3.5) -> dict[str, torch.Tensor]:
    """FluxPipeline's steps written out with its own helpers: encode_prompt, _pack_latents, image ids, the call."""
    vae, tr, pipe = parts["vae"], parts["transformer"], _pipe(parts)
    embeds, pooled, text_ids = pipe.encode_prompt(prompt=prompts, prompt_2=None, max_sequence_length=L_T5)
    x0 = clean_latents(vae, images)
    xt = sigma * noise + (1 - sigma) * x0
    b, c, h, w = xt.shape
    tokens = pipe._pack_latents(xt, b, c, h, w)
    img_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, xt.device, xt.dtype)
    g = None if guidance is None else torch.full((b,), guidance)
    got = run_with_taps(tr, taps, lambda: tr(
        hidden_states=tokens, timestep=torch.full((b,), sigma), guidance=g, encoder_hidden_states=embeds,
        pooled_projections=pooled, txt_ids=text_ids, img_ids=img_ids))
    return {n: v.transpose(1, 2) if n.endswith(":context") else v.transpose(1, 2).reshape(b, -1, h // 2, w // 2)
            for n, v in got.items()}


@pytest.mark.parametrize("guidance", [True, False])
def test_flux_features_equal_the_transformer_run_by_hand(guidance: bool) -> None:
    parts = tiny_flux_components(seed=2, guidance=guidance)
    taps = ["transformer_blocks.1", "transformer_blocks.0:context", "single_transformer_blocks.1",
            "single_transformer_blocks.2:input"]
    bb = FluxBackbone(**parts, layers=taps, timestep=260, max_sequence_length=L_T5)
    images, noise = _images(), torch.randn(2, 4, 8, 12)
    out = bb(images, prompts=PROMPTS, noise=noise)
    ref = _by_hand(parts, images, PROMPTS, taps, 0.26, noise, 3.5 if guidance else None)
    for f, n in zip(out.features, taps, strict=True):
        assert f.shape == ref[n].shape, n
        assert _rel(f, ref[n]) <= 1e-4, n
    assert out.features[0].shape == (2, 16, 4, 6) and out.features[1].shape == (2, 16, L_T5)
    # block indices count double then single blocks (DiTF's numbering)
    assert FluxBackbone(**parts, layers=[1, 2, 4], max_sequence_length=L_T5).layers == [
        "transformer_blocks.1", "single_transformer_blocks.0", "single_transformer_blocks.2"]


def test_encode_prompt_equals_the_pipeline() -> None:
    parts = tiny_flux_components(seed=0)
    e, p = FluxBackbone(**parts, max_sequence_length=L_T5).encode_prompt(PROMPTS)
    re, rp, _ = _pipe(parts).encode_prompt(prompt=PROMPTS, prompt_2=None, max_sequence_length=L_T5)
    torch.testing.assert_close(e, re, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p, rp, rtol=1e-5, atol=1e-6)
    assert e.shape == (2, L_T5, 24) and p.shape == (2, 16)


@torch.no_grad()
def test_joint_attention_maps_equal_the_joint_softmax_by_hand() -> None:
    """By hand: FluxAttnProcessor's arithmetic with an explicit softmax over the whole joint sequence,
    then the image-query -> text-key block, renormalised over text (the backbone computes it without
    the image keys: the joint denominator cancels)."""
    from diffusers.models.embeddings import apply_rotary_emb

    parts = tiny_flux_components(seed=3)
    bb = FluxBackbone(**parts, layers=[4], attention=True, timestep=300, max_sequence_length=L_T5)
    images, noise = _images(1, 16, 16), torch.randn(1, 4, 8, 8)
    out = bb(images, prompts="a cat", noise=noise)
    maps = []

    class Explicit:
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     image_rotary_emb=None):
            def heads(x):
                return x.unflatten(-1, (attn.heads, -1))

            q, k = attn.norm_q(heads(attn.to_q(hidden_states))), attn.norm_k(heads(attn.to_k(hidden_states)))
            v = heads(attn.to_v(hidden_states))
            if encoder_hidden_states is not None:
                eq = attn.norm_added_q(heads(attn.add_q_proj(encoder_hidden_states)))
                ek = attn.norm_added_k(heads(attn.add_k_proj(encoder_hidden_states)))
                ev = heads(attn.add_v_proj(encoder_hidden_states))
                q, k, v = torch.cat([eq, q], 1), torch.cat([ek, k], 1), torch.cat([ev, v], 1)
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
            p = torch.softmax(torch.einsum("bnhd,bmhd->bhnm", q, k) / q.shape[-1] ** 0.5, -1)
            o = torch.einsum("bhnm,bmhd->bnhd", p, v).flatten(2)
            if encoder_hidden_states is None:
                return o
            n_txt = encoder_hidden_states.shape[1]
            block = p[:, :, n_txt:, :n_txt]
            maps.append((block / block.sum(-1, keepdim=True)).mean(1))
            return attn.to_out[0](o[:, n_txt:]), attn.to_add_out(o[:, :n_txt])

    ref_parts = tiny_flux_components(seed=3)
    for blk in ref_parts["transformer"].transformer_blocks:
        blk.attn.set_processor(Explicit())
    for blk in ref_parts["transformer"].single_transformer_blocks:
        blk.attn.set_processor(Explicit())
    ref_feat = _by_hand(ref_parts, images, ["a cat"], ["single_transformer_blocks.2"], 0.3, noise)
    ref = torch.stack(maps).mean(0).transpose(1, 2).reshape(1, L_T5, 4, 4)
    assert set(out.attention) == {4} and len(maps) == 2  # the two double-stream blocks
    assert _rel(out.attention[4], ref) <= 1e-4
    torch.testing.assert_close(out.attention[4].sum(1), torch.ones(1, 4, 4))
    assert _rel(out.features[0], ref_feat["single_transformer_blocks.2"]) <= 1e-4


def test_dynamic_shift_early_stop_and_round_trip(tmp_path) -> None:
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    parts = tiny_flux_components(seed=1)
    sh = FluxBackbone(**parts, timestep=500, shifted=True, layers=[0], max_sequence_length=L_T5)
    sched = sh.scheduler
    mu = calculate_shift(1024, 256, 4096, 0.5, 1.15)  # the pipeline's mu for 1024 image tokens
    ref = sched.time_shift(mu, 1.0, torch.tensor(0.5))
    assert abs(sh.sigmas_for(1024)[0] - float(ref)) < 1e-6
    early = FluxBackbone(**parts, layers=[1], max_sequence_length=L_T5)
    full = FluxBackbone(**parts, layers=[1, 4], max_sequence_length=L_T5)
    x, noise = _images(1, 16, 16), torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(early(x, noise=noise).features[0], full(x, noise=noise).features[0])
    assert early._stop_after == "transformer_blocks.1"
    early.save_pretrained(tmp_path / "flux")
    back = DiffusionBackbone.from_pretrained(tmp_path / "flux", layers=[1], max_sequence_length=L_T5)
    assert isinstance(back, FluxBackbone)
    torch.testing.assert_close(back(x, noise=noise).features[0], early(x, noise=noise).features[0])


def test_ditf_option_is_the_modulated_block_input() -> None:
    parts = tiny_flux_components(seed=5)
    bb = FluxBackbone(**parts, ditf=True, ditf_block=3, massive_channels=(3, 7), max_sequence_length=L_T5)
    assert bb.layers == ["single_transformer_blocks.1:input"]
    x, noise = _images(1, 16, 16), torch.randn(1, 4, 8, 8)
    got = bb(x, prompts="a cat", noise=noise).features[0]
    raw = FluxBackbone(**parts, layers=["single_transformer_blocks.1:input"], max_sequence_length=L_T5)
    f = raw(x, prompts="a cat", noise=noise).features[0].clone()
    f[:, [3, 7]] = 0
    f = F.layer_norm(f.permute(0, 2, 3, 1), (16,), eps=1e-6).permute(0, 3, 1, 2)
    temb = parts["transformer"].time_text_embed(torch.tensor([260.0]), torch.tensor([3500.0]),
                                                raw.encode_prompt(["a cat"])[1])
    shift, scale, _ = parts["transformer"].single_transformer_blocks[1].norm.linear(F.silu(temb)).chunk(3, 1)
    ref = (1 + scale[:, :, None, None]) * f + shift[:, :, None, None]
    assert _rel(got, ref) <= 1e-4
    assert bb.feature_info.channels() == [16]


def test_flux_bad_input() -> None:
    parts = tiny_flux_components(seed=0)
    with pytest.raises(ValueError, match="needs CLIP.*and T5.*missing \\['text_encoder_2'"):
        FluxBackbone(**{**parts, "text_encoder_2": None})
    with pytest.raises(ValueError, match=r"Valid block indices: 0\.\.4 \(0\.\.1 = transformer_blocks.*single"):
        FluxBackbone(**parts, layers=["single_transformer_blocks.9"])
    with pytest.raises(ValueError, match=r"integers t in \[0, 1000\)"):
        FluxBackbone(**parts, timestep=-1)
    with pytest.raises(ValueError, match="not a single-stream block"):
        FluxBackbone(**parts, ditf=True, ditf_block=1)
    with pytest.raises(ValueError, match="massive_channels \\[154, 1446\\] are outside"):
        FluxBackbone(**parts, ditf=True, ditf_block=3)
    with pytest.raises(ValueError, match="leave layers unset"):
        FluxBackbone(**parts, ditf=True, ditf_block=3, layers=[0])
    bb = create_backbone("test_flux", layers=[0])
    with pytest.raises(ValueError, match="not a multiple of 4"):
        bb(_images(1, 16, 10))
    with pytest.raises(ValueError, match=r"latents must have shape \(B, 4, h, w\)"):
        bb(latents=torch.zeros(1, 16, 4, 4))
