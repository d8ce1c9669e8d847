"""diffperc.integrations.mmseg: DiffPercBackbone inside an mmseg EncoderDecoder (tiny test_sd backbone).

Needs mmsegmentation with full mmcv (compiled ops); skipped otherwise (`bash scripts/install_mmseg.sh`).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

try:
    import mmseg.models  # noqa: F401  (needs mmcv._ext: mmcv-lite is not enough)
except Exception as err:  # ImportError, or mmseg's AssertionError on an incompatible mmcv
    pytest.skip(f"mmsegmentation with full mmcv is not importable ({type(err).__name__}: {err}); "
                "install it with `bash scripts/install_mmseg.sh`", allow_module_level=True)

from mmengine.config import Config  # noqa: E402
from mmengine.optim import OptimWrapper  # noqa: E402
from mmengine.structures import PixelData  # noqa: E402
from mmseg.registry import MODELS  # noqa: E402
from mmseg.structures import SegDataSample  # noqa: E402
from mmseg.utils import register_all_modules  # noqa: E402

from diffperc import create_backbone  # noqa: E402
from diffperc.heads.vpd import TextAdapter  # noqa: E402
from diffperc.integrations.mmseg import DiffPercBackbone  # noqa: E402

register_all_modules(init_default_scope=True)

MEAN, STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
BB_KW = {"layers": "vpd", "timestep": 1, "add_noise": False}
# test_sd's VPD taps are channels [16, 16, 8, 8] at reductions [16, 8, 4, 2] (deepest first).
SHALLOW_FIRST_CHANNELS, SHALLOW_FIRST_STRIDES = [8, 8, 16, 16], [2, 4, 8, 16]


def _normalise(img255: torch.Tensor) -> torch.Tensor:
    return (img255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def test_features_equal_diffperc_backbone_shallow_first():
    bb = MODELS.build(dict(type="DiffPercBackbone", model="test_sd", mean=MEAN, std=STD, **BB_KW))
    ref = create_backbone("test_sd", **BB_KW)
    img255 = torch.randint(0, 256, (2, 3, 32, 48)).float()
    with torch.no_grad():
        feats = bb(_normalise(img255))
        expected = ref(img255 / 255, prompts="").features  # deepest first
    assert isinstance(feats, tuple) and bb.out_channels == SHALLOW_FIRST_CHANNELS
    assert bb.out_reductions == SHALLOW_FIRST_STRIDES
    for f, e, c, r in zip(feats, expected[::-1], SHALLOW_FIRST_CHANNELS, SHALLOW_FIRST_STRIDES, strict=True):
        assert f.shape == (2, c, 32 // r, 48 // r)
        torch.testing.assert_close(f, e, atol=1e-5, rtol=1e-5)
    # A size that is not a multiple of 16 is padded inside and the maps cropped back (ceil).
    with torch.no_grad():
        odd = bb(_normalise(torch.randint(0, 256, (1, 3, 40, 56)).float()))
    assert [tuple(f.shape[-2:]) for f in odd] == [(-(-40 // r), -(-56 // r)) for r in SHALLOW_FIRST_STRIDES]
    # Raw 0-255 pixels (a preprocessor without normalisation) are caught, not silently clamped.
    with pytest.raises(ValueError, match="mean and std"):
        bb(img255)


def test_class_prompts_adapter_and_attention_concat():
    names, template = ["wall", "floor", "sky"], "a photo of a {}."
    bb = DiffPercBackbone(model="test_sd", mean=MEAN, std=STD, class_names=names, templates=[template],
                          text_adapter=True, concat_attention=True, attention_reductions=[4, 8],
                          trainable=True, **BB_KW)
    te, tok = bb.model.text_encoder, bb.model.tokenizer
    with torch.no_grad():  # VPD class embedding: pooled output = final state of the end-of-text token
        for k, name in enumerate(names):
            ids = tok(template.format(name), padding="max_length", max_length=20, return_tensors="pt").input_ids
            hidden = te(ids).last_hidden_state[0]
            eot = (ids[0] == tok.eos_token_id).nonzero()[0, 0]
            torch.testing.assert_close(bb.class_embeds[0, k], hidden[eot], atol=1e-6, rtol=1e-6)
    # Three class tokens appended at reductions 4 and 8 only.
    assert bb.out_channels == [8, 8 + 3, 16 + 3, 16]
    assert isinstance(bb.adapter, TextAdapter) and torch.allclose(bb.adapter.gamma, torch.full((8,), 1e-4))

    img255 = torch.randint(0, 256, (2, 3, 32, 32)).float()
    feats = bb(_normalise(img255))
    ref = create_backbone("test_sd", attention=True, attention_resolutions=[4, 8], trainable=True, **BB_KW)
    ref.unet.load_state_dict(bb.model.unet.state_dict())
    with torch.no_grad():
        embeds = bb.adapter(bb.class_embeds).expand(2, -1, -1)
        out = ref(img255 / 255, prompt_embeds=embeds)
    by_r = dict(zip(ref.feature_info.reductions(), out.features, strict=True))
    for f, r in zip(feats, SHALLOW_FIRST_STRIDES, strict=True):
        want = torch.cat([by_r[r], out.attention[r]], 1) if r in (4, 8) else by_r[r]
        torch.testing.assert_close(f.detach(), want, atol=1e-5, rtol=1e-5)
    sum(f.square().mean() for f in feats).backward()  # the adapter learns through the trainable UNet
    assert bb.adapter.gamma.grad is not None and bb.adapter.gamma.grad.abs().sum() > 0


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="trainable=True"):
        DiffPercBackbone(model="test_sd", text_adapter=True, **BB_KW)
    with pytest.raises(ValueError, match="std"):
        DiffPercBackbone(model="test_sd", std=[1.0, 0.0, 1.0], **BB_KW)
    with pytest.raises(ValueError, match="pretrained"):
        DiffPercBackbone(model="test_sd", pretrained="x.pth", **BB_KW)
    with pytest.raises(ValueError, match="init_cfg"):
        DiffPercBackbone(model="test_sd", init_cfg=dict(type="Normal", layer="Conv2d"), **BB_KW)


def _config_file(tmp_path) -> str:
    """An mmseg config (Python file, as users write them) with the documented custom_imports line."""
    path = tmp_path / "tiny_fpn_diffperc.py"
    path.write_text(f"""
custom_imports = dict(imports=["diffperc.integrations.mmseg"], allow_failed_imports=False)
norm_cfg = dict(type="GN", num_groups=2, requires_grad=True)
model = dict(
    type="EncoderDecoder",
    data_preprocessor=dict(type="SegDataPreProcessor", mean={MEAN}, std={STD}, bgr_to_rgb=True,
                           pad_val=0, seg_pad_val=255, size=(32, 48)),
    backbone=dict(type="DiffPercBackbone", model="test_sd", layers="vpd", timestep=1, add_noise=False,
                  mean={MEAN}, std={STD}),
    neck=dict(type="FPN", in_channels={SHALLOW_FIRST_CHANNELS}, out_channels=8, num_outs=4),
    decode_head=dict(type="FPNHead", in_channels=[8, 8, 8, 8], in_index=[0, 1, 2, 3],
                     feature_strides={SHALLOW_FIRST_STRIDES}, channels=8, num_classes=3, dropout_ratio=0.0,
                     norm_cfg=norm_cfg, align_corners=False,
                     loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0,
                                      avg_non_ignore=True)),
    train_cfg=dict(), test_cfg=dict(mode="whole"))
""")
    return str(path)


def _batch() -> dict:
    g = torch.Generator().manual_seed(0)
    inputs, samples = [], []
    for _ in range(2):
        inputs.append(torch.randint(0, 256, (3, 32, 48), generator=g, dtype=torch.uint8))
        mask = torch.randint(0, 3, (1, 32, 48), generator=g)
        mask[:, :4] = 255  # ignored rows
        s = SegDataSample(gt_sem_seg=PixelData(data=mask))
        s.set_metainfo({"img_shape": (32, 48), "ori_shape": (32, 48), "pad_shape": (32, 48)})
        samples.append(s)
    return {"inputs": inputs, "data_samples": samples}


def test_encoder_decoder_trains_and_predicts(tmp_path):
    cfg = Config.fromfile(_config_file(tmp_path))
    model = MODELS.build(cfg.model)
    assert isinstance(model.backbone, DiffPercBackbone)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    model.init_weights()  # what mmengine's runner calls: must not touch the pretrained weights
    assert all(torch.equal(before[k], v) for k, v in model.backbone.state_dict().items())

    head_before = {k: v.clone() for k, v in model.decode_head.state_dict().items()}
    optim = OptimWrapper(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9))
    model.train()
    assert not model.backbone.model.unet.training  # frozen UNet stays in eval mode
    losses = []
    for _ in range(8):
        log_vars = model.train_step(_batch(), optim)
        losses.append(float(log_vars["loss"].detach()))
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    assert any(not torch.equal(head_before[k], v) for k, v in model.decode_head.state_dict().items())
    assert all(torch.equal(before[k], v) for k, v in model.backbone.state_dict().items())  # frozen: unchanged

    model.eval()
    data = model.data_preprocessor(_batch(), False)
    with torch.no_grad():
        logits = model._forward(data["inputs"], data["data_samples"])  # (B, K, H/2, W/2) at the finest stride
        results = model.test_step(_batch())
    assert logits.shape == (2, 3, 16, 24)
    for i, res in enumerate(results):
        seg_logits, pred = res.seg_logits.data, res.pred_sem_seg.data
        assert seg_logits.shape == (3, 32, 48) and pred.shape == (1, 32, 48)
        want = F.interpolate(logits[i : i + 1], size=(32, 48), mode="bilinear", align_corners=False)[0]
        torch.testing.assert_close(seg_logits, want, atol=1e-5, rtol=1e-5)
        assert torch.equal(pred[0], seg_logits.argmax(0))
