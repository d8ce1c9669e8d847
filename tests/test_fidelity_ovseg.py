"""OVDiff fidelity: diffperc's steps against literal ports of karazijal/sdov's released functions.

Each ``port_*`` re-implements one released function step by step (same order of operations,
constants and resizes), ported to diffusers 0.42 / torch 2.x, with the file:line it follows
(karazijal/sdov @ 218566b; CutLER vendored in it under ``CutLER/``). Tiny random models, offline.
The expected values never come from diffperc's own function for the same step.
"""

from __future__ import annotations

import math
from itertools import chain, combinations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage
from scipy.linalg import eigh

from diffperc import create_backbone
from diffperc.zeroshot.ovseg import OVDiff
from diffperc.zeroshot.ovseg.clip_filter import clip_input, select_classes
from diffperc.zeroshot.ovseg.extractors import ViTKeyExtractor, create_extractor, create_vit
from diffperc.zeroshot.ovseg.inference import crop_boxes, labels_from_scores, score_features
from diffperc.zeroshot.ovseg.maskcut import maskcut
from diffperc.zeroshot.ovseg.masks import select_fg_bg
from diffperc.zeroshot.ovseg.pamr import pamr
from diffperc.zeroshot.ovseg.prototypes import (
    PrototypeBank,
    assemble_prototypes,
    class_prototypes,
    stuff_filter,
)
from diffperc.zeroshot.ovseg.segmenter import resize_for_inference
from diffperc.zeroshot.ovseg.support import (
    NEGATIVE_PROMPT,
    build_pipeline,
    normalise_heatmaps,
    sample_with_heatmaps,
)


# ============================================================================ ports: sampling (sd.py)
class PortDAAMStore:
    """sd.py:170-205 DAAMStore, verbatim arithmetic."""

    def __init__(self, token_groups, is_cfg=True):
        self.token_groups, self.is_cfg = token_groups, is_cfg
        self.store = [None for _ in range(len(token_groups))]
        self.store_counts = [0 for _ in range(len(token_groups))]
        self.size = None

    def update(self, attention_prob, nheads, name):
        bh, seq_len, ntoks = attention_prob.shape  # sd.py:181
        map = attention_prob.view(-1, nheads, seq_len, ntoks).detach()  # sd.py:182
        B = map.shape[0]
        if self.is_cfg:  # sd.py:184-186: conditional half
            map = map[B // 2:]
            B = map.shape[0]
        a = int(math.sqrt(seq_len))  # sd.py:187
        if self.size is None:
            self.size = a
        for i, tg in enumerate(self.token_groups):  # sd.py:190-198
            m = map[..., tg].view(B, nheads, a, a, len(tg)).permute(0, 4, 1, 2, 3).reshape(B * len(tg), nheads, a, a).float()
            m = F.interpolate(m, size=(self.size, self.size), mode="bicubic", align_corners=False).clamp(min=0)
            m = m.view(B, len(tg), nheads, self.size, self.size).sum(2)
            if self.store[i] is None:
                self.store[i] = m
            else:
                self.store[i].add_(m)
            self.store_counts[i] += nheads

    def get_heatmaps(self):  # sd.py:200-205
        hms = []
        for i in range(len(self.token_groups)):
            hm = self.store[i] / self.store_counts[i]
            hms.append(hm.mean(1, keepdim=True))
        return torch.cat(hms, dim=1)


class PortDAAMAttnProcessor:
    """sd.py:215-263 DAAMAttnProcessor.__call__ on a diffusers 0.42 Attention."""

    def __init__(self, name, store):
        self.name, self.store = name, store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
        batch_size, sequence_length, _ = hidden_states.shape  # sd.py:228-229
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        query = attn.to_q(hidden_states)  # sd.py:231
        is_cross = encoder_hidden_states is not None
        encoder_hidden_states = encoder_hidden_states if encoder_hidden_states is not None else hidden_states
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        query, key, value = attn.head_to_batch_dim(query), attn.head_to_batch_dim(key), attn.head_to_batch_dim(value)
        attention_probs = attn.get_attention_scores(query, key, attention_mask)  # sd.py:242
        if is_cross:  # sd.py:245-248
            self.store.update(attention_probs, attn.heads, self.name)
        hidden_states = attn.batch_to_head_dim(torch.bmm(attention_probs, value))  # sd.py:255-256
        return attn.to_out[1](attn.to_out[0](hidden_states))  # sd.py:259-261


def port_pipeline_call(pipe, prompt, token_prompts, num_images, generator, guidance_scale, steps, negative_prompt):
    """sd.py:834-1071 StableDiffusionDAAMPipeline.__call__ (max_iter_to_alter=0: no attend-and-excite)."""
    unet, tok, te, sched = pipe.unet, pipe.tokenizer, pipe.text_encoder, pipe.scheduler
    height = width = unet.config.sample_size * pipe.vae_scale_factor  # sd.py:940-941

    def encode(texts):  # sd.py:535-566 and 598-616: pad to max_length, last hidden state
        ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
        return te(ids.input_ids)[0]

    pos = encode([prompt]).repeat(1, num_images, 1).view(num_images, tok.model_max_length, -1)  # sd.py:571-574
    neg = encode([negative_prompt]).repeat(1, num_images, 1).view(num_images, tok.model_max_length, -1)
    prompt_embeds = torch.cat([neg, pos])  # sd.py:630
    sched.set_timesteps(steps)  # sd.py:981
    from diffusers.utils.torch_utils import randn_tensor

    shape = (num_images, unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    latents = randn_tensor(shape, generator=generator, dtype=prompt_embeds.dtype) * sched.init_noise_sigma  # sd.py:724-739
    prompt_tokens = tok(prompt).input_ids  # sd.py:997-1008
    attn_targets = []
    for ind_prompt in token_prompts:
        ind_tokens = tok(ind_prompt, add_special_tokens=False).input_ids
        start_idx = prompt_tokens.index(ind_tokens[0])
        attn_targets.append(list(range(start_idx, start_idx + len(ind_tokens))))
    store = PortDAAMStore(attn_targets, True)  # sd.py:1018
    unet.set_attn_processor({n: PortDAAMAttnProcessor(n, store) for n in unet.attn_processors})  # sd.py:742-759
    for t in sched.timesteps:  # sd.py:1040-1059
        latent_model_input = sched.scale_model_input(torch.cat([latents] * 2), t)
        noise_pred = unet(latent_model_input, t, encoder_hidden_states=prompt_embeds).sample
        noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
        noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
        latents = sched.step(noise_pred, t, latents).prev_sample
    heatmaps = store.get_heatmaps()  # sd.py:1067
    image = pipe.vae.decode(1 / pipe.vae.config.scaling_factor * latents).sample  # sd.py:646-652
    return (image / 2 + 0.5).clamp(0, 1).float(), heatmaps


def port_normalise(daams, size):
    """sample_support_set.py:194-201."""
    daams = daams.clone()
    daams -= daams.flatten(2).min(-1, keepdim=True)[0][..., None]
    daams /= daams.flatten(2).max(-1, keepdim=True)[0][..., None].clamp(min=1e-6)
    daams = F.interpolate(daams, size=size, mode="bilinear", align_corners=False)
    daams -= daams.flatten(2).min(-1, keepdim=True)[0][..., None]
    daams /= daams.flatten(2).max(-1, keepdim=True)[0][..., None].clamp(min=1e-6)
    return daams


def test_support_sampling_and_heatmaps_match_the_released_pipeline():
    bb = create_backbone("test_sd")
    pipe = build_pipeline(bb)
    # the scheduler is pinned to diffusers 0.14's DPM-Solver timesteps: linspace(0, 999, n + 1).round()[::-1][:-1]
    pipe.scheduler.set_timesteps(30)
    expect = np.linspace(0, 999, 31).round()[::-1][:-1].astype(np.int64)
    assert np.array_equal(pipe.scheduler.timesteps.numpy(), expect)
    prompt, word = "A good picture of a potted plant", "potted plant"
    images, raw = sample_with_heatmaps(pipe, prompt, word, 2, torch.Generator().manual_seed(42), 8.0, 4, NEGATIVE_PROMPT)
    original = dict(bb.unet.attn_processors)
    try:
        exp_images, exp_raw = port_pipeline_call(build_pipeline(bb), prompt, [word], 2, torch.Generator().manual_seed(42),
                                                 8.0, 4, NEGATIVE_PROMPT)
    finally:
        bb.unet.set_attn_processor(dict(original))
    torch.testing.assert_close(images, exp_images, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(raw, exp_raw, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(normalise_heatmaps(raw, (32, 32)), port_normalise(exp_raw, (32, 32)), rtol=1e-4, atol=1e-5)


# ============================================================================ ports: fg / bg (sample_support_set.py)
def port_fg_bg(r_instances, daam):
    """sample_support_set.py:227-268 with CUTLER_Processor's background mask first (utils/cutler.py:81-83)."""
    r = torch.cat([1 - r_instances.any(dim=0, keepdim=True).float(), r_instances.float()], dim=0)
    daam = daam.view(1, *daam.shape[-2:])
    if r.shape[0] < 2:  # :231-243 (unreachable here: the background region is always there)
        return (daam > 0.5)[0], (daam < 0.2)[0]
    weights = (r * daam / r.sum([-1, -2], keepdim=True)).sum([-1, -2])  # :245
    reind = torch.argsort(weights, descending=True)  # :246-248
    weights = weights[reind]
    r = r[reind]
    r_clipped = (r * weights.unsqueeze(-1).unsqueeze(-1)).argmax(0)  # :249
    fg = r_clipped == 0  # :251
    bg = (r_clipped == r_clipped.max()).float()  # :253
    bg = bg * (daam < 0.2)[0]  # :258
    # :263 skimage.morphology.binary_erosion (0.19.3): ndi.binary_erosion(footprint=diamond(1), border_value=True)
    bg = ndimage.binary_erosion(bg.round().bool().numpy(), structure=ndimage.generate_binary_structure(2, 1),
                                border_value=True)
    return fg, torch.from_numpy(bg)


def test_fg_bg_selection_matches_the_release():
    g = torch.Generator().manual_seed(0)
    hm = F.interpolate(torch.rand(1, 1, 6, 6, generator=g), size=(24, 24), mode="bilinear")[0, 0]
    hm = (hm - hm.min()) / (hm.max() - hm.min())
    inst = torch.zeros(3, 24, 24, dtype=torch.bool)
    inst[0, 2:12, 3:15], inst[1, 10:20, 10:22], inst[2, 15:24, 0:8] = True, True, True
    fg, bg = select_fg_bg(inst, hm)
    efg, ebg = port_fg_bg(inst, hm)
    assert torch.equal(fg, efg) and torch.equal(bg, ebg)
    assert fg.any() and bg.any()
    # no instance: the released fallback (fg > 0.5, bg < 0.2, no erosion)
    fg0, bg0 = select_fg_bg(torch.zeros(0, 24, 24, dtype=torch.bool), hm)
    assert torch.equal(fg0, hm > 0.5) and torch.equal(bg0, hm < 0.2)


# ============================================================================ ports: prototypes (gen_proto_sd.py, protos.py)
def port_class_protos(feats_hwd, masks_fg, masks_bg, k):
    """gen_proto_sd.py:221-318 for one class and one (layers, timestep); masks are 0/1 PNG tensors."""
    from sklearn.cluster import KMeans

    def kmeans_fn(f, k):  # gen_proto_sd.py:20-27
        f = f.cpu().reshape(-1, f.shape[-1]).numpy()
        return torch.from_numpy(KMeans(n_clusters=k, random_state=0, n_init="auto").fit(f).cluster_centers_).float()

    fsize = feats_hwd.shape[1:3]
    cat_feats, cat_bg = [], []
    for feats, mask, bg_mask in zip(feats_hwd, masks_fg, masks_bg, strict=True):
        cmap = F.interpolate(mask.view(1, 1, *mask.shape[-2:]), size=[*fsize], mode="bilinear")[0].bool().flatten()  # :230-232
        if cmap.sum() == 0:  # :234-235
            continue
        bgmap = F.interpolate(bg_mask.view(1, 1, *bg_mask.shape[-2:]), size=[*fsize], mode="bilinear")[0].bool().flatten()
        cat_feats.append(feats.view(np.prod(fsize), -1)[cmap, :])  # :265-266
        cat_bg.append(feats.view(np.prod(fsize), -1)[bgmap, :])  # :268-271
    out = {"ind": torch.stack([f.mean(0) for f in cat_feats])}  # :296
    cf = torch.cat(cat_feats, 0)
    out["proto"], out["kmeans"] = cf.mean(0), kmeans_fn(cf, k)  # :297-304
    out["ind_bg"] = torch.stack([f.mean(0) for f in cat_bg])  # :310
    cb = torch.cat(cat_bg, 0)
    out["proto_bg"], out["kmeans_bg"] = cb.mean(0), kmeans_fn(cb, k)  # :311-318
    return out


def test_class_prototypes_match_the_release():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(4, 6, 8, 8, generator=g)  # (N, D, h, w)
    fg = torch.zeros(4, 32, 32, dtype=torch.bool)
    bg = torch.zeros(4, 32, 32, dtype=torch.bool)
    fg[0, 8:20, 8:20], fg[1, 0:5, 0:30], fg[3, 20:32, 3:9] = True, True, True  # image 2: empty fg -> skipped
    bg[0, 24:, :], bg[1, 10:, 10:], bg[2, :, :] = True, True, True  # image 3: empty bg -> NaN instance mean
    mine = class_prototypes(feats, fg, bg, kmeans=5)
    exp = port_class_protos(feats.permute(0, 2, 3, 1), fg.float(), bg.float(), 5)
    for key in ("ind", "proto", "kmeans", "proto_bg"):
        torch.testing.assert_close(mine[key], exp[key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mine["ind_bg"], exp["ind_bg"], equal_nan=True)
    assert mine["ind"].shape[0] == 3 and torch.isnan(mine["ind_bg"][2]).all()
    torch.testing.assert_close(mine["kmeans_bg"], exp["kmeans_bg"], rtol=1e-5, atol=1e-6)


def port_filter_bg2allfg(bg_proto, allfg_proto, threshold):
    """protos.py:82-93 filter_proto_bg2allfg (the keep branch)."""
    if bg_proto.shape[0] <= 1:
        return bg_proto
    proto = bg_proto.clone()
    proto /= proto.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    self_sim = torch.einsum("ij,kj->ik", proto, allfg_proto / allfg_proto.norm(dim=-1, keepdim=True).clamp_min(1e-6))
    keep_mask = (self_sim <= threshold).all(-1)
    return bg_proto[keep_mask]


def port_build_and_pad(prototypes, classlist, is_stuff, filter_bg_thres, ctx_mode=True):
    """protos.py:148-285 (feat_mode="all", kmeans=0, bgmode="all", no other filters) then predict.py:396-442."""
    classlist_nobg = [c for c in classlist if "background" not in c]
    fg_suffixs, bg_suffixs = ["", "_ind", "_kmeans"], ["_bg", "_bg_ind", "_kmeans_bg"]  # :187-189
    fg_prototypes, fg_proto_classes = [], []
    for cid, c in enumerate(classlist_nobg):  # :194-213
        p = torch.cat([prototypes[c + s].view(-1, prototypes[c + s].shape[-1]) for s in fg_suffixs], dim=0)
        fg_prototypes.append(p)
        fg_proto_classes.append([cid + 1] * p.shape[0])
    fg_proto_classes = torch.tensor(sum(fg_proto_classes, start=[]), dtype=torch.long)
    fg_prototypes = torch.cat(fg_prototypes, dim=0)
    bg_prototypes, bg_proto_classes = [], []
    for cid, c in enumerate(classlist_nobg):  # :222-263
        if ctx_mode and is_stuff.get(c, False):
            continue
        ps = [prototypes[c + s].view(-1, prototypes[c + s].shape[-1]) for s in bg_suffixs]
        ps = [p[p.isfinite().any(-1)] for p in ps]  # :228
        b = torch.cat(ps, dim=0)
        if filter_bg_thres > 0:  # :240-249
            if ctx_mode:
                ctx = torch.tensor([i + 1 for i, n in enumerate(classlist_nobg) if is_stuff.get(n, False)])
                sel = (fg_proto_classes[..., None] == ctx[None]).any(-1)
                fg_proto = fg_prototypes[sel]
            else:
                fg_proto = fg_prototypes[fg_proto_classes != cid + 1]
            b = port_filter_bg2allfg(b, fg_proto, filter_bg_thres)
        bg_prototypes.append(b)
        bg_proto_classes.append([cid + 1] * b.shape[0])
    bg_prototypes = torch.cat(bg_prototypes, dim=0)
    bg_proto_classes = torch.tensor(sum(bg_proto_classes, start=[]), dtype=torch.long)
    all_prototypes = torch.cat([bg_prototypes, fg_prototypes], dim=0)  # :276-279
    proto_classes = torch.cat([bg_proto_classes, fg_proto_classes], dim=0)
    proto_class_mask = torch.cat([torch.zeros_like(bg_proto_classes), fg_proto_classes], dim=0)
    n = max((proto_class_mask == cid).long().sum().item() for cid in range(1, len(classlist)))  # predict.py:401-405
    fg_protos, fg_masks, bg_protos, bg_masks = [], [], [], []
    for cid in range(1, len(classlist)):  # predict.py:407-425
        fg = all_prototypes[proto_class_mask == cid]
        fg_pad = torch.zeros(n, *fg.shape[1:])
        fg_pad[: fg.shape[0]] = fg
        fg_mask = torch.ones(n, dtype=torch.bool)
        fg_mask[fg.shape[0]:] = False
        bg = all_prototypes[torch.logical_and(proto_class_mask == 0, proto_classes == cid)]
        bg_pad = torch.zeros(n, *bg.shape[1:])
        bg_pad[: bg.shape[0]] = bg
        bg_mask = torch.ones(n, dtype=torch.bool)
        bg_mask[bg.shape[0]:] = False
        fg_protos.append(fg_pad), fg_masks.append(fg_mask), bg_protos.append(bg_pad), bg_masks.append(bg_mask)
    all_prototypes = torch.stack([torch.stack(bg_protos), torch.stack(fg_protos)], dim=0)  # :427-433
    all_proto_mask = torch.stack([torch.stack(bg_masks), torch.stack(fg_masks)], dim=0)
    norm = all_prototypes / all_prototypes.norm(dim=-1, keepdim=True).clamp(min=1e-6)  # :439-440
    return norm * all_proto_mask[..., None], all_proto_mask


def _random_protos(classes, d=6, n=3, k=4, seed=0, nan_row=True):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for c in classes:
        p = {"proto": torch.randn(d, generator=g), "proto_bg": torch.randn(d, generator=g),
             "ind": torch.randn(n, d, generator=g), "ind_bg": torch.randn(n, d, generator=g),
             "kmeans": torch.randn(k, d, generator=g), "kmeans_bg": torch.randn(k, d, generator=g)}
        if nan_row:
            p["ind_bg"][1] = float("nan")
        out[c] = p
    return out


@pytest.mark.parametrize("ctx_mode", [True, False])
def test_prototype_assembly_and_stuff_filter_match_the_release(ctx_mode):
    classes = ["cat", "sky", "dog", "wall"]
    stuff = ["sky", "wall"]
    per_class = _random_protos(classes, seed=3)
    # make some bg prototypes of "cat" nearly equal to stuff fg prototypes, so the 0.85 filter bites
    per_class["cat"]["kmeans_bg"][:2] = per_class["sky"]["kmeans"][:2] + 0.01
    flat = {(c + s): v for c, p in per_class.items()
            for s, v in zip(["", "_bg", "_ind", "_bg_ind", "_kmeans", "_kmeans_bg"],
                            [p["proto"], p["proto_bg"], p["ind"], p["ind_bg"], p["kmeans"], p["kmeans_bg"]], strict=True)}
    bank = assemble_prototypes(per_class, classes, stuff, stuff_threshold=0.85, ctx_mode=ctx_mode)
    exp, exp_mask = port_build_and_pad(flat, ["background", *classes], {c: c in stuff for c in classes}, 0.85, ctx_mode)
    assert bank.protos.shape == exp.shape
    torch.testing.assert_close(bank.protos, exp, rtol=1e-5, atol=1e-6)
    assert torch.equal(bank.mask, exp_mask)
    if ctx_mode:
        assert not bank.mask[0, 1].any() and bank.mask[0, 0].sum() == 1 + 2 + 4 - 2  # 1 NaN row, 2 filtered
    # the filter on its own, and its no-op cases (a single row; an empty fg set: VOC has no stuff)
    bg, fg = torch.randn(7, 5), torch.randn(3, 5)
    fg[0] = bg[2] * 2
    torch.testing.assert_close(stuff_filter(bg, fg, 0.85), port_filter_bg2allfg(bg, fg, 0.85))
    assert len(stuff_filter(bg, fg, 0.85)) == 6
    assert torch.equal(stuff_filter(bg, torch.zeros(0, 5), 0.85), bg)
    assert torch.equal(stuff_filter(bg[:1], fg, -1.0), bg[:1])


# ============================================================================ ports: scoring (predict.py)
def port_predict_scores(crops, extract, norm_protos, proto_mask, class_ids_mask, gt_size, ncls):
    """predict.py:556-645: crops, einsum + masked max + bg max, resize, clamp, average, threshold 0, argmax."""
    oH, oW = crops[-1][0].shape[-2:]
    agg = torch.zeros(ncls, oH, oW)
    counts = torch.zeros(1, oH, oW)
    simlr_mask = torch.logical_and(proto_mask, class_ids_mask[..., None])[..., None, None]  # :589
    for crop_imgt, x1, y1, x2, y2 in crops:
        fs_ = extract(crop_imgt)  # (h, w, f)
        fs_ = fs_ / fs_.norm(dim=-1, keepdim=True).clamp_min(1e-6)  # :597
        sim = torch.einsum("hwf,lckf->lckhw", fs_, norm_protos)  # :599
        sim = torch.where(simlr_mask.broadcast_to(sim.shape), sim, torch.scalar_tensor(-1, dtype=sim.dtype))  # :603-607
        sim = sim.max(dim=2).values  # :608
        sim = torch.cat([sim[0].max(dim=0, keepdim=True).values, sim[1]], dim=0)  # :614-616
        sim = F.interpolate(sim[None], size=(y2 - y1, x2 - x1), mode="bilinear", align_corners=False)[0].clamp(min=-1, max=1)
        agg[:, y1:y2, x1:x2] += sim  # :621-622
        counts[:, y1:y2, x1:x2] += 1
    avg = agg / counts.clamp_min(1)  # :625
    up = F.interpolate(avg[None], size=gt_size, mode="bilinear", align_corners=False)[0]  # :633-635
    thr = torch.where(up > 0.0, up, torch.zeros_like(up)).float()  # :638-640
    return avg, thr.max(dim=0).indices  # :644-645


def port_crops(imgt, cropsizes, strides):
    """predict.py:559-585."""
    crops = []
    oH, oW = imgt.shape[-2:]
    for crop, stride in zip(cropsizes, strides, strict=True):
        h_grids = max(oH - crop + stride - 1, 0) // stride + 1
        w_grids = max(oW - crop + stride - 1, 0) // stride + 1
        for h_idx in range(h_grids):
            for w_idx in range(w_grids):
                y1, x1 = h_idx * stride, w_idx * stride
                y2, x2 = min(y1 + crop, oH), min(x1 + crop, oW)
                y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
                crops.append((imgt[:, y1:y2, x1:x2], x1, y1, x2, y2))
    crops.append((imgt, 0, 0, oW, oH))
    return crops


class FakeExtractor:
    """Features = a fixed random 1x1 conv of the crop, average-pooled by 4 (the same for both paths)."""

    key, device = "fake", torch.device("cpu")

    def __init__(self, d=6):
        self.w = torch.randn(d, 3, 1, 1, generator=torch.Generator().manual_seed(5))

    def crop_features(self, crop, generator=None):
        return F.avg_pool2d(F.conv2d(crop[None], self.w), 4, ceil_mode=True)[0]


@pytest.mark.parametrize("h, w", [(48, 64), (40, 40), (20, 33)])
def test_crops_scoring_and_labels_match_the_release(h, w):
    assert [(y1, x1, y2, x2) for _, x1, y1, x2, y2 in port_crops(torch.zeros(3, h, w), [32, 24], [16, 16])] == \
        crop_boxes(h, w, (32, 24), (16, 16))
    classes = ["cat", "sky", "dog"]
    bank = assemble_prototypes(_random_protos(classes, seed=4, nan_row=False), classes, ["sky"])
    ov = OVDiff(create_backbone("test_sd"), extractors=[FakeExtractor()], progress=False, size=h,
                crops=(32, 24), strides=(16, 16))
    ov.classes, ov.stuff, ov.banks = classes, ["sky"], [bank]
    image = torch.rand(3, h, w, generator=torch.Generator().manual_seed(6))
    keep = torch.tensor([True, True, False])
    mine = ov.scores(image, keep)
    ext = FakeExtractor()
    exp, exp_labels = port_predict_scores(port_crops(image, [32, 24], [16, 16]),
                                          lambda c: ext.crop_features(c).permute(1, 2, 0), bank.protos, bank.mask,
                                          keep[None], (h + 7, w + 5), 4)
    torch.testing.assert_close(mine, exp, rtol=1e-5, atol=1e-6)
    assert torch.equal(labels_from_scores(mine, (h + 7, w + 5)), exp_labels)
    assert (mine[3] == -1).all()  # dog is not kept
    # one crop through score_features against the port's masked max
    f = ext.crop_features(image[:, :32, :32])
    s = score_features(f, bank, keep)
    sim = torch.einsum("fhw,lckf->lckhw", f / f.norm(dim=0, keepdim=True), bank.protos)
    sim = torch.where((bank.mask & keep[None, :, None])[..., None, None], sim, torch.tensor(-1.0)).max(2).values
    torch.testing.assert_close(s, torch.cat([sim[0].max(0, keepdim=True).values, sim[1]]), rtol=1e-5, atol=1e-6)


# ============================================================================ ports: CLIP filter (utils/clip_class.py)
def port_clip_thresh(img_embs, text_embed, classes, topk, conn=" and "):
    """utils/clip_class.py:150-187 CLIPClassifierThresh.forward (embeddings given)."""
    def powerset(iterable):  # clip_class.py:12-15
        s = list(iterable)
        return chain.from_iterable(combinations(s, r) for r in range(1, len(s) + 1))

    cls_text_emb = text_embed(["a " + c for c in classes])  # :89-93
    lbl_scores = img_embs @ cls_text_emb.T  # :155
    probs = torch.softmax(lbl_scores, dim=-1).squeeze()  # :156-158
    tp = probs >= (1 / len(classes))
    pred_class_inds_fs = torch.where(tp)[0].cpu().tolist()
    if len(pred_class_inds_fs) == 0:  # :160-161
        pred_class_inds_fs = (torch.topk(lbl_scores, topk, dim=-1).indices).cpu().squeeze().tolist()
    if len(pred_class_inds_fs) > topk:  # :169-171
        _probs = torch.where(tp, probs, torch.zeros_like(probs))
        pred_class_inds_fs = (torch.topk(_probs, topk, dim=-1).indices).cpu().squeeze().tolist()
    second_stage_combs = list(powerset(pred_class_inds_fs))  # :173-176
    prompts = [conn.join(["a " + classes[cid] for cid in comb]) for comb in second_stage_combs]
    text_embs = text_embed(prompts)
    text_embs = text_embs / text_embs.norm(dim=-1, keepdim=True)
    pred_ind = (img_embs @ text_embs.T).squeeze().argmax(dim=-1).item()  # :178-179
    return list(second_stage_combs[pred_ind])


def _hash_text_encoder(d=8):
    def encode(texts):
        out = []
        for t in texts:  # a fixed pseudo-random unit vector per word, summed over the words of the text
            v = torch.zeros(d)
            for word in t.split():
                v += torch.randn(d, generator=torch.Generator().manual_seed(sum(map(ord, word)) * 31 + len(word)))
            out.append(v / v.norm())
        return torch.stack(out)

    return encode


@pytest.mark.parametrize("topk, seed", [(10, 0), (10, 1), (2, 2), (3, 3)])
def test_clip_subset_filter_matches_the_release(topk, seed):
    classes = ["cat", "dog", "car", "tree", "person", "boat", "potted plant"]
    enc = _hash_text_encoder()
    img = F.normalize(torch.randn(8, generator=torch.Generator().manual_seed(seed)), dim=0)
    mine = select_classes(img, enc, classes, topk=topk)
    exp = port_clip_thresh(img[None], enc, classes, topk)
    assert mine == exp and 1 <= len(mine) <= topk


def test_clip_and_eval_resizing_match_the_release():
    import torchvision.transforms as T
    import torchvision.transforms.functional as TF

    pil = Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8))
    img = torch.from_numpy(np.array(pil)).permute(2, 0, 1).float() / 255
    # predict.py:40 EvalDataset: TF.resize(PIL, 448, LANCZOS) (short side), here 24
    exp = TF.to_tensor(TF.resize(pil, size=24, interpolation=TF.InterpolationMode.LANCZOS))
    small = resize_for_inference(img, 24)
    torch.testing.assert_close(small, exp)
    # mmdata.py:79-84 prep_sample (512x512 LANCZOS) + clip_class.py:27-32 aug (Resize 224; tv 0.13: no antialias on tensors)
    ref = TF.to_tensor(TF.resize(TF.to_pil_image((small * 255).round().byte()), (512, 512),
                                 interpolation=TF.InterpolationMode.LANCZOS))
    ref = T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))(
        T.Resize((224, 224), antialias=False)(ref[None]))
    torch.testing.assert_close(clip_input(small), ref, rtol=1e-5, atol=1e-5)


# ============================================================================ ports: features (sd.py, utils/extractor.py)
class PortFeatureCapture:
    """sd.py:290-329 FeatureCapture with sd.py:265-287 FeatStore (layer_spec filter, bilinear to feat_size)."""

    def __init__(self, name, store):
        self.name, self.store = name, store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
        batch_size, sequence_length, _ = hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        query = attn.to_q(hidden_states)
        self.store(self.name, query)  # :300-301
        encoder_hidden_states = encoder_hidden_states if encoder_hidden_states is not None else hidden_states
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        query, key, value = attn.head_to_batch_dim(query), attn.head_to_batch_dim(key), attn.head_to_batch_dim(value)
        probs = attn.get_attention_scores(query, key, attention_mask)
        return attn.to_out[1](attn.to_out[0](attn.batch_to_head_dim(torch.bmm(probs, value))))


def port_sd_support_features(bb, img, layer_spec, feat_size, timestep=200, seed=43):
    """gen_proto_sd.py:247-258 -> sd.py:814-820 encode, :779-792 extract_features, :265-287 FeatStore."""
    from diffusers import DDPMScheduler

    feats_out = []

    def store(name, f):
        if name not in layer_spec:
            return
        b, n_tok, d = f.shape
        hw = int(math.sqrt(n_tok))
        fm = f.transpose(-1, -2).reshape(-1, d, hw, hw).float()
        feats_out.append(fm if hw == feat_size[0] else F.interpolate(fm, size=feat_size, mode="bilinear", align_corners=False))

    gen = torch.Generator().manual_seed(seed)  # gen_proto_sd.py:247-249
    latents = bb.vae.encode(2 * img[None] - 1).latent_dist.sample(generator=gen) * bb.vae.config.scaling_factor
    gen = torch.Generator().manual_seed(seed)  # :255-257
    unet = bb.unet
    original = dict(unet.attn_processors)
    unet.set_attn_processor({n: PortFeatureCapture(n, store) for n in unet.attn_processors})  # sd.py:781-786
    try:
        scheduler = DDPMScheduler.from_config(bb.scheduler.config)  # sd.py:787-789
        t = torch.tensor(timestep, dtype=torch.long)
        noisy = scheduler.add_noise(latents, torch.randn(latents.shape, generator=gen, dtype=latents.dtype), t)
        ids = bb.tokenizer("", padding="max_length", max_length=bb.tokenizer.model_max_length, truncation=True,
                           return_tensors="pt").input_ids  # sd.py:769-777: the empty prompt
        unet(noisy, t, encoder_hidden_states=bb.text_encoder(ids)[0])
    finally:
        unet.set_attn_processor(dict(original))
    return torch.cat(feats_out, dim=1)[0]  # sd.py:287


def test_sd_query_features_match_the_release():
    bb = create_backbone("test_sd")
    ext = create_extractor("sd", bb)
    names = [n.replace(".to_q", ".processor") for n in ext.layers]
    assert len(names) == 9 and names[0].startswith("down_blocks.0.attentions.0") and names[-1].startswith("up_blocks.3.attentions.2")
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    mine = ext.support_features(images)
    for i in range(2):
        exp = port_sd_support_features(bb, images[i], names, (16, 16))
        torch.testing.assert_close(mine[i], exp, rtol=1e-4, atol=1e-5)


def port_vit_keys(model, imgt, layer, patch, stride):
    """utils/extractor.py StridedViTExtractor: DINO prepare_tokens with _fix_pos_enc (:549-578), key hook
    (:610-617), extract_descriptors (:760-787), then gen_vit_features.py:17-30 reshape to (B, d*h, fH, fW)."""
    b, c, h, w = imgt.shape
    x = model.patch_embed.proj(imgt).flatten(2).transpose(1, 2)  # DINO PatchEmbed
    x = torch.cat((model.cls_token.expand(b, -1, -1), x), dim=1)
    npatch, N = x.shape[1] - 1, model.pos_embed.shape[1] - 1
    if npatch == N and w == h:
        pos = model.pos_embed
    else:
        w0, h0 = 1 + (h - patch) // stride, 1 + (w - patch) // stride  # DINO passes (w, h) = (H, W)
        w0, h0 = w0 + 0.1, h0 + 0.1
        pp = F.interpolate(model.pos_embed[:, 1:].reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), -1).permute(0, 3, 1, 2),
                           scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)), mode="bicubic", align_corners=False,
                           recompute_scale_factor=False)
        pos = torch.cat((model.pos_embed[:, 0].unsqueeze(0), pp.permute(0, 2, 3, 1).view(1, -1, x.shape[-1])), dim=1)
    x = model.norm_pre(x + pos)
    feats = []

    def hook(module, inp, out):  # :610-617
        inp = inp[0]
        B, Nt, C = inp.shape
        qkv = module.qkv(inp).reshape(B, Nt, 3, module.num_heads, C // module.num_heads).permute(2, 0, 3, 1, 4)
        feats.append(qkv[1])

    handle = model.blocks[layer].attn.register_forward_hook(hook)
    try:
        for blk in model.blocks:
            x = blk(x)
    finally:
        handle.remove()
    k = feats[0][:, :, 1:, :]  # drop cls
    desc = k.permute(0, 2, 3, 1).flatten(start_dim=-2, end_dim=-1).unsqueeze(dim=1)  # Bx1xtx(dxh)
    fW, fH = w // stride - patch // stride + 1, h // stride - patch // stride + 1
    return desc.squeeze(1).transpose(1, 2).reshape(b, -1, fH, fW)


@pytest.mark.parametrize("name", ["test_dino", "test_clip"])
@pytest.mark.parametrize("size", [(32, 32), (24, 40)])
def test_vit_key_features_match_the_release(name, size):
    model, layer = create_vit(name)
    ext = ViTKeyExtractor(model, layer=layer, name=name)
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(8))
    mine = ext.keys(x)  # (1, C, gh, gw), channels = heads x head_dim
    exp = port_vit_keys(model, x, layer, 8, 8)  # channels = head_dim x heads
    heads = model.blocks[0].attn.num_heads
    hd = mine.shape[1] // heads
    perm = [h_ * hd + d_ for d_ in range(hd) for h_ in range(heads)]
    torch.testing.assert_close(mine[:, perm], exp, rtol=1e-4, atol=1e-5)


# ============================================================================ ports: MaskCut (CutLER/maskcut/maskcut.py)
def port_maskcut_forward(feats, dims, tau=0.15, N=3):
    """CutLER/maskcut/maskcut.py:38-156 (cpu=True), TokenCut detect_box (object_discovery.py:67-94), metric.IoU."""
    def get_affinity_matrix(feats, tau, eps=1e-5):  # :38-47
        feats = F.normalize(feats, p=2, dim=0)
        A = (feats.transpose(0, 1) @ feats).cpu().numpy()
        A = A > tau
        A = np.where(A.astype(float) == 0, eps, A)
        return A, np.diag(np.sum(A, axis=1))

    def iou(m1, m2):  # metric.py:5-9
        m1, m2 = (m1 > 0.5).to(torch.bool), (m2 > 0.5).to(torch.bool)
        return (torch.sum(m1 * (m1 == m2)).to(torch.float) / torch.sum(m1 + m2)).mean().item()

    bipartitions, current_mask, ps = [], None, None  # loop-carried, as in maskcut_forward
    for i in range(N):
        if i == 0:
            painting = torch.from_numpy(np.zeros(dims))
        else:  # :69-77 get_masked_affinity_matrix
            painting = painting + current_mask.unsqueeze(0)
            painting[painting > 0] = 1
            painting[painting <= 0] = 0
            feats = ((1 - painting) * feats.clone().view(feats.shape[0], ps, ps)).view(feats.shape[0], -1)
        A, D = get_affinity_matrix(feats, tau)
        _, eigenvectors = eigh(D - A, D, subset_by_index=[1, 2])  # :49-54
        eigenvec = np.copy(eigenvectors[:, 0])
        second_smallest_vec = eigenvectors[:, 0]
        bipartition = second_smallest_vec > np.sum(second_smallest_vec) / len(second_smallest_vec)  # :56-60
        seed = np.argmax(np.abs(second_smallest_vec))
        b_ = bipartition.reshape(dims)  # :62-67
        nc = int(b_[0][0]) + int(b_[0][-1]) + int(b_[-1][0]) + int(b_[-1][-1])
        reverse = True if nc >= 3 else bipartition[seed] != 1
        if reverse:
            eigenvec = eigenvec * -1
            bipartition = np.logical_not(bipartition)
            seed = np.argmax(eigenvec)
        else:
            seed = np.argmax(second_smallest_vec)
        bipartition = bipartition.reshape(dims).astype(float)
        objects, _ = ndimage.label(bipartition)  # detect_box
        cc = np.where(objects == objects[np.unravel_index(seed, dims)])
        pseudo_mask = np.zeros(dims)
        pseudo_mask[cc[0], cc[1]] = 1
        pseudo_mask = torch.from_numpy(pseudo_mask)
        ps = pseudo_mask.shape[0]
        if i >= 1:  # :134-139
            ratio = torch.sum(pseudo_mask) / pseudo_mask.size()[0] / pseudo_mask.size()[1]
            if iou(current_mask, pseudo_mask) > 0.5 or ratio <= 0.01:
                pseudo_mask = torch.from_numpy(np.zeros(dims))
        current_mask = pseudo_mask
        masked_out = 0 if len(bipartitions) == 0 else np.sum(bipartitions, axis=0)  # :143-147
        bm = pseudo_mask.numpy() - masked_out
        bm[bm <= 0] = 0
        bipartitions.append(bm)
    return [b.astype(bool) for b in bipartitions if b.any()]


@pytest.mark.parametrize("backend", ["scipy", "torch"])
def test_maskcut_matches_the_release(backend):
    g = torch.Generator().manual_seed(9)
    h = w = 12
    centres = torch.eye(16)[:4] * 3  # orthogonal clusters: cosine between them ~0 < tau
    labels = torch.zeros(h, w, dtype=torch.long)
    labels[2:7, 2:8], labels[7:11, 6:11], labels[0:3, 9:12] = 1, 2, 3
    feats = (centres[labels].permute(2, 0, 1) + 0.3 * torch.randn(16, h, w, generator=g)).double()
    mine = maskcut(feats, num_masks=3, tau=0.15, backend=backend)
    exp = port_maskcut_forward(feats.reshape(16, -1).clone(), (h, w))
    assert len(mine) == len(exp) >= 2
    for m, e in zip(mine, exp, strict=True):
        assert torch.equal(m, torch.from_numpy(e))
    assert all(any(torch.equal(m, labels == k) for k in (1, 2, 3)) for m in mine)  # whole objects, exactly


# ============================================================================ ports: PAMR (utils/pamr.py)
def port_pamr(x, mask, num_iter=10, dilations=(1, 2, 4, 8, 12, 24)):
    """utils/pamr.py:10-147: LocalAffinity kernels as replicate-padded dilated convolutions."""
    def kernel(kind):
        if kind == "std":  # :76-95, 9 positions
            w_ = torch.zeros(9, 1, 3, 3)
            for i in range(9):
                w_[i, 0, i // 3, i % 3] = 1
            return w_
        w_ = torch.zeros(8, 1, 3, 3)
        pos = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2)]
        for i, (a, b) in enumerate(pos):
            if kind == "aff":  # :18-38: centre 1, neighbour -1
                w_[i, 0, 1, 1] = 1
                w_[i, 0, a, b] = -1
            else:  # :56-74 copy
                w_[i, 0, a, b] = 1
        return w_

    def local(x, kind):  # :40-54
        B, K, H, W = x.size()
        x = x.view(B * K, 1, H, W)
        k = kernel(kind)
        s = k.shape[0]
        out = torch.empty(B * K, len(dilations) * s, H, W)
        for i, d in enumerate(dilations):
            out[:, i * s:(i + 1) * s] = F.conv2d(F.pad(x, [d] * 4, mode="replicate"), k, dilation=d)
        return out.view(B, K, -1, H, W)

    mask = F.interpolate(mask, size=x.size()[-2:], mode="bilinear", align_corners=True)  # :129
    x_std = local(x, "std").std(2, keepdim=True)  # :136, :97-102
    x = -local(x, "aff").abs() / (1e-8 + 0.1 * x_std)  # :138, :104-108
    x = F.softmax(x.mean(1, keepdim=True), 2)  # :139-140
    for _ in range(num_iter):  # :142-144
        mask = (local(mask, "copy") * x).sum(2)
    return mask


def test_pamr_matches_the_release():
    g = torch.Generator().manual_seed(10)
    img = torch.rand(1, 3, 30, 26, generator=g) * 255
    scores = torch.rand(1, 4, 15, 13, generator=g) * 2 - 1
    torch.testing.assert_close(pamr(img, scores), port_pamr(img, scores), rtol=1e-4, atol=1e-5)


# ============================================================================ mIoU as mmseg computes it
def port_mmseg_miou(preds, gts, num_classes, ignore_index=255):
    """mmseg 0.30 core/evaluation/metrics.py intersect_and_union + total_area_to_metrics; mean = nanmean (predict.py:680)."""
    ti, tu = torch.zeros(num_classes, dtype=torch.float64), torch.zeros(num_classes, dtype=torch.float64)
    for pred, label in zip(preds, gts, strict=True):
        mask = label != ignore_index
        pred, label = pred[mask], label[mask]
        intersect = pred[pred == label]
        area_i = torch.histc(intersect.float(), bins=num_classes, min=0, max=num_classes - 1)
        area_p = torch.histc(pred.float(), bins=num_classes, min=0, max=num_classes - 1)
        area_l = torch.histc(label.float(), bins=num_classes, min=0, max=num_classes - 1)
        ti += area_i
        tu += area_p + area_l - area_i
    return float(np.nanmean((ti / tu).numpy()))


def test_segmetrics_is_mmseg_miou():
    from diffperc.metrics import SegMetrics

    g = torch.Generator().manual_seed(11)
    preds = [torch.randint(0, 5, (9, 7), generator=g) for _ in range(3)]
    gts = [torch.randint(0, 4, (9, 7), generator=g) for _ in range(3)]  # class 4 never in the labels
    gts[0][:2] = 255
    m = SegMetrics(6, ignore_index=255)  # class 5: in neither -> NaN, left out
    for p, t in zip(preds, gts, strict=True):
        m.update(p[None], t[None])
    assert abs(float(m.compute()["miou"]) - port_mmseg_miou(preds, gts, 6)) < 1e-6


def test_bank_rejects_features_of_another_extractor():
    bank = PrototypeBank(torch.zeros(2, 1, 1, 4), torch.ones(2, 1, 1, dtype=torch.bool), ["cat"])
    with pytest.raises(ValueError, match="channels"):
        score_features(torch.zeros(5, 2, 2), bank)
