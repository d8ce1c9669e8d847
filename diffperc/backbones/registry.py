"""Named backbone presets (timm-style): ``create_backbone(name, **overrides)``, ``list_backbones(pattern)``.

The only registry in diffperc. Each entry is a function that builds a backbone from keyword
overrides; presets for real weights name their hub id, tiny ones (``test_*``) build random
components offline, and ``digits`` loads the bundled model from the package.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["register_backbone", "create_backbone", "list_backbones", "bundled_model_path", "load_backbone", "HUB_IDS"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_DEPRECATED: dict[str, str] = {}

HUB_IDS = {
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd21": "stabilityai/stable-diffusion-2-1",
    "sd21-base": "stabilityai/stable-diffusion-2-1-base",
}


def register_backbone(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register ``fn(**kwargs) -> nn.Module`` under ``name``."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return wrap


def register_backbone_deprecations(renames: dict[str, str]) -> None:
    """Map old preset names to new ones (a FutureWarning is raised on use)."""
    _DEPRECATED.update(renames)


def list_backbones(pattern: str = "*") -> list[str]:
    """Sorted preset names matching a glob ``pattern`` (e.g. ``"test_*"``, ``"sd*"``)."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def create_backbone(name: str, **overrides: Any) -> nn.Module:
    """Build a registered preset; ``overrides`` go to the backbone (``layers``, ``timestep``, ...)."""
    if name in _DEPRECATED:
        import warnings

        warnings.warn(f"backbone {name!r} is renamed {_DEPRECATED[name]!r}", FutureWarning, stacklevel=2)
        name = _DEPRECATED[name]
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=5, cutoff=0.4)
        raise ValueError(
            f"unknown backbone {name!r}. Did you mean: {', '.join(close) if close else 'none close'}? "
            f"Known: {', '.join(list_backbones())}. A local folder or hub id loads with "
            "DiffusionBackbone.from_pretrained(path) (or `--model PATH` on the command line)."
        )
    return _REGISTRY[name](**overrides)


def load_backbone(name_or_path: str, **overrides: Any) -> nn.Module:
    """A registered preset if ``name_or_path`` is one, else ``DiffusionBackbone.from_pretrained``."""
    if name_or_path in _REGISTRY or name_or_path in _DEPRECATED:
        return create_backbone(name_or_path, **overrides)
    looks_like_path = Path(name_or_path).expanduser().exists() or "/" in name_or_path or name_or_path.startswith(".")
    if not looks_like_path:
        return create_backbone(name_or_path, **overrides)  # raises with close matches
    from .diffusion import DiffusionBackbone

    return DiffusionBackbone.from_pretrained(name_or_path, **overrides)


def bundled_model_path() -> Path:
    """Folder of the bundled ``digits`` model (package data ``diffperc/checkpoints/digits``)."""
    candidates = [Path(str(resources.files("diffperc"))) / "checkpoints" / "digits",
                  Path(__file__).resolve().parents[1] / "checkpoints" / "digits"]
    for c in candidates:
        if (c / "model_index.json").exists():
            return c
    raise FileNotFoundError(f"the bundled digits model is missing (looked in {[str(c) for c in candidates]}); "
                            "reinstall diffperc or rebuild it with `python scripts/train_digits.py`")


def _hub(name: str) -> Callable[..., nn.Module]:
    def build(**kw: Any) -> nn.Module:
        from .diffusion import DiffusionBackbone

        return DiffusionBackbone.from_pretrained(HUB_IDS[name], **kw)

    build.__doc__ = f"Stable Diffusion preset {name!r}: {HUB_IDS[name]} (needs the weights; see README)."
    return build


for _name in HUB_IDS:
    register_backbone(_name)(_hub(_name))


@register_backbone("test_sd")
def test_sd(seed: int = 0, **kw: Any) -> nn.Module:
    """Tiny random SD 1.x-shaped backbone (offline, milliseconds); see ``backbones/tiny.py``."""
    from .diffusion import DiffusionBackbone
    from .tiny import tiny_sd_components

    return DiffusionBackbone(**tiny_sd_components(seed=seed), name_or_path="test_sd", **kw)


@register_backbone("test_sd2")
def test_sd2(seed: int = 0, **kw: Any) -> nn.Module:
    """Tiny random SD 2.x-shaped backbone (linear projections, v-prediction)."""
    from .diffusion import DiffusionBackbone
    from .tiny import tiny_sd_components

    return DiffusionBackbone(**tiny_sd_components(seed=seed, sd2=True), name_or_path="test_sd2", **kw)


@register_backbone("digits")
def digits(**kw: Any) -> nn.Module:
    """The bundled digits model (32x32 images, trained by scripts/train_digits.py)."""
    from .diffusion import DiffusionBackbone

    kw.setdefault("layers", "vpd")
    return DiffusionBackbone.from_pretrained(bundled_model_path(), **kw)

# presets defined beside their classes register on import
from . import dinov2 as _dinov2  # noqa: E402,F401
from . import fused as _fused  # noqa: E402,F401
