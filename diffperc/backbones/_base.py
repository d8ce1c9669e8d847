"""Shared backbone types: :class:`FeatureInfo`, :class:`FeatureInfoList`, :class:`BackboneOutput`,
:class:`DenoiserPlacement` (``device`` / ``dtype`` read off the denoising network) and
:class:`ProbedFeatureInfo` (``feature_info`` measured once by a tiny forward).

Every backbone in diffperc (diffusion UNet, DINOv2, SD+DINOv2 fusion) returns a
:class:`BackboneOutput` and describes its feature maps with a :class:`FeatureInfoList`,
so heads can size themselves with ``backbone.feature_info.channels()`` (timm style).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["BackboneOutput", "DenoiserPlacement", "FeatureInfo", "FeatureInfoList", "ProbedFeatureInfo"]


class DenoiserPlacement:
    """``device`` and ``dtype`` properties: those of the first parameter of the denoising network,
    the submodule named by the class attribute ``_denoiser`` (``"unet"`` or ``"transformer"``).

    Mixed into :class:`~diffperc.backbones.DiffusionBackbone`, :class:`~diffperc.backbones.DiTBackbone`
    and :class:`~diffperc.zeroshot.flow.FlowMatchingModel`, whose inputs follow that network.
    """

    _denoiser: str = "unet"

    @property
    def device(self) -> torch.device:
        return next(getattr(self, self._denoiser).parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(getattr(self, self._denoiser).parameters()).dtype


class ProbedFeatureInfo:
    """A ``feature_info`` property measured once, on first use, by the backbone's ``_probe()`` (a tiny
    forward that sets ``self._feature_info``); shared by the diffusion UNet and DiT backbones."""

    _feature_info: FeatureInfoList | None = None

    @property
    def feature_info(self) -> FeatureInfoList:
        """Name, channels and reduction of each feature map, measured by a tiny forward (see ``_probe``)."""
        if self._feature_info is None:
            self._probe()
        return self._feature_info


@dataclass(frozen=True)
class FeatureInfo:
    """One feature map: the module it comes from, its channels and its reduction.

    ``reduction`` r means the map of an (H, W) image is (H / r, W / r).
    """

    name: str
    channels: int
    reduction: int


_TIMM_KEYS = {"num_chs": "channels", "reduction": "reduction", "module": "name", "index": "index"}
Index = int | Sequence[int] | None


class FeatureInfoList(list):
    """A list of :class:`FeatureInfo` with timm-style accessors.

    Both spellings work: diffperc's ``channels()``, ``reductions()``, ``names()`` and timm's
    ``FeatureInfo`` methods ``channels(idx)``, ``reduction(idx)``, ``module_name(idx)``,
    ``get(key, idx)`` and ``get_dicts(keys, idx)`` (keys ``num_chs``, ``reduction``, ``module``,
    ``index``).
    As in timm, ``idx`` None means every entry (a list), an int one entry (a value) and a
    list of ints those entries (a list).
    """

    def get(self, key: str, idx: Index = None) -> Any:
        """timm's ``get``: the value of ``key`` (``num_chs``/``reduction``/``module`` or a field name)."""
        attr = _TIMM_KEYS.get(key, key)
        if attr not in _TIMM_KEYS.values():
            raise KeyError(f"unknown feature info key {key!r}; use one of {sorted(_TIMM_KEYS)}")

        def value(i: int) -> Any:
            return i % len(self) if attr == "index" else getattr(self[i], attr)

        if idx is None:
            return [value(i) for i in range(len(self))]
        if isinstance(idx, int):
            return value(idx)
        return [value(i) for i in idx]

    def get_dicts(self, keys: Sequence[str] | None = None, idx: Index = None) -> dict | list[dict]:
        """timm's ``get_dicts``: ``{"num_chs", "reduction", "module", "index"}`` per entry (or only ``keys``)."""
        keys = list(_TIMM_KEYS) if keys is None else list(keys)

        def one(i: int) -> dict:
            return {k: self.get(k, i) for k in keys}

        if isinstance(idx, int):
            return one(idx)
        return [one(i) for i in (range(len(self)) if idx is None else idx)]

    def channels(self, idx: Index = None) -> int | list[int]:
        return self.get("num_chs", idx)

    def reduction(self, idx: Index = None) -> int | list[int]:
        """timm's name for the reduction (output stride) of one entry or of all."""
        return self.get("reduction", idx)

    def reductions(self) -> list[int]:
        return self.get("reduction")

    def module_name(self, idx: Index = None) -> str | list[str]:
        """timm's name for the module path each map comes from."""
        return self.get("module", idx)

    def names(self) -> list[str]:
        return self.get("module")


@dataclass
class BackboneOutput:
    """What a backbone returns.

    Attributes:
        features: one (B, C_i, H / r_i, W / r_i) tensor per ``feature_info`` entry.
        attention: reduction r -> (B, L, H / r, W / r) cross-attention probabilities over the
            L prompt tokens (each pixel sums to 1 over L), or None when not captured.
    """

    features: list[Tensor]
    attention: dict[int, Tensor] | None = None
