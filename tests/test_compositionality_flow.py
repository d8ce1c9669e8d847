"""Flow-matching scoring vs a literal port of the released SD3 scoring, and the epsilon path vs the released SD one.

Ports (written here, for fidelity) of eugene6923/Diffusion-Classifiers-Compositionality's bundled diffusers:
- SD3: pipelines/stable_diffusion_3/pipeline_stable_diffusion_3_img2img.py, ``sampled_timesteps`` (l.829-865),
  ``prepare_latents`` (l.726-800: noise = noise_samples[sampling_step], scale_noise), the scoring loop of
  ``__call__`` (l.1113-1149 timesteps, l.1162-1323 the no-CFG branch: target = noise - init_latents,
  weighting * MSE or * L2 norm).
- SD: pipelines/stable_diffusion/pipeline_stable_diffusion_img2img.py, ``sampled_timesteps`` (l.891-900),
  ``prepare_latents`` (l.820-826: EulerDiscreteScheduler.add_noise), l.1227-1315 (scale_model_input,
  UNet, ||noise - noise_pred||_2 or MSE).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffperc.zeroshot.classifier import DiffusionClassifier
from diffperc.zeroshot.flow import (
    RELEASED_START_SD,
    FlowMatchingClassifier,
    released_grid,
    tiny_flow_model,
)


@pytest.fixture(scope="module")
def flow_model():
    return tiny_flow_model(seed=0)


PROMPTS = ["a red cube left of a ball", "a ball left of a red cube", "two green dogs"]


# ----------------------------------------------------------------------------- literal ports
def _port_sd3_sampled_timesteps(scheduler, sampling_steps, later=False, num_inference_steps=50, strength=0.6):
    # pipeline_stable_diffusion_3_img2img.py l.829-865
    if not later:
        rate = int(1000 / sampling_steps)
        init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
        t_start = max(num_inference_steps - init_timestep, 0)
        t_end = len(scheduler.timesteps) - t_start
        timesteps_indices = np.arange(t_start * scheduler.order, t_end, rate)
        return scheduler.timesteps[timesteps_indices].tolist()[::-1]
    timesteps_array = np.array(scheduler.timesteps)
    valid_timesteps = timesteps_array[(timesteps_array >= 500) & (timesteps_array <= 1000)]
    selected_indices = np.linspace(0, len(valid_timesteps) - 1, 30).astype(int)
    return valid_timesteps[selected_indices].tolist()


def _port_sd3_dists(model, prompts, latents, noise_samples, time_weighting=None, use_normed_classifier=False,
                    later=False, seed=0):
    """dists (B, S) of the released __call__ for one image latent repeated over the B prompts."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(model.scheduler.config)
    pipe = model.pipeline()
    prompt_embeds, _, pooled_prompt_embeds, _ = pipe.encode_prompt(
        prompt=prompts, prompt_2=None, prompt_3=None, do_classifier_free_guidance=False,
        max_sequence_length=model.max_sequence_length)
    batch_size = len(prompts)
    if time_weighting is None:
        timesteps = _port_sd3_sampled_timesteps(scheduler, 30, later=later)
    else:  # l.1131-1149
        torch.manual_seed(seed)
        u = compute_density_for_timestep_sampling(weighting_scheme=time_weighting, batch_size=50, logit_mean=0.0,
                                                  logit_std=1.0, mode_scale=1.29)
        indices = (u * scheduler.config.num_train_timesteps).long()
        timesteps = scheduler.timesteps[indices]
    dists = []
    for sampling_step, t in enumerate(timesteps):
        latent_timestep = torch.tensor([t] * batch_size)
        init_latents = latents.repeat(batch_size, 1, 1, 1)  # presaved latents of the image, one per prompt
        noise = noise_samples[sampling_step].unsqueeze(0).repeat(batch_size, 1, 1, 1)
        scaled = scheduler.scale_noise(init_latents, latent_timestep, noise)
        # the bundled scale_noise also returns sigma (l.158-169): sigmas[index_for_timestep(t)]
        step_indices = [scheduler.index_for_timestep(tt, scheduler.timesteps) for tt in latent_timestep]
        sigmas = scheduler.sigmas[step_indices].flatten().view(-1, 1, 1, 1)
        t = torch.tensor(t, dtype=torch.float)
        timestep = t.expand(scaled.shape[0])
        noise_pred = model.transformer(hidden_states=scaled, timestep=timestep, encoder_hidden_states=prompt_embeds,
                                       pooled_projections=pooled_prompt_embeds, return_dict=False)[0]
        weighting = compute_loss_weighting_for_sd3(weighting_scheme=time_weighting, sigmas=sigmas)
        target = noise - init_latents
        if use_normed_classifier:
            dist = weighting.float().flatten() * torch.norm((noise_pred - target).reshape(target.shape[0], -1), p=2,
                                                            dim=1)
        else:
            dist = weighting.float().flatten() * ((noise_pred - target) ** 2).reshape(target.shape[0], -1).mean(dim=-1)
        dists.append(dist)
    return torch.stack(dists).permute(1, 0), torch.as_tensor(np.asarray(timesteps, dtype=np.float32))


def _port_sd_dists(backbone, prompts, latents, noise_samples, use_normed_classifier=True):
    """dists (B, S) of the released SD img2img __call__ (no CFG), EulerDiscreteScheduler, strength 0.8."""
    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler.from_config(backbone.scheduler.config)
    rate = int(1000 / 30)  # l.891-900
    init_timestep = min(int(50 * 0.8), 50)
    t_start = max(50 - init_timestep, 0)
    t_end = len(scheduler.timesteps) - t_start
    timesteps = scheduler.timesteps[np.arange(t_start * scheduler.order, t_end, rate)].tolist()[::-1]
    prompt_embeds = backbone.encode_prompt(prompts)
    batch_size = len(prompts)
    dists = []
    for sampling_step, t in enumerate(timesteps):
        init_latents = latents.repeat(batch_size, 1, 1, 1)
        noise = noise_samples[sampling_step].unsqueeze(0).repeat(batch_size, 1, 1, 1)
        lat = scheduler.add_noise(init_latents, noise, torch.tensor([t] * batch_size))  # x0 + sigma eps
        t = torch.tensor(t, dtype=torch.float)
        scheduler._init_step_index(t)  # scale_model_input(..., itm=True) re-inits the step index (bundled l.310)
        sigma = scheduler.sigmas[scheduler.step_index]
        lat = lat / ((sigma**2 + 1) ** 0.5)
        noise_pred = backbone.unet(lat, t, encoder_hidden_states=prompt_embeds, return_dict=False)[0]
        noise, noise_pred = noise.flatten(1), noise_pred.flatten(1)
        dist = torch.norm(noise - noise_pred, p=2, dim=1) if use_normed_classifier else \
            torch.mean((noise - noise_pred) ** 2, dim=1)
        dists.append(dist)
    return torch.stack(dists).permute(1, 0), torch.tensor(timesteps)


# ----------------------------------------------------------------------------- tests
def test_released_grid_is_the_released_timesteps(flow_model):
    clf = FlowMatchingClassifier(flow_model, PROMPTS)
    ported = _port_sd3_sampled_timesteps(flow_model.scheduler, 30)
    assert len(ported) == 30
    torch.testing.assert_close(clf.train_timesteps[clf.grid(30)], torch.tensor(ported, dtype=torch.float32))
    assert clf.train_timesteps[clf.grid(30)][0].item() == pytest.approx(65.9656, abs=1e-3)  # released comment l.862
    later = FlowMatchingClassifier(flow_model, PROMPTS, timesteps="later")
    torch.testing.assert_close(later.train_timesteps[later.grid(30)],
                               torch.tensor(_port_sd3_sampled_timesteps(flow_model.scheduler, 30, later=True)))
    with pytest.raises(ValueError, match="released timestep grid has"):
        released_grid(40)


@pytest.mark.parametrize("loss,weighting,timesteps", [("l2", None, "released"), ("l2_norm", None, "released"),
                                                      ("l2", None, "later"), ("l2_norm", "logit_normal", None),
                                                      ("l2", "cosmap", None), ("l2", "sigma_sqrt", None)])
def test_flow_errors_match_released_port(flow_model, loss, weighting, timesteps):
    torch.manual_seed(1)
    x0 = torch.randn(1, 4, 8, 8)
    bank = torch.randn(1000, 4, 8, 8)  # the released noise_samples bank
    ref, ref_t = _port_sd3_dists(flow_model, PROMPTS, x0, bank, time_weighting=weighting,
                                 use_normed_classifier=loss == "l2_norm", later=timesteps == "later", seed=0)
    if weighting is None:
        clf = FlowMatchingClassifier(flow_model, PROMPTS, loss=loss, timesteps=timesteps)
    else:  # released: --time_weighting both picks the timestep density and the loss weighting
        mode = "logit_normal" if weighting == "logit_normal" else "uniform"
        clf = FlowMatchingClassifier(flow_model, PROMPTS, loss=loss, timesteps=mode, seed=0, schedule=[(50, 1)],
                                     weighting="none" if weighting == "logit_normal" else weighting)
    S = ref.shape[1]
    pos = clf.grid(S)
    torch.testing.assert_close(clf.train_timesteps[pos], ref_t)
    errors = clf.pair_errors(latents=x0, timesteps=pos, noise=bank[:S])[0]  # (K, S), unweighted
    w = clf._weights(pos)
    torch.testing.assert_close(errors * w, ref, rtol=1e-4, atol=1e-5)
    # score = weighted mean; the released mean of weighted errors is the same up to the constant mean(w)
    score = clf.score(latents=x0, timesteps=pos, noise=bank[:S])[0]
    torch.testing.assert_close(score * w.mean(), ref.mean(1), rtol=1e-4, atol=1e-5)


def test_epsilon_path_matches_released_sd_port():
    from diffperc import create_backbone

    bb = create_backbone("test_sd")
    torch.manual_seed(2)
    x0 = torch.randn(1, 4, 8, 8)
    bank = torch.randn(1000, 4, 8, 8)
    for normed in (True, False):
        ref, ref_t = _port_sd_dists(bb, PROMPTS, x0, bank, use_normed_classifier=normed)
        t = released_grid(30, 1000, RELEASED_START_SD)
        assert t.tolist() == ref_t.long().tolist() == list(range(32, 990, 33))
        clf = DiffusionClassifier(bb, PROMPTS, schedule=[(30, 1)], loss="l2_norm" if normed else "l2")
        errors = clf.pair_errors(latents=x0, timesteps=t, noise=bank[:30])[0]
        torch.testing.assert_close(errors, ref, rtol=1e-4, atol=1e-5)


def test_shared_noise_bank_and_adaptive(flow_model):
    x = torch.rand(2, 3, 16, 16)
    clf = FlowMatchingClassifier(flow_model, PROMPTS, schedule=[(10, 2), (30, 1)], timesteps="even", seed=3)
    errors = clf.pair_errors(x, timesteps=clf.grid(30))  # (B, K, S), one seeded bank for all captions and images
    again = FlowMatchingClassifier(flow_model, PROMPTS, schedule=[(30, 1)], timesteps="even", seed=3).pair_errors(x)
    torch.testing.assert_close(errors, again)
    out = clf.classify(x)
    replay = clf.classify_errors(errors)
    assert torch.equal(out.pred, replay.pred) and torch.equal(out.unet_evals, replay.unet_evals)
    assert (out.unet_evals == 3 * 10 + 2 * 20).all()  # round 1: 3 captions x 10; round 2: 2 x 20 new pairs
    # the same image latent twice: identical errors (noise depends on the slot, not the image)
    lat = clf.encode(x[:1])
    e2 = clf.pair_errors(latents=torch.cat([lat, lat]))
    torch.testing.assert_close(e2[0], e2[1])


def test_flow_bad_input(flow_model):
    with pytest.raises(ValueError, match="loss must be"):
        FlowMatchingClassifier(flow_model, PROMPTS, loss="l1")
    with pytest.raises(ValueError, match="timesteps must be one of"):
        FlowMatchingClassifier(flow_model, PROMPTS, timesteps="cosine")
    with pytest.raises(ValueError, match="weighting must be one of"):
        FlowMatchingClassifier(flow_model, PROMPTS, weighting="snr")
    with pytest.raises(ValueError, match="at least two"):
        FlowMatchingClassifier(flow_model, ["only one caption"])
    long = "a photo of " + " and ".join(["a red cube"] * 30)
    with pytest.warns(UserWarning, match="1 of 2 captions tokenize to more than"):
        flow_model.encode_prompt([long, "a short one"])
    weights = FlowMatchingClassifier(flow_model, PROMPTS, weighting="sigma_sqrt")._weights(torch.tensor([0, 999]))
    sig = flow_model.scheduler.sigmas[[999, 0]]
    assert weights[0] > weights[1] and math.isclose(weights[1].item(), sig[1].item() ** -2, rel_tol=1e-5)


# ----------------------------------------------------------------------------- the DiT backbones
def test_from_backbone_sd3_gives_the_tiny_flow_model_scores(flow_model):
    from diffperc.backbones import SD3Backbone
    from diffperc.zeroshot.flow import FlowMatchingModel

    fm = flow_model
    bb = SD3Backbone(vae=fm.vae, transformer=fm.transformer, scheduler=fm.scheduler, text_encoder=fm.text_encoder,
                     text_encoder_2=fm.text_encoder_2, tokenizer=fm.tokenizer, tokenizer_2=fm.tokenizer_2,
                     text_encoder_3=fm.text_encoder_3, tokenizer_3=fm.tokenizer_3, layers=[0],
                     max_sequence_length=fm.max_sequence_length)
    adapted = FlowMatchingModel.from_backbone(bb)
    assert adapted.transformer is fm.transformer  # shared, not copied
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    kw = dict(schedule=[(6, 1)], timesteps="even", seed=1)
    ref = FlowMatchingClassifier(fm, PROMPTS, **kw).pair_errors(x)
    got = FlowMatchingClassifier(adapted, PROMPTS, **kw).pair_errors(x)
    torch.testing.assert_close(got, ref)
    with pytest.raises(TypeError, match="SD3Backbone or a FluxBackbone"):
        FlowMatchingModel.from_backbone(torch.nn.Linear(2, 2))


@torch.no_grad()
def test_flux_adapter_errors_equal_the_pipeline_computation_by_hand():
    from diffusers import FluxPipeline

    from diffperc import create_backbone
    from diffperc.zeroshot.flow import FlowMatchingModel, FluxFlowMatchingModel

    bb = create_backbone("test_flux", layers=[0], max_sequence_length=16)
    fm = FlowMatchingModel.from_backbone(bb)
    assert isinstance(fm, FluxFlowMatchingModel) and fm.guidance_scale == 3.5
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    clf = FlowMatchingClassifier(fm, PROMPTS, schedule=[(4, 1)], timesteps="even", seed=2)
    pos = clf.grid(4)
    noise = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    errors = clf.pair_errors(x, timesteps=pos, noise=noise)  # (1, K, 4)
    # by hand, with FluxPipeline's own helpers and the classifier's noise bank
    pipe = FluxPipeline(transformer=bb.transformer, scheduler=bb.scheduler, vae=bb.vae, text_encoder=bb.text_encoder,
                        tokenizer=bb.tokenizer, text_encoder_2=bb.text_encoder_2, tokenizer_2=bb.tokenizer_2)
    embeds, pooled, text_ids = pipe.encode_prompt(prompt=PROMPTS, prompt_2=None, max_sequence_length=16)
    vae = bb.vae
    x0 = (vae.encode(x * 2 - 1).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
    sched = bb.scheduler
    ts = sched.timesteps.flip(0)[pos]
    ids = pipe._prepare_latent_image_ids(1, 4, 4, x0.device, x0.dtype)
    for k in range(len(PROMPTS)):
        for j, t in enumerate(ts):
            eps = noise[j : j + 1]
            xt = sched.scale_noise(x0, t[None], eps)
            v = bb.transformer(hidden_states=pipe._pack_latents(xt, 1, 4, 8, 8), timestep=t[None] / 1000,
                               guidance=torch.full((1,), 3.5), encoder_hidden_states=embeds[k : k + 1],
                               pooled_projections=pooled[k : k + 1], txt_ids=text_ids, img_ids=ids)[0]
            v = pipe._unpack_latents(v, 16, 16, 2)  # 16 px images, VAE factor 2
            ref = ((v - (eps - x0)) ** 2).mean()
            assert abs(errors[0, k, j].item() - ref.item()) <= 1e-4 * ref.item() + 1e-7
