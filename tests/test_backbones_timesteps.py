"""Several timesteps in one call (issue 13 item 3): one batched UNet call, same as one run per timestep."""

from __future__ import annotations

import pytest
import torch

from diffperc import DiffusionBackbone, create_backbone
from diffperc.backbones.tiny import tiny_sd_components

TS = [50, 150, 250]


def _images(b: int = 2, size: int = 32) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_per_timestep_features_equal_single_timestep_runs_in_one_call() -> None:
    parts = tiny_sd_components(seed=4)
    calls = []
    parts["unet"].register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    multi = DiffusionBackbone(**parts, layers="vpd", timestep=TS, attention=True)
    assert multi.feature_info.names() == [f"{n}@t{t}" for t in TS for n in multi.layers]
    images, noise = _images(), torch.randn(2, 4, 16, 16)
    calls.clear()
    out = multi(images, noise=noise)
    assert calls == [2 * len(TS)]  # every timestep of every image in one UNet call
    assert len(out.features) == 4 * len(TS)
    maps = []
    for k, t in enumerate(TS):
        single = DiffusionBackbone(**parts, layers="vpd", timestep=t, attention=True)
        ref = single(images, noise=noise)  # the same clean latents and the same noise at each t
        for got, want in zip(out.features[4 * k : 4 * (k + 1)], ref.features, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        maps.append(ref.attention)
    for r, m in out.attention.items():  # attention: the mean over the timesteps
        torch.testing.assert_close(m, torch.stack([a[r] for a in maps]).mean(0), rtol=1e-4, atol=1e-6)


def test_mean_over_timesteps_with_an_ensemble() -> None:
    parts = tiny_sd_components(seed=5)
    e = 2
    images, noise = _images(), torch.randn(2 * e, 4, 16, 16)
    mean = DiffusionBackbone(**parts, layers="dift", timestep=[100, 300], timestep_reduce="mean", ensemble_size=e,
                             ensemble_chunk=1)
    assert mean.feature_info.names() == ["up_blocks.1"]
    got = mean(images, noise=noise).features[0]
    refs = [DiffusionBackbone(**parts, layers="dift", timestep=t, ensemble_size=e)(images, noise=noise).features[0]
            for t in (100, 300)]
    torch.testing.assert_close(got, (refs[0] + refs[1]) / 2, rtol=1e-4, atol=1e-5)


def test_bad_timesteps() -> None:
    for bad, match in (([], "empty"), ([10, 1000], r"\[0, 1000\).*\[1000\]"), ([1.5], "integers"),
                       ([5, 5], "duplicates")):
        with pytest.raises(ValueError, match=match):
            create_backbone("test_sd", timestep=bad)
    with pytest.raises(ValueError, match="timestep_reduce"):
        create_backbone("test_sd", timestep=TS, timestep_reduce="max")
