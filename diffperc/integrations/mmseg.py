"""diffperc backbones inside mmsegmentation 1.x: ``DiffPercBackbone`` in ``mmseg.registry.MODELS``.

Importing this module registers the backbone. An mmseg config activates it with
``custom_imports`` and then names it like any mmseg backbone; with VPD's semantic segmentation
recipe (Zhao et al., ICCV 2023, arXiv 2303.02153, github.com/wl-zhao/VPD: SD 1.5 decoder taps,
ADE20K class-name embeddings through a text adapter, cross-attention maps of reductions 16 and 32
appended to the features, Semantic FPN, UNet at 0.1x lr)::

    custom_imports = dict(imports=["diffperc.integrations.mmseg"], allow_failed_imports=False)
    data_preprocessor = dict(type="SegDataPreProcessor", mean=[127.5] * 3, std=[127.5] * 3,
                             bgr_to_rgb=True, pad_val=0, seg_pad_val=255, size=(512, 512))
    model = dict(
        type="EncoderDecoder", data_preprocessor=data_preprocessor,
        backbone=dict(type="DiffPercBackbone", model="sd15", layers="vpd", timestep=1, add_noise=False,
                      scale_latents=False, trainable=True, mean=[127.5] * 3, std=[127.5] * 3,
                      class_names=ADE20K_CLASSES, text_adapter=True, concat_attention=True,
                      attention_reductions=[16, 32]),
        neck=dict(type="FPN", in_channels=[320, 790, 1430, 1280], out_channels=256, num_outs=4),
        decode_head=dict(type="FPNHead", in_channels=[256] * 4, in_index=[0, 1, 2, 3],
                         feature_strides=[8, 16, 32, 64], channels=256, num_classes=150, dropout_ratio=0.1,
                         norm_cfg=dict(type="SyncBN", requires_grad=True), align_corners=False,
                         loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0)),
        test_cfg=dict(mode="slide", crop_size=(512, 512), stride=(341, 341)))
    optim_wrapper = dict(type="OptimWrapper", optimizer=dict(type="AdamW", lr=8e-5, weight_decay=1e-3),
                         paramwise_cfg=dict(custom_keys={"backbone.model.unet": dict(lr_mult=0.1),
                                                         "norm": dict(decay_mult=0.0)}))

(VPD's own settings: mean = std = 127.5 (its VQ-GAN normalisation), unscaled latents, FPNHead
channels 256 with SyncBN. Note that mmcv sorts ``custom_keys`` by length, so here the longer UNet
key wins over ``"norm"``, unlike VPD's ``{'unet', 'norm'}`` where ``'norm'`` wins for the UNet's
transformer norms; see ``diffperc.tasks._dense.vpd_param_group``.)
(``ADE20K_CLASSES`` from ``diffperc.data.ade20k``; ``backbone.out_channels`` gives the neck's
``in_channels``.) Without ``trainable=True`` the UNet is frozen and runs under no_grad: only the
neck and head train.

Inputs: mmseg's data preprocessor hands the backbone ``(img - mean) / std`` with ``img`` in 0-255 (RGB
when ``bgr_to_rgb=True``, which diffusion models need). The backbone undoes that with its own
``mean``/``std`` (they must equal the preprocessor's) to get the [0, 1] images diffperc backbones
take. Sizes that are not multiples of the model's 64 (SD) are zero-padded inside and the features
cropped back (``pad=True`` by default).

Outputs: a tuple of feature maps ordered shallow to deep (smallest reduction first), as mmseg necks
and heads expect; diffperc's own ``feature_info`` order is deepest first.

The weights come from ``model`` when the module is built; ``init_weights`` (called by mmengine's
runner) re-initialises nothing. mmseg checkpoints of the whole segmentor hold the backbone's
weights too (frozen ones included).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

try:
    from mmengine.model import BaseModule
    from mmseg.registry import MODELS
except (ImportError, AssertionError) as err:  # mmseg asserts on an incompatible mmcv at import
    raise ImportError(
        f"diffperc.integrations.mmseg needs mmsegmentation 1.x with full mmcv 2.1 ({err}). "
        "Install them with `bash scripts/install_mmseg.sh` (builds mmcv from source, 8-16 min on 2 CPU cores)."
    ) from err

from ..backbones.registry import load_backbone
from ..heads.vpd import TextAdapter, concat_attention, vpd_in_channels

__all__ = ["DiffPercBackbone"]

# mmseg's usual ImageNet statistics on 0-255 pixels (RGB).
IMAGENET_MEAN_255 = (123.675, 116.28, 103.53)
IMAGENET_STD_255 = (58.395, 57.12, 57.375)
_RANGE_SLACK = 0.02  # unnormalised images may leave [0, 1] by this much (rounding) before an error


def _check_stats(name: str, values: Sequence[float]) -> Tensor:
    values = [float(v) for v in values]
    if len(values) != 3 or (name == "std" and min(values) <= 0):
        raise ValueError(f"DiffPercBackbone: {name} must be 3 per-channel values on 0-255 pixels"
                         f"{' (all > 0)' if name == 'std' else ''}, got {values}")
    return torch.tensor(values).view(1, 3, 1, 1)


def _check_init_cfg(init_cfg: dict | list | None) -> dict | list | None:
    cfgs = [] if init_cfg is None else [init_cfg] if isinstance(init_cfg, dict) else list(init_cfg)
    bad = [c for c in cfgs if not isinstance(c, dict) or c.get("type") != "Pretrained"]
    if bad:
        raise ValueError(f"DiffPercBackbone: init_cfg may only be dict(type='Pretrained', checkpoint=...) (a saved "
                         f"DiffPercBackbone state); weights come from `model`, got {bad}")
    return init_cfg


@MODELS.register_module()
class DiffPercBackbone(BaseModule):
    """A diffperc backbone (``create_backbone`` preset, local folder or hub id) as an mmseg backbone.

    Args:
        model: preset name (``"sd15"``, ``"sd21"``, ``"test_sd"``, see ``diffperc.list_backbones()``),
            a local diffusers folder or a hub id.
        mean, std: the data preprocessor's per-channel statistics on 0-255 pixels; inputs are mapped
            back with ``(x * std + mean) / 255`` to [0, 1].
        prompt: one fixed prompt for every image ("" = the empty prompt). Unused with ``class_names``.
        class_names: K names; the UNet is conditioned on their K embeddings (VPD segmentation: pooled
            CLIP text output averaged over prompt templates), so attention maps have K channels.
        templates: prompt templates with one ``{}`` for ``class_names`` (default: CLIP's 80 ImageNet
            templates, as VPD; one template such as ``["a photo of a {}."]`` is 80x faster to build).
        text_adapter: refine the text embeddings with VPD's ``t + gamma * MLP(t)`` (needs ``trainable=True``:
            a frozen UNet runs under no_grad, so the adapter would get no gradient).
        adapter_gamma_init: initial gamma of the adapter (VPD: 1e-4).
        concat_attention: append the cross-attention maps (one channel per prompt token) to the feature
            of the same reduction (VPD); turns on the backbone's ``attention``.
        attention_reductions: reductions whose maps are appended (VPD: ``[16, 32]``); None = all.
        init_cfg: only ``dict(type="Pretrained", checkpoint=...)`` of a saved DiffPercBackbone.
        **backbone_kwargs: options of the diffperc backbone (``layers``, ``timestep``, ``add_noise``,
            ``trainable``, ``gradient_checkpointing``, ``pad`` (default True here), ...).
    """

    def __init__(
        self, model: str = "sd15", mean: Sequence[float] = IMAGENET_MEAN_255, std: Sequence[float] = IMAGENET_STD_255,
        prompt: str = "", class_names: Sequence[str] | None = None, templates: Sequence[str] | None = None,
        text_adapter: bool = False, adapter_gamma_init: float = 1e-4, concat_attention: bool = False,
        attention_reductions: Sequence[int] | None = None, init_cfg: dict | list | None = None,
        pretrained: str | None = None, **backbone_kwargs: Any,
    ) -> None:
        super().__init__(init_cfg=_check_init_cfg(init_cfg))
        if pretrained is not None:
            raise ValueError(f"DiffPercBackbone loads its weights from `model`; got pretrained={pretrained!r}: "
                             "set model='<preset, local diffusers folder or hub id>' instead")
        if text_adapter and not backbone_kwargs.get("trainable", False):
            raise ValueError("DiffPercBackbone: text_adapter=True needs trainable=True (a frozen UNet runs under "
                             "no_grad, so the adapter would never get a gradient)")
        if concat_attention:
            if backbone_kwargs.get("attention") is False:
                raise ValueError("DiffPercBackbone: concat_attention=True needs attention maps; drop attention=False")
            backbone_kwargs["attention"] = True
            if attention_reductions is not None:
                backbone_kwargs.setdefault("attention_resolutions", [int(r) for r in attention_reductions])
        backbone_kwargs.setdefault("pad", True)
        self.model = load_backbone(model, **backbone_kwargs)
        self.register_buffer("mean", _check_stats("mean", mean), persistent=False)  # (1, 3, 1, 1), 0-255
        self.register_buffer("std", _check_stats("std", std), persistent=False)
        self.prompt, self.concat_attention = prompt, concat_attention
        self.attention_reductions = None if attention_reductions is None else [int(r) for r in attention_reductions]
        embeds = None if class_names is None else self._class_embeds(class_names, templates)  # (1, K, D)
        self.register_buffer("class_embeds", embeds, persistent=False)
        dim = self.model.unet.config.cross_attention_dim
        self.adapter = TextAdapter(dim, gamma_init=adapter_gamma_init) if text_adapter else None
        reductions = self.model.feature_info.reductions()
        self.out_indices = sorted(range(len(reductions)), key=lambda i: reductions[i])  # shallow first
        self._out_channels: list[int] | None = None

    def _class_embeds(self, class_names: Sequence[str], templates: Sequence[str] | None) -> Tensor:
        """(1, K, D) class-name embeddings (VPD), computed once with the frozen text encoder."""
        from ..tasks._text import IMAGENET_TEMPLATES, class_embeddings

        if isinstance(class_names, str) or not class_names:
            raise ValueError(f"DiffPercBackbone: class_names must be a non-empty list of names, got {class_names!r}")
        emb = class_embeddings(self.model.text_encoder, self.model.tokenizer, list(class_names),
                               templates=IMAGENET_TEMPLATES if templates is None else list(templates))
        return emb.unsqueeze(0)  # (1, K, D)

    # ------------------------------------------------------------------ mmengine hooks
    def init_weights(self) -> None:
        """Keep the pretrained weights; only a ``Pretrained`` init_cfg (a saved state of this module) is applied."""
        if self.init_cfg:
            super().init_weights()
        self._is_init = True

    # ------------------------------------------------------------------ shapes
    @property
    def num_tokens(self) -> int:
        """L, the prompt tokens the UNet attends to (= attention channels per appended map)."""
        if self.class_embeds is not None:
            return self.class_embeds.shape[1]
        return int(self.model.tokenizer.model_max_length)

    @property
    def out_channels(self) -> list[int]:
        """Channels of the returned maps, shallow first: the neck's ``in_channels``."""
        if self._out_channels is None:
            info = self.model.feature_info
            channels = info.channels()
            if self.concat_attention:
                channels = vpd_in_channels(info, self.num_tokens, self._map_reductions())
            self._out_channels = [channels[i] for i in self.out_indices]
        return self._out_channels

    @property
    def out_reductions(self) -> list[int]:
        """Reduction (stride) of each returned map, shallow first: the head's ``feature_strides``."""
        reductions = self.model.feature_info.reductions()
        return [reductions[i] for i in self.out_indices]

    @torch.no_grad()
    def _map_reductions(self) -> list[int]:
        """Reductions that get attention maps, found by running the model once on a tiny black image."""
        side = self.model.size_multiple
        images = torch.zeros(1, 3, side, side, device=self.model.device, dtype=self.model.dtype)
        embeds = torch.zeros(1, 1, self.model.unet.config.cross_attention_dim, device=images.device, dtype=images.dtype)
        return sorted(self.model(images, prompt_embeds=embeds).attention)

    # ------------------------------------------------------------------ forward
    def to_unit_range(self, inputs: Tensor) -> Tensor:
        """Normalised (B, 3, H, W) ``(img - mean) / std`` -> (B, 3, H, W) images in [0, 1]."""
        if inputs.ndim != 4 or inputs.shape[1] != 3:
            raise ValueError(f"DiffPercBackbone: inputs must be (B, 3, H, W), got {tuple(inputs.shape)}")
        images = (inputs * self.std.to(inputs) + self.mean.to(inputs)) / 255.0
        lo, hi = images.min().item(), images.max().item()
        if lo < -_RANGE_SLACK or hi > 1 + _RANGE_SLACK:
            raise ValueError(f"DiffPercBackbone: inputs unnormalised with mean={self.mean.flatten().tolist()}, "
                             f"std={self.std.flatten().tolist()} span [{lo * 255:.1f}, {hi * 255:.1f}], not 0-255: "
                             "give the backbone the data preprocessor's mean and std")
        return images.clamp(0, 1)

    def prompt_embeds(self) -> Tensor:
        """(1, L, D) text conditioning: class embeddings or the encoded prompt, through the adapter if any."""
        if self.class_embeds is not None:
            embeds = self.class_embeds
        else:
            embeds = self.model.encode_prompt([self.prompt])
        return self.adapter(embeds) if self.adapter is not None else embeds

    def forward(self, inputs: Tensor) -> tuple[Tensor, ...]:
        """(B, 3, H, W) normalised images -> one (B, C_i, H/r_i, W/r_i) map per tap, smallest r_i first."""
        images = self.to_unit_range(inputs)
        embeds = self.prompt_embeds()
        out = self.model(images, prompt_embeds=embeds.expand(images.shape[0], -1, -1))
        feats = out.features
        if self.concat_attention:
            feats = concat_attention(feats, out.attention, self.model.feature_info.reductions())
        return tuple(feats[i] for i in self.out_indices)

