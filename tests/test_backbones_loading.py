"""Loading (issue 12 item 6): kwargs checked before any weight is read, pretrained=False, timm's
FeatureInfo methods, safetensors by default, single-file checkpoints with a local config, device/dtype."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from diffperc import DiffusionBackbone, create_backbone, list_backbones
from diffperc.backbones import _loading
from diffperc.backbones.registry import accepted_kwargs, load_backbone


def _images(b: int = 1, size: int = 32) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to read weights fails the test."""
    def fail(*a, **k):
        raise AssertionError("weights were read before the keyword check")

    monkeypatch.setattr(_loading, "load_components", fail)


def test_wrong_kwarg_on_hub_name_fails_fast_with_valid_names(no_loading: None) -> None:
    t0 = time.perf_counter()
    with pytest.raises(TypeError) as err:
        create_backbone("sd15", layerz="vpd")
    assert time.perf_counter() - t0 < 1.0
    msg = str(err.value)
    assert "'layerz'" in msg and "did you mean 'layers'" in msg
    for valid in ("layers", "timestep", "ensemble_size", "attention", "revision", "pretrained", "use_safetensors"):
        assert valid in msg
    with pytest.raises(TypeError, match="features_only.*always return feature maps"):
        create_backbone("sd21", features_only=True)
    with pytest.raises(TypeError, match="out_indices.*layers="):
        load_backbone("stabilityai/stable-diffusion-2-1", out_indices=(1, 2))
    # a folder that does not exist: the keyword error comes first, so nothing was looked up
    with pytest.raises(TypeError, match="timestpe.*did you mean 'timestep'"):
        DiffusionBackbone.from_pretrained("/nonexistent/sd", timestpe=261)


@pytest.mark.parametrize("name", list_backbones())
def test_every_preset_checks_its_kwargs(name: str, no_loading: None) -> None:
    valid = accepted_kwargs(name)
    assert valid is not None and {"device", "torch_dtype"} <= valid
    with pytest.raises(TypeError, match="'not_an_option'"):
        create_backbone(name, not_an_option=1)


def test_accepted_kwargs_are_the_real_options() -> None:
    sd = accepted_kwargs("test_sd")
    assert {"layers", "timestep", "add_noise", "ensemble_size", "attention", "seed", "pretrained"} <= sd
    assert not {"vae", "unet", "name_or_path"} & sd  # components are set by the preset
    assert {"layer", "image_size", "pretrained"} <= accepted_kwargs("dinov2_vitb14")
    assert not {"name", "model"} & accepted_kwargs("dinov2_vitb14")
    assert {"weights", "sd_kwargs", "dino_kwargs"} <= accepted_kwargs("sd15_dinov2b")


def _saved(tmp_path: Path, **kw) -> tuple[DiffusionBackbone, Path]:
    bb = create_backbone("test_sd", layers="vpd", timestep=1, add_noise=False, **kw)
    bb.save_pretrained(tmp_path / "model")
    return bb, tmp_path / "model"


def test_pretrained_false_builds_architecture_from_config_without_weights(tmp_path: Path) -> None:
    bb, folder = _saved(tmp_path)
    for f in list(folder.rglob("*.safetensors")):
        f.unlink()  # only config and tokenizer files are left: nothing to read weights from
    rnd = DiffusionBackbone.from_pretrained(folder, pretrained=False, layers="vpd", timestep=1, add_noise=False)
    for part in ("unet", "vae", "text_encoder"):
        ref, got = getattr(bb, part).state_dict(), getattr(rnd, part).state_dict()
        assert {k: v.shape for k, v in ref.items()} == {k: v.shape for k, v in got.items()}
    assert not torch.equal(bb.unet.conv_in.weight, rnd.unet.conv_in.weight)  # random, not the saved weights
    assert rnd.feature_info == bb.feature_info
    assert [f.shape for f in rnd(_images()).features] == [f.shape for f in bb(_images()).features]
    with pytest.raises(FileNotFoundError, match="could not load"):
        DiffusionBackbone.from_pretrained(folder)  # pretrained=True needs the weights that were removed


def test_pretrained_false_without_cached_config_says_how(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache" / "hub"))
    t0 = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=r"pretrained=False.*config files.*--include '\*\.json'"):
        DiffusionBackbone.from_pretrained("nobody/not-cached-sd", pretrained=False)
    assert time.perf_counter() - t0 < 10
    with pytest.raises(ValueError, match="test_sd is random"):
        create_backbone("test_sd", pretrained=True)
    assert create_backbone("test_sd", pretrained=False).layers == ["up_blocks.1"]


def test_feature_info_has_timm_methods() -> None:
    timm_features = pytest.importorskip("timm.models._features")
    # timm's FeatureInfo wants non-decreasing reductions: the encoder side
    info = create_backbone("test_sd", layers=["down_blocks.0", "down_blocks.1", "down_blocks.2", "mid_block"]).feature_info
    ref = timm_features.FeatureInfo([{"num_chs": f.channels, "reduction": f.reduction, "module": f.name}
                                     for f in info], out_indices=tuple(range(len(info))))
    assert info.channels() == ref.channels() == [8, 8, 16, 16]
    assert info.reduction() == ref.reduction() == info.reductions()
    assert info.module_name() == ref.module_name() == info.names()
    assert info.get_dicts() == ref.get_dicts()
    assert info.get_dicts(keys=["num_chs", "module"], idx=[1, 3]) == ref.get_dicts(keys=["num_chs", "module"], idx=[1, 3])
    assert info.get_dicts(idx=2) == ref.get_dicts(idx=2)
    assert info.channels(1) == ref.channels(1) and info.reduction(-1) == ref.reduction(-1)
    assert info.module_name([0, 2]) == ref.module_name([0, 2])
    assert info.get("reduction", 0) == ref.get("reduction", 0)
    assert info[0].channels == 8  # the dataclass entries are still there
    with pytest.raises(KeyError, match="num_chs"):
        info.get("channels_typo")


def test_safetensors_by_default_bin_only_with_opt_out(tmp_path: Path) -> None:
    bb, folder = _saved(tmp_path)
    for sub in ("unet", "vae"):  # pickled .bin weights instead of .safetensors
        getattr(bb, sub).save_pretrained(folder / sub, safe_serialization=False)
        (folder / sub / "diffusion_pytorch_model.safetensors").unlink()
    (folder / "text_encoder" / "model.safetensors").unlink()
    torch.save(bb.text_encoder.state_dict(), folder / "text_encoder" / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="use_safetensors=False"):
        DiffusionBackbone.from_pretrained(folder, layers="vpd")
    loaded = DiffusionBackbone.from_pretrained(folder, use_safetensors=False, layers="vpd", timestep=1, add_noise=False)
    images = _images()
    for a, b in zip(loaded(images, prompts="a cat").features, bb(images, prompts="a cat").features, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_single_file_offline_needs_config_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"not read: the config check comes first")
    with pytest.raises(ValueError, match=r"no config= given.*local diffusers folder.*cached"):
        DiffusionBackbone.from_pretrained(ckpt)
    with pytest.raises(ValueError, match="config folder .*missing_cfg does not exist"):
        DiffusionBackbone.from_pretrained(ckpt, config=tmp_path / "missing_cfg")
    (tmp_path / "no_index").mkdir()
    with pytest.raises(ValueError, match="has no model_index.json"):
        DiffusionBackbone.from_pretrained(ckpt, config=tmp_path / "no_index")


# ---------------------------------------------------------------- a real single-file round trip
# A literal port of diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py (commit
# 58eb52c0, line numbers below), generalised from SD's 4 levels to the tiny models' sizes, to write
# the tiny SD as an original (LDM-key) single-file checkpoint that diffusers converts back.

_UNET_MAP = [  # :17-29
    ("time_embed.0.weight", "time_embedding.linear_1.weight"), ("time_embed.0.bias", "time_embedding.linear_1.bias"),
    ("time_embed.2.weight", "time_embedding.linear_2.weight"), ("time_embed.2.bias", "time_embedding.linear_2.bias"),
    ("input_blocks.0.0.weight", "conv_in.weight"), ("input_blocks.0.0.bias", "conv_in.bias"),
    ("out.0.weight", "conv_norm_out.weight"), ("out.0.bias", "conv_norm_out.bias"),
    ("out.2.weight", "conv_out.weight"), ("out.2.bias", "conv_out.bias"),
]
_UNET_RESNET = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"),  # :31-39
                ("out_layers.3", "conv2"), ("emb_layers.1", "time_emb_proj"), ("skip_connection", "conv_shortcut")]


def _unet_layer_map(levels: int, per: int) -> list[tuple[str, str]]:
    """(sd, hf) prefixes, :41-89 with range(4) -> levels, range(2)/range(3) -> per/per+1, 3 * i -> (per+1) * i."""
    out = []
    for i in range(levels):
        for j in range(per):  # :47-57
            out.append((f"input_blocks.{(per + 1) * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            if i < levels - 1:
                out.append((f"input_blocks.{(per + 1) * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        for j in range(per + 1):  # :59-69
            out.append((f"output_blocks.{(per + 1) * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            if i > 0:
                out.append((f"output_blocks.{(per + 1) * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < levels - 1:  # :71-80
            out.append((f"input_blocks.{(per + 1) * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
            out.append((f"output_blocks.{(per + 1) * i + per}.{1 if i == 0 else 2}.", f"up_blocks.{i}.upsamplers.0."))
    out.append(("middle_block.1.", "mid_block.attentions.0."))  # :82-84
    out += [(f"middle_block.{2 * j}.", f"mid_block.resnets.{j}.") for j in range(2)]  # :86-89
    return out


def _unet_to_ldm(sd: dict, levels: int, per: int) -> dict:
    """convert_unet_state_dict, :92-109."""
    mapping = {k: k for k in sd}
    for s, h in _UNET_MAP:
        mapping[h] = s
    for k, v in mapping.items():
        if "resnets" in k:
            for s, h in _UNET_RESNET:
                v = v.replace(h, s)
            mapping[k] = v
    for k, v in mapping.items():
        for s, h in _unet_layer_map(levels, per):
            v = v.replace(h, s)
        mapping[k] = v
    return {v: sd[k] for k, v in mapping.items()}


def _vae_to_ldm(sd: dict, levels: int, per: int) -> dict:
    """convert_vae_state_dict, :116-206 (4 levels -> levels, 2 resnets -> per, 3 - i -> levels - 1 - i)."""
    maps = [("nin_shortcut", "conv_shortcut"), ("norm_out", "conv_norm_out"), ("mid.attn_1.", "mid_block.attentions.0.")]
    for i in range(levels):
        maps += [(f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}.") for j in range(per)]
        if i < levels - 1:  # :130-137
            maps.append((f"down.{i}.downsample.", f"down_blocks.{i}.downsamplers.0."))
            maps.append((f"up.{levels - 1 - i}.upsample.", f"up_blocks.{i}.upsamplers.0."))
        maps += [(f"decoder.up.{levels - 1 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}.")
                 for j in range(per + 1)]  # :141-144
    maps += [(f"mid.block_{i + 1}.", f"mid_block.resnets.{i}.") for i in range(2)]  # :147-150
    attn = [("norm.", "group_norm."), ("q.", "query."), ("k.", "key."), ("v.", "value."), ("proj_out.", "proj_attn.")]
    extra = [("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]  # :163-168
    out = {}
    for k, v in sd.items():
        name = k
        for s, h in maps:  # :181-184
            name = name.replace(h, s)
        if "attentions" in k:  # :185-189
            for s, h in attn:
                name = name.replace(h, s)
        if "mid.attn_1." in name:  # :191-205: to_q -> q, ...; linear weights -> 1x1 conv weights
            for h, s in extra:
                name = name.replace(f"mid.attn_1.{h}.", f"mid.attn_1.{s}.")
            v = v.reshape(*v.shape, 1, 1) if v.ndim == 2 else v
        out[name] = v
    return out


def _sd1_single_file(bb: DiffusionBackbone) -> dict:
    """The original-format state dict, :324-345 (SD 1.x text encoder branch, :341-342)."""
    u, v = bb.unet.config, bb.vae.config
    ckpt = {"model.diffusion_model." + k: t for k, t in
            _unet_to_ldm(bb.unet.state_dict(), len(u.block_out_channels), u.layers_per_block).items()}
    ckpt |= {"first_stage_model." + k: t for k, t in
             _vae_to_ldm(bb.vae.state_dict(), len(v.block_out_channels), v.layers_per_block).items()}
    # the original files name CLIP's keys text_model.*, a prefix transformers 5's state_dict leaves out
    ckpt |= {"cond_stage_model.transformer." + ("" if k.startswith("text_model.") else "text_model.") + k: t
             for k, t in bb.text_encoder.state_dict().items()}
    return {k: t.contiguous() for k, t in ckpt.items()}


def test_single_file_round_trip_with_local_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import save_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    bb, folder = _saved(tmp_path)
    save_file(_sd1_single_file(bb), tmp_path / "tiny_sd.safetensors")
    loaded = DiffusionBackbone.from_pretrained(tmp_path / "tiny_sd.safetensors", config=folder, layers="vpd",
                                               timestep=1, add_noise=False)
    for part in ("unet", "vae", "text_encoder"):
        ref, got = getattr(bb, part).state_dict(), getattr(loaded, part).state_dict()
        assert ref.keys() == got.keys()
        assert all(torch.equal(ref[k], got[k]) for k in ref), part
    images = _images()
    for a, b in zip(loaded(images, prompts="a cat").features, bb(images, prompts="a cat").features, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # equal weights; attention kernels may differ
    # a file that is not an SD checkpoint, with a good config: the error names the file's content
    save_file({"model.diffusion_model.x": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match=r"could not convert single-file checkpoint .*other.safetensors"):
        DiffusionBackbone.from_pretrained(tmp_path / "other.safetensors", config=folder)


def test_device_and_torch_dtype_arguments(tmp_path: Path) -> None:
    bb = create_backbone("test_sd", device="cpu", torch_dtype="bfloat16", layers="dift")
    assert bb.dtype == torch.bfloat16 and bb.device.type == "cpu"
    _ = bb.feature_info  # the one probe forward, before counting
    seen = []
    bb.unet.up_blocks[1].resnets[0].register_forward_hook(lambda m, a, o: seen.append(a[0].dtype))
    assert bb(_images()).features[0].dtype == torch.bfloat16 and seen == [torch.bfloat16]
    _, folder = _saved(tmp_path)
    loaded = load_backbone(folder, device=torch.device("cpu"), torch_dtype=torch.bfloat16)
    assert loaded.dtype == loaded.vae.dtype == loaded.text_encoder.dtype == torch.bfloat16
    assert load_backbone("test_sd", device=None, torch_dtype=None).dtype == torch.float32
    with pytest.raises(ValueError, match="not a floating dtype"):
        create_backbone("test_sd", torch_dtype="int8")
