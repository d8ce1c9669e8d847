"""Keyword checks that run before any weight is read, and dtype/device parsing.

A typo (``layerz=``) or a timm habit (``features_only=True``) on a preset that loads Stable
Diffusion must fail in milliseconds, not after minutes of loading: the accepted names come
from the signatures of the functions the keywords end up in (``inspect.signature``).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

__all__ = ["as_dtype", "check_kwargs", "signature_names"]

# what a timm user reaches for, and what diffperc does instead
_HINTS = {
    "features_only": "diffperc backbones always return feature maps (out.features); drop it",
    "out_indices": "choose the maps with layers= (module paths, or a preset such as 'dift' or 'vpd')",
    "num_classes": "backbones have no classifier; put a head on out.features",
    "dtype": "use torch_dtype= (weights' dtype) or bb.to(dtype)",
    "layer_names": "use layers=",
    "t": "use timestep=",
}


def signature_names(*callables: Callable[..., Any], exclude: Iterable[str] = ()) -> set[str]:
    """Keyword-passable parameter names of ``callables`` (no ``self``, ``*args``, ``**kwargs``)."""
    names: set[str] = set()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    for fn in callables:
        names |= {n for n, p in inspect.signature(fn).parameters.items() if p.kind in kinds and n not in ("self", "cls")}
    return names - set(exclude)


def takes_var_keyword(fn: Callable[..., Any]) -> bool:
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(fn).parameters.values())


def check_kwargs(owner: str, valid: Iterable[str], given: Mapping[str, Any]) -> None:
    """Raise a TypeError naming each unknown keyword of ``given``, close matches and all valid names."""
    valid = sorted(set(valid))
    unknown = [k for k in given if k not in valid]
    if not unknown:
        return
    parts = []
    for k in unknown:
        close = difflib.get_close_matches(k, valid, n=3, cutoff=0.6)
        hint = _HINTS.get(k) or (f"did you mean {' or '.join(repr(c) for c in close)}?" if close else "")
        parts.append(f"{k!r}" + (f" ({hint})" if hint else ""))
    raise TypeError(f"{owner} got unknown keyword argument{'s' if len(unknown) > 1 else ''} {', '.join(parts)}. "
                    f"Valid: {', '.join(valid)}")


def as_dtype(dtype: torch.dtype | str | None, default: torch.dtype | None = None) -> torch.dtype | None:
    """``torch.bfloat16``, ``"bfloat16"``, ``"bf16"``, ``"torch.float16"`` ... -> a torch floating dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"torch_dtype must be a floating dtype, got {dtype}")
        return default if dtype is None else dtype
    aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16", "float": "float32",
               "fp64": "float64", "double": "float64"}
    name = str(dtype).removeprefix("torch.")
    name = aliases.get(name, name)
    if name not in ("float32", "float16", "bfloat16", "float64"):
        raise ValueError(f"torch_dtype {dtype!r} is not a floating dtype: use float32, float16 or bfloat16")
    return getattr(torch, name)
