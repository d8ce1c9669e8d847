"""Device and compute precision of the plain commands: ``--device`` / ``--dtype`` resolved once, here.

Lightning commands keep Lightning's own ``--trainer.accelerator`` / ``--trainer.precision``;
everything else (``demo``, ``extract``, ``info``, ``classify``, ``correspond``, ``index``,
``serve``, folder ``predict``) loads its model through :func:`load_backbone` with a
``device`` and ``torch_dtype``.

    bb = load_backbone("sd15", device=resolve_device(None), torch_dtype=resolve_dtype("bfloat16"))
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["DTYPES", "default_device", "load_backbone", "resolve_device", "resolve_dtype"]

DTYPES = ("float32", "float16", "bfloat16")

# Presets that load weights through DiffusionBackbone.from_pretrained: they take torch_dtype and
# device directly, so the weights are read once in the target dtype (no fp32 copy of SD in memory).
_FROM_PRETRAINED_PRESETS = ("digits", "sd15", "sd21", "sd21-base", "sd21-cleandift", "sd15-cleandift", "sd3-medium",
                            "flux-dev", "flux-schnell")


def default_device() -> torch.device:
    """``cuda`` when a CUDA device is usable, else ``cpu``."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None, option: str = "--device") -> torch.device:
    """A usable device from a name (``cpu``, ``cuda``, ``cuda:1``, ``mps``); None = :func:`default_device`.

    Raises:
        ValueError: an unknown name, or a CUDA/MPS device this machine does not have.
    """
    if device is None or device == "auto":
        return default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"{option} {device!r} is not a device: use cpu, cuda, cuda:N or mps") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{option} {device}: CUDA is not available on this machine (torch "
                             f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}): use --device cpu, "
                             "or install a CUDA build of torch")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{option} {device}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                             f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{option} {device}: MPS is not available on this machine: use --device cpu")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, option: str = "--dtype") -> torch.dtype:
    """``"float32"`` / ``"float16"`` / ``"bfloat16"`` (or a torch dtype) -> the torch dtype; None = float32."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"{option} must be one of {', '.join(DTYPES)}, got {dtype}")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"{option} must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return getattr(torch, dtype)


def load_backbone(name_or_path: str, device: str | torch.device | None = None,
                  torch_dtype: str | torch.dtype | None = None, **overrides: Any) -> nn.Module:
    """:func:`diffperc.backbones.registry.load_backbone` placed on ``device`` in ``torch_dtype``.

    Args:
        name_or_path: preset name, diffusers folder, single file or hub id.
        device: where the model runs; None = :func:`default_device` (cuda when available).
        torch_dtype: compute precision of the weights (float32, float16, bfloat16); None = float32.
        **overrides: backbone options (``layers``, ``timestep``, ...).

    Returns:
        the backbone in eval mode, its parameters on ``device`` in ``torch_dtype``.
    """
    from .backbones import registry

    dev, dt = resolve_device(device), resolve_dtype(torch_dtype)
    direct = name_or_path in _FROM_PRETRAINED_PRESETS or name_or_path not in registry.list_backbones()
    if direct:
        bb = registry.load_backbone(name_or_path, torch_dtype=dt, device=dev, **overrides)
    else:  # presets built in code (test_*, fused): build, then move
        bb = registry.load_backbone(name_or_path, **overrides)
    return bb.to(device=dev, dtype=dt).eval()
