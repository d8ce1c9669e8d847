"""diffperc: text-to-image diffusion models as perception backbones.

    from diffperc import create_backbone
    bb = create_backbone("sd15", layers="vpd", timestep=1, add_noise=False, attention=True)
    out = bb(images, prompts="a photo of a room")   # out.features, out.attention
"""

from .backbones._base import BackboneOutput as BackboneOutput
from .backbones.diffusion import DiffusionBackbone as DiffusionBackbone
from .backbones.registry import create_backbone as create_backbone
from .backbones.registry import list_backbones as list_backbones

__version__ = "0.1.0"

__all__ = ["BackboneOutput", "DiffusionBackbone", "__version__", "create_backbone", "list_backbones"]
