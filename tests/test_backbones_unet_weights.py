"""``unet_weights=``: a UNet state dict (CleanDIFT, a fine-tune) loaded over a pipeline's UNet, strictly checked.

Tiny models only: the weights of a second tiny UNet (another seed) saved as a file, a UNet folder or a
pipeline folder must give exactly the features of a backbone built with that UNet in the first place.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from diffperc import DiffusionBackbone
from diffperc.backbones.registry import accepted_kwargs, create_backbone, load_backbone
from diffperc.backbones.tiny import tiny_sd_components

OPTS = {"layers": "vpd", "timestep": 50}


def _features(bb: DiffusionBackbone) -> list[torch.Tensor]:
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return bb(images, prompts="a cat", generator=torch.Generator().manual_seed(1)).features


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny pipeline (seed 0) and the seed-1 UNet as a file, a UNet folder and a whole pipeline folder."""
    root = tmp_path_factory.mktemp("unet_weights")
    DiffusionBackbone(**tiny_sd_components(seed=0), **OPTS).save_pretrained(root / "base")
    other = tiny_sd_components(seed=1)
    save_file(other["unet"].state_dict(), root / "unet1.safetensors")
    other["unet"].save_pretrained(root / "unet1_folder")
    DiffusionBackbone(**other, **OPTS).save_pretrained(root / "pipe1")
    return {"base": root / "base", "file": root / "unet1.safetensors", "unet_folder": root / "unet1_folder",
            "pipeline": root / "pipe1", "root": root}


@pytest.fixture(scope="module")
def expected() -> list[torch.Tensor]:
    """Features of the seed-0 pipeline whose UNet is the seed-1 one, built directly (no unet_weights)."""
    parts = tiny_sd_components(seed=0)
    parts["unet"] = tiny_sd_components(seed=1)["unet"]
    return _features(DiffusionBackbone(**parts, **OPTS))


@pytest.mark.parametrize("kind", ["file", "unet_folder", "pipeline"])
def test_unet_weights_give_the_features_of_that_unet(folders, expected, kind) -> None:
    bb = DiffusionBackbone.from_pretrained(folders["base"], unet_weights=folders[kind], **OPTS)
    got = _features(bb)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    plain = _features(DiffusionBackbone.from_pretrained(folders["base"], **OPTS))
    assert not torch.allclose(plain[0], got[0])  # the override really changed something
    assert bb.config["unet_weights"] == str(folders[kind])


def test_presets_and_load_backbone_take_unet_weights(folders, expected) -> None:
    """A preset built in code (test_sd) gets the weights after building; load_backbone passes them on."""
    for bb in (create_backbone("test_sd", unet_weights=folders["file"], **OPTS),
               load_backbone(str(folders["base"]), unet_weights=str(folders["file"]), **OPTS)):
        for g, e in zip(_features(bb), expected, strict=True):
            torch.testing.assert_close(g, e, rtol=0, atol=0)
    bf16 = create_backbone("test_sd", unet_weights=folders["file"], torch_dtype="bfloat16", **OPTS)
    assert bf16.unet.conv_in.weight.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.unet.conv_in.weight.float(),
                               tiny_sd_components(seed=1)["unet"].conv_in.weight.bfloat16().float())


def test_a_common_key_prefix_is_stripped(folders, expected) -> None:
    unet = tiny_sd_components(seed=1)["unet"]
    save_file({f"unet.{k}": v for k, v in unet.state_dict().items()}, folders["root"] / "prefixed.safetensors")
    bb = DiffusionBackbone.from_pretrained(folders["base"], unet_weights=folders["root"] / "prefixed.safetensors",
                                           **OPTS)
    torch.testing.assert_close(_features(bb)[0], expected[0], rtol=0, atol=0)


def test_bad_keys_and_shapes_are_named(folders) -> None:
    state = tiny_sd_components(seed=1)["unet"].state_dict()
    dropped = sorted(state)[0]
    bad = {k: v for k, v in state.items() if k != dropped} | {"not.a.unet.key": torch.zeros(1)}
    save_file(bad, folders["root"] / "bad.safetensors")
    with pytest.raises(ValueError, match=rf"1 missing keys \[{dropped}\]; 1 unexpected keys \[not.a.unet.key\]"):
        DiffusionBackbone.from_pretrained(folders["base"], unet_weights=folders["root"] / "bad.safetensors")
    # an SD 2.x-flavoured UNet (linear projections) has the same keys but other shapes
    save_file(tiny_sd_components(seed=1, sd2=True)["unet"].state_dict(), folders["root"] / "sd2.safetensors")
    with pytest.raises(ValueError, match=r"tensors have other shapes .*proj_in.weight"):
        create_backbone("test_sd", unet_weights=folders["root"] / "sd2.safetensors")
    with pytest.raises(FileNotFoundError, match=r"unet_weights .*nope.safetensors.*no such file"):
        create_backbone("test_sd", unet_weights="./nope.safetensors")
    (folders["root"] / "empty").mkdir(exist_ok=True)
    with pytest.raises(FileNotFoundError, match="has no diffusion_pytorch_model"):
        DiffusionBackbone.from_pretrained(folders["base"], unet_weights=folders["root"] / "empty")
    save_file({"x": torch.zeros(1)}, folders["root"] / "x.safetensors")
    with pytest.raises(ValueError, match=r"unet_weights .*\.pt is not a \.safetensors file.*use_safetensors=False"):
        torch.save({"x": torch.zeros(1)}, folders["root"] / "w.pt")
        create_backbone("test_sd", unet_weights=folders["root"] / "w.pt")


def test_hub_file_ids_and_offline_errors(folders, monkeypatch) -> None:
    """``org/name/file.safetensors`` is a file in a hub repo; offline and uncached, the error says how to get it."""
    import huggingface_hub

    calls = []

    def fake_download(repo_id, filename, revision=None, local_files_only=False):
        calls.append((repo_id, filename, local_files_only))
        return str(folders["file"])

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    bb = create_backbone("test_sd", unet_weights="CompVis/cleandift/cleandift_sd21_unet.safetensors", **OPTS)
    assert calls == [("CompVis/cleandift", "cleandift_sd21_unet.safetensors", True)]
    assert torch.equal(bb.unet.conv_in.weight, tiny_sd_components(seed=1)["unet"].conv_in.weight)
    # a repo id alone: a snapshot of its UNet files (a pipeline repo's unet/ or a UNet repo's root)
    snaps = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, revision=None, local_files_only=False, allow_patterns=None:
                        snaps.append((repo_id, allow_patterns)) or str(folders["pipeline"]))
    bb = create_backbone("test_sd", unet_weights="someone/tiny-pipeline", **OPTS)
    assert snaps[0][0] == "someone/tiny-pipeline" and "unet/diffusion_pytorch_model*" in snaps[0][1]
    assert torch.equal(bb.unet.conv_in.weight, tiny_sd_components(seed=1)["unet"].conv_in.weight)
    monkeypatch.undo()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(folders["root"] / "empty_cache"))
    with pytest.raises(FileNotFoundError, match=r"hf download CompVis/nothing-here x.safetensors.*HF_HUB_OFFLINE"):
        create_backbone("test_sd", unet_weights="CompVis/nothing-here/x.safetensors")


def test_cleandift_presets_use_the_released_settings(monkeypatch) -> None:
    """sd21-cleandift = SD 2.1 + CleanDIFT's UNet, clean latents at t=261, up_blocks.1 (see registry.py)."""
    seen = {}

    def fake(name_or_path, **kw):
        seen[name_or_path] = kw
        return "built"

    monkeypatch.setattr(DiffusionBackbone, "from_pretrained", staticmethod(fake))
    assert create_backbone("sd21-cleandift") == "built" and create_backbone("sd15-cleandift", timestep=0) == "built"
    assert seen["stabilityai/stable-diffusion-2-1"] == {
        "unet_weights": "CompVis/cleandift/cleandift_sd21_unet.safetensors", "layers": "dift", "timestep": 261,
        "add_noise": False}
    assert seen["stable-diffusion-v1-5/stable-diffusion-v1-5"]["timestep"] == 0  # overrides win
    assert "unet_weights" in accepted_kwargs("sd21-cleandift") and "unet_weights" in accepted_kwargs("test_sd")
    with pytest.raises(TypeError, match="'unet_weight' .*did you mean 'unet_weights'"):
        create_backbone("sd21-cleandift", unet_weight="x")
