"""Origin-identification embeddings: a Stable Diffusion VAE encoder and an optional learned linear map.

ID² (Wang et al., "Origin Identification for Text-Guided Image-to-Image Diffusion Models",
ICML 2025, arXiv 2501.02376, github.com/WangWenhao0716/ID2, CC-BY-NC-4.0): an image is
resized to 256x256, scaled to [-1, 1] and encoded by the SD 2 VAE; its latent (4x32x32)
flattened to 4096-d is mapped by a bias-free linear layer W (4096 -> 512) and compared by
cosine similarity. Without W (``projection=None``) the embedding is the raw-VAE baseline.

The README embeds ``vae.encode(x).latent_dist.sample()``: ``latent_sample="sample"`` does the
same (a fresh posterior draw from torch's global RNG each call, so an image's embedding varies
from call to call); the default ``"mean"`` is the posterior mean, so an index and its queries
are deterministic. As the README, the latent is not multiplied by ``scaling_factor`` (W is
linear and bias-free and embeddings are L2-normalised, so a global scale would change nothing),
which keeps the released W usable as is. Step-by-step comparison: docs/fidelity/id2.md.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from .._io import atomic_file, write_bytes_atomic
from ..images import DEFAULT_MAX_PIXELS, UnreadableImageError, open_image, to_rgb8  # the one image loader

__all__ = ["DEFAULT_MAX_PIXELS", "ImageDecodeError", "OriginEmbedder", "load_projection", "load_vae",
           "read_image", "save_projection", "to_tensor"]

LATENT_SAMPLES = ("mean", "sample")
_TORCH_SUFFIXES = (".pt", ".pth", ".tar", ".bin", ".ckpt")


class ImageDecodeError(ValueError):
    """Bytes or a file that are not a usable image: not an image, truncated, or a decompression bomb."""


# ---------------------------------------------------------------------------- images
def read_image(source: str | os.PathLike | bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an image fully (first frame) and return it as RGB.

    Args:
        source: a file path or the encoded bytes.
        max_pixels: images with more pixels than this are refused before decoding (a small
            file can declare a huge size: a decompression bomb).

    Raises:
        ImageDecodeError: not an image, truncated or corrupt, or larger than ``max_pixels``.
    """
    try:  # diffperc.images: allow-listed decoders, size checked on the header, EXIF, 16-bit scaled
        return to_rgb8(open_image(source, max_pixels=max_pixels))
    except (UnreadableImageError, FileNotFoundError) as err:
        raise ImageDecodeError(str(err)) from err


def to_tensor(images: list[Image.Image], size: int) -> Tensor:
    """PIL images -> (B, 3, size, size) float32 in [0, 1], resized with antialiased bilinear (aspect not kept)."""
    arrays = [np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR)) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


# ---------------------------------------------------------------------------- VAE and projection
def load_vae(model: str) -> nn.Module:
    """The ``AutoencoderKL`` of a backbone preset, a diffusers model folder, a VAE folder or a hub id.

    Only the VAE is loaded (not the UNet or text encoder) where the weights are files.
    """
    from ..backbones._loading import _missing_message, is_offline
    from ..backbones.registry import _REGISTRY, HUB_IDS, bundled_model_path, create_backbone

    if model == "digits":
        source, subfolder = str(bundled_model_path()), "vae"
    elif model in HUB_IDS:
        source, subfolder = HUB_IDS[model], "vae"
    elif model in _REGISTRY:
        return create_backbone(model).vae  # built in code (test_sd, ...)
    else:
        path = Path(model).expanduser()
        if path.is_dir():
            subfolder = "vae" if (path / "vae").is_dir() else None
            if subfolder is None and not (path / "config.json").is_file():
                raise FileNotFoundError(f"{path} is neither a diffusers model folder (with vae/) nor a VAE folder "
                                        "(with config.json): pass a preset name (digits, sd21) or such a folder")
            source = str(path)
        elif path.exists() or model.count("/") != 1:
            raise FileNotFoundError(f"--model {model!r} is not a preset ({', '.join(sorted(_REGISTRY))}), "
                                    "an existing folder or a hub id 'org/name'")
        else:
            source, subfolder = model, "vae"
    from diffusers import AutoencoderKL

    try:
        return AutoencoderKL.from_pretrained(source, subfolder=subfolder, torch_dtype=torch.float32,
                                             local_files_only=is_offline())
    except (OSError, ValueError) as err:
        raise FileNotFoundError(_missing_message(model, err)) from err


def load_projection(path: str | os.PathLike) -> Tensor:
    """Read a projection W (D, F) from ``.safetensors`` (key ``weight``), a torch file or a task checkpoint.

    Torch files are read with ``weights_only=True``: the ID² release (a bare tensor), a state
    dict (``...fc1.weight`` or ``projection.weight``) or an ``OriginIDTask`` Lightning
    checkpoint (its EMA weights are preferred).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"projection file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        weight = tensors.get("weight", next(iter(tensors.values())) if len(tensors) == 1 else None)
    elif path.name.endswith(_TORCH_SUFFIXES):
        obj = torch.load(path, map_location="cpu", weights_only=True)
        weight = obj if isinstance(obj, Tensor) else _weight_from_state(obj.get("state_dict", obj))
    else:
        raise ValueError(f"projection {path.name}: expected .safetensors or a torch file ({', '.join(_TORCH_SUFFIXES)})")
    if not isinstance(weight, Tensor) or weight.ndim != 2:
        raise ValueError(f"projection {path.name}: no 2-D weight (D, F) found (safetensors key 'weight', "
                         "state-dict key ending in 'projection.weight' or 'fc1.weight')")
    return weight.float()


def _weight_from_state(state: dict[str, Any]) -> Tensor | None:
    for suffix in ("ema_projection", "projection.weight", "fc1.weight"):
        keys = [k for k in state if k.endswith(suffix)]
        if keys:
            return state[keys[0]]
    return None


def save_projection(weight: Tensor, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write W (D, F) as ``.safetensors`` (key ``weight``) through a temp file and a rename."""
    from safetensors.torch import save_file

    path = Path(path)
    with atomic_file(path) as tmp:
        save_file({"weight": weight.detach().float().cpu().contiguous()}, tmp, metadata=metadata)
    return path


# ---------------------------------------------------------------------------- embedder
class OriginEmbedder(nn.Module):
    """L2-normalised ID² embeddings: VAE posterior latent, flattened, optionally times W.

    Args:
        vae: a diffusers ``AutoencoderKL`` (frozen, eval).
        projection: W (D, F) with F = latent_channels x (image_size / f)^2; None embeds the
            raw flattened latent (the raw-VAE baseline, D = F).
        image_size: side the images are resized to (ID²: 256); None takes
            ``min(256, vae.config.sample_size)``.
        model: name or path the VAE came from, recorded in :attr:`config`.
        latent_sample: ``"mean"`` (default, deterministic) or ``"sample"`` (one posterior draw per
            call from torch's global RNG, ``latent_dist.sample()`` as ID²'s README).
    """

    def __init__(self, vae: nn.Module, projection: Tensor | None = None, image_size: int | None = None,
                 model: str | None = None, latent_sample: str = "mean") -> None:
        super().__init__()
        if latent_sample not in LATENT_SAMPLES:
            raise ValueError(f"latent_sample must be one of {LATENT_SAMPLES}, got {latent_sample!r}")
        self.latent_sample = latent_sample
        self.vae = vae.requires_grad_(False).eval()
        self.vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        sample = vae.config.sample_size
        sample = sample[0] if isinstance(sample, (list, tuple)) else sample
        size = image_size if image_size is not None else min(256, int(sample))
        if size < self.vae_factor or size % self.vae_factor:
            raise ValueError(f"image_size must be a positive multiple of the VAE's downsampling {self.vae_factor}, "
                             f"got {size}")
        self.image_size, self.model = size, model
        side = size // self.vae_factor
        self.feature_dim = vae.config.latent_channels * side * side
        self.projection: nn.Linear | None = None
        if projection is not None:
            projection = torch.as_tensor(projection).float()
            if projection.ndim != 2 or projection.shape[1] != self.feature_dim:
                raise ValueError(
                    f"projection has shape {tuple(projection.shape)} but this VAE at image_size {size} gives "
                    f"{self.feature_dim} features ({vae.config.latent_channels}x{side}x{side}): it needs (D, "
                    f"{self.feature_dim}). Was it trained for another model or image size (ID²: SD 2, 256 px)?")
            self.projection = nn.Linear(projection.shape[1], projection.shape[0], bias=False)
            self.projection.weight.data.copy_(projection)
            self.projection.requires_grad_(False)
        self.dim = self.projection.out_features if self.projection is not None else self.feature_dim
        self._fingerprint: str | None = None

    @classmethod
    def from_model(cls, model: str = "digits", projection: str | os.PathLike | Tensor | None = None,
                   image_size: int | None = None, device: str | torch.device | None = None,
                   latent_sample: str = "mean") -> OriginEmbedder:
        """Load the VAE of ``model`` (see :func:`load_vae`) and a projection file or tensor (optional)."""
        weight = load_projection(projection) if isinstance(projection, (str, os.PathLike)) else projection
        emb = cls(load_vae(model), weight, image_size=image_size, model=model, latent_sample=latent_sample)
        return emb.to(device) if device is not None else emb

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    # ------------------------------------------------------------------ compute
    def preprocess(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 3, S, S) in [-1, 1] on the VAE's device and dtype (S = image_size)."""
        if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images must be a float tensor (B, 3, H, W) in [0, 1], got {shape}")
        if not images.is_floating_point():
            raise TypeError(f"images must be floats in [0, 1], got {images.dtype}: use images.float() / 255")
        if images.shape[0] and (images.min() < -1e-3 or images.max() > 1 + 1e-3):
            raise ValueError(f"images must be in [0, 1], got [{images.min():.3g}, {images.max():.3g}]")
        vae_param = next(self.vae.parameters())
        x = images.to(vae_param.device, torch.float32)
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                              align_corners=False)
        return (x.clamp(0, 1) * 2 - 1).to(vae_param.dtype)

    @torch.no_grad()
    def vae_features(self, images: Tensor, batch_size: int = 32) -> Tensor:
        """Flattened VAE posterior latents (B, F) float32 (means, or draws with ``latent_sample="sample"``),
        F = C x (S/f)^2; the features ID² trains W on."""
        out = []
        for start in range(0, len(images), batch_size):
            dist = self.vae.encode(self.preprocess(images[start : start + batch_size])).latent_dist
            latent = dist.sample() if self.latent_sample == "sample" else dist.mean
            out.append(latent.flatten(1).float())
        return torch.cat(out) if out else torch.zeros(0, self.feature_dim, device=self.device)

    def project(self, features: Tensor) -> Tensor:
        """(B, F) VAE features -> (B, D) L2-normalised embeddings (W x features, or the features themselves)."""
        x = features.float()
        if self.projection is not None:
            x = F.linear(x.to(self.projection.weight.device), self.projection.weight.float())
        return F.normalize(x, dim=1)

    @torch.no_grad()
    def embed(self, images: Tensor, batch_size: int = 32) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, D) float32 unit vectors (images are resized to image_size)."""
        return self.project(self.vae_features(images, batch_size))

    def embed_pil(self, images: list[Image.Image], batch_size: int = 32) -> np.ndarray:
        """PIL images -> (B, D) float32 numpy unit vectors (for the index and the service)."""
        return self.embed(to_tensor(images, self.image_size), batch_size).cpu().numpy()

    # ------------------------------------------------------------------ identity
    def fingerprint(self) -> str:
        """sha256 of the VAE encoder weights, the image size, W (and ``latent_sample`` if not the mean): equal
        fingerprints embed identically (in distribution, for ``"sample"``)."""
        if self._fingerprint is None:
            h = hashlib.sha256(f"{self.image_size}".encode())
            if self.latent_sample != "mean":  # the mean's fingerprint stays what indexes built before recorded
                h.update(self.latent_sample.encode())
            for name, t in sorted(self.vae.state_dict().items()):
                if name.startswith(("encoder.", "quant_conv.")):
                    h.update(name.encode())
                    h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
            if self.projection is not None:
                h.update(self.projection.weight.detach().float().cpu().contiguous().numpy().tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    @property
    def config(self) -> dict[str, Any]:
        """What :meth:`from_config` needs to rebuild this embedder, plus its fingerprint."""
        return {"model": self.model, "image_size": self.image_size, "dim": self.dim,
                "feature_dim": self.feature_dim, "projection": self.projection is not None,
                "latent_sample": self.latent_sample, "fingerprint": self.fingerprint()}

    def save_config(self, folder: str | os.PathLike) -> None:
        """Write ``embedder.json`` (and ``projection.safetensors`` if any) into ``folder``, atomically."""
        folder = Path(folder)
        if self.projection is not None:
            save_projection(self.projection.weight, folder / "projection.safetensors")
        write_bytes_atomic(folder / "embedder.json", json.dumps(self.config, indent=2).encode(), durable=True)

    @classmethod
    def from_config(cls, folder: str | os.PathLike, device: str | torch.device | None = None) -> OriginEmbedder:
        """Rebuild the embedder saved by :meth:`save_config`; refuse if the model's weights changed."""
        folder = Path(folder)
        cfg_path = folder / "embedder.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{cfg_path} is missing: {folder} is not an index folder made by "
                                    "`diffperc index build`")
        cfg = json.loads(cfg_path.read_text())
        proj = folder / "projection.safetensors" if cfg.get("projection") else None
        emb = cls.from_model(cfg["model"], proj, image_size=cfg["image_size"], device=device,
                             latent_sample=cfg.get("latent_sample", "mean"))
        if emb.fingerprint() != cfg["fingerprint"]:
            raise ValueError(f"the model {cfg['model']!r} now has different VAE weights than when the index in "
                             f"{folder} was built (fingerprint {emb.fingerprint()[:12]} != {cfg['fingerprint'][:12]}): "
                             "queries would not be comparable. Restore that model or rebuild the index.")
        return emb
