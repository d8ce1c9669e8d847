"""Support sets sampled from the diffusion model, with the class tokens' cross-attention heatmaps.

Follows karazijal/sdov ``sample_support_set.py`` and ``sd.py`` (``StableDiffusionDAAMPipeline``,
``DAAMStore``): per category, N images from a Stable Diffusion pipeline built from the backbone's
own components (DPM-Solver multistep, 30 steps, guidance 8.0, prompt "A good picture of a {c}",
the released negative prompt), one CPU generator seeded per class and drawn batch after batch.
During sampling every cross-attention layer at every step reports its softmax probabilities;
for the conditional half of the CFG batch the class tokens' maps are upsampled (bicubic) to the
first layer's map size, clamped at 0 and summed over heads; the sum is divided by the number of
(layer, head, step) maps and averaged over the class's tokens (``DAAMStore.update`` /
``get_heatmaps``). Heatmaps are min-max normalised, bilinearly upsampled to the image size and
min-max normalised again (``sample_support_set.py:194-201``).

The cache keeps, per (model, category, N, seed, settings), the images as PNGs (quantised as the
released code writes them: ``to_pil_image`` truncates), the raw heatmaps and the generator state
after each batch, so an interrupted run resumes at the next batch with the same random stream.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from ..._io import write_text_atomic

__all__ = ["NEGATIVE_PROMPT", "TEMPLATE", "HeatmapAccumulator", "SupportSet", "build_pipeline", "class_token_group",
           "model_fingerprint", "normalise_heatmaps", "sample_support_set", "sample_with_heatmaps", "slug"]

# sample_support_set.py:29 and :154
NEGATIVE_PROMPT = "text, low quality, blurry, cartoon, meme, low resolution, bad, poor, faded"
TEMPLATE = "A good picture of a {}"
_VERSION = 1  # bump when the cached content changes meaning


@dataclass
class SupportSet:
    """N sampled images of one category and their heatmaps.

    Attributes:
        category: the class name.
        images: (N, 3, S, S) uint8 images as written to (and read from) the cache.
        heatmaps: (N, 1, S, S) float32 in [0, 1]: the class tokens' attention, normalised and upsampled.
        folder: the cache folder of this class (None when not cached).
    """

    category: str
    images: Tensor
    heatmaps: Tensor
    folder: Path | None = None

    def float_images(self) -> Tensor:
        """(N, 3, S, S) float32 in [0, 1] (``to_tensor`` of the cached PNGs)."""
        return self.images.float() / 255.0


# ---------------------------------------------------------------------------- attention accumulation
class HeatmapAccumulator:
    """Class-token heatmaps summed over layers, heads and steps (``sd.py`` DAAMStore).

    Args:
        token_groups: per group, the prompt token indices whose maps are averaged.
        cfg: the UNet batch is [unconditional; conditional]; only the second half is kept.
    """

    def __init__(self, token_groups: Sequence[Sequence[int]], cfg: bool = True) -> None:
        self.token_groups = [list(g) for g in token_groups]
        self.cfg = cfg
        self.latent_hw: tuple[int, int] = (0, 0)
        self.size: tuple[int, int] | None = None
        self.sums: list[Tensor | None] = [None] * len(self.token_groups)
        self.counts = [0] * len(self.token_groups)

    def _map_hw(self, seq_len: int) -> tuple[int, int]:
        h, w = self.latent_hw
        if h * w == 0:  # square maps, as the released store assumes
            a = int(math.sqrt(seq_len))
            return a, a
        r = math.sqrt(h * w / seq_len)
        return round(h / r), round(w / r)

    def update(self, probs: Tensor, heads: int) -> None:
        """Add one layer's probabilities (B * heads, HW, L) (``DAAMStore.update``)."""
        bh, seq_len, n_tok = probs.shape
        maps = probs.detach().view(-1, heads, seq_len, n_tok)
        if self.cfg:
            maps = maps[maps.shape[0] // 2 :]
        b = maps.shape[0]
        hw = self._map_hw(seq_len)
        if self.size is None:  # the first cross-attention layer sets the size (SD: the largest map)
            self.size = hw
        for i, group in enumerate(self.token_groups):
            m = maps[..., group].view(b, heads, *hw, len(group)).permute(0, 4, 1, 2, 3)
            m = m.reshape(b * len(group), heads, *hw).float()
            m = F.interpolate(m, size=self.size, mode="bicubic", align_corners=False).clamp(min=0)
            m = m.view(b, len(group), heads, *self.size).sum(2)
            self.sums[i] = m if self.sums[i] is None else self.sums[i].add_(m)
            self.counts[i] += heads

    def heatmaps(self) -> Tensor:
        """(B, G, h, w): per group, the mean over (layer, head, step) maps and the group's tokens."""
        if any(s is None for s in self.sums):
            raise RuntimeError("no cross-attention was recorded: did the UNet run with the heatmap processors?")
        return torch.cat([(s / c).mean(1, keepdim=True) for s, c in zip(self.sums, self.counts, strict=True)], dim=1)


class _HeatmapProcessor:
    """diffusers ``AttnProcessor`` arithmetic that reports cross-attention probabilities to an accumulator."""

    def __init__(self, acc: HeatmapAccumulator, fallback: Any) -> None:
        self.acc, self.fallback = acc, fallback

    def __call__(self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, **kwargs: Any) -> Tensor:
        if encoder_hidden_states is None:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        ndim = hidden_states.ndim
        if ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, key_len, _ = encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, key_len, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(query, key, attention_mask)  # (B * heads, HW, L)
        self.acc.update(probs, attn.heads)
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


# ---------------------------------------------------------------------------- pipeline
def build_pipeline(backbone: nn.Module) -> Any:
    """A diffusers ``StableDiffusionPipeline`` over the backbone's own modules, with DPM-Solver++.

    The released code ran diffusers 0.14, whose DPM-Solver spaced 30 steps with ``linspace`` and
    ended at sigma_min; current diffusers would inherit SD's ``leading`` spacing and end at 0,
    so both are pinned (``sd.py:1202`` swaps the scheduler the same way).
    """
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    scheduler = DPMSolverMultistepScheduler.from_config(
        backbone.scheduler.config, timestep_spacing="linspace", final_sigmas_type="sigma_min",
        steps_offset=1)  # unused with linspace; keeps the pipeline from rewriting the config with a warning
    pipe = StableDiffusionPipeline(vae=backbone.vae, text_encoder=backbone.text_encoder, tokenizer=backbone.tokenizer,
                                   unet=backbone.unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def native_size(backbone: nn.Module) -> int:
    """The image side the UNet was trained at: ``sample_size`` x the VAE factor (512 for SD 1.5)."""
    vae_factor = 2 ** (len(backbone.vae.config.block_out_channels) - 1)
    return int(backbone.unet.config.sample_size) * vae_factor


def class_token_group(tokenizer: Any, prompt: str, target: str) -> list[int]:
    """Indices of ``target``'s tokens inside ``prompt``'s ids (with BOS), as ``sd.py:997-1008`` finds them.

    The first occurrence of the target's first token starts the group.
    """
    if target not in prompt:
        raise ValueError(f"the class word {target!r} must appear in the prompt {prompt!r}")
    ids = tokenizer(prompt).input_ids
    target_ids = tokenizer(target, add_special_tokens=False).input_ids
    if not target_ids or target_ids[0] not in ids:
        raise ValueError(f"the tokens of {target!r} are not found in the tokens of {prompt!r}")
    start = ids.index(target_ids[0])
    group = list(range(start, start + len(target_ids)))
    if group[-1] >= tokenizer.model_max_length:
        raise ValueError(f"{target!r} falls beyond the tokenizer's {tokenizer.model_max_length} tokens in {prompt!r}")
    return group


@torch.no_grad()
def sample_with_heatmaps(
    pipe: Any, prompt: str, target: str, num_images: int, generator: torch.Generator, guidance_scale: float = 8.0,
    num_inference_steps: int = 30, negative_prompt: str | None = NEGATIVE_PROMPT, size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """One pipeline call: ``num_images`` images of ``prompt`` and their raw ``target`` heatmaps.

    Args:
        pipe: from :func:`build_pipeline`.
        prompt, target: the prompt and the class word inside it whose tokens are tracked.
        num_images: images in this batch (``num_images_per_prompt``).
        generator: draws the initial latents (a CPU generator, as released).
        guidance_scale, num_inference_steps, negative_prompt: sampler settings.
        size: image side; default the model's native size.

    Returns:
        images (n, 3, S, S) float32 in [0, 1]; heatmaps (n, 1, h, w) float32, not normalised
        (h, w = the first cross-attention layer's map size).
    """
    unet = pipe.unet
    size = size or int(unet.config.sample_size) * pipe.vae_scale_factor
    cfg = guidance_scale > 1.0
    acc = HeatmapAccumulator([class_token_group(pipe.tokenizer, prompt, target)], cfg=cfg)
    acc.latent_hw = (size // pipe.vae_scale_factor, size // pipe.vae_scale_factor)
    from diffusers.models.attention_processor import AttnProcessor2_0

    original = dict(unet.attn_processors)
    processor = _HeatmapProcessor(acc, AttnProcessor2_0())
    unet.set_attn_processor({name: processor for name in original})
    try:
        out = pipe(prompt=prompt, negative_prompt=negative_prompt if cfg else None, num_images_per_prompt=num_images,
                   guidance_scale=guidance_scale, num_inference_steps=num_inference_steps, generator=generator,
                   height=size, width=size, output_type="pt")
    finally:
        unet.set_attn_processor(dict(original))  # set_attn_processor empties the dict it is given
    return out.images.float().cpu(), acc.heatmaps().cpu()


def normalise_heatmaps(raw: Tensor, size: tuple[int, int]) -> Tensor:
    """Min-max per map, bilinear upsampling to ``size``, min-max again (``sample_support_set.py:194-201``)."""
    def minmax(x: Tensor) -> Tensor:
        x = x - x.flatten(2).min(-1, keepdim=True)[0][..., None]
        return x / x.flatten(2).max(-1, keepdim=True)[0][..., None].clamp(min=1e-6)

    return minmax(F.interpolate(minmax(raw.float()), size=size, mode="bilinear", align_corners=False))


# ---------------------------------------------------------------------------- cache
def slug(name: str) -> str:
    """A file-system safe folder name for a category (spaces -> '_', '/' -> '+', as released)."""
    s = re.sub(r"[^\w.+-]", "_", name.replace("/", "+"))
    return s or "_"


def model_fingerprint(backbone: nn.Module) -> str:
    """A short hash of the backbone's name and a few weight values (tells apart two random models)."""
    h = hashlib.sha1(str(getattr(backbone, "config", {}).get("name_or_path")).encode())
    for part in ("unet", "vae", "text_encoder"):
        params = list(getattr(backbone, part).parameters())
        for p in (params[0], params[-1]):
            h.update(str(tuple(p.shape)).encode())
            h.update(p.detach().flatten()[:64].float().cpu().numpy().tobytes())
    return h.hexdigest()[:12]


def _settings_key(settings: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def _write_png(image: Tensor, path: Path) -> None:
    """uint8 (3, H, W) -> PNG, atomically."""
    from ..._io import atomic_file

    with atomic_file(path) as tmp:
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp, format="PNG")


def _read_png(path: Path) -> Tensor:
    with Image.open(path) as img:
        return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).contiguous()


def _save_progress(folder: Path, raw: Tensor, generator: torch.Generator) -> None:
    from safetensors.torch import save_file

    from ..._io import atomic_file

    with atomic_file(folder / "progress.safetensors") as tmp:
        save_file({"heatmaps": raw.contiguous(), "rng_state": generator.get_state()}, str(tmp))


def _load_progress(folder: Path) -> tuple[Tensor, Tensor] | None:
    path = folder / "progress.safetensors"
    if not path.exists():
        return None
    from safetensors.torch import load_file

    data = load_file(str(path))
    return data["heatmaps"], data["rng_state"]


def sample_support_set(
    backbone: nn.Module, category: str, prompt_word: str | None = None, num_images: int = 32, seed: int = 42,
    cache_dir: str | Path | None = None, template: str = TEMPLATE, negative_prompt: str | None = NEGATIVE_PROMPT,
    guidance_scale: float = 8.0, num_inference_steps: int = 30, batch_size: int = 8, size: int | None = None,
    pipe: Any = None, progress: bool = True,
) -> SupportSet:
    """Sample (or load from the cache) the support set of one category.

    Args:
        backbone: a :class:`~diffperc.backbones.diffusion.DiffusionBackbone` (its vae, unet,
            text_encoder, tokenizer and scheduler are used).
        category: the class name (the cache folder's name).
        prompt_word: the word(s) put in the template (VOC's "pottedplant" -> "potted plant");
            default the category.
        num_images: N images (released default 32).
        seed: seeds the class's CPU generator (released 42; the same for every class).
        cache_dir: where to cache; None samples without caching.
        template: prompt with one ``{}`` (released "A good picture of a {}").
        negative_prompt: the unconditional half's prompt (released list of bad qualities).
        guidance_scale, num_inference_steps: released 8.0 and 30.
        batch_size: images per pipeline call (released 8; part of the cache key).
        size: image side; default the model's native size (512 for SD 1.5).
        pipe: a pipeline from :func:`build_pipeline` to reuse.
        progress: show a progress bar.

    Returns:
        the :class:`SupportSet` (images as cached, heatmaps normalised to the image size).
    """
    if num_images < 1 or batch_size < 1:
        raise ValueError(f"num_images and batch_size must be >= 1, got {num_images}, {batch_size}")
    if template.count("{}") != 1:
        raise ValueError(f"template must contain exactly one '{{}}', got {template!r}")
    word = prompt_word or category
    prompt = template.format(word)
    size = size or native_size(backbone)
    settings = {"v": _VERSION, "model": model_fingerprint(backbone), "template": template, "negative": negative_prompt,
                "n": num_images, "seed": seed, "guidance": guidance_scale, "steps": num_inference_steps,
                "batch": batch_size, "size": size, "scheduler": "dpmsolver++/linspace/sigma_min"}
    folder = None
    if cache_dir is not None:
        name = slug(category) if word == category else f"{slug(category)}__{slug(word)}"
        folder = Path(cache_dir).expanduser() / "support" / _settings_key(settings) / name
        cached = _load_cached(folder, num_images, size)
        if cached is not None:
            return SupportSet(category, cached[0], cached[1], folder)
    generator = torch.Generator("cpu").manual_seed(seed)  # sample_support_set.py:119-120
    raw_parts: list[Tensor] = []
    images: list[Tensor] = []
    done = 0
    if folder is not None:
        resumed = _load_progress(folder)
        if resumed is not None and (folder / "images" / f"{resumed[0].shape[0] - 1:05d}.png").exists():
            raw_parts, done = [resumed[0]], resumed[0].shape[0]
            generator.set_state(resumed[1])
            images = [_read_png(folder / "images" / f"{i:05d}.png") for i in range(done)]
        write_text_atomic(folder / "meta.json", json.dumps({**settings, "category": category, "prompt": prompt, "complete": False},
                                                           indent=1))
    pipe = pipe or build_pipeline(backbone)
    from tqdm.auto import tqdm

    with tqdm(total=num_images, initial=done, desc=f"support <{prompt}>", disable=not progress, leave=False) as bar:
        while done < num_images:
            n = min(batch_size, num_images - done)
            batch, raw = sample_with_heatmaps(pipe, prompt, word, n, generator, guidance_scale, num_inference_steps,
                                              negative_prompt, size)
            batch = (batch * 255).to(torch.uint8)  # to_pil_image: mul(255).byte() truncates
            for i, img in enumerate(batch):
                images.append(img)
                if folder is not None:
                    _write_png(img, folder / "images" / f"{done + i:05d}.png")
            raw_parts.append(raw)
            done += n
            if folder is not None:
                _save_progress(folder, torch.cat(raw_parts), generator)
            bar.update(n)
    raw_all = torch.cat(raw_parts)
    if folder is not None:
        write_text_atomic(folder / "meta.json", json.dumps({**settings, "category": category, "prompt": prompt, "complete": True},
                                                           indent=1))
    return SupportSet(category, torch.stack(images), normalise_heatmaps(raw_all, (size, size)), folder)


def _load_cached(folder: Path, num_images: int, size: int) -> tuple[Tensor, Tensor] | None:
    meta = folder / "meta.json"
    if not meta.exists() or not json.loads(meta.read_text()).get("complete"):
        return None
    progress = _load_progress(folder)
    if progress is None or progress[0].shape[0] != num_images:
        return None
    images = torch.stack([_read_png(folder / "images" / f"{i:05d}.png") for i in range(num_images)])
    return images, normalise_heatmaps(progress[0], (size, size))
