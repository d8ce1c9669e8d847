"""Backbones: the SD UNet (diffusion.py), SDXL (sdxl.py), SD3 (sd3.py) and FLUX (flux.py) on the DiT base
(dit.py), DINOv2 (dinov2.py), their fusion (fused.py), presets (registry.py)."""

from ._base import BackboneOutput, FeatureInfo, FeatureInfoList
from .diffusion import DiffusionBackbone
from .dit import DiTBackbone
from .flux import FluxBackbone
from .registry import create_backbone, list_backbones, register_backbone
from .sd3 import SD3Backbone
from .sdxl import SDXLBackbone

__all__ = ["BackboneOutput", "DiffusionBackbone", "FeatureInfo", "FeatureInfoList", "create_backbone",
           "list_backbones", "register_backbone", "SDXLBackbone", "DiTBackbone", "FluxBackbone", "SD3Backbone"]
