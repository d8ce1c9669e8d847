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

__all__ = ["load_components", "save_components", "is_offline", "load_unet_weights", "resolve_unet_weights"]

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


def _safetensors_hint(source: str, err: Exception, use_safetensors: bool) -> str:
    folder = Path(source)
    only_bin = folder.is_dir() and any(folder.rglob("*.bin")) and not any(folder.rglob("*.safetensors"))
    if use_safetensors and (only_bin or (not folder.is_dir() and "safetensors" in str(err).lower())):
        return ("\n- Only pickled .bin weights there? diffperc reads .safetensors by default; pass "
                "use_safetensors=False to read the .bin files (torch.load(weights_only=True)).")
    return ""


def load_components(
    name_or_path: str | Path, revision: str | None = None, variant: str | None = None,
    torch_dtype: torch.dtype = torch.float32, local_files_only: bool | None = None, pretrained: bool = True,
    use_safetensors: bool = True, config: str | Path | None = None, index: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Load the components of an SD 1.x/2.x model ({"vae", "unet", "text_encoder", "tokenizer",
    "scheduler"}) or of an SDXL one (also "text_encoder_2", "tokenizer_2"), as model_index.json says.

    Args:
        name_or_path: hub id, local diffusers folder, or a single-file checkpoint.
        pretrained: False builds each model from its config with random weights (no weight file read).
        use_safetensors: only ``.safetensors`` weights (False: pickled ``.bin`` too, weights_only).
        config: diffusers layout of a single-file checkpoint (local folder or cached hub id).
        index: the model_index.json contents if already read (else read here).
    """
    name = str(name_or_path)
    path = Path(name).expanduser()
    offline = is_offline() if local_files_only is None else local_files_only
    if path.is_file() and name.endswith(_SINGLE_FILE_SUFFIXES):
        if not pretrained:
            raise ValueError(f"pretrained=False needs a diffusers config, not a single-file checkpoint: pass "
                             f"{config or 'the diffusers folder or hub id the checkpoint came from'} instead of {name}")
        return _load_single_file(path, torch_dtype, config, offline)
    if path.exists() and not (path / "model_index.json").exists() and not (path / "unet").is_dir():
        raise FileNotFoundError(_missing_message(name, FileNotFoundError(f"{path} has no model_index.json or unet/")))
    if not path.exists() and _looks_local(name):
        raise FileNotFoundError(_missing_message(name, FileNotFoundError(f"no such folder: {path}")))
    source = str(path) if path.exists() else name
    common = {"revision": revision, "local_files_only": offline}
    index = model_index(source, common) if index is None else index
    family_of(index)  # an unsupported pipeline fails here, before any weight
    try:
        return _components(source, torch_dtype, variant, use_safetensors, common, pretrained, index)
    except (OSError, ValueError) as err:
        if not pretrained:
            raise FileNotFoundError(
                f"pretrained=False builds {name!r} with random weights from its config files, but they could not "
                f"be read ({type(err).__name__}: {str(err).splitlines()[0][:200]}). Get only the configs (no "
                f"weights) once where the Hub is reachable: `hf download {name} --include '*.json' '*.txt'`, "
                "then run with HF_HUB_OFFLINE=1; or pass a local diffusers folder.") from err
        raise FileNotFoundError(_missing_message(name, err) + _safetensors_hint(source, err, use_safetensors)) from err


FAMILIES = {  # model_index.json _class_name -> (family, components the backbone needs)
    "StableDiffusionPipeline": ("sd", ("vae", "unet", "text_encoder", "tokenizer", "scheduler")),
    "StableDiffusionXLPipeline": ("sdxl", ("vae", "unet", "text_encoder", "text_encoder_2", "tokenizer",
                                           "tokenizer_2", "scheduler")),
    "StableDiffusion3Pipeline": ("sd3", ("vae", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3",
                                         "tokenizer", "tokenizer_2", "tokenizer_3", "scheduler")),
    "FluxPipeline": ("flux", ("vae", "transformer", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                              "scheduler")),
}
_DEFAULT_CLASSES = {"vae": ("diffusers", "AutoencoderKL"), "unet": ("diffusers", "UNet2DConditionModel"),
                    "text_encoder": ("transformers", "CLIPTextModel"), "tokenizer": ("transformers", "CLIPTokenizer"),
                    "scheduler": ("diffusers", "DDPMScheduler")}


def model_index(source: str, common: dict[str, Any]) -> dict[str, Any]:
    """The pipeline's model_index.json (a local folder or a cached / reachable hub id); {} if there is none."""
    import json

    path = Path(source) / "model_index.json"
    if not path.is_file() and not Path(source).exists():
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(source, "model_index.json", revision=common["revision"],
                                        local_files_only=common["local_files_only"]))
        except Exception:  # noqa: BLE001 - a missing index falls back to SD; loading then says what is missing
            return {}
    return json.loads(path.read_text()) if path.is_file() else {}


def family_of(index: dict[str, Any]) -> str:
    """"sd" or "sdxl" from a model_index.json; a clear error for pipelines diffperc has no backbone for."""
    name = index.get("_class_name", "StableDiffusionPipeline")
    if name not in FAMILIES:
        known = ", ".join(f"{k} ({v[0]})" for k, v in FAMILIES.items())
        raise ValueError(f"no diffperc backbone for a {name} (model_index.json); supported: {known}")
    return FAMILIES[name][0]


def _component_class(index: dict[str, Any], name: str) -> Any:
    import importlib

    library, cls_name = index.get(name) or _DEFAULT_CLASSES[name]
    if library not in ("diffusers", "transformers"):
        raise ValueError(f"component {name!r} comes from {library!r}; only diffusers and transformers are loaded")
    if name == "scheduler":  # SD 1/2 and SDXL noise with DDPM; the flow families keep their own scheduler
        unet_family = index.get("_class_name", "StableDiffusionPipeline") in ("StableDiffusionPipeline",
                                                                              "StableDiffusionXLPipeline")
        cls_name = "DDPMScheduler" if unet_family else cls_name
    return getattr(importlib.import_module(library), cls_name)


def _components(source: str, torch_dtype: torch.dtype, variant: str | None, use_safetensors: bool,
                common: dict[str, Any], pretrained: bool, index: dict[str, Any]) -> dict[str, Any]:
    """Every component the family needs: weights (``pretrained``) or the architecture from its config."""
    _, names = FAMILIES[index.get("_class_name", "StableDiffusionPipeline")]
    out = {}
    for name in names:
        if (index.get(name) or [""])[0] is None:  # a dropped component (SD3 without T5: [null, null])
            out[name] = None
            continue
        cls = _component_class(index, name)
        is_model = isinstance(cls, type) and issubclass(cls, nn.Module)
        if not is_model:  # tokenizer, scheduler: small files either way
            out[name] = cls.from_pretrained(source, subfolder=name, **common)
        elif pretrained:
            dtype_kw = {"dtype": torch_dtype} if cls.__module__.startswith("transformers") else {"torch_dtype": torch_dtype}
            out[name] = cls.from_pretrained(source, subfolder=name, variant=variant, use_safetensors=use_safetensors,
                                            **dtype_kw, **common)
        elif cls.__module__.startswith("transformers"):
            out[name] = cls(cls.config_class.from_pretrained(source, subfolder=name, **common)).to(torch_dtype)
        else:
            model = cls.from_config(cls.load_config(source, subfolder=name, **common))
            out[name] = model if torch_dtype == torch.float32 else model.to(torch_dtype)
    return out


def _single_file_config_error(path: Path, config: str | Path | None, why: str) -> ValueError:
    return ValueError(
        f"single-file checkpoint {path}: {why}. Offline, diffusers needs the model's diffusers config to convert "
        "it: pass config= (on the command line --model-config) a local diffusers folder (model_index.json and its "
        "unet/, vae/, text_encoder/, tokenizer/, scheduler/ configs, e.g. one DiffusionBackbone.save_pretrained "
        "wrote) or a hub id whose config files are cached, e.g. 'stable-diffusion-v1-5/stable-diffusion-v1-5' "
        "(get them with `hf download ID --include '*.json' '*.txt'`)."
        + ("" if config is None else f" Got config={str(config)!r}.")
    )


def _load_single_file(path: Path, torch_dtype: torch.dtype, config: str | Path | None, offline: bool) -> dict[str, Any]:
    """An original-format SD checkpoint (.safetensors / .ckpt), converted by diffusers into ``config``'s layout."""
    from diffusers import StableDiffusionPipeline

    if config is None and offline:
        raise _single_file_config_error(path, None, "no config= given and the Hub is off (HF_HUB_OFFLINE)")
    if config is not None:
        cfg = Path(str(config)).expanduser()
        if cfg.exists() and not (cfg / "model_index.json").is_file():
            raise _single_file_config_error(path, config, f"config folder {cfg} has no model_index.json")
        if not cfg.exists() and _looks_local(str(config)):
            raise _single_file_config_error(path, config, f"config folder {cfg} does not exist")
        config = str(cfg) if cfg.exists() else str(config)
    try:
        pipe = StableDiffusionPipeline.from_single_file(str(path), config=config, torch_dtype=torch_dtype,
                                                        local_files_only=offline)
    except Exception as err:  # diffusers raises many types here; say which part failed
        text = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
        if "config" in text.lower() or "model_index" in text.lower() or "LocalEntryNotFound" in text:
            raise _single_file_config_error(path, config, f"its config could not be read ({text})") from err
        raise ValueError(f"could not convert single-file checkpoint {path} with config {config!r} ({text}). The file "
                         "must be an SD 1.x/2.x checkpoint (original LDM key names) matching that config.") from err
    return {k: getattr(pipe, k) for k in ("vae", "unet", "text_encoder", "tokenizer", "scheduler")}


def save_components(folder: str | Path, vae: nn.Module, unet: nn.Module | None, text_encoder: nn.Module,
                    tokenizer: Any, scheduler: Any, pipeline: str = "StableDiffusionPipeline", **extra: Any) -> None:
    """Write a diffusers folder atomically (a temp folder beside the target, then rename).

    ``extra``: further components (SDXL: ``text_encoder_2``, ``tokenizer_2``; SD3 / FLUX: ``transformer``
    with ``unet=None``, and a dropped component as None); model_index.json names ``pipeline`` and each
    component's library and class.
    """
    import json

    parts = {"vae": vae, "unet": unet, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler,
             **extra}
    if unet is None:  # transformer families
        del parts["unet"]
    index: dict[str, Any] = {"_class_name": pipeline}
    if pipeline == "StableDiffusionPipeline":
        index |= {"feature_extractor": [None, None], "requires_safety_checker": False, "safety_checker": [None, None]}
    with atomic_dir(Path(folder).expanduser().resolve()) as tmp:
        for name, part in sorted(parts.items()):
            if part is None:  # a dropped component (SD3 without T5)
                index[name] = [None, None]
                continue
            if isinstance(part, nn.Module):
                part.save_pretrained(tmp / name, safe_serialization=True)
            else:
                part.save_pretrained(tmp / name)
            index[name] = [type(part).__module__.split(".")[0], type(part).__name__]
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------- UNet weight overrides
_UNET_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json")
_STATE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def _read_state_file(path: Path, use_safetensors: bool) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file, a sharded index, or (``use_safetensors=False``) a torch file."""
    import json

    name = path.name
    if name.endswith(".index.json"):
        shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        out: dict[str, torch.Tensor] = {}
        for shard in shards:
            out |= _read_state_file(path.parent / shard, use_safetensors)
        return out
    if name.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path))
    if not use_safetensors:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        return state.get("state_dict", state) if isinstance(state, dict) else state
    raise ValueError(f"unet_weights {path} is not a .safetensors file; diffperc reads .safetensors by default "
                     "(pass use_safetensors=False to read a torch file with torch.load(weights_only=True))")


def _unet_file_in(folder: Path) -> Path | None:
    """The UNet weight file of a diffusers UNet folder or of a pipeline folder (its ``unet/``)."""
    for sub in (folder, folder / "unet"):
        for fname in _UNET_FILES:
            if (sub / fname).is_file():
                return sub / fname
        variants = sorted(sub.glob("diffusion_pytorch_model.*.safetensors"))  # e.g. the fp16 variant
        if len(variants) == 1:
            return variants[0]
    return None


def _hub_unet_file(source: str, revision: str | None, offline: bool) -> Path:
    """``org/name`` (a UNet repo or a pipeline repo with ``unet/``) or ``org/name/file.safetensors`` on the Hub."""
    from huggingface_hub import hf_hub_download, snapshot_download

    parts = source.removeprefix("hf://").split("/")
    if len(parts) > 2:  # a file inside a repo, e.g. CompVis/cleandift/cleandift_sd21_unet.safetensors
        return Path(hf_hub_download("/".join(parts[:2]), "/".join(parts[2:]), revision=revision,
                                    local_files_only=offline))
    folder = Path(snapshot_download(source, revision=revision, local_files_only=offline, allow_patterns=[
        "config.json", "diffusion_pytorch_model*", "unet/config.json", "unet/diffusion_pytorch_model*"]))
    found = _unet_file_in(folder)
    if found is None:
        raise FileNotFoundError(f"hub repo {source!r} has no diffusion_pytorch_model*.safetensors at its root or in "
                                "unet/: name the file, e.g. 'org/name/path/to/unet.safetensors'")
    return found


def resolve_unet_weights(source: str | Path, revision: str | None = None, local_files_only: bool | None = None
                         ) -> Path:
    """The weight file behind ``unet_weights``: a local file, a local UNet / pipeline folder, or the Hub.

    Local paths win: a file (``.safetensors``, or a torch file), a diffusers UNet folder
    (``diffusion_pytorch_model.safetensors``) or a pipeline folder with ``unet/``. Otherwise
    ``org/name`` is a hub repo (UNet repo or pipeline snapshot with ``unet/``) and
    ``org/name/file.safetensors`` a file in one (CleanDIFT: ``CompVis/cleandift/cleandift_sd21_unet.safetensors``).
    """
    name = str(source)
    path = Path(name).expanduser()
    offline = is_offline() if local_files_only is None else local_files_only
    if path.is_file():
        return path
    if path.is_dir():
        found = _unet_file_in(path)
        if found is None:
            raise FileNotFoundError(f"unet_weights folder {path} has no diffusion_pytorch_model*.safetensors (nor "
                                    "unet/ with one): pass a UNet folder, a pipeline folder or the weight file")
        return found
    hub_like = not name.startswith((".", "/", "~")) and name.count("/") >= 1 and not name.endswith("/")
    if not hub_like:
        raise FileNotFoundError(f"unet_weights {name!r}: no such file or folder (and not a hub id 'org/name' or "
                                "'org/name/file.safetensors')")
    try:
        return _hub_unet_file(name, revision, offline)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"unet_weights {name!r} is neither a local path nor a reachable/cached hub file "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}). Download it once where the "
            f"Hub is reachable (`hf download {'/'.join(name.split('/')[:2])}"
            + (f" {'/'.join(name.split('/')[2:])}" if name.count("/") > 1 else "")
            + "`), then run with HF_HUB_OFFLINE=1, or pass the local file.") from err


def _match_prefix(state: dict[str, torch.Tensor], want: set[str]) -> dict[str, torch.Tensor] | None:
    """``state`` with one common key prefix stripped (``"unet."``, ``"model."``...) if that gives exactly ``want``."""
    if set(state) == want:
        return state
    sample = next(iter(want))
    prefixes = {k[: -len(sample)] for k in state if k.endswith(sample) and len(k) > len(sample)}
    hits = []
    for p in prefixes:
        sub = {k[len(p):]: v for k, v in state.items() if k.startswith(p)}
        if set(sub) == want:
            hits.append((p, sub))
    return hits[0][1] if len(hits) == 1 else None


def load_unet_weights(unet: nn.Module, source: str | Path, revision: str | None = None,
                      local_files_only: bool | None = None, use_safetensors: bool = True) -> Path:
    """Load a UNet state dict (CleanDIFT, a fine-tune) into ``unet``, every key checked (strict).

    Args:
        unet: the loaded ``UNet2DConditionModel``; tensors are cast to its dtype and device.
        source: see :func:`resolve_unet_weights`. Keys are diffusers UNet names; a file whose
            keys all sit under one prefix (``"unet."``...) is accepted with the prefix stripped.
        use_safetensors: False also reads torch files (``torch.load(weights_only=True)``).

    Returns:
        the file that was read.

    Raises:
        ValueError: keys missing or unexpected (both listed), or shapes that do not match.
    """
    path = resolve_unet_weights(source, revision, local_files_only)
    state = _read_state_file(path, use_safetensors)
    own = unet.state_dict()
    matched = _match_prefix(state, set(own))
    if matched is None:
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))

        def show(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")

        hint = ""
        if any(k.startswith("model.diffusion_model.") for k in state):
            hint = (" The keys are original LDM names (model.diffusion_model.*): a full single-file checkpoint "
                    "loads as the model itself (--model FILE --model-config FOLDER_OR_ID), not as unet_weights.")
        raise ValueError(f"unet_weights {path} does not match the UNet ({type(unet).__name__}, {len(own)} tensors): "
                         f"{len(missing)} missing keys [{show(missing)}]; {len(unexpected)} unexpected keys "
                         f"[{show(unexpected)}]. It must be a diffusers UNet state dict of the same architecture "
                         f"(e.g. CleanDIFT's cleandift_sd21_unet.safetensors for sd21).{hint}")
    bad = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in matched.items() if v.shape != own[k].shape]
    if bad:
        raise ValueError(f"unet_weights {path}: {len(bad)} tensors have other shapes than the UNet's (file vs model): "
                         f"{'; '.join(bad[:5])}. It is a UNet of another architecture (SD 1.x vs 2.x?).")
    unet.load_state_dict(matched, strict=True)
    return path
