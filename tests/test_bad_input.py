"""Bad input at the backbone boundary gets an error that names the problem and the fix."""

from __future__ import annotations

import pytest
import torch

from diffperc import DiffusionBackbone, create_backbone


@pytest.fixture(scope="module")
def bb() -> DiffusionBackbone:
    return create_backbone("test_sd", layers="dift")


@pytest.mark.parametrize(
    ("images", "match"),
    [
        (torch.rand(3, 64, 64), r"use images.unsqueeze\(0\)"),
        (torch.rand(1, 64, 64, 3), r"\(B, 3, H, W\).*channels last"),
        (torch.rand(1, 1, 64, 64), r"must have shape \(B, 3, H, W\), got \(1, 1, 64, 64\)"),
        (torch.randint(0, 255, (1, 3, 64, 64), dtype=torch.uint8), r"floats in \[0, 1\].*uint8.*/ 255"),
        (torch.rand(1, 3, 64, 64) * 255, r"in \[0, 1\].*0-255"),
        (torch.rand(1, 3, 64, 64) * 2 - 1, r"in \[0, 1\].*\[-1, 1\]"),
        (torch.full((1, 3, 64, 64), float("nan")), "NaN"),
        (torch.rand(0, 3, 64, 64), "empty batch"),
        (torch.rand(1, 3, 60, 64), r"60x64 is not a multiple of 16.*pad=True"),
    ],
)
def test_bad_images(bb: DiffusionBackbone, images: torch.Tensor, match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        bb(images)


def test_not_a_tensor(bb: DiffusionBackbone) -> None:
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        bb([[0.0]])


def test_prompt_count_and_embeds(bb: DiffusionBackbone) -> None:
    images = torch.rand(2, 3, 32, 32)
    with pytest.raises(ValueError, match="got 3 prompts for a batch of 2 images"):
        bb(images, prompts=["a", "b", "c"])
    with pytest.raises(ValueError, match="cross_attention_dim 8, got 16"):
        bb(images, prompt_embeds=torch.randn(2, 4, 16))
    with pytest.raises(ValueError, match="prompt_embeds has batch 3, images have 2"):
        bb(images, prompt_embeds=torch.randn(3, 4, 8))
    with pytest.raises(ValueError, match="not both"):
        bb(images, prompts="a", prompt_embeds=torch.randn(2, 4, 8))


def test_bad_latents(bb: DiffusionBackbone) -> None:
    with pytest.raises(ValueError, match=r"latents must have shape \(B, 4, h, w\)"):
        bb(latents=torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="latent size 12x16 is not a multiple of the UNet's downsampling 8"):
        bb(latents=torch.randn(1, 4, 12, 16))


def test_unknown_layer_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown UNet layer 'up_blocks.9'.*Presets: \['dift', 'vpd', 'cross_q', 'ovdiff_q'\].*up_blocks.1"):
        create_backbone("test_sd", layers=["up_blocks.9"])
    with pytest.raises(ValueError, match="layers is empty"):
        create_backbone("test_sd", layers=[])


def test_bad_options() -> None:
    with pytest.raises(ValueError, match=r"timestep must be integers in \[0, 1000\)"):
        create_backbone("test_sd", timestep=1000)
    with pytest.raises(ValueError, match="ensemble_size and ensemble_chunk must be >= 1"):
        create_backbone("test_sd", ensemble_size=0)
    with pytest.raises(ValueError, match="latent_sample must be 'mean' or 'sample'"):
        create_backbone("test_sd", latent_sample="mode")


def test_unknown_backbone_lists_close_matches() -> None:
    with pytest.raises(ValueError, match=r"unknown backbone 'sd-15'. Did you mean: sd15"):
        create_backbone("sd-15")


def test_missing_model_folder_says_how_to_download_and_run_offline(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"(?s)no such folder.*hf download.*HF_HUB_OFFLINE=1"):
        DiffusionBackbone.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no model_index.json"):
        DiffusionBackbone.from_pretrained(tmp_path / "empty")


def test_uncached_hub_id_offline_fails_fast_with_instructions(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"(?s)'stable-diffusion-v1-5/stable-diffusion-v1-5'.*hf download"):
        create_backbone("sd15")
