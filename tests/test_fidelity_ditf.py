"""DiTF fidelity (issue 13 item 1, FLUX): ``FluxBackbone(ditf=True)`` against a literal port of the released code.

Port of ganchaofan0000/DiTF at commit 08658e6 (file:line of each step in the comments), run on the tiny
FLUX model. The released code runs BFL's own ``Flux`` module; the port calls the same computations on
diffusers' ``FluxTransformer2DModel`` (its modules are BFL's renamed by diffusers' conversion:
``img_in`` = ``x_embedder``, ``txt_in`` = ``context_embedder``, ``time_in + guidance_in + vector_in`` =
``time_text_embed``, ``pe_embedder`` = ``pos_embed``, ``DoubleStreamBlock`` = ``transformer_blocks``,
``SingleStreamBlock`` = ``single_transformer_blocks``, ``Modulation.lin`` = ``norm.linear``). Written
without diffperc code. Float32 (the release runs bf16). Channels (3, 7) stand in for FLUX.1's
(154, 1446), block 3 (single block 1 after 2 double ones) for 28 (single block 9 after 19).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffperc.backbones import FluxBackbone
from diffperc.backbones.tiny import tiny_flux_components

T5_LEN, ENSEMBLE, T, K, CD = 16, 4, 260, 3, (3, 7)
# einops is not a dependency: its patterns used by the release, written in torch (each named where used)


def pack_2x2(x: torch.Tensor) -> torch.Tensor:
    """rearrange(x, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def hf_embedder(tokenizer, module, max_length: int, is_clip: bool, text: list[str]) -> torch.Tensor:
    """src/flux/modules/conditioner.py:23-39 (HFEmbedder.forward)."""
    batch_encoding = tokenizer(text, truncation=True, max_length=max_length, return_length=False,
                               return_overflowing_tokens=False, padding="max_length", return_tensors="pt")  # :24-32
    outputs = module(input_ids=batch_encoding["input_ids"], attention_mask=None, output_hidden_states=False)  # :34-38
    return outputs["pooler_output" if is_clip else "last_hidden_state"]  # :12, :39


def prepare_txt(bs: int, t5, clip, prompt: str):
    """src/flux/feat_flux.py:7-19."""
    prompt = [prompt]
    txt = t5(prompt)
    if txt.shape[0] == 1 and bs > 1:
        txt = txt.expand(bs, *txt.shape[1:])  # :11-12 repeat(txt, "1 ... -> bs ...", bs=bs)
    txt_ids = torch.zeros(bs, txt.shape[1], 3)  # :13
    vec = clip(prompt)
    if vec.shape[0] == 1 and bs > 1:
        vec = vec.expand(bs, *vec.shape[1:])  # :16-17 repeat(vec, "1 ... -> bs ...", bs=bs)
    return txt, txt_ids, vec


def prepare(img: torch.Tensor):
    """src/flux/feat_flux.py:22-34."""
    bs, c, h, w = img.shape
    img = pack_2x2(img)  # :25
    img_ids = torch.zeros(h // 2, w // 2, 3)
    img_ids[..., 1] = img_ids[..., 1] + torch.arange(h // 2)[:, None]  # :30
    img_ids[..., 2] = img_ids[..., 2] + torch.arange(w // 2)[None, :]  # :31
    img_ids = img_ids.reshape(-1, 3)[None].expand(bs, -1, -1)  # :32 repeat(img_ids, "h w c -> b (h w) c", b=bs)
    return img, img_ids


def forward_feat(model, img, img_ids, txt, txt_ids, timesteps, y, ft_indices, guidance):
    """src/flux/model.py:125-193 (Flux.forward_feat) with SingleStreamBlock.forward_feat (layers.py:291-312)."""
    n_double = len(model.transformer_blocks)  # model.py:177 hard-codes FLUX.1's 19
    img = model.x_embedder(img)  # :141 img_in
    # :144-152 vec = time_in(emb(t)) + guidance_in(emb(g)) + vector_in(y), timestep_embedding's time_factor 1000
    vec = model.time_text_embed(timesteps * 1000, guidance * 1000, y)
    txt = model.context_embedder(txt)  # :156 txt_in
    ids = torch.cat((txt_ids, img_ids), dim=1)  # :158
    pe = model.pos_embed(ids[0])  # :159 pe_embedder (diffusers takes the ids without the batch dim)
    up_ft = []
    for i, block in enumerate(model.transformer_blocks):  # :162-170
        if i > max(ft_indices):
            break
        txt, img = block(hidden_states=img, encoder_hidden_states=txt, temb=vec, image_rotary_emb=pe)
    x = torch.cat((txt, img), 1)  # :173
    for i, block in enumerate(model.single_transformer_blocks):  # :174-184
        if (n_double + i) > max(ft_indices):
            break
        if (n_double + i) in ft_indices:
            x_feat = x.clone()  # layers.py:294
            shift, scale, gate = block.norm.linear(F.silu(vec))[:, None, :].chunk(3, dim=-1)  # layers.py:292, :122
            up_ft.append(x_feat[:, txt.shape[1]:, ...].clone().detach())  # model.py:183
            up_ft.append((shift, scale, gate))  # model.py:184 (ModulationOut)
            continue  # the block's own output is not used (ft_indices has one entry)
        t_out, i_out = block(hidden_states=x[:, txt.shape[1]:], encoder_hidden_states=x[:, : txt.shape[1]],
                             temb=vec, image_rotary_emb=pe)
        x = torch.cat((t_out, i_out), 1)  # layers.py:277-289 (a joint [txt, img] stream)
    return up_ft


@torch.no_grad()
def released_ditf(parts: dict, img01: torch.Tensor, caption: str, noise: torch.Tensor, gen: torch.Generator):
    """src/flux/feat_flux.py:113-174 (Featurizer4Eval.forward) then eval_spair.py:146-164."""
    model, ae = parts["transformer"], parts["vae"]
    t5 = lambda p: hf_embedder(parts["tokenizer_2"], parts["text_encoder_2"], T5_LEN, False, p)  # noqa: E731
    clip = lambda p: hf_embedder(parts["tokenizer"], parts["text_encoder"], 77, True, p)  # noqa: E731
    img_tensor = (img01 * 2 - 1).repeat(ENSEMBLE, 1, 1, 1)  # eval_spair.py:89, feat_flux.py:123
    prompt_embeds, text_ids, vec = prepare_txt(bs=ENSEMBLE, t5=t5, clip=clip, prompt=caption)  # :129-133
    t = T / 1000  # :136
    z = ae.encode(img_tensor).latent_dist.sample(generator=gen)  # :137; autoencoder.py:302-304 DiagonalGaussian(sample)
    latents = ae.config.scaling_factor * (z - ae.config.shift_factor)  # autoencoder.py:304
    latents_noisy = t * noise + (1.0 - t) * latents  # :143
    ensem, c, h, w = latents_noisy.shape
    img, img_ids = prepare(img=latents_noisy)  # :146
    t_vec = torch.full((img.shape[0],), t, dtype=img.dtype)  # :148
    guidance_vec = torch.full((img.shape[0],), 3.5, dtype=img.dtype)  # :149 (guidance=3.5)
    model_output = forward_feat(model, img, img_ids, prompt_embeds, text_ids, t_vec, vec, [K], guidance_vec)
    mod = model_output[1]  # :164
    feat = model_output[0]
    dit_feat = feat.view(feat.shape[0], h // 2, w // 2, -1).permute(0, 3, 1, 2)  # :167-168 "b (h w) c -> b h w c"
    dit_feat = dit_feat.mean(0, keepdim=True)  # :169
    ada = torch.cat([mod[0].mean(0, keepdim=True), mod[1].mean(0, keepdim=True), mod[2].mean(0, keepdim=True)], 1)
    # eval_spair.py
    pre_norm = nn.LayerNorm(dit_feat.shape[1], elementwise_affine=False, eps=1e-6)  # :113
    src_ft_raw = dit_feat.clone()
    _, _, H, W = src_ft_raw.shape
    for ch in CD:  # :150-152 (--cd)
        src_ft_raw[:, ch, :, :] = 0.0
    src_ft = src_ft_raw.flatten(2).transpose(1, 2)  # :154 "b c h w -> b (h w) c"
    src_ft = pre_norm(src_ft)  # :155
    src_ft = src_ft.transpose(1, 2).reshape(1, -1, H, W)  # :156 "b (h w) c -> b c h w"
    src_shift = ada[0][0].unsqueeze(0).unsqueeze(2).unsqueeze(3)  # :159, :162
    src_scale = ada[0][1].unsqueeze(0).unsqueeze(2).unsqueeze(3)  # :160, :163
    return (1 + src_scale) * src_ft + src_shift  # :164


def test_ditf_backbone_equals_the_released_computation() -> None:
    parts = tiny_flux_components(seed=7)
    img = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(ENSEMBLE, 4, 8, 12, generator=torch.Generator().manual_seed(1))
    caption = "a photo of a cat sitting on a wooden chair"
    ref = released_ditf(parts, img, caption, noise, torch.Generator().manual_seed(2))
    bb = FluxBackbone(**parts, ditf=True, ditf_block=K, massive_channels=CD, timestep=T, ensemble_size=ENSEMBLE,
                      latent_sample="sample", max_sequence_length=T5_LEN, guidance_scale=3.5)
    got = bb(img, prompts=caption, noise=noise, generator=torch.Generator().manual_seed(2)).features[0]
    assert got.shape == ref.shape == (1, 16, 4, 6)
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel <= 1e-4, rel
    # the recipe's parts matter: without channel discard the result differs
    other = FluxBackbone(**parts, ditf=True, ditf_block=K, massive_channels=(), timestep=T, ensemble_size=ENSEMBLE,
                         latent_sample="sample", max_sequence_length=T5_LEN)
    far = other(img, prompts=caption, noise=noise, generator=torch.Generator().manual_seed(2)).features[0]
    assert ((far - ref).norm() / ref.norm()).item() > 1e-2
