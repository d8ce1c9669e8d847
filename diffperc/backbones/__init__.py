"""Backbones: the SD UNet (diffusion.py), SDXL (sdxl.py), DINOv2 (dinov2.py), their fusion (fused.py),
presets (registry.py)."""

from ._base import BackboneOutput, FeatureInfo, FeatureInfoList
from .diffusion import DiffusionBackbone
from .registry import create_backbone, list_backbones, register_backbone
from .sdxl import SDXLBackbone

__all__ = ["BackboneOutput", "DiffusionBackbone", "FeatureInfo", "FeatureInfoList", "create_backbone",
           "list_backbones", "register_backbone", "SDXLBackbone"]
