"""Loading and saving Stable Diffusion components (diffusers folders, hub ids, single files).

Errors for weights that cannot be found say how to download them and how to run offline.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._io import atomic_dir

__all__ = ["load_components", "save_components", "is_offline"]

_SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")


def is_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set to a true value."""
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _looks_local(name: str) -> bool:
    """Hub ids are ``org/name``; anything else (./x, /abs, a/b/c, x.ckpt, plain x) is a path."""
    return name.startswith((".", "/", "~")) or name.count("/") != 1 or name.endswith(_SINGLE_FILE_SUFFIXES)


def _missing_message(name: str, err: Exception) -> str:
    return (
        f"could not load Stable Diffusion weights {name!r} ({type(err).__name__}: {str(err).splitlines()[0][:200]}).\n"
        f"- Hub id: download it once where the Hub is reachable, e.g. `hf download {name}` "
        f"(or `huggingface-cli download {name}`), then run with HF_HUB_OFFLINE=1 to use the cache "
        "(~/.cache/huggingface, or HF_HOME), or copy the folder and pass its path.\n"
        "- Local folder: it must hold model_index.json and the subfolders vae/, unet/, text_encoder/, "
        "tokenizer/, scheduler/ (diffusers format; `DiffusionBackbone.save_pretrained` writes one).\n"
        "- Offline tests and demos: use create_backbone('test_sd') (tiny, random) or 'digits' (bundled)."
    )


def load_components(
    name_or_path: str | Path, revision: str | None = None, variant: str | None = None,
    torch_dtype: torch.dtype = torch.float32, local_files_only: bool | None = None,
) -> dict[str, Any]:
    """Load {"vae", "unet", "text_encoder", "tokenizer", "scheduler"} of an SD 1.x/2.x model."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_file() and name.endswith(_SINGLE_FILE_SUFFIXES):
        return _load_single_file(path, torch_dtype)
    if path.exists() and not (path / "model_index.json").exists() and not (path / "unet").is_dir():
        raise FileNotFoundError(_missing_message(name, FileNotFoundError(f"{path} has no model_index.json or unet/")))
    if not path.exists() and _looks_local(name):
        raise FileNotFoundError(_missing_message(name, FileNotFoundError(f"no such folder: {path}")))
    source = str(path) if path.exists() else name
    offline = is_offline() if local_files_only is None else local_files_only
    common = {"revision": revision, "local_files_only": offline}
    try:
        return {
            "vae": AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=torch_dtype, variant=variant, **common),
            "unet": UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=torch_dtype,
                                                         variant=variant, **common),
            "text_encoder": CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=torch_dtype,
                                                          variant=variant, **common),
            "tokenizer": CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **common),
            "scheduler": DDPMScheduler.from_pretrained(source, subfolder="scheduler", **common),
        }
    except (OSError, ValueError) as err:
        raise FileNotFoundError(_missing_message(name, err)) from err


def _load_single_file(path: Path, torch_dtype: torch.dtype) -> dict[str, Any]:
    """An original-format SD checkpoint (.safetensors / .ckpt), converted by diffusers."""
    from diffusers import StableDiffusionPipeline

    try:
        pipe = StableDiffusionPipeline.from_single_file(str(path), torch_dtype=torch_dtype)
    except Exception as err:  # diffusers raises many types here; say what to do
        raise ValueError(f"could not read single-file checkpoint {path}: {err}. It must be an SD 1.x/2.x "
                         "checkpoint (original LDM or diffusers key names).") from err
    return {k: getattr(pipe, k) for k in ("vae", "unet", "text_encoder", "tokenizer", "scheduler")}


def save_components(folder: str | Path, vae: nn.Module, unet: nn.Module, text_encoder: nn.Module,
                    tokenizer: Any, scheduler: Any) -> None:
    """Write a diffusers folder atomically: a temp folder beside the target, then rename."""
    with atomic_dir(Path(folder).expanduser().resolve()) as tmp:
        vae.save_pretrained(tmp / "vae", safe_serialization=True)
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
        tokenizer.save_pretrained(tmp / "tokenizer")
        scheduler.save_pretrained(tmp / "scheduler")
        (tmp / "model_index.json").write_text(_MODEL_INDEX)


_MODEL_INDEX = """{
  "_class_name": "StableDiffusionPipeline",
  "feature_extractor": [null, null],
  "requires_safety_checker": false,
  "safety_checker": [null, null],
  "scheduler": ["diffusers", "DDPMScheduler"],
  "text_encoder": ["transformers", "CLIPTextModel"],
  "tokenizer": ["transformers", "CLIPTokenizer"],
  "unet": ["diffusers", "UNet2DConditionModel"],
  "vae": ["diffusers", "AutoencoderKL"]
}
"""
