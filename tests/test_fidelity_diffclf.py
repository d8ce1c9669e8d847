"""The Diffusion Classifier and its image-text matching against literal ports of the released code.

Upstream (read with ``git show HEAD:<file>`` in the mirrors):
- diffusion-classifier/diffusion-classifier @ e9f772d (Li et al., ICCV 2023): eval_prob_adaptive.py
  (``get_transform``, ``eval_prob_adaptive``, ``eval_error``, ``main``), diffusion/models.py
  (``get_scheduler_config``), diffusion/datasets.py (CIFAR-10 through torchvision), run_winoground.py
  (``eval_prob`` and the scores), scripts/save_noise.py.
- McGill-NLP/diffusion-itm @ 7d5a9c0 (DiffusionITM, Krojer et al. 2023): diffusion_itm.py (``score_batch``,
  ``main``) and its diffusers fork McGill-NLP/diffusers @ 8ad50fd:
  src/diffusers/pipelines/stable_diffusion/pipeline_stable_diffusion_img2img.py (``__call__``,
  ``prepare_latents``), src/diffusers/schedulers/scheduling_euler_discrete.py.

Each ``_port_*`` function re-implements one upstream function step by step (same order of operations,
constants, resizes), ported to current diffusers/torch, on tiny random SD-shaped models; diffperc is used
only to build those components (and, for the data step, to load the files under test). The ports take the
saved-noise paths of the scripts (``--noise_path``), which is the sharing diffperc implements.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as torch_transforms
from diffusers import EulerDiscreteScheduler
from PIL import Image
from torchvision.transforms.functional import InterpolationMode

from diffperc.backbones.registry import create_backbone
from diffperc.data.classification import Cifar10Dataset
from diffperc.zeroshot.classifier import DiffusionClassifier, evenly_spaced
from diffperc.zeroshot.matching import image_text_errors, winoground_scores

CLASSES = ["cat", "dog", "bird", "fish"]
SD_SCALE = 0.18215  # eval_prob_adaptive.py:240 and run_winoground.py:176 hard-code SD's scaling factor


# ---------------------------------------------------------------------------- ports: diffusion-classifier
def _port_get_transform(interpolation=InterpolationMode.BICUBIC, size=512):
    """eval_prob_adaptive.py:24-36 (``_convert_image_to_rgb``, ``get_transform``), literally."""
    return torch_transforms.Compose([
        torch_transforms.Resize(size, interpolation=interpolation),
        torch_transforms.CenterCrop(size),
        lambda image: image.convert("RGB"),
        torch_transforms.ToTensor(),
        torch_transforms.Normalize([0.5], [0.5]),
    ])


def _port_scheduler() -> EulerDiscreteScheduler:
    """diffusion/models.py:52-66 (``get_scheduler_config`` for '2-0'); models.py:26 builds Euler. Only
    ``alphas_cumprod`` is used (eval_prob_adaptive.py:107-108)."""
    config = {"_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
              "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
              "prediction_type": "epsilon", "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
              "trained_betas": None}
    return EulerDiscreteScheduler.from_config(config)


def _port_text_embeddings(tokenizer, text_encoder, prompts):
    """eval_prob_adaptive.py:200-209: pad to max length, truncate, text_encoder(...)[0] in chunks of 100."""
    text_input = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                           return_tensors="pt")
    embeddings = []
    with torch.inference_mode():
        for i in range(0, len(text_input.input_ids), 100):
            embeddings.append(text_encoder(text_input.input_ids[i : i + 100])[0])
    return torch.cat(embeddings, dim=0)


def _port_latent(vae, img_input):
    """eval_prob_adaptive.py:239-240: posterior mean times 0.18215."""
    with torch.no_grad():
        x0 = vae.encode(img_input).latent_dist.mean
        x0 *= SD_SCALE
    return x0


def _port_eval_error(unet, scheduler, latent, all_noise, ts, noise_idxs, text_embeds, text_embed_idxs,
                     batch_size=32, loss="l2"):
    """eval_prob_adaptive.py:98-122 (``eval_error``), fp32 on the CPU."""
    assert len(ts) == len(noise_idxs) == len(text_embed_idxs)
    pred_errors = torch.zeros(len(ts), device="cpu")
    idx = 0
    with torch.inference_mode():
        for _ in range(len(ts) // batch_size + int(len(ts) % batch_size != 0)):
            batch_ts = torch.tensor(ts[idx : idx + batch_size])
            noise = all_noise[noise_idxs[idx : idx + batch_size]]
            noised_latent = latent * (scheduler.alphas_cumprod[batch_ts] ** 0.5).view(-1, 1, 1, 1) + \
                noise * ((1 - scheduler.alphas_cumprod[batch_ts]) ** 0.5).view(-1, 1, 1, 1)  # :107-108
            text_input = text_embeds[text_embed_idxs[idx : idx + batch_size]]  # :110
            noise_pred = unet(noised_latent, batch_ts, encoder_hidden_states=text_input).sample  # :111
            if loss == "l2":  # :112-119
                error = F.mse_loss(noise, noise_pred, reduction="none").mean(dim=(1, 2, 3))
            elif loss == "l1":
                error = F.l1_loss(noise, noise_pred, reduction="none").mean(dim=(1, 2, 3))
            elif loss == "huber":
                error = F.huber_loss(noise, noise_pred, reduction="none").mean(dim=(1, 2, 3))
            else:
                raise NotImplementedError
            pred_errors[idx : idx + len(batch_ts)] = error.detach().cpu()
            idx += len(batch_ts)
    return pred_errors


def _port_timesteps(T, n_samples):
    """eval_prob_adaptive.py:58-59 and :65 (before :66 drops evaluated ones): the grid and each round's set."""
    max_n_samples = max(n_samples)
    start = T // max_n_samples // 2
    t_to_eval = list(range(start, T, T // max_n_samples))[:max_n_samples]
    rounds = [t_to_eval[len(t_to_eval) // n // 2 :: len(t_to_eval) // n][:n] for n in n_samples]
    return t_to_eval, rounds


def _port_eval_prob_adaptive(unet, latent, text_embeds, scheduler, n_samples, to_keep, all_noise, loss="l2",
                             n_trials=1, batch_size=32):
    """eval_prob_adaptive.py:44-95 (``eval_prob_adaptive``) with a given ``all_noise`` (``--noise_path``).

    Also returns ``noise_of_t`` (t -> index into all_noise), bookkeeping for the test, not upstream.
    """
    T = scheduler.config.num_train_timesteps  # :45-46
    data = dict()
    t_evaluated = set()
    remaining_prmpt_idxs = list(range(len(text_embeds)))  # :55-57
    t_to_eval, _ = _port_timesteps(T, n_samples)  # :58-59
    noise_of_t = {}
    for n, n_to_keep in zip(n_samples, to_keep, strict=True):  # :61
        ts, noise_idxs, text_embed_idxs = [], [], []
        curr_t_to_eval = t_to_eval[len(t_to_eval) // n // 2 :: len(t_to_eval) // n][:n]  # :65
        curr_t_to_eval = [t for t in curr_t_to_eval if t not in t_evaluated]  # :66
        for prompt_i in remaining_prmpt_idxs:  # :67-71: the noise index counts timesteps in evaluation order
            for t_idx, t in enumerate(curr_t_to_eval, start=len(t_evaluated)):
                ts.extend([t] * n_trials)
                noise_idxs.extend(list(range(n_trials * t_idx, n_trials * (t_idx + 1))))
                text_embed_idxs.extend([prompt_i] * n_trials)
                noise_of_t[t] = n_trials * t_idx
        t_evaluated.update(curr_t_to_eval)  # :72
        pred_errors = _port_eval_error(unet, scheduler, latent, all_noise, ts, noise_idxs, text_embeds,
                                       text_embed_idxs, batch_size, loss)  # :73-74
        for prompt_i in remaining_prmpt_idxs:  # :76-84
            mask = torch.tensor(text_embed_idxs) == prompt_i
            prompt_ts = torch.tensor(ts)[mask]
            prompt_pred_errors = pred_errors[mask]
            if prompt_i not in data:
                data[prompt_i] = dict(t=prompt_ts, pred_errors=prompt_pred_errors)
            else:
                data[prompt_i]["t"] = torch.cat([data[prompt_i]["t"], prompt_ts])
                data[prompt_i]["pred_errors"] = torch.cat([data[prompt_i]["pred_errors"], prompt_pred_errors])
        errors = [-data[prompt_i]["pred_errors"].mean() for prompt_i in remaining_prmpt_idxs]  # :87-89
        best_idxs = torch.topk(torch.tensor(errors), k=n_to_keep, dim=0).indices.tolist()
        remaining_prmpt_idxs = [remaining_prmpt_idxs[i] for i in best_idxs]
    assert len(remaining_prmpt_idxs) == 1  # :92-95
    return remaining_prmpt_idxs[0], data, noise_of_t


def _port_winoground_eval_prob(unet, latent, cond_emb, scheduler, all_noise, t_interval, batch_size=32):
    """run_winoground.py:19-72 (``eval_prob``) with ``--randomize_noise --noise_path`` (the README's run)."""
    text_embeddings = cond_emb.repeat(batch_size, 1, 1)  # :23
    n_train_timesteps = scheduler.config.num_train_timesteps
    assert n_train_timesteps % t_interval == 0  # :26
    pred_errors = torch.zeros(n_train_timesteps // t_interval, device="cpu")  # :33
    ts = list(range(t_interval // 2, n_train_timesteps, t_interval))  # :35-37 (n_trials 1)
    with torch.inference_mode():
        idx = 0
        for _ in range(len(ts) // batch_size + int(len(ts) % batch_size != 0)):  # :48
            batch_ts = torch.tensor(ts[idx : idx + batch_size])
            noise = all_noise[idx : idx + len(batch_ts)]  # :50-51 randomize_noise: noise i for timestep i
            noised_latent = latent * (scheduler.alphas_cumprod[batch_ts] ** 0.5).view(-1, 1, 1, 1) + \
                noise * ((1 - scheduler.alphas_cumprod[batch_ts]) ** 0.5).view(-1, 1, 1, 1)  # :54-55
            text_input = text_embeddings if len(text_embeddings) == len(batch_ts) else \
                text_embeddings[: len(batch_ts)]  # :57
            noise_pred = unet(noised_latent, batch_ts, encoder_hidden_states=text_input).sample  # :58
            error = F.mse_loss(noise, noise_pred, reduction="none").mean(dim=(1, 2, 3))  # :67
            pred_errors[idx : idx + len(batch_ts)] = error.detach().cpu()
            idx += len(batch_ts)
    return pred_errors.view(n_train_timesteps // t_interval, 1)  # :72


def _port_winoground_scores(results):
    """run_winoground.py:224-242: score = -mean error; text / image / group correctness (strict >)."""
    r = {k: -v.mean().item() for k, v in results.items()}
    text = r["c0_i0"] > r["c1_i0"] and r["c1_i1"] > r["c0_i1"]
    image = r["c0_i0"] > r["c0_i1"] and r["c1_i1"] > r["c1_i0"]
    return r, {"text": text, "image": image, "group": image and text}


def _port_save_noise(latent_size):
    """scripts/save_noise.py:11-12: the shared Winoground noise."""
    torch.manual_seed(42)
    return torch.randn(1024, 4, latent_size, latent_size)


# ---------------------------------------------------------------------------- ports: DiffusionITM
def _port_euler_add_noise_and_scale(scheduler_config, init_latents, noise, t):
    """The fork's scheduling_euler_discrete.py for an integer t before ``set_timesteps``: sigmas :143-146,
    timesteps :154, ``add_noise`` :372-378 (x0 + sigma eps), ``scale_model_input`` :174-177 (/ sqrt(sigma^2 + 1))."""
    beta_start, beta_end = scheduler_config.beta_start, scheduler_config.beta_end
    T = scheduler_config.num_train_timesteps
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float32) ** 2  # scaled_linear :133-135
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    sigmas = np.array(((1 - alphas_cumprod) / alphas_cumprod) ** 0.5)
    sigmas = torch.from_numpy(np.concatenate([sigmas[::-1], [0.0]]).astype(np.float32))
    timesteps = torch.from_numpy(np.linspace(0, T - 1, T, dtype=float)[::-1].copy())
    step_index = (timesteps == t).nonzero().item()
    noisy = init_latents + noise * sigmas[step_index]  # add_noise
    return noisy, sigmas[step_index]


def _port_diffusion_itm_call(bb, prompt, latent, noise_samples, sampling_steps=10, unconditional=False,
                             guidance_scale=0.0):
    """pipeline_stable_diffusion_img2img.py ``__call__`` :705-761 with ``prepare_latents`` :550-601.

    Deviation, for a deterministic comparison: ``prepare_latents`` encodes the image and draws a fresh
    posterior sample at every timestep (:571, ``latent_dist.sample(generator)``); the port is given the
    scaled latent (``latent``) and uses it at every timestep (diffperc uses the posterior mean).
    """
    do_cfg = guidance_scale > 1.0  # :709
    tok = bb.tokenizer
    ids = tok([prompt], padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    with torch.no_grad():
        prompt_embeds = bb.text_encoder(ids)[0]  # _encode_prompt :349-366
        if unconditional or do_cfg:  # :712-720: negative prompt "" (:399), [uncond, cond] (:452)
            uncond = tok([""], padding="max_length", max_length=tok.model_max_length, truncation=True,
                         return_tensors="pt").input_ids
            prompt_embeds = torch.cat([bb.text_encoder(uncond)[0], prompt_embeds])
        dists = []
        rate = int(1000 / sampling_steps)  # :729-730
        timesteps = list(range(10, 990, rate))
        for sampling_step, t in enumerate(timesteps):  # :731
            noise = noise_samples[sampling_step].unsqueeze(0).repeat(1, 1, 1, 1)  # :594-596
            latents, sigma = _port_euler_add_noise_and_scale(bb.scheduler.config, latent, noise, t)  # :599
            latent_model_input = torch.cat([latents] * 2) if unconditional or guidance_scale > 0 else latents  # :737
            latent_model_input = latent_model_input / ((sigma**2 + 1) ** 0.5)  # :738 scale_model_input
            noise_pred = bb.unet(latent_model_input, t, encoder_hidden_states=prompt_embeds).sample  # :741
            if unconditional:  # :744-753
                noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                noise = noise.flatten(1)
                dist = torch.norm(noise - noise_pred_text.flatten(1), p=2, dim=1)
                base_dist = torch.norm(noise - noise_pred_uncond.flatten(1), p=2, dim=1)
                dists.append(dist - base_dist)
            else:  # :754-758
                dists.append(torch.norm(noise.flatten(1) - noise_pred.flatten(1), p=2, dim=1))
        dists = torch.stack(dists).permute(1, 0)  # :760
    return dists, timesteps


def _port_score(bb, prompt, latent, noise_samples, unconditional):
    """diffusion_itm.py:40-44 (``score_batch``): mean over timesteps, negated (higher = better)."""
    dists, timesteps = _port_diffusion_itm_call(bb, prompt, latent, noise_samples, unconditional=unconditional)
    return -dists.to(torch.float32).mean(dim=1), timesteps


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def sd():
    return create_backbone("test_sd")


def _write_cifar(root: Path, pixels: np.ndarray) -> Path:
    """CIFAR-10's python layout (bytes-keyed pickles), as torchvision's CIFAR10 reads it."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names}, f, protocol=2)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": pixels.reshape(len(pixels), -1), b"labels": [0] * len(pixels)}, f, protocol=2)
    return folder


def _pil_images(n: int, size: tuple[int, int], seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


# ---------------------------------------------------------------------------- tests
def test_cifar10_upscaling_is_the_papers_transform(tmp_path):
    """CIFAR-10 images (32 px) reach the VAE as torchvision's Resize(S, BICUBIC) + CenterCrop on the PIL
    image makes them (diffusion/datasets.py:91-92 gives torchvision's CIFAR10 the transform of
    eval_prob_adaptive.py:28-36); also a non-square image through the ImageFolder path."""
    from diffperc.data.classification import pil_resize_center_crop

    pixels = np.random.default_rng(0).integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)
    folder = _write_cifar(tmp_path, pixels)
    for size in (48, 64):
        ds = Cifar10Dataset(folder, image_size=size)
        transform = _port_get_transform(InterpolationMode.BICUBIC, size)
        for i in range(len(pixels)):
            expected = transform(Image.fromarray(pixels[i].transpose(1, 2, 0)))  # torchvision CIFAR10 __getitem__
            torch.testing.assert_close(ds[i]["image"] * 2 - 1, expected, rtol=0, atol=1e-6)
    for image in _pil_images(2, (57, 40), seed=1) + _pil_images(1, (40, 73), seed=2):
        torch.testing.assert_close(pil_resize_center_crop(image, 32) * 2 - 1, _port_get_transform(size=32)(image),
                                   rtol=0, atol=1e-6)


@pytest.mark.parametrize(("n_samples", "to_keep"), [
    ((50, 500), (5, 1)), ((25, 250), (5, 1)), ((100, 500), (5, 1)), ((20, 50, 100, 500), (20, 10, 5, 1)),
    ((50, 100, 500, 1000), (500, 50, 10, 1)), ((50, 100, 500, 1000), (25, 10, 5, 1))])
def test_paper_schedules_pick_the_released_timesteps(sd, n_samples, to_keep):
    """Every schedule of commands.md (CIFAR-10; Pets; STL-10; Food/Aircraft/Flowers; ImageNet; ObjectNet):
    diffperc's grid and each round's timesteps are the ones eval_prob_adaptive.py:58-65 selects."""
    t_to_eval, rounds = _port_timesteps(1000, n_samples)
    clf = DiffusionClassifier(sd, ["a", "b"], schedule=list(zip(n_samples, (1,) * len(n_samples), strict=True)))
    grid = clf.grid(max(n_samples))
    assert grid.tolist() == t_to_eval
    for n, expected in zip(n_samples, rounds, strict=True):
        assert grid[evenly_spaced(n, len(grid))].tolist() == expected


def test_grid_differs_only_where_the_released_one_does_not_span_the_range(sd):
    """Documented difference (docs/fidelity/diffusion_classifier.md): for S not dividing T the released grid
    (stride T // S from T // S // 2) stops short of T; diffperc spreads the S timesteps over all of [0, T)."""
    t_to_eval, _ = _port_timesteps(1000, (300,))
    grid = DiffusionClassifier(sd, ["a", "b"], schedule=[(300, 1)]).grid(300)
    assert t_to_eval[-1] == 898 and grid[-1].item() == 998 and len(t_to_eval) == len(grid) == 300


@pytest.mark.parametrize(("n_samples", "to_keep", "loss"), [
    ((4, 20), (2, 1), "l2"),  # the two-round shape of CIFAR-10 / Pets / STL-10
    ((5, 10, 40), (3, 2, 1), "l1"),  # rounds whose timesteps are not nested (as Food / Aircraft)
    ((20,), (1,), "huber"),  # naive
])
def test_adaptive_classifier_matches_eval_prob_adaptive(sd, tmp_path, n_samples, to_keep, loss):
    """CIFAR-10 files -> diffperc's loader and classifier vs the port of get_transform, the VAE step of main and
    eval_prob_adaptive / eval_error with one saved noise for every image: same prediction, same per-prompt
    timesteps and mean errors, same UNet evaluation count."""
    size, n_img = 32, 2
    pixels = np.random.default_rng(3).integers(0, 256, (n_img, 3, 32, 32), dtype=np.uint8)
    ds = Cifar10Dataset(_write_cifar(tmp_path, pixels), image_size=size)
    prompts = [f"a blurry photo of a {c}." for c in CLASSES]  # prompts/cifar10_prompts.csv style
    clf = DiffusionClassifier(sd, prompts, schedule=list(zip(n_samples, to_keep, strict=True)), loss=loss,
                              batch_size=7)
    text_embeds = _port_text_embeddings(sd.tokenizer, sd.text_encoder, prompts)
    all_noise = torch.randn(max(n_samples), 4, size // 2, size // 2, generator=torch.Generator().manual_seed(5))
    scheduler = _port_scheduler()
    transform = _port_get_transform(InterpolationMode.BICUBIC, size)
    ports = []
    for i in range(n_img):
        x0 = _port_latent(sd.vae, transform(Image.fromarray(pixels[i].transpose(1, 2, 0))).unsqueeze(0))
        ports.append(_port_eval_prob_adaptive(sd.unet, x0, text_embeds, scheduler, n_samples, to_keep, all_noise,
                                              loss=loss, batch_size=5))
    # diffperc keys noise by grid slot; the release by evaluation order: hand it the release's noise per slot
    noise_of_t = ports[0][2]
    slot_noise = all_noise[[noise_of_t[t] for t in clf.grid(max(n_samples)).tolist()]]
    out = clf.classify(torch.stack([ds[i]["image"] for i in range(n_img)]), noise=slot_noise)
    for b, (pred, data, _) in enumerate(ports):
        assert out.pred[b].item() == pred
        assert out.unet_evals[b].item() == sum(len(d["t"]) for d in data.values())
        for k, d in data.items():
            assert out.n_pairs[b, k].item() == len(d["t"])
            torch.testing.assert_close(out.scores[b, k], d["pred_errors"].mean(), rtol=1e-4, atol=1e-7)
        assert set(range(len(prompts))) - set(data) == set()  # every prompt is scored in round 1


class CheapUNet(torch.nn.Module):
    """A random, fast stand-in with the UNet's call signature (sample, t, encoder_hidden_states) -> .sample,
    for the 1,000-timestep default run (the tiny SD UNet would take ~10 s there)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        g = torch.Generator().manual_seed(7)
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.2)
            self.conv.bias.zero_()

    def forward(self, sample, timestep, encoder_hidden_states):
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1, 1, 1, 1) / 1000
        text = encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return type("Out", (), {"sample": self.conv(sample) * (1 + t) + text})()


@pytest.mark.parametrize("t_interval", [100, 1])
def test_winoground_matches_run_winoground(t_interval):
    """image_text_errors vs run_winoground.py's eval_prob on two images and two captions: same errors and text /
    image / group scores. t_interval 1 with the defaults (no n_samples, no seed): the published run
    (README: --t_interval 1 --noise_path noise_512.pt --randomize_noise --interpolation bicubic), whose noise
    save_noise.py draws with torch.manual_seed(42)."""
    from diffperc.data.classification import pil_resize_center_crop

    bb = create_backbone("test_sd")
    if t_interval == 1:
        bb.unet = CheapUNet(bb.unet.config)
    size, captions = 32, ["a dog chasing a cat", "a cat chasing a dog"]
    pil = _pil_images(2, (40, 36), seed=4)
    transform = _port_get_transform(InterpolationMode.BICUBIC, size)  # run_winoground.py:95 preprocess
    x = [_port_latent(bb.vae, transform(im).unsqueeze(0)) for im in pil]  # :168-177
    emb = [_port_text_embeddings(bb.tokenizer, bb.text_encoder, [c]) for c in captions]  # :163-179
    all_noise = _port_save_noise(size // 2)
    scheduler = _port_scheduler()
    results = {f"c{c}_i{i}": _port_winoground_eval_prob(bb.unet, x[i], emb[c], scheduler, all_noise, t_interval)
               for c in range(2) for i in range(2)}  # :180-185
    scores, correct = _port_winoground_scores(results)
    images = torch.stack([pil_resize_center_crop(im, size) for im in pil])
    kw = {} if t_interval == 1 else {"n_samples": 1000 // t_interval}
    errors = image_text_errors(bb, captions, images, **kw)
    expected = torch.tensor([[-scores[f"c{c}_i{i}"] for i in range(2)] for c in range(2)])
    torch.testing.assert_close(errors, expected, rtol=1e-4, atol=1e-7)
    assert winoground_scores(errors) == correct


@pytest.mark.parametrize("unconditional", [False, True])
def test_matching_matches_diffusion_itm(sd, unconditional):
    """image_text_errors(loss="l2_norm") vs DiffusionITM's scoring (diffusion_itm.py score_batch over its fork's
    img2img __call__: Euler noising, per-timestep Euclidean norms; with --img_retrieval minus the norm under
    the empty prompt), on its default 10 timesteps range(10, 990, 100) and a saved noise bank."""
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(8))
    noise_samples = torch.randn(1000, 4, 16, 16, generator=torch.Generator().manual_seed(9))  # fork :231
    captions = ["a red cube on a blue ball", "a blue cube on a red ball"]
    expected = torch.zeros(2, 2)
    for c, caption in enumerate(captions):
        for i in range(2):
            score, timesteps = _port_score(sd, caption, latents[i : i + 1], noise_samples, unconditional)
            expected[c, i] = -score[0]
    ts = torch.tensor(timesteps)
    errors = image_text_errors(sd, captions, latents=latents, normalize=unconditional, loss="l2_norm",
                               timesteps=ts, noise=noise_samples[: len(ts)])
    torch.testing.assert_close(errors, expected, rtol=1e-4, atol=1e-6)
