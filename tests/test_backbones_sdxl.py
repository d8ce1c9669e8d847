"""SDXL backbone (issue 13 item 1): both text encoders, pooled embeds, added time ids, against a by-hand run."""

from __future__ import annotations

import pytest
import torch

from diffperc import create_backbone
from diffperc.backbones.sdxl import SDXLBackbone
from diffperc.backbones.tiny import tiny_sdxl_components

PROMPTS = ["a photo of a cat", "a dog"]


def _images(b: int = 2, h: int = 32, w: int = 48) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _by_hand(parts: dict, images: torch.Tensor, prompts: list[str], taps: list[str], t: int,
             noise: torch.Tensor, time_ids: list[int]) -> dict[str, torch.Tensor]:
    """StableDiffusionXLPipeline's conditioning written out (encode_prompt :375-419, _get_add_time_ids :729-744)."""
    vae, unet, sched = parts["vae"], parts["unet"], parts["scheduler"]
    hidden, pooled = [], None
    for tok, te in ((parts["tokenizer"], parts["text_encoder"]), (parts["tokenizer_2"], parts["text_encoder_2"])):
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        out = te(ids, output_hidden_states=True)
        if out[0].ndim == 2:
            pooled = out[0]  # CLIPTextModelWithProjection.text_embeds
        hidden.append(out.hidden_states[-2])
    embeds = torch.cat(hidden, dim=-1)
    x0 = vae.encode(images * 2 - 1).latent_dist.mean * vae.config.scaling_factor
    a = sched.alphas_cumprod[t]
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    got = {}
    hooks = []
    for name in taps:
        path, _, kind = name.partition(":")
        m = unet.get_submodule(path)
        if kind == "input":
            hooks.append(m.register_forward_pre_hook(lambda m, a, n=name: got.__setitem__(n, a[0])))
        else:
            hooks.append(m.register_forward_hook(lambda m, a, o, n=name: got.__setitem__(
                n, o[0] if isinstance(o, tuple) else o)))
    ids6 = torch.tensor([time_ids], dtype=embeds.dtype).repeat(len(images), 1)
    unet(xt, torch.full((len(xt),), t), encoder_hidden_states=embeds,
         added_cond_kwargs={"text_embeds": pooled, "time_ids": ids6})
    for h in hooks:
        h.remove()
    return got


def test_sdxl_features_equal_the_unet_run_by_hand() -> None:
    parts = tiny_sdxl_components(seed=3)
    taps = ["up_blocks.0", "up_blocks.1.attentions.1", "up_blocks.1.resnets.0:input"]
    bb = SDXLBackbone(**parts, layers=taps, timestep=261)
    images, noise = _images(), torch.randn(2, 4, 16, 24)
    out = bb(images, prompts=PROMPTS, noise=noise)
    ref = _by_hand(parts, images, PROMPTS, taps, 261, noise, [32, 48, 0, 0, 32, 48])  # pipeline defaults: (H, W)
    for f, n in zip(out.features, taps, strict=True):
        torch.testing.assert_close(f, ref[n], rtol=1e-4, atol=1e-5)
    # the added conditions matter: other time ids give other features
    other = SDXLBackbone(**parts, layers=taps, timestep=261, original_size=(64, 64), crops_coords_top_left=(4, 0))
    ref2 = _by_hand(parts, images, PROMPTS, taps, 261, noise, [64, 64, 4, 0, 32, 48])
    got2 = other(images, prompts=PROMPTS, noise=noise).features
    torch.testing.assert_close(got2[0], ref2[taps[0]], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got2[0], out.features[0], rtol=1e-3)


def test_sdxl_embeds_presets_and_bad_input() -> None:
    bb = create_backbone("test_sdxl", layers="cross_q", timestep=1, add_noise=False, attention=True)
    assert bb.layers == ["up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_q"]
    images = _images(1, 32, 32)
    embeds, pooled = bb.encode_prompt(["a cat"])
    assert embeds.shape == (1, 77, 16) and pooled.shape == (1, 8)
    a = bb(images, prompts="a cat")
    b = bb(images, prompt_embeds=embeds, pooled_prompt_embeds=pooled)
    torch.testing.assert_close(a.features[0], b.features[0])
    assert set(a.attention) == {4, 8} and all(m.shape[1] == 77 for m in a.attention.values())
    with pytest.raises(ValueError, match="needs pooled_prompt_embeds"):
        bb(images, prompt_embeds=embeds)
    with pytest.raises(ValueError, match=r"pooled_prompt_embeds must have shape \(B, 8\)"):
        bb(images, prompt_embeds=embeds, pooled_prompt_embeds=torch.zeros(1, 5))
    with pytest.raises(ValueError, match="SD 1/2 UNets go to DiffusionBackbone"):
        from diffperc.backbones.tiny import tiny_sd_components

        sd = tiny_sd_components()
        SDXLBackbone(sd["vae"], sd["unet"], sd["text_encoder"], sd["text_encoder"], sd["tokenizer"], sd["tokenizer"],
                     sd["scheduler"])


def test_sdxl_folder_round_trip_picks_the_class_from_model_index(tmp_path) -> None:
    import json

    from diffperc import DiffusionBackbone
    from diffperc.backbones.registry import list_families

    bb = create_backbone("test_sdxl", layers="dift", timestep=1, add_noise=False)
    bb.save_pretrained(tmp_path / "xl")
    index = json.loads((tmp_path / "xl" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    loaded = DiffusionBackbone.from_pretrained(tmp_path / "xl", layers="dift", timestep=1, add_noise=False)
    assert type(loaded) is SDXLBackbone
    images = _images(1, 32, 32)
    torch.testing.assert_close(loaded(images, prompts="a cat").features[0], bb(images, prompts="a cat").features[0])
    rnd = DiffusionBackbone.from_pretrained(tmp_path / "xl", pretrained=False)  # architecture only
    assert type(rnd) is SDXLBackbone and not torch.equal(rnd.unet.conv_in.weight, bb.unet.conv_in.weight)
    with pytest.raises(TypeError, match="original_sizee.*did you mean 'original_size'"):
        DiffusionBackbone.from_pretrained(tmp_path / "xl", original_sizee=(1024, 1024))
    index["_class_name"] = "KandinskyPipeline"
    (tmp_path / "xl" / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="no diffperc backbone for a KandinskyPipeline.*StableDiffusionXLPipeline"):
        DiffusionBackbone.from_pretrained(tmp_path / "xl")
    families = {f["family"]: f for f in list_families()}
    assert {"sd", "sdxl", "dinov2", "sd+dinov2"} <= set(families)
    assert {"sdxl", "test_sdxl"} <= set(families["sdxl"]["presets"]) and "test_sd" in families["sd"]["presets"]
