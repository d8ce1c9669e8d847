"""OriginEmbedder (ID² VAE embedding) against an independent computation, projection files, image decoding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from retrieval_helpers import bomb_png, png_bytes

from diffperc.backbones.registry import create_backbone
from diffperc.retrieval.embedder import (
    ImageDecodeError,
    OriginEmbedder,
    load_projection,
    read_image,
    save_projection,
    to_tensor,
)


@pytest.fixture(scope="module")
def vae() -> torch.nn.Module:
    return create_backbone("test_sd").vae


def test_raw_embedding_matches_vae_by_hand(vae: torch.nn.Module) -> None:
    """Raw-VAE baseline = normalize(flatten(posterior mean of the [-1, 1] image)), computed independently."""
    emb = OriginEmbedder(vae, image_size=32)
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        mean = vae.encode(images * 2 - 1).latent_dist.mean  # (3, 4, 16, 16)
    expected = F.normalize(mean.flatten(1), dim=1)
    got = emb.embed(images, batch_size=2)  # two batches
    assert got.shape == (3, emb.dim) == (3, 4 * 16 * 16)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(3))


def test_projection_and_resize_match_by_hand(vae: torch.nn.Module) -> None:
    weight = torch.randn(16, 4 * 16 * 16)
    emb = OriginEmbedder(vae, projection=weight, image_size=32)
    images = torch.rand(2, 3, 48, 48)  # resized to 32 with antialiased bilinear
    x = F.interpolate(images, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        feats = vae.encode(x * 2 - 1).latent_dist.mean.flatten(1)
    expected = F.normalize(feats @ weight.T, dim=1)
    torch.testing.assert_close(emb.embed(images), expected, rtol=1e-4, atol=1e-5)
    assert emb.dim == 16


def test_projection_shape_mismatch_names_the_fix(vae: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match=r"needs \(D, 1024\)"):
        OriginEmbedder(vae, projection=torch.randn(8, 4096), image_size=32)


def test_bad_images_are_refused(vae: torch.nn.Module) -> None:
    emb = OriginEmbedder(vae, image_size=32)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        emb.embed(torch.rand(1, 3, 32, 32) * 255)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        emb.embed(torch.rand(3, 32, 32))


def test_projection_files_round_trip(tmp_path: Path, vae: torch.nn.Module) -> None:
    weight = torch.randn(8, 1024)
    save_projection(weight, tmp_path / "w.safetensors")
    torch.testing.assert_close(load_projection(tmp_path / "w.safetensors"), weight)
    torch.save(weight, tmp_path / "id2_release.pth.tar")  # the ID² release is a bare tensor
    torch.testing.assert_close(load_projection(tmp_path / "id2_release.pth.tar"), weight)
    torch.save({"state_dict": {"module.base.0.fc1.weight": weight}}, tmp_path / "ckpt.pth.tar")
    torch.testing.assert_close(load_projection(tmp_path / "ckpt.pth.tar"), weight)
    assert not list(tmp_path.glob(".*.tmp"))  # the temp file was renamed
    emb = OriginEmbedder(vae, projection=load_projection(tmp_path / "w.safetensors"), image_size=32)
    emb2 = OriginEmbedder(vae, projection=weight, image_size=32)
    assert emb.fingerprint() == emb2.fingerprint()
    assert emb.fingerprint() != OriginEmbedder(vae, image_size=32).fingerprint()


def test_latent_sample_draws_posterior_samples(vae: torch.nn.Module) -> None:
    """'sample' = mean + std * N(0, 1) from the global RNG (ID²'s README); recorded in config and fingerprint."""
    images = torch.rand(2, 3, 32, 32)
    mean_emb, sample_emb = OriginEmbedder(vae, image_size=32), OriginEmbedder(vae, image_size=32, latent_sample="sample")
    with torch.no_grad():
        dist = vae.encode(images * 2 - 1).latent_dist
    torch.manual_seed(0)
    eps = torch.randn(dist.mean.shape)
    torch.manual_seed(0)
    torch.testing.assert_close(sample_emb.vae_features(images), (dist.mean + dist.std * eps).flatten(1),
                               rtol=1e-5, atol=1e-6)
    assert not torch.allclose(sample_emb.vae_features(images), sample_emb.vae_features(images))  # fresh draws
    assert torch.equal(mean_emb.vae_features(images), mean_emb.vae_features(images))
    assert sample_emb.config["latent_sample"] == "sample" and mean_emb.config["latent_sample"] == "mean"
    assert sample_emb.fingerprint() != mean_emb.fingerprint()
    with pytest.raises(ValueError, match="latent_sample must be one of"):
        OriginEmbedder(vae, image_size=32, latent_sample="mode")


def test_read_image_rejects_bad_bytes(tmp_path: Path) -> None:
    good = png_bytes(0)
    assert read_image(good).size == (40, 40)
    with pytest.raises(ImageDecodeError, match="not an image"):
        read_image(b"definitely not an image")
    with pytest.raises(ImageDecodeError, match="truncated"):
        read_image(good[: len(good) // 2])
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        read_image(bomb_png())
    assert to_tensor([read_image(good)], 32).shape == (1, 3, 32, 32)
