"""VPD depth, semantic and referring segmentation against literal ports of VPD's released forward.

Upstream: github.com/wl-zhao/VPD @ 92095ab (paths below are relative to it), which runs the
CompVis LDM UNet (github.com/CompVis/stable-diffusion @ 21f890f, ``ldm/``) wrapped by
``vpd/models.py``; mmsegmentation 0.30 for the segmentation neck/head. The ports below re-implement
those steps on diffusers' ``UNet2DConditionModel`` (the LDM module each step uses is named with its
diffusers path) with their own hooks, attention processor, attention store and heads, on the tiny
random SD-shaped components (``tiny_sd_components``, the weights ``test_sd`` is built from).
diffperc is used only to build the components and, for each head, to provide the weights copied
into the port. Compared: features (with the attention maps), the maps themselves and the head
outputs (rel err <= 1e-4), predictions (identical).

Mapping LDM -> diffusers (SD 1.5; the tiny UNet has the same block structure):
  ``encoder_vq.encode(x).mode()``            -> ``vae.quant_conv(vae.encoder(x))``, first half of the channels
  ``output_blocks[1]``, ``[4]``, ``[7]``     -> ``up_blocks.0.resnets.1``, ``up_blocks.1.attentions.1``,
                                                ``up_blocks.2.attentions.1``; the final ``h`` -> ``up_blocks.3``
  ``CrossAttention`` in input/middle/output  -> every ``Attention`` (attn1 and attn2) in down/mid/up blocks
  ``DiffusionWrapper(c_crossattn=[c])``      -> ``encoder_hidden_states = cat([c], 1)``
Sizes: VPD's constants for 512-px SD inputs scale to the tiny model's (VAE factor 2 instead of 8):
base_size 512 -> 64 (latent 64 -> 32), attention kept up to (latent / 2)^2 queries, depth crops
480 -> 56 padded 512 -> 64 (fused map 16 -> 8 cropped by one), GroupNorm(16, C) -> gcd(16, C) groups.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import nn

from diffperc.backbones.tiny import tiny_sd_components
from diffperc.tasks._dense import VPD_BACKBONE_ATTENTION
from diffperc.tasks.depth import DepthTask
from diffperc.tasks.refseg import RefSegTask
from diffperc.tasks.semseg import SemSegTask

TEMPLATES = ["a photo of a {}.", "a {} in a video game."]
TINY_ATTENTION = {**VPD_BACKBONE_ATTENTION, "attention_resolutions": [4, 8]}  # SD: [16, 32]
RTOL, ATOL = 1e-4, 1e-5


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    """rel err ||got - want|| / ||want|| <= RTOL (the issue's measure), and no element off by more than
    ATOL times the tensor's largest magnitude (float32 sums in another order differ by ~1e-7 relative,
    which an elementwise rtol on values near zero would flag)."""
    assert got.shape == want.shape, (got.shape, want.shape)
    rel = ((got.double() - want.double()).norm() / want.double().norm()).item()
    assert rel <= RTOL, f"relative error {rel:.2e} > {RTOL:.0e}"
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL * want.abs().max().item())
    assert want.abs().max() > 1e-3  # a real signal, not two zero tensors


def _randomize(module: nn.Module, seed: int, scale: float = 0.3) -> None:
    """Random weights and BN statistics, so every port step matters (VPD's 1e-3 inits make heads near-constant)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g) * scale)
                if name.endswith("running_var"):
                    t.copy_(t.abs() + 0.5)


# ================================================================ vpd/models.py, ported
class PortAttentionStore:
    """vpd/models.py:128-166 AttentionStore (step_store per place, maps with <= max_size^2 queries kept)."""

    def __init__(self, base_size: int, max_size: int | None = None) -> None:
        self.base_size = base_size
        self.max_size = self.base_size // 2 if max_size is None else max_size  # models.py:163-166
        self.reset()

    def reset(self) -> None:  # models.py:153-156
        self.step_store = {k: [] for k in ("down_cross", "mid_cross", "up_cross", "down_self", "mid_self", "up_self")}

    def __call__(self, attn: torch.Tensor, is_cross: bool, place: str) -> torch.Tensor:  # models.py:134-138
        key = f"{place}_{'cross' if is_cross else 'self'}"
        if attn.shape[1] <= self.max_size**2:
            self.step_store[key].append(attn)
        return attn

    def get_average_attention(self) -> dict[str, list[torch.Tensor]]:  # models.py:149-151
        return {key: list(items) for key, items in self.step_store.items()}


class PortCrossAttention:
    """vpd/models.py:33-63 ``ca_forward`` (LDM ldm/modules/attention.py:170-193 with the store call) as a
    diffusers attention processor."""

    def __init__(self, controller: PortAttentionStore, place: str) -> None:
        self.controller, self.place = controller, place

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        h = attn.heads
        x = hidden_states
        q = attn.to_q(x)
        is_cross = encoder_hidden_states is not None
        context = x if encoder_hidden_states is None else encoder_hidden_states  # default(context, x)
        k, v = attn.to_k(context), attn.to_v(context)

        def split(t: torch.Tensor) -> torch.Tensor:  # rearrange 'b n (h d) -> (b h) n d'
            b, n, hd = t.shape
            return t.reshape(b, n, h, hd // h).permute(0, 2, 1, 3).reshape(b * h, n, hd // h)

        q, k, v = split(q), split(k), split(v)
        sim = torch.einsum("b i d, b j d -> b i j", q, k) * attn.scale
        probs = sim.softmax(dim=-1)
        bh, i, j = probs.shape
        attn2 = probs.reshape(bh // h, h, i, j).permute(1, 0, 2, 3).mean(0)  # '(b h) k c -> h b k c', mean(0)
        self.controller(attn2, is_cross, self.place)
        out = torch.einsum("b i j, b j d -> b i d", probs, v)
        out = out.reshape(bh // h, h, i, -1).permute(0, 2, 1, 3).reshape(bh // h, i, -1)  # '(b h) n d -> b n (h d)'
        return attn.to_out[1](attn.to_out[0](out))  # self.to_out = Sequential(Linear, Dropout)


def port_register_attention_control(unet: nn.Module, controller: PortAttentionStore) -> None:
    """vpd/models.py:75-95: every CrossAttention of input_blocks / middle_block / output_blocks, by place."""
    for block, place in (("down_blocks", "down"), ("mid_block", "mid"), ("up_blocks", "up")):
        for module in unet.get_submodule(block).modules():
            if isinstance(module, Attention):
                module.set_processor(PortCrossAttention(controller, place))


# register_hier_output (models.py:199-207): the h after output_blocks 1, 4, 7 and after the last one
LDM_OUTPUT_BLOCKS = {1: "up_blocks.0.resnets.1", 4: "up_blocks.1.attentions.1", 7: "up_blocks.2.attentions.1",
                     11: "up_blocks.3"}


class PortUNetWrapper:
    """vpd/models.py:211-250 UNetWrapper around register_hier_output (models.py:168-209)."""

    def __init__(self, unet: nn.Module, use_attn: bool = True, base_size: int = 512, vae_factor: int = 8,
                 attn_selector: str = "up_cross+down_cross") -> None:
        self.unet = unet
        latent = base_size // vae_factor  # VPD: base_size // 8
        self.attention_store = PortAttentionStore(base_size=latent)
        self.size16, self.size32, self.size64 = latent // 4, latent // 2, latent  # base_size // 32, // 16, // 8
        self.use_attn = use_attn
        if use_attn:
            port_register_attention_control(unet, self.attention_store)
        self.attn_selector = attn_selector.split("+")

    def _hier_forward(self, latents: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> list[torch.Tensor]:
        outs: dict[int, torch.Tensor] = {}

        def keep(i: int, module: nn.Module, args: tuple, output: object) -> None:
            outs[i] = output if isinstance(output, torch.Tensor) else output[0]

        hooks = [self.unet.get_submodule(p).register_forward_hook(lambda m, a, o, i=i: keep(i, m, a, o))
                 for i, p in LDM_OUTPUT_BLOCKS.items()]
        try:
            self.unet(latents, t, encoder_hidden_states=context)  # self.out is never applied (models.py:204-207)
        finally:
            for hk in hooks:
                hk.remove()
        return [outs[1], outs[4], outs[7], outs[11]]  # out_list

    def __call__(self, latents: torch.Tensor, t: torch.Tensor, c_crossattn: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.use_attn:
            self.attention_store.reset()
        context = torch.cat(c_crossattn, 1)  # ldm/models/diffusion/ddpm.py:1408-1410 DiffusionWrapper
        out_list = self._hier_forward(latents, t, context)
        if self.use_attn:
            attn16, attn32, attn64 = self.process_attn(self.attention_store.get_average_attention())
            out_list[1] = torch.cat([out_list[1], attn16], dim=1)
            out_list[2] = torch.cat([out_list[2], attn32], dim=1)
            if attn64 is not None:
                out_list[3] = torch.cat([out_list[3], attn64], dim=1)
        return out_list[::-1]

    def process_attn(self, avg_attn: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        attns = {self.size16: [], self.size32: [], self.size64: []}  # models.py:238-250
        for k in self.attn_selector:
            for up_attn in avg_attn[k]:
                size = int(math.sqrt(up_attn.shape[1]))
                b, hw, c = up_attn.shape
                attns[size].append(up_attn.permute(0, 2, 1).reshape(b, c, size, hw // size))  # 'b (h w) c -> b c h w'
        attn16 = torch.stack(attns[self.size16]).mean(0)
        attn32 = torch.stack(attns[self.size32]).mean(0)
        attn64 = torch.stack(attns[self.size64]).mean(0) if attns[self.size64] else None
        return attn16, attn32, attn64


class PortTextAdapter(nn.Module):
    """vpd/models.py:252-306: fc = Linear-GELU-Linear; texts + gamma * fc(texts), repeated per image (seg),
    kept per sentence (refer) or made one token per image (depth)."""

    def __init__(self, text_dim: int) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(text_dim, text_dim), nn.GELU(), nn.Linear(text_dim, text_dim))

    def forward(self, latents: torch.Tensor, texts: torch.Tensor, gamma: torch.Tensor, kind: str) -> torch.Tensor:
        texts = texts + gamma * self.fc(texts)
        if kind == "seg":  # TextAdapter: repeat 'n c -> b n c'
            return texts[None].expand(latents.shape[0], -1, -1)
        if kind == "depth":  # TextAdapterDepth: repeat 'n c -> n b c', b=1
            return texts[:, None, :]
        return texts  # TextAdapterRefer


def port_encode_mode(vae: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """ldm/models/autoencoder.py:324-328 + distributions.py:24-31, 61-62: mode() = mean of the moments."""
    moments = vae.quant_conv(vae.encoder(x))
    mean, _logvar = torch.chunk(moments, 2, dim=1)
    return mean


def port_class_embeddings(text_encoder: nn.Module, tokenizer, names: list[str], templates: list[str],
                          max_length: int = 20) -> torch.Tensor:
    """depth/dump_nyu_text_embeddings.py:27, 118-132 with vpd/models.py:326-336 FrozenCLIPEmbedder (pooled)."""
    rows = []
    for classname in [name.replace("_", " ") for name in names]:
        texts = [template.format(classname) for template in templates]
        enc = tokenizer(texts, truncation=True, max_length=max_length, return_length=True,
                        return_overflowing_tokens=False, padding="max_length", return_tensors="pt")
        rows.append(text_encoder(input_ids=enc["input_ids"]).pooler_output.mean(dim=0))
    return torch.stack(rows, dim=0)


def _copy(dst: nn.Module, src: nn.Module) -> None:
    """Copy the tensors of ``src`` into ``dst`` in registration order (same shapes, possibly other names)."""
    d, s = list(dst.state_dict().values()), list(src.state_dict().values())
    assert len(d) == len(s), (len(d), len(s))
    with torch.no_grad():
        for a, b in zip(d, s, strict=True):
            assert a.shape == b.shape, (a.shape, b.shape)
            a.copy_(b)


def _port_unet(use_attn: bool, base_size: int) -> tuple[PortUNetWrapper, dict]:
    comps = tiny_sd_components(seed=0)  # test_sd's weights
    vae_factor = 2 ** (len(comps["vae"].config.block_out_channels) - 1)
    return PortUNetWrapper(comps["unet"].eval(), use_attn=use_attn, base_size=base_size, vae_factor=vae_factor), comps


# ================================================================ depth (depth/models_depth/model.py)
class PortVPDDepth(nn.Module):
    """model.py:20-159: VPDDepthEncoder's layer1/layer2/out_layer + VPDDepth's Decoder and last_layer_depth."""

    def __init__(self, ldm_prior: list[int], out_dim: int, num_deconv: int, num_filters: int, channels_out: int,
                 max_depth: float) -> None:
        super().__init__()
        g = math.gcd  # GroupNorm(16, C) at the tiny widths
        self.layer1 = nn.Sequential(nn.Conv2d(ldm_prior[0], ldm_prior[0], 3, stride=2, padding=1),  # model.py:27-32
                                    nn.GroupNorm(g(16, ldm_prior[0]), ldm_prior[0]), nn.ReLU(),
                                    nn.Conv2d(ldm_prior[0], ldm_prior[0], 3, stride=2, padding=1))
        self.layer2 = nn.Sequential(nn.Conv2d(ldm_prior[1], ldm_prior[1], 3, stride=2, padding=1))  # 34-36
        self.out_layer = nn.Sequential(nn.Conv2d(sum(ldm_prior), out_dim, 1), nn.GroupNorm(g(16, out_dim), out_dim),
                                       nn.ReLU())  # 38-42
        layers, in_planes = [], out_dim  # Decoder._make_deconv_layer, kernel 2: padding 0 (model.py:202-242)
        for _ in range(num_deconv):
            layers += [nn.ConvTranspose2d(in_planes, num_filters, 2, stride=2, padding=0, output_padding=0, bias=False),
                       nn.BatchNorm2d(num_filters), nn.ReLU(inplace=True)]
            in_planes = num_filters
        self.deconv_layers = nn.Sequential(*layers)
        self.conv_layers = nn.Sequential(nn.Conv2d(num_filters, channels_out, 3, 1, 1),  # build_conv_layer: bias
                                         nn.BatchNorm2d(channels_out), nn.ReLU(inplace=True))  # 176-188
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)  # 190
        self.last_layer_depth = nn.Sequential(nn.Conv2d(channels_out, channels_out, 3, 1, 1), nn.ReLU(inplace=False),
                                              nn.Conv2d(channels_out, 1, 3, 1, 1))  # 125-128
        self.text_adapter = PortTextAdapter(8)
        self.gamma = nn.Parameter(torch.ones(8) * 1e-4)
        self.max_depth = max_depth

    def decoder(self, conv_feats: list[torch.Tensor]) -> torch.Tensor:  # model.py:192-200
        out = self.conv_layers(self.deconv_layers(conv_feats[0]))
        return self.up(self.up(out))


def port_depth_forward(m: PortVPDDepth, unet: PortUNetWrapper, vae: nn.Module, class_embeddings: torch.Tensor,
                       x: torch.Tensor, class_ids: torch.Tensor, crop: int = 56, padded: int = 64) -> torch.Tensor:
    """VPDDepth.forward (model.py:134-159) around VPDDepthEncoder.forward (90-105); 480 -> crop, 512 -> padded."""
    b, c, h, w = x.shape
    x = x * 2.0 - 1.0
    if h == crop and w == crop:
        new_x = torch.zeros(b, c, padded, padded)
        new_x[:, :, 0:crop, 0:crop] = x
        x = new_x
    latents = port_encode_mode(vae, x)
    ce = class_embeddings[class_ids.tolist()]
    c_crossattn = m.text_adapter(latents, ce, m.gamma, "depth")
    t = torch.ones((x.shape[0],)).long()
    outs = unet(latents, t, c_crossattn=[c_crossattn])
    feats = [outs[0], outs[1], torch.cat([outs[2], F.interpolate(outs[3], scale_factor=2)], dim=1)]
    conv_feats = m.out_layer(torch.cat([m.layer1(feats[0]), m.layer2(feats[1]), feats[2]], dim=1))
    if h == crop:
        conv_feats = conv_feats[:, :, :-1, :-1]
    out = m.decoder([conv_feats])
    return torch.sigmoid(m.last_layer_depth(out)) * m.max_depth


def port_depth_tta(forward, x: torch.Tensor, class_id: torch.Tensor, shift_size: int = 2) -> torch.Tensor:
    """depth/test.py:101-126 (= train.py:278-304): shift windows, then flip, averaged back."""
    bs, _, h, w = x.shape
    interval = (w - h) // (shift_size - 1)
    sliding, masks, ids = [], torch.zeros((bs, 1, h, w)), []
    for i in range(shift_size):
        sliding.append(x[..., :, i * interval : i * interval + h])
        masks[..., :, i * interval : i * interval + h] += 1
        ids.append(class_id)
    x, ids = torch.cat(sliding, dim=0), torch.cat(ids, dim=0)
    x, ids = torch.cat((x, torch.flip(x, [3])), dim=0), torch.cat((ids, ids), dim=0)
    pred = forward(x, ids)
    half = pred.shape[0] // 2
    pred = (pred[:half] + torch.flip(pred[half:], [3])) / 2.0
    pred_s = torch.zeros((bs, 1, h, w))
    for i in range(shift_size):
        pred_s[..., :, i * interval : i * interval + h] += pred[i : i + 1]
    return pred_s / masks


@pytest.fixture(scope="module")
def depth_setup():
    torch.manual_seed(0)
    task = DepthTask(backbone="test_sd", backbone_kwargs=None, neck_channels=16, deconv_channels=8, num_deconv=1,
                     decoder_channels=8, scene_names=["living_room", "kitchen"], templates=TEMPLATES,
                     shift_windows=2).eval()
    _randomize(task.head, 1)
    with torch.no_grad():
        task.adapter.gamma.fill_(0.5)
    unet, comps = _port_unet(use_attn=False, base_size=64)
    port = PortVPDDepth([8, 8, 16 + 16], 16, num_deconv=1, num_filters=8, channels_out=8, max_depth=10.0).eval()
    head = task.head  # features deepest first: down[3] is the 1/2 map (VPD's 1/8), down[2] the 1/4 one
    _copy(port.layer1, head.down[3])
    _copy(port.layer2, head.down[2])
    _copy(port.out_layer, head.neck)
    _copy(port.deconv_layers, head.deconv)
    _copy(port.conv_layers, head.conv)
    _copy(port.last_layer_depth, head.last)
    _copy(port.text_adapter.fc, task.adapter.mlp)
    with torch.no_grad():
        port.gamma.copy_(task.adapter.gamma)
        table = port_class_embeddings(comps["text_encoder"], comps["tokenizer"], ["living_room", "kitchen"], TEMPLATES)
    return task, port, unet, comps, table


def test_depth_backbone_is_vpds(depth_setup):
    """DepthTask() without backbone_kwargs builds VPD's backbone (vpd/models.py UNetWrapper + model.py:92-102)."""
    task = depth_setup[0]
    cfg = task.backbone.config
    assert cfg["layers"] == list(LDM_OUTPUT_BLOCKS.values())[:3] + ["up_blocks.3.attentions.2"]
    assert (cfg["timestep"], cfg["add_noise"], cfg["scale_latents"], cfg["trainable"]) == (1, False, False, True)
    assert not cfg["attention"]  # VPDDepthEncoder: UNetWrapper(use_attn=False)


def test_depth_features_head_and_tta_match_vpd(depth_setup):
    task, port, unet, comps, table = depth_setup
    torch.manual_seed(2)
    x, ids = torch.rand(2, 3, 56, 56), torch.tensor([1, 0])
    with torch.no_grad():
        prompts = task.scene_prompts(ids, 2)
        torch.testing.assert_close(task.prompt_table(task.scene_names, TEMPLATES, 20), table, rtol=RTOL, atol=1e-6)
        feats, padded = task.dense_features(x, prompts)  # deepest first
        latents = port_encode_mode(comps["vae"], F.pad(x * 2 - 1, (0, 8, 0, 8)))
        outs = unet(latents, torch.ones(2).long(), [port.text_adapter(latents, table[ids.tolist()], port.gamma, "depth")])
        assert padded == (64, 64)
        for got, want in zip(feats[::-1], outs, strict=True):
            _close(got, want)
        got = task(x, ids)
        want = port_depth_forward(port, unet, comps["vae"], table, x, ids)
        _close(got, want)
        # test.py: 2 shift windows of 56 x 56 over 56 x 80, flip, averaged by overlap
        wide = torch.rand(1, 3, 56, 80)
        got_tta = task.predict_depth(wide, torch.tensor([1]))
        want_tta = port_depth_tta(lambda im, c: port_depth_forward(port, unet, comps["vae"], table, im, c), wide,
                                  torch.tensor([1]))
    assert got.shape == (2, 1, 56, 56)
    _close(got_tta, want_tta)


# ================================================================ semantic segmentation (segmentation/)
class PortConvModule(nn.Module):
    """mmcv ConvModule(conv, norm, act) as built by mmseg (bias off with a norm)."""

    def __init__(self, cin: int, cout: int, k: int, norm: bool, act: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=not norm)
        self.bn = nn.BatchNorm2d(cout) if norm else None
        self.activate = nn.ReLU() if act else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        x = self.bn(x) if self.bn is not None else x
        return self.activate(x) if self.activate is not None else x


class PortFPNSeg(nn.Module):
    """mmseg 0.30 FPN (necks/fpn.py FPN.__init__/forward) + FPNHead (decode_heads/fpn_head.py) with VPD's config
    (fpn_vpd_sd1-5_512x512_gpu8x2.py:9-18; _base_/models/fpn_r50.py:22-32: channels 256, SyncBN, dropout 0.1)."""

    def __init__(self, in_channels: list[int], out_channels: int, channels: int, num_classes: int,
                 feature_strides: list[int]) -> None:
        super().__init__()
        self.lateral_convs = nn.ModuleList(PortConvModule(c, out_channels, 1, False, False) for c in in_channels)
        self.fpn_convs = nn.ModuleList(PortConvModule(out_channels, out_channels, 3, False, False) for _ in in_channels)
        self.feature_strides = feature_strides
        self.scale_heads = nn.ModuleList()
        for i in range(len(feature_strides)):  # fpn_head.py FPNHead.__init__
            head_length = max(1, int(np.log2(feature_strides[i]) - np.log2(feature_strides[0])))
            layers = []
            for k in range(head_length):
                layers.append(PortConvModule(out_channels if k == 0 else channels, channels, 3, True, True))
                if feature_strides[i] != feature_strides[0]:
                    layers.append(None)  # Upsample(scale_factor=2, bilinear, align_corners=False)
            self.scale_heads.append(nn.ModuleList([m for m in layers if m is not None]))
            self._ups = getattr(self, "_ups", []) + [feature_strides[i] != feature_strides[0]]
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)  # BaseDecodeHead.conv_seg; dropout is identity in eval

    def neck(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:  # fpn.py FPN.forward
        laterals = [conv(inputs[i]) for i, conv in enumerate(self.lateral_convs)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[2:], mode="nearest")
        return [self.fpn_convs[i](laterals[i]) for i in range(len(laterals))]

    def decode(self, x: list[torch.Tensor]) -> torch.Tensor:  # fpn_head.py FPNHead.forward + cls_seg
        def head(i: int, y: torch.Tensor) -> torch.Tensor:
            for block in self.scale_heads[i]:
                y = block(y)
                if self._ups[i]:  # mmseg Upsample: resize to int(2 * size)
                    y = F.interpolate(y, size=[int(t * 2) for t in y.shape[-2:]], mode="bilinear", align_corners=False)
            return y

        output = head(0, x[0])
        for i in range(1, len(self.feature_strides)):
            output = output + F.interpolate(head(i, x[i]), size=output.shape[2:], mode="bilinear", align_corners=False)
        return self.conv_seg(output)


def port_seg_encode_decode(seg: PortFPNSeg, unet: PortUNetWrapper, vae: nn.Module, adapter: PortTextAdapter,
                           gamma: torch.Tensor, class_embeddings: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
    """vpd_seg.py:88-98 extract_feat, 173-185 encode_decode (img normalised to [-1, 1] by mmseg)."""
    latents = port_encode_mode(vae, img)
    c_crossattn = adapter(latents, class_embeddings, gamma, "seg")
    outs = unet(latents, torch.ones((img.shape[0],)).long(), c_crossattn=[c_crossattn])
    out = seg.decode(seg.neck(list(outs)))
    return F.interpolate(out, size=img.shape[2:], mode="bilinear", align_corners=False)


def port_slide_inference(encode_decode, img: torch.Tensor, crop: int, stride: int, num_classes: int,
                         ori_shape: tuple[int, int]) -> torch.Tensor:
    """vpd_seg.py:188-231 slide_inference (rescale=True) and 255-301 inference/simple_test: labels at ori_shape."""
    batch_size, _, h_img, w_img = img.size()
    h_grids = max(h_img - crop + stride - 1, 0) // stride + 1
    w_grids = max(w_img - crop + stride - 1, 0) // stride + 1
    preds = img.new_zeros((batch_size, num_classes, h_img, w_img))
    count_mat = img.new_zeros((batch_size, 1, h_img, w_img))
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1, x1 = h_idx * stride, w_idx * stride
            y2, x2 = min(y1 + crop, h_img), min(x1 + crop, w_img)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            crop_seg_logit = encode_decode(img[:, :, y1:y2, x1:x2])
            preds += F.pad(crop_seg_logit, (int(x1), int(preds.shape[3] - x2), int(y1), int(preds.shape[2] - y2)))
            count_mat[:, :, y1:y2, x1:x2] += 1
    preds = preds / count_mat
    preds = F.interpolate(preds, size=ori_shape, mode="bilinear", align_corners=False)
    return F.softmax(preds, dim=1).argmax(dim=1)


@pytest.fixture(scope="module")
def seg_setup():
    torch.manual_seed(0)
    names = ["sky", "road", "car"]
    task = SemSegTask(backbone="test_sd", backbone_kwargs=TINY_ATTENTION, num_classes=3, class_names=names,
                      templates=TEMPLATES, fpn_channels=8, slide_crop=64, slide_stride=43).eval()
    _randomize(task.head, 3)
    with torch.no_grad():
        task.adapter.gamma.fill_(0.5)
    unet, comps = _port_unet(use_attn=True, base_size=64)
    head = task.head
    seg = PortFPNSeg(head.in_channels[::-1], 8, 8, 3, [2, 4, 8, 16]).eval()  # VPD: [320, 790, 1430, 1280]
    for dst, src in ((seg.lateral_convs, head.lateral), (seg.fpn_convs, head.fpn), (seg.scale_heads, head.scale_heads)):
        _copy(dst, src)
    _copy(seg.conv_seg, head.classifier)
    adapter = PortTextAdapter(8)
    _copy(adapter.fc, task.adapter.mlp)
    with torch.no_grad():
        table = port_class_embeddings(comps["text_encoder"], comps["tokenizer"], names, TEMPLATES)
    return task, seg, unet, comps, adapter, table


def test_semseg_features_attention_and_logits_match_vpd(seg_setup):
    task, seg, unet, comps, adapter, table = seg_setup
    torch.manual_seed(4)
    x = torch.rand(2, 3, 64, 64)
    gamma = task.adapter.gamma.detach()
    with torch.no_grad():
        prompts = task.class_prompts(2)
        out = task.backbone(x, prompt_embeds=prompts)
        feats, _ = task.dense_features(x, prompts)
        latents = port_encode_mode(comps["vae"], x * 2 - 1)
        outs = unet(latents, torch.ones(2).long(), [adapter(latents, table, gamma, "seg")])
        store = unet.attention_store.get_average_attention()
        attn16, attn32, attn64 = unet.process_attn(store)
        got = task(x)
        want = port_seg_encode_decode(seg, unet, comps["vae"], adapter, gamma, table, x * 2 - 1)  # mmseg Normalize
    assert attn64 is None and store["mid_cross"]  # 1/2 maps exceed max_size; mid maps are stored, not selected
    _close(out.attention[8], attn16)  # latent 8 x 8 (SD: 16 x 16 = 1/32)
    _close(out.attention[4], attn32)  # latent 16 x 16 (SD: 32 x 32 = 1/16)
    assert sorted(out.attention) == [4, 8]
    for g, w in zip(feats[::-1], outs, strict=True):
        _close(g, w)
    assert [f.shape[1] for f in outs] == [8, 8 + 3, 16 + 3, 16]  # SD: 320, 640 + 150, 1280 + 150, 1280
    _close(got, want)
    assert torch.equal(got.argmax(1), want.argmax(1))


def test_semseg_slide_and_original_size_scoring_match_mmseg(seg_setup):
    """Sliding window (crop 64, stride 43 ~ 512 / 341), logits resized to the annotation's original 80 x 120
    before the argmax; the confusion matrix equals the one of the port's predictions (mmseg intersect_and_union)."""
    task, seg, unet, comps, adapter, table = seg_setup
    torch.manual_seed(5)
    x, labels = torch.rand(1, 3, 64, 96), torch.randint(0, 3, (1, 80, 120))
    labels[:, :5] = 255
    gamma = task.adapter.gamma.detach()
    task.val_metrics.reset()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a trainer
        task._eval_step({"image": x, "mask": labels}, "val")
        pred = port_slide_inference(lambda im: port_seg_encode_decode(seg, unet, comps["vae"], adapter, gamma, table,
                                                                      im * 2 - 1), x, 64, 43, 3, (80, 120))
    keep = labels != 255
    want = np.bincount((labels[keep] * 3 + pred[keep]).numpy(), minlength=9).reshape(3, 3)
    assert np.array_equal(task.val_metrics.confmat.numpy(), want)
    assert len(np.unique(pred)) > 1


# ================================================================ referring segmentation (refer/)
class PortSimpleDecoding(nn.Module):
    """refer/lib/mask_predictor.py:7-72 SimpleDecoding(dims, factor=2)."""

    def __init__(self, dims: list[int], factor: int = 2) -> None:
        super().__init__()
        hidden = dims[-1] // factor
        c4, c3, c2, c1 = dims[-1], dims[-2], dims[-3], dims[-4]

        def block(cin: int) -> nn.ModuleList:
            return nn.ModuleList([nn.Conv2d(cin, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(),
                                  nn.Conv2d(hidden, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden),
                                  nn.ReLU()])

        self.b4, self.b3, self.b2 = block(c4 + c3), block(hidden + c2), block(hidden + c1)
        self.conv1_1 = nn.Conv2d(hidden, 2, 1)

    def forward(self, x_c4: torch.Tensor, x_c3: torch.Tensor, x_c2: torch.Tensor, x_c1: torch.Tensor) -> torch.Tensor:
        def fuse(x: torch.Tensor, y: torch.Tensor, blk: nn.ModuleList) -> torch.Tensor:
            if x.size(-2) < y.size(-2) or x.size(-1) < y.size(-1):
                x = F.interpolate(input=x, size=(y.size(-2), y.size(-1)), mode="bilinear", align_corners=True)
            x = torch.cat([x, y], dim=1)
            for m in blk:
                x = m(x)
            return x

        x = fuse(x_c4, x_c3, self.b4)
        x = fuse(x, x_c2, self.b3)
        x = fuse(x, x_c1, self.b2)
        return self.conv1_1(x)


def port_refer_forward(dec: PortSimpleDecoding, unet: PortUNetWrapper, vae: nn.Module, adapter: PortTextAdapter,
                       gamma: torch.Tensor, img: torch.Tensor, l_feats: torch.Tensor) -> torch.Tensor:
    """refer/models_refer/model.py:43-55 VPDRefer.forward."""
    input_shape = img.shape[-2:]
    latents = port_encode_mode(vae, img)
    c_crossattn = adapter(latents, l_feats, gamma, "refer")
    outs = unet(latents, torch.ones((img.shape[0],)).long(), c_crossattn=[c_crossattn])
    x_c1, x_c2, x_c3, x_c4 = outs
    x = dec(x_c4, x_c3, x_c2, x_c1)
    return F.interpolate(x, size=input_shape, mode="bilinear", align_corners=True)


def test_refseg_matches_vpd():
    torch.manual_seed(0)
    task = RefSegTask(backbone="test_sd", backbone_kwargs=TINY_ATTENTION, max_tokens=8).eval()
    _randomize(task.head, 10)
    with torch.no_grad():
        task.adapter.gamma.fill_(0.5)
        task.head.classifier.bias.zero_()  # both classes occur in the predicted masks
    unet, comps = _port_unet(use_attn=True, base_size=64)
    head = task.head
    assert head.blocks[0][0].out_channels == head.in_channels[0] // 2  # SimpleDecoding: dims[-1] // 2
    dec = PortSimpleDecoding(head.in_channels[::-1]).eval()  # VPD neck_dim [320, 640 + 40, 1280 + 40, 1280]
    for dst, src in ((dec.b4, head.blocks[0]), (dec.b3, head.blocks[1]), (dec.b2, head.blocks[2])):
        _copy(dst, src)
    _copy(dec.conv1_1, head.classifier)
    adapter = PortTextAdapter(8)
    _copy(adapter.fc, task.adapter.mlp)
    sentences = ["man on the left", "the red car behind the tree"]
    torch.manual_seed(7)
    x, target = torch.rand(2, 3, 64, 64), torch.randint(0, 2, (2, 64, 64))
    with torch.no_grad():
        # dataset_refer_clip.py:63-67 tokenisation, train.py:80/136 CLIP last_hidden_state
        ids = comps["tokenizer"](text=sentences, truncation=True, max_length=8, return_length=True,
                                 return_overflowing_tokens=False, padding="max_length", return_tensors="pt")["input_ids"]
        l_feats = comps["text_encoder"](input_ids=ids[:, :8]).last_hidden_state
        feats, _ = task.dense_features(x, task.sentence_prompts(sentences))
        want = port_refer_forward(dec, unet, comps["vae"], adapter, task.adapter.gamma, x * 2 - 1, l_feats)
        outs = unet(port_encode_mode(comps["vae"], x * 2 - 1), torch.ones(2).long(),
                    [adapter(None, l_feats, task.adapter.gamma, "refer")])
        got = task(x, sentences)
    for g, w in zip(feats[::-1], outs, strict=True):
        _close(g, w)
    assert [f.shape[1] for f in outs] == [8, 8 + 8, 16 + 8, 16]
    _close(got, want)
    mask, want_mask = got.argmax(1), want.argmax(1)
    assert torch.equal(mask, want_mask) and 0 < mask.float().mean() < 1
    # train.py:35-39, 86-98: I, U per sentence
    task.val_metrics.reset()
    task.val_metrics.update(mask, target)
    inter = [np.sum(np.logical_and(want_mask[i].numpy(), target[i].numpy())) for i in range(2)]
    union = [np.sum(np.logical_or(want_mask[i].numpy(), target[i].numpy())) for i in range(2)]
    scores = task.val_metrics.compute()
    assert scores["oiou"].item() == pytest.approx(sum(inter) / sum(union), rel=1e-6)
    assert scores["miou"].item() == pytest.approx(np.mean([i / u for i, u in zip(inter, union, strict=True)]), rel=1e-6)
