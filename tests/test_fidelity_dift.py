"""Fidelity: diffperc's DIFT correspondence against a literal port of Tsingularity/dift.

The port re-implements ``python eval_spair.py --dift_model sd`` (src/models/dift_sd.py
SDFeaturizer4Eval / OneStepSDPipeline / MyUNet2DConditionModel, eval_spair.py), ported to
current diffusers, on the tiny SD 2.x-shaped parts of ``tiny_sd_components(sd2=True)``
(v-prediction, as SD 2.1), with ``--img_size 64 64`` instead of 768 (the tiny VAE downsamples
2x) and DIFT's other defaults (t=261, up_ft_index 1, ensemble 8).

The one deliberate change: DIFT draws the posterior sample and the noise of each image from
one unseeded global RNG stream (``latent_dist.sample()`` then ``torch.randn_like``); the port
seeds that stream before each image with the seed diffperc documents for it
(``image_seed(seed, image id)``), so both draw the same numbers in the same order.

Checked: per-image features (rel err <= 1e-4), per-keypoint matches (identical), per-image
and per-point PCK@0.1, overall and per category (identical).
"""

from __future__ import annotations

import json
import os
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer
from PIL import Image
from spair_format import write_spair
from torch import nn

from diffperc.backbones.tiny import tiny_sd_components
from diffperc.data.correspondence import CorrespondenceDataModule, collate_pairs
from diffperc.tasks.correspondence import CorrespondenceTask

IMG_SIZE, T, UP_FT_INDEX, ENSEMBLE, SEED = [64, 64], 261, 1, 8, 0
SIZES = {"bird": [(90, 60), (50, 70), (64, 64)], "cow": [(80, 48), (56, 72)]}  # (W, H)
PAIRS = {"bird": [(0, 1), (1, 2), (2, 2), (0, 0)], "cow": [(0, 1), (1, 1)]}


def image_seed(seed: int, key: str) -> int:
    """diffperc's documented per-image seed: (seed * 1_000_003 + crc32(key)) mod 2**63."""
    return (seed * 1_000_003 + zlib.crc32(key.encode("utf-8"))) % 2**63


class PortSDFeaturizer4Eval:
    """src/models/dift_sd.py:162-291 on tiny components."""

    def __init__(self, cat_list: list[str]) -> None:
        from diffusers import DDIMScheduler

        parts = tiny_sd_components(seed=0, sd2=True)
        self.vae, self.unet, self.tokenizer, self.text_encoder = (parts[k] for k in ("vae", "unet", "tokenizer",
                                                                                     "text_encoder"))
        self.scheduler = DDIMScheduler.from_config(parts["scheduler"].config)  # dift_sd.py:195
        self.null_prompt_embeds = self._encode_prompt("")  # :200-206
        self.cat2prompt_embeds = {cat: self._encode_prompt(f"a photo of a {cat}") for cat in cat_list}  # :250-260

    @torch.no_grad()
    def _encode_prompt(self, prompt: str) -> torch.Tensor:
        """StableDiffusionPipeline._encode_prompt (diffusers 0.15, no CFG): padded ids -> text_encoder(...)[0]."""
        ids = self.tokenizer(prompt, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids)[0]  # [1, 77, dim]

    @torch.no_grad()
    def pipe(self, img_tensor: torch.Tensor, t: int, up_ft_indices: list[int], prompt_embeds: torch.Tensor) -> dict:
        """OneStepSDPipeline.__call__, dift_sd.py:176-187."""
        latents = self.vae.encode(img_tensor).latent_dist.sample() * self.vae.config.scaling_factor  # :178
        t = torch.tensor(t, dtype=torch.long)  # :179
        # :180 randn_like follows the latents' memory format: DIFT's CUDA VAE gives contiguous NCHW latents,
        # the tiny VAE on a CPU gives channels-last ones, so the port makes them contiguous first
        noise = torch.randn_like(latents.contiguous())
        latents_noisy = self.scheduler.add_noise(latents, noise, t)  # :181
        return self.unet_forward(latents_noisy, t, up_ft_indices, prompt_embeds)  # :182-186

    def unet_forward(self, sample, timestep, up_ft_indices, encoder_hidden_states) -> dict:
        """MyUNet2DConditionModel.forward (dift_sd.py:15-160): ``up_ft[i]`` = output of ``up_blocks[i]``.

        The copied forward runs diffusers 0.15's UNet until the last wanted up block; in current
        diffusers the same tensors are the outputs of the up blocks, read with forward hooks.
        """
        up_ft = {}
        hooks = [self.unet.up_blocks[i].register_forward_hook(
            lambda m, a, out, i=i: up_ft.__setitem__(i, out.detach())) for i in up_ft_indices]  # :155-156
        try:
            self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states)
        finally:
            for h in hooks:
                h.remove()
        return {"up_ft": up_ft}

    @torch.no_grad()
    def forward(self, img: Image.Image, category=None, img_size=IMG_SIZE, t=T, up_ft_index=UP_FT_INDEX,
                ensemble_size=ENSEMBLE) -> torch.Tensor:
        """dift_sd.py:268-291."""
        if img_size is not None:
            img = img.resize(img_size)  # :276-277 (PIL's default filter: bicubic)
        from torchvision.transforms import PILToTensor

        img_tensor = (PILToTensor()(img) / 255.0 - 0.5) * 2  # :278
        img_tensor = img_tensor.unsqueeze(0).repeat(ensemble_size, 1, 1, 1)  # :279
        prompt_embeds = self.cat2prompt_embeds.get(category, self.null_prompt_embeds)  # :280-283
        prompt_embeds = prompt_embeds.repeat(ensemble_size, 1, 1)  # :284
        unet_ft_all = self.pipe(img_tensor=img_tensor, t=t, up_ft_indices=[up_ft_index], prompt_embeds=prompt_embeds)
        unet_ft = unet_ft_all["up_ft"][up_ft_index]  # ensem, c, h, w  (:290)
        return unet_ft.mean(0, keepdim=True)  # 1, c, h, w  (:291)


def port_eval_spair(dataset_path: str) -> dict:
    """eval_spair.py:14-133 (features computed once per distinct image, then every pair matched)."""
    test_path = "PairAnnotation/test"
    json_list = sorted(os.listdir(os.path.join(dataset_path, test_path)))  # :24 (listdir; sorted: deterministic)
    all_cats = sorted(os.listdir(os.path.join(dataset_path, "JPEGImages")))  # :25
    cat2json = {cat: [i for i in json_list if cat in i] for cat in all_cats}  # :26-33
    cat2img = {}
    for cat in all_cats:  # :36-49
        cat2img[cat] = []
        for json_path in cat2json[cat]:
            with open(os.path.join(dataset_path, test_path, json_path)) as temp_f:
                data = json.load(temp_f)
            for name in (data["src_imname"], data["trg_imname"]):
                if name not in cat2img[cat]:
                    cat2img[cat].append(name)
    dift = PortSDFeaturizer4Eval(cat_list=all_cats)  # :51-52
    features = {}
    for cat in all_cats:  # :58-69
        for image_path in cat2img[cat]:
            path = os.path.join(dataset_path, "JPEGImages", cat, image_path)
            torch.manual_seed(image_seed(SEED, path))  # the one change: the global stream seeded per image
            features[(cat, image_path)] = dift.forward(Image.open(path), category=cat)
    out = {"total_pck": [], "all_correct": 0, "all_total": 0, "features": features, "matches": {}}
    for cat in all_cats:  # :75-131
        cat_pck, cat_correct, cat_total = [], 0, 0
        for json_path in cat2json[cat]:
            with open(os.path.join(dataset_path, test_path, json_path)) as temp_f:
                data = json.load(temp_f)
            src_img_size = data["src_imsize"][:2][::-1]  # :88-89
            trg_img_size = data["trg_imsize"][:2][::-1]
            src_ft = nn.Upsample(size=src_img_size, mode="bilinear")(features[(cat, data["src_imname"])])  # :94-95
            trg_ft = nn.Upsample(size=trg_img_size, mode="bilinear")(features[(cat, data["trg_imname"])])
            h, w = trg_ft.shape[-2], trg_ft.shape[-1]
            trg_bndbox = data["trg_bndbox"]
            threshold = max(trg_bndbox[3] - trg_bndbox[1], trg_bndbox[2] - trg_bndbox[0])  # :99-100
            total = correct = 0
            matches = []
            for idx in range(len(data["src_kps"])):  # :105-125
                total += 1
                cat_total += 1
                out["all_total"] += 1
                src_point, trg_point = data["src_kps"][idx], data["trg_kps"][idx]
                num_channel = src_ft.size(1)
                src_vec = src_ft[0, :, src_point[1], src_point[0]].view(1, num_channel)  # 1, C
                trg_vec = trg_ft.view(num_channel, -1).transpose(0, 1)  # HW, C
                src_vec = F.normalize(src_vec).transpose(0, 1)  # c, 1
                trg_vec = F.normalize(trg_vec)  # HW, c
                cos_map = torch.mm(trg_vec, src_vec).view(h, w).cpu().numpy()  # H, W
                max_yx = np.unravel_index(cos_map.argmax(), cos_map.shape)
                matches.append((int(max_yx[1]), int(max_yx[0])))
                dist = ((max_yx[1] - trg_point[0]) ** 2 + (max_yx[0] - trg_point[1]) ** 2) ** 0.5
                if (dist / threshold) <= 0.1:
                    correct += 1
                    cat_correct += 1
                    out["all_correct"] += 1
            cat_pck.append(correct / total)
            out["matches"][json_path[: -len(".json")]] = matches
        out["total_pck"].extend(cat_pck)
        out[f"{cat}/per_image"], out[f"{cat}/per_point"] = np.mean(cat_pck), cat_correct / cat_total  # :130-131
    out["per_image"] = np.mean(out["total_pck"])  # :132
    out["per_point"] = out["all_correct"] / out["all_total"]  # :133
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = write_spair(tmp_path_factory.mktemp("dift") / "SPair-71k", SIZES, PAIRS, seed=5)
    port = port_eval_spair(str(root))
    task = CorrespondenceTask("test_sd2", {"layers": "dift", "timestep": T, "add_noise": True,
                                           "ensemble_size": ENSEMBLE, "latent_sample": "sample"},
                              method="dift", prompt="a photo of a {category}", alphas=(0.1,), seed=SEED)
    dm = CorrespondenceDataModule("spair", str(root), image_size=IMG_SIZE[0], batch_size=2)
    Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
            enable_checkpointing=False, default_root_dir=root.parent).test(task, datamodule=dm, verbose=False)
    return port, task, dm


def test_features_match_the_port(runs):
    port, task, dm = runs
    ds = dm.datasets["test"]
    seen = set()
    for it in (ds[i] for i in range(len(ds))):
        for side in ("src", "trg"):
            cat, name = it["category"], os.path.basename(it[f"{side}_id"])
            if (cat, name) in seen:
                continue
            seen.add((cat, name))
            ours = task.image_features(it[f"{side}_image"], cat, it[f"{side}_id"])[0]
            ref = port["features"][(cat, name)][0]
            assert ours.shape == ref.shape == (16, 16, 16)  # up_blocks.1 output of the tiny UNet: 1/4 of 64 px
            torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
    assert len(seen) == sum(len(v) for v in SIZES.values())


def test_matches_match_the_port(runs):
    port, task, dm = runs
    ds = dm.datasets["test"]
    for i in range(len(ds)):
        batch = collate_pairs([ds[i]])
        pred, _ = task.match_pair(batch, 0)
        assert pred.tolist() == [list(map(float, m)) for m in port["matches"][batch["name"][0]]], batch["name"][0]


def test_pck_matches_the_port(runs):
    port, task, _ = runs
    res = task.results
    assert res["pck@0.1/per_image"] == pytest.approx(port["per_image"], abs=1e-12)
    assert res["pck@0.1/per_keypoint"] == pytest.approx(port["per_point"], abs=1e-12)
    for cat in SIZES:
        assert res[f"{cat}/pck@0.1/per_image"] == pytest.approx(port[f"{cat}/per_image"], abs=1e-12)
        assert res[f"{cat}/pck@0.1/per_keypoint"] == pytest.approx(port[f"{cat}/per_point"], abs=1e-12)
    assert 0 < port["per_point"] < 1  # self-pairs match, the others mostly not: a number that can move
    # the cache: every distinct image featurised once, for both of its pairs
    assert task.cache.misses == sum(len(v) for v in SIZES.values())
