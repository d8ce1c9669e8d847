"""diffperc: text-to-image diffusion models as perception backbones.

    from diffperc import create_backbone
    bb = create_backbone("sd15", layers="vpd", timestep=1, add_noise=False, attention=True)
    out = bb(images, prompts="a photo of a room")   # out.features, out.attention
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .backbones._base import BackboneOutput as BackboneOutput
    from .backbones.diffusion import DiffusionBackbone as DiffusionBackbone
    from .backbones.registry import create_backbone as create_backbone
    from .backbones.registry import list_backbones as list_backbones

__version__ = "0.1.0"

__all__ = ["BackboneOutput", "DiffusionBackbone", "__version__", "create_backbone", "list_backbones"]

# The public names are imported on first use (PEP 562), so `import diffperc` and `diffperc --help`
# do not import torch and diffusers.
_EXPORTS = {"BackboneOutput": ".backbones._base", "DiffusionBackbone": ".backbones.diffusion",
            "create_backbone": ".backbones.registry", "list_backbones": ".backbones.registry"}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'diffperc' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
