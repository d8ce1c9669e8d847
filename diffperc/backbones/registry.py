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

import torch
from torch import nn

from ._kwargs import as_dtype, check_kwargs, signature_names, takes_var_keyword
from .diffusion import DiffusionBackbone
from .sdxl import SDXLBackbone

__all__ = ["register_backbone", "create_backbone", "list_backbones", "bundled_model_path", "load_backbone", "HUB_IDS",
           "accepted_kwargs", "list_families"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_ACCEPTS: dict[str, tuple[Callable[..., Any], ...]] = {}
_EXCLUDE: dict[str, tuple[str, ...]] = {}
_DEPRECATED: dict[str, str] = {}
# arguments of a DiffusionBackbone that are its components, not options
COMPONENTS = ("vae", "unet", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2",
              "tokenizer_3", "scheduler", "transformer", "name_or_path")

HUB_IDS = {
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd21": "stabilityai/stable-diffusion-2-1",
    "sd21-base": "stabilityai/stable-diffusion-2-1-base",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
}


def register_backbone(name: str, accepts: tuple[Callable[..., Any], ...] = (), exclude: tuple[str, ...] = ()
                      ) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register ``fn(**kwargs) -> nn.Module`` under ``name``.

    ``accepts``: the callables that ``fn``'s ``**kwargs`` end up in (e.g. the backbone class);
    their parameter names (minus the components) are valid keywords, anything else is
    rejected by :func:`create_backbone` before ``fn`` runs. A builder without ``**kwargs``
    is checked against its own signature; one with ``**kwargs`` and no ``accepts`` is not checked.
    ``exclude``: names of ``accepts`` that the builder sets itself.
    """

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is already registered")
        _REGISTRY[name] = fn
        _ACCEPTS[name] = tuple(accepts)
        _EXCLUDE[name] = tuple(exclude)
        return fn

    return wrap


def accepted_kwargs(name: str) -> set[str] | None:
    """Keyword arguments preset ``name`` accepts (None where its builder cannot tell)."""
    fn = _REGISTRY[name]
    if takes_var_keyword(fn) and not _ACCEPTS[name]:
        return None
    return signature_names(fn, *_ACCEPTS[name], exclude=COMPONENTS + _EXCLUDE[name]) | {"device", "torch_dtype",
                                                                                          "unet_weights"}


def register_backbone_deprecations(renames: dict[str, str]) -> None:
    """Map old preset names to new ones (a FutureWarning is raised on use)."""
    _DEPRECATED.update(renames)


def list_backbones(pattern: str = "*") -> list[str]:
    """Sorted preset names matching a glob ``pattern`` (e.g. ``"test_*"``, ``"sd*"``)."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def create_backbone(name: str, *, device: str | torch.device | None = None,
                    torch_dtype: torch.dtype | str | None = None, unet_weights: str | Path | None = None,
                    **overrides: Any) -> nn.Module:
    """Build a registered preset; ``overrides`` go to the backbone (``layers``, ``timestep``, ...).

    Args:
        name: a preset of :func:`list_backbones`.
        device: where the model goes (None: where it was built, the CPU).
        torch_dtype: weights' and compute dtype (``torch.bfloat16`` or ``"bfloat16"``; None: float32).
            Presets that load weights load them in this dtype; the others are cast after building.
        unet_weights: a UNet state dict loaded over the preset's UNet (strict key check): a
            ``.safetensors`` file, a UNet or pipeline folder, a hub repo or ``org/name/file.safetensors``
            (see :func:`diffperc.backbones._loading.load_unet_weights`). None: the preset's own.
        **overrides: backbone options. Unknown names raise a TypeError listing the valid ones
            before anything is loaded.
    """
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
    valid = accepted_kwargs(name)
    if valid is not None:
        check_kwargs(f"backbone {name!r}", valid, overrides)
    torch_dtype = as_dtype(torch_dtype)
    fn = _REGISTRY[name]
    native = signature_names(fn, *_ACCEPTS[name])
    passed = {k: v for k, v in (("device", device), ("torch_dtype", torch_dtype), ("unet_weights", unet_weights))
              if k in native and v is not None}
    later = unet_weights is not None and "unet_weights" not in passed
    if later:  # a preset built in code: find the file before building, load it after
        from ._loading import resolve_unet_weights

        unet_weights = resolve_unet_weights(unet_weights)
    model = fn(**overrides, **passed)
    if later:
        from ._loading import load_unet_weights

        if not isinstance(getattr(model, "unet", None), nn.Module):
            raise ValueError(f"unet_weights: backbone {name!r} ({type(model).__name__}) has no UNet to load them into")
        load_unet_weights(model.unet, unet_weights)
        if isinstance(getattr(model, "config", None), dict):
            model.config["unet_weights"] = str(unet_weights)
    if (device is not None and "device" not in passed) or (torch_dtype is not None and "torch_dtype" not in passed):
        model = model.to(device=device, dtype=torch_dtype)
    return model


def load_backbone(name_or_path: str | Path, *, device: str | torch.device | None = None,
                  torch_dtype: torch.dtype | str | None = None, **overrides: Any) -> nn.Module:
    """A registered preset if ``name_or_path`` is one, else ``DiffusionBackbone.from_pretrained``.

    ``device`` and ``torch_dtype`` as in :func:`create_backbone`; unknown ``overrides`` raise
    before any weight is read. ``config`` (a single file's diffusers layout) and ``unet_weights``
    may come attached to ``name_or_path`` (the command line's ``--model-config`` /
    ``--unet-weights``: a ``diffperc.cli._options.ModelArg``).
    """
    overrides = dict(getattr(name_or_path, "load_kwargs", None) or {}) | overrides
    name_or_path = str(name_or_path)
    if overrides.get("config") is not None and not (Path(name_or_path).expanduser().is_file()
                                                    and name_or_path.endswith((".safetensors", ".ckpt"))):
        raise ValueError(f"config= (--model-config) {str(overrides['config'])!r} is only for a single-file checkpoint "
                         f"(.safetensors/.ckpt) given as the model; {name_or_path!r} is not one: drop it (a preset, "
                         "folder or hub id has its own config)")
    if name_or_path in _REGISTRY or name_or_path in _DEPRECATED:
        return create_backbone(name_or_path, device=device, torch_dtype=torch_dtype, **overrides)
    looks_like_path = Path(name_or_path).expanduser().exists() or "/" in name_or_path or name_or_path.startswith(".")
    if not looks_like_path:
        return create_backbone(name_or_path, **overrides)  # raises with close matches
    return DiffusionBackbone.from_pretrained(name_or_path, device=device, torch_dtype=torch_dtype, **overrides)


_FAMILIES = (  # (family, class, diffusers pipeline, what it is)
    ("sd", "DiffusionBackbone", "StableDiffusionPipeline", "Stable Diffusion 1.x / 2.x UNet (epsilon and v-prediction)"),
    ("sdxl", "SDXLBackbone", "StableDiffusionXLPipeline", "SDXL UNet: two text encoders, pooled embeds, time ids"),
    ("dinov2", "DINOv2Backbone", None, "DINOv2 ViT patch tokens (timm or transformers)"),
    ("sd+dinov2", "FusedBackbone", None, "SD-DINO fusion of an SD backbone and DINOv2"),
    ("sd3", "SD3Backbone", "StableDiffusion3Pipeline", "SD3 MMDiT, rectified flow: CLIP-L + CLIP-G (+ T5), joint attention"),
    ("flux", "FluxBackbone", "FluxPipeline", "FLUX.1 double/single-stream DiT, rectified flow; the DiTF recipe"),
)
_DIT_FAMILY = {"test_sd3": "sd3", "sd3-medium": "sd3", "test_flux": "flux", "flux-dev": "flux", "flux-schnell": "flux"}


def _family_of_preset(name: str) -> str:
    if name in _DIT_FAMILY:
        return _DIT_FAMILY[name]
    if name in ("sdxl", "test_sdxl"):
        return "sdxl"
    if "dinov2" in name:
        return "sd+dinov2" if name.startswith(("sd", "test_sd_")) else "dinov2"
    return "sd"


def _all_families() -> list[tuple[str, str | None, str | None, str]]:
    """``_FAMILIES`` plus every pipeline the loader knows (``_loading.FAMILIES``) that is not listed there yet."""
    from ._loading import FAMILIES

    rows = list(_FAMILIES)
    listed = {r[0] for r in rows}
    for pipe, (fam, _) in FAMILIES.items():
        if fam not in listed:
            rows.append((fam, None, pipe, f"{pipe} (from model_index.json)"))
            listed.add(fam)
    return rows


def _preset_family(name: str, families: list[str]) -> str:
    """A preset's family: the longest family name its name starts with (``test_`` aside), else the rules above."""
    base = name.removeprefix("test_")
    hits = sorted((f for f in families if "+" not in f and base.startswith(f)), key=len, reverse=True)
    return hits[0] if hits and "dinov2" not in name else _family_of_preset(name)


def list_families() -> list[dict[str, Any]]:
    """Every backbone family: ``{"family", "class", "pipeline", "description", "presets"}`` (for ``diffperc info``).

    Data-driven: ``_FAMILIES`` here and the pipelines of ``_loading.FAMILIES``; a preset belongs to
    the family its name starts with (``sdxl``, ``test_sdxl`` -> sdxl), so new families and presets
    show up in ``diffperc info`` without touching the command.
    """
    rows = _all_families()
    names = [r[0] for r in rows]
    return [{"family": fam, "class": cls, "pipeline": pipe, "description": desc,
             "presets": [n for n in list_backbones() if _preset_family(n, names) == fam]}
            for fam, cls, pipe, desc in rows]


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
        return DiffusionBackbone.from_pretrained(HUB_IDS[name], **kw)

    build.__doc__ = f"Stable Diffusion preset {name!r}: {HUB_IDS[name]} (needs the weights; see README)."
    return build


_SD_ACCEPTS = (DiffusionBackbone.__init__, DiffusionBackbone.from_pretrained)

for _name in HUB_IDS:
    register_backbone(_name, accepts=_SD_ACCEPTS + ((SDXLBackbone.__init__,) if _name == "sdxl" else ()))(_hub(_name))


def _random_only(name: str, pretrained: bool) -> None:
    if pretrained:
        raise ValueError(f"{name} is random and has no pretrained weights (pretrained=False is its only mode); "
                         "use a real preset such as sd15 for weights")


@register_backbone("test_sd", accepts=(DiffusionBackbone.__init__,))
def test_sd(seed: int = 0, pretrained: bool = False, **kw: Any) -> nn.Module:
    """Tiny random SD 1.x-shaped backbone (offline, milliseconds); see ``backbones/tiny.py``."""
    from .tiny import tiny_sd_components

    _random_only("test_sd", pretrained)
    return DiffusionBackbone(**tiny_sd_components(seed=seed), name_or_path="test_sd", **kw)


@register_backbone("test_sd2", accepts=(DiffusionBackbone.__init__,))
def test_sd2(seed: int = 0, pretrained: bool = False, **kw: Any) -> nn.Module:
    """Tiny random SD 2.x-shaped backbone (linear projections, v-prediction)."""
    from .tiny import tiny_sd_components

    _random_only("test_sd2", pretrained)
    return DiffusionBackbone(**tiny_sd_components(seed=seed, sd2=True), name_or_path="test_sd2", **kw)


@register_backbone("test_sdxl", accepts=(DiffusionBackbone.__init__, SDXLBackbone.__init__))
def test_sdxl(seed: int = 0, pretrained: bool = False, original_size: tuple[int, int] | None = None,
              crops_coords_top_left: tuple[int, int] = (0, 0), target_size: tuple[int, int] | None = None,
              **kw: Any) -> nn.Module:
    """Tiny random SDXL-shaped backbone (two text encoders, added conditions); see ``tiny_sdxl_components``."""
    from .tiny import tiny_sdxl_components

    _random_only("test_sdxl", pretrained)
    return SDXLBackbone(**tiny_sdxl_components(seed=seed), name_or_path="test_sdxl", original_size=original_size,
                        crops_coords_top_left=crops_coords_top_left, target_size=target_size, **kw)


@register_backbone("digits", accepts=_SD_ACCEPTS)
def digits(**kw: Any) -> nn.Module:
    """The bundled digits model (32x32 images, trained by scripts/train_digits.py)."""
    kw.setdefault("layers", "vpd")
    return DiffusionBackbone.from_pretrained(bundled_model_path(), **kw)


# presets defined beside their classes register on import
from . import dinov2 as _dinov2  # noqa: E402,F401
from . import fused as _fused  # noqa: E402,F401

# CleanDIFT (Stracke et al., CVPR 2025, arXiv 2412.03439; github CompVis/cleandift): the SD UNet fine-tuned to
# take the clean image, loaded over the base pipeline's UNet (README: `unet.load_state_dict(...)`, strict).
# Settings from the released code: the clean latent (no noise) at t=261 - the TLFR eval branch hard-codes it
# (geoaware-sc-eval third_party/ODISE/odise/modeling/meta_arch/ldm.py:881-883, `use_clean_features`), main's
# get_features passes the learned `timestep` parameter initialised at t_init=261 (src/sd_feature_extraction.py:248,
# 324-326, 474-477); features `us6` = the output of up_blocks.1 (notebooks/get_correspondences.ipynb cell 2,
# src/min_sd21.py CrossAttnUpBlock2D) at 768 px for sd21; the caption is used ("A photo of a {category}").
CLEANDIFT_WEIGHTS = {
    "sd21-cleandift": ("sd21", "CompVis/cleandift/cleandift_sd21_unet.safetensors"),
    "sd15-cleandift": ("sd15", "CompVis/cleandift/cleandift_sd15_unet.safetensors"),
}


def _cleandift(name: str) -> Callable[..., nn.Module]:
    base, weights = CLEANDIFT_WEIGHTS[name]

    def build(unet_weights: str | Path = weights, **kw: Any) -> nn.Module:
        kw = {"layers": "dift", "timestep": 261, "add_noise": False} | kw
        return DiffusionBackbone.from_pretrained(HUB_IDS[base], unet_weights=unet_weights, **kw)

    build.__doc__ = (f"CleanDIFT {name!r}: {HUB_IDS[base]} with the UNet of {weights} (clean latents, t=261, "
                     "up_blocks.1; needs both downloads).")
    return build


for _name in CLEANDIFT_WEIGHTS:
    register_backbone(_name, accepts=_SD_ACCEPTS)(_cleandift(_name))


# ---------------------------------------------------------------- DiT families (SD3, FLUX)
from .dit import DiTBackbone as DiTBackboneBase  # noqa: E402
from .flux import FluxBackbone  # noqa: E402
from .sd3 import SD3Backbone  # noqa: E402

_DIT_HUB = {"sd3-medium": (SD3Backbone, "stabilityai/stable-diffusion-3-medium-diffusers"),
            "flux-dev": (FluxBackbone, "black-forest-labs/FLUX.1-dev"),
            "flux-schnell": (FluxBackbone, "black-forest-labs/FLUX.1-schnell")}
HUB_IDS.update({k: v[1] for k, v in _DIT_HUB.items()})


def _dit_hub(name: str) -> Callable[..., nn.Module]:
    cls, hub_id = _DIT_HUB[name]

    def build(**kw: Any) -> nn.Module:
        return cls.from_pretrained(hub_id, **kw)

    build.__doc__ = f"{cls.__name__} preset {name!r}: {hub_id} (needs the weights; gated on the Hub, see README)."
    return build


for _name, (_cls, _) in _DIT_HUB.items():
    register_backbone(_name, accepts=(_cls.__init__, DiTBackboneBase.__init__, DiffusionBackbone.from_pretrained),
                      exclude=("scale_latents", "attention_resolutions"))(_dit_hub(_name))


@register_backbone("test_sd3", accepts=(SD3Backbone.__init__, DiTBackboneBase.__init__))
def test_sd3(seed: int = 0, pretrained: bool = False, t5: bool = True, **kw: Any) -> nn.Module:
    """Tiny random SD3-shaped backbone (MMDiT, 3 joint blocks, three text encoders); see ``tiny_sd3_components``."""
    from .tiny import tiny_sd3_components

    _random_only("test_sd3", pretrained)
    kw.setdefault("max_sequence_length", 16)
    return SD3Backbone(**tiny_sd3_components(seed=seed, t5=t5), name_or_path="test_sd3", **kw)


@register_backbone("test_flux", accepts=(FluxBackbone.__init__, DiTBackboneBase.__init__))
def test_flux(seed: int = 0, pretrained: bool = False, guidance: bool = True, **kw: Any) -> nn.Module:
    """Tiny random FLUX-shaped backbone (2 double + 3 single blocks, guidance embedding); see ``tiny_flux_components``."""
    from .tiny import tiny_flux_components

    _random_only("test_flux", pretrained)
    kw.setdefault("max_sequence_length", 16)
    return FluxBackbone(**tiny_flux_components(seed=seed, guidance=guidance), name_or_path="test_flux", **kw)
