"""Backbones: the SD UNet (diffusion.py), DINOv2 (dinov2.py), their fusion (fused.py), presets (registry.py)."""

from ._base import BackboneOutput, FeatureInfo, FeatureInfoList
from .diffusion import DiffusionBackbone
from .registry import create_backbone, list_backbones, register_backbone

__all__ = ["BackboneOutput", "DiffusionBackbone", "FeatureInfo", "FeatureInfoList", "create_backbone",
           "list_backbones", "register_backbone"]
