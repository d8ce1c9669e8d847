"""The work behind ``diffperc demo`` and ``diffperc info`` (their parsers: ``diffperc/cli/``).

Each command is a plain function, callable from Python and tests:

- :func:`run_demo`: held-out digits captioned with their class -> PNGs of the PCA of every
  feature layer and of every prompt token's cross-attention map (``viz.py``).
- :func:`model_info`: feature layers, cross-attention layers with their reductions, sizes,
  parameter counts and the scheduler of a model.

``diffperc extract`` is :func:`diffperc.extract.extract_features`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, TextIO

import torch
from PIL import Image
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import __version__, viz
from ._io import write_text_atomic
from .devices import load_backbone

__all__ = ["model_info", "native_size", "parse_layers", "prompt_tokens", "run_demo"]

_CELL = 96  # pixels per picture in the demo grids


def native_size(bb: nn.Module) -> int:
    """The image side a backbone was trained at (SD 1.5: 512, digits: 32), a multiple of ``size_multiple``."""
    multiple = bb.size_multiple
    unet = getattr(bb, "unet", None)
    side = unet.config.sample_size * bb.vae_factor if unet is not None else 4 * multiple
    side = side[0] if isinstance(side, (tuple, list)) else side
    return max(multiple, -(-side // multiple) * multiple)


def prompt_tokens(tokenizer: Any, prompt: str) -> tuple[list[int], list[str]]:
    """Ids and readable strings of a prompt's real tokens, start and end token included, no padding."""
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    names = {tokenizer.bos_token: "<start>", tokenizer.eos_token: "<end>"}
    return ids, [names.get(t, t.replace("</w>", "")) for t in tokenizer.convert_ids_to_tokens(ids)]


def parse_layers(layers: str) -> str | list[str]:
    """``"vpd"``/``"dift"`` stay presets; ``"a, b"`` -> ``["a", "b"]``."""
    return layers if layers in ("vpd", "dift") else [name.strip() for name in layers.split(",") if name.strip()]


def _find(seq: list[int], sub: list[int]) -> list[int]:
    """Positions of the first occurrence of ``sub`` in ``seq`` (empty if absent)."""
    for i in range(len(seq) - len(sub) + 1):
        if sub and seq[i : i + len(sub)] == sub:
            return list(range(i, i + len(sub)))
    return []


# ---------------------------------------------------------------------------- demo
def _demo_images(n: int, size: int) -> tuple[Tensor, Tensor]:
    """``n`` held-out digits, cycling through the classes 0, 1, ..., 9, 0, ...: (n, 3, S, S), (n,)."""
    from .data.digits import load

    images, labels = load("heldout", image_size=size)
    picks = [int((labels == i % 10).nonzero()[i // 10]) for i in range(n)]
    return images[picks], labels[picks]


def _run_batched(bb: nn.Module, images: Tensor, prompts: list[str], batch_size: int, seed: int):
    """Backbone outputs of all images, ``batch_size`` at a time: features list, attention dict."""
    gen = torch.Generator().manual_seed(seed)
    feats, maps = [], []
    for s in tqdm(range(0, len(images), batch_size), desc="backbone", unit="batch", file=sys.stderr):
        with torch.no_grad():
            out = bb(images[s : s + batch_size].to(bb.device, bb.dtype), prompts=prompts[s : s + batch_size],
                     generator=gen)
        feats.append([f.float().cpu() for f in out.features])
        maps.append({r: m.float().cpu() for r, m in (out.attention or {}).items()})
    return [torch.cat(fs) for fs in zip(*feats, strict=True)], {r: torch.cat([m[r] for m in maps]) for r in maps[0]}


def _feature_figure(bb: nn.Module, images: Tensor, words: list[str], feats: list[Tensor]):
    """Rows: one image, then the joint-PCA RGB of each layer (same colours = same feature directions)."""
    # Maps of 8+ pixels a side are fitted without their edge pixels (zero-padding outliers).
    pcas = [viz.feature_pca(f, fit_border=int(min(f.shape[-2:]) >= 8)) for f in feats]  # each (N, 3, h, w)
    tiles, labels = [], []
    for i in range(len(images)):
        tiles.append(viz.to_pil(images[i]).resize((_CELL, _CELL), Image.BILINEAR))
        labels.append(f"input: {words[i]}\n")
        for info, pca in zip(bb.feature_info, pcas, strict=True):
            tiles.append(viz.to_pil(pca[i]).resize((_CELL, _CELL), Image.BILINEAR))  # smooth: easier to read
            h, w = pca.shape[-2:]
            labels.append(f"{info.name}\n{info.channels} ch, {h}x{w} (1/{info.reduction})" if i == 0 else "\n")
    return viz.image_grid(tiles, nrow=1 + len(feats), labels=labels)


def _prompt_share(maps: Tensor, n_tokens: int) -> Tensor:
    """(L, h, w) attention over all L token slots -> (n, h, w) shares of the first n (the prompt's real
    tokens), summing to 1 per pixel. Padding slots, which hold most of the probability in a short
    prompt, are dropped, so the maps compare the words with each other."""
    real = maps[:n_tokens]
    return real / real.sum(0, keepdim=True).clamp_min(1e-12)


def _word_figure(images: Tensor, words: list[str], spans: list[list[int]], n_tokens: list[int],
                 maps: dict[int, Tensor]):
    """Rows: one image, then its class word's attention map at each resolution (upsampled)."""
    top = max(m.shape[-1] for m in maps.values())
    rows = []
    for i in range(len(images)):
        per_res = [torch.nn.functional.interpolate(_prompt_share(maps[r][i], n_tokens[i])[spans[i]].sum(0)[None, None], size=(top, top),
                                                   mode="bilinear", align_corners=False)[0, 0] for r in sorted(maps)]
        rows.append(viz.attention_grid(images[i], torch.stack(per_res), [f"'{words[i]}' 1/{r}" for r in sorted(maps)],
                                       size=_CELL))
    return viz.image_grid(rows, nrow=1)


def run_demo(model: str = "digits", out: str | os.PathLike = "diffperc_demo", n: int = 8, timestep: int = 1,
             add_noise: bool = False, size: int | None = None, prompt: str = "a photo of the digit {}",
             batch_size: int = 8, seed: int = 0, log: TextIO | None = None, device: str | torch.device | None = None,
             torch_dtype: str | torch.dtype | None = None) -> list[Path]:
    """Write the demo PNGs (and a README.txt describing them) to ``out``; print and return their paths.

    Args:
        model: preset or diffusers folder; any SD-shaped model works (the digits are resized).
        out: output folder (created).
        n: number of held-out digits, one per class first.
        timestep, add_noise: backbone timestep and noising (default t=1 without noise, as VPD).
        size: image side; default :func:`native_size` of the model.
        prompt: prompt template; ``{}`` becomes the digit's class word ("seven").
        batch_size: images per backbone call.
        seed: seed of the noise.
        log: where the written paths are printed (default stdout).
        device, torch_dtype: where and in which precision the model runs (default: cuda when
            available, float32).
    """
    from .data.digits import CLASS_WORDS

    if not 1 <= n <= 200:
        raise ValueError(f"--n must be between 1 and 200 (the held-out digits have ~29 per class), got {n}")
    log = log or sys.stdout
    bb = load_backbone(model, device=device, torch_dtype=torch_dtype, layers="vpd", timestep=timestep,
                       add_noise=add_noise, attention=True)
    size = size or native_size(bb)
    images, labels = _demo_images(n, size)
    words = [CLASS_WORDS[int(label)] for label in labels]
    prompts = [prompt.replace("{}", w) for w in words]
    feats, maps = _run_batched(bb, images, prompts, batch_size, seed)
    out = Path(out)
    written = [viz.save_png(_feature_figure(bb, images, words, feats), out / "features_pca.png")]
    spans, n_tokens = [], []
    for i in tqdm(range(n), desc="attention maps", unit="img", file=sys.stderr):
        ids, tokens = prompt_tokens(bb.tokenizer, prompts[i])
        n_tokens.append(len(ids))
        spans.append(_find(ids, bb.tokenizer(words[i], add_special_tokens=False).input_ids))
        rows = [viz.attention_grid(images[i], _prompt_share(maps[r][i], len(ids)), tokens, size=_CELL)
                for r in sorted(maps)]
        row_labels = [f"share of cross-attention among the prompt's tokens, at 1/{r} of the image "
                      f"({maps[r].shape[-2]}x{maps[r].shape[-1]})" for r in sorted(maps)]
        written.append(viz.save_png(viz.image_grid(rows, nrow=1, labels=row_labels), out / f"attention_{i:02d}_{words[i]}.png"))
    if "{}" in prompt and all(spans):
        written.append(viz.save_png(_word_figure(images, words, spans, n_tokens, maps), out / "attention_class_word.png"))
    written.append(_write_readme(out, bb, model, size, timestep, add_noise, prompt, written))
    for path in written:
        print(path, file=log)
    return written


def _write_readme(out: Path, bb: nn.Module, model: str, size: int, timestep: int, add_noise: bool, prompt: str,
                  files: list[Path]) -> Path:
    text = [f"diffperc {__version__} demo: model {model!r}, {size}x{size} held-out digits, timestep {timestep}"
            f"{' with' if add_noise else ' without'} noise, prompt {prompt!r}.", "",
            "features_pca.png: per row one image, then per feature layer the first 3 principal components of",
            "  its features as RGB (one PCA per layer over all images: the same colour means the same feature",
            "  direction; edge pixels of maps 8+ pixels wide are left out of the fit, as zero padding makes",
            "  them outliers). Upsampled bilinearly: the label gives each map's true size.",
            "attention_NN_<word>.png: per prompt token, where that token's cross-attention goes, over the image;",
            "  one row per resolution. Values are shares among the prompt's real tokens (padding slots dropped,",
            "  renormalised to sum to 1 per pixel); each panel stretches its own min-max range (in the label)",
            "  over the colour map, dark = low, yellow = high, blended 80/20 over the greyscale image.",
            "attention_class_word.png: the class word's map alone for every image (on the bundled digits model it tilts",
            "  towards the strokes but is nearly flat: about 31 % of its mass on the ~31 % of pixels that are ink; each",
            "  panel's min-max range is in its label).",
            "", "Files:", *(f"  {p.name}" for p in files)]
    path = out / "README.txt"
    write_text_atomic(path, "\n".join(text) + "\n")
    return path


# ---------------------------------------------------------------------------- info
def attention_reductions(bb: nn.Module) -> dict[str, int]:
    """Cross-attention layer path -> image reduction r of its maps, measured by one tiny UNet forward."""
    side = bb.unet_factor
    seen: dict[str, int] = {}
    hooks = [bb.unet.get_submodule(n).register_forward_hook(
        lambda m, a, o, n=n: seen.__setitem__(n, o.shape[1] if o.ndim == 3 else o[0, 0].numel()))
        for n in bb.attention_layers]
    cfg = bb.unet.config
    try:
        with torch.no_grad():
            bb.unet(torch.zeros(1, cfg.in_channels, side, side, device=bb.device, dtype=bb.dtype),
                    torch.zeros(1, dtype=torch.long, device=bb.device),
                    encoder_hidden_states=torch.zeros(1, 1, cfg.cross_attention_dim, device=bb.device, dtype=bb.dtype))
    finally:
        for h in hooks:
            h.remove()
    return {n: bb.vae_factor * round((side * side / seen[n]) ** 0.5) for n in bb.attention_layers if n in seen}


def _count(module: nn.Module | None) -> str:
    if module is None:
        return "-"
    n = sum(p.numel() for p in module.parameters())
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def model_info(model: str, layers: str = "vpd", device: str | torch.device | None = None,
               torch_dtype: str | torch.dtype | None = None, backbone: nn.Module | None = None) -> str:
    """A readable description of a model's backbone (what ``diffperc info`` prints); ``backbone``: already loaded."""
    bb = backbone if backbone is not None else load_backbone(model, device=device, torch_dtype=torch_dtype,
                                                             layers=parse_layers(layers))
    sched = bb.scheduler.config
    unet = getattr(bb, "unet", None)
    tok = bb.tokenizer
    lines = [f"model: {model} ({type(bb).__name__})",
             f"size_multiple: {bb.size_multiple} (images must be multiples of it); native size: {native_size(bb)}",
             f"scheduler: {type(bb.scheduler).__name__}, prediction_type={sched.get('prediction_type', 'flow')}, "
             f"num_train_timesteps={sched.get('num_train_timesteps')}, "
             + (f"beta_schedule={sched.beta_schedule}" if "beta_schedule" in sched else f"shift={sched.get('shift')}"),
             f"device: {bb.device}, dtype: {str(bb.dtype).removeprefix('torch.')}",
             f"tokenizer: max length {tok.model_max_length}, vocabulary {len(tok)}",
             "parameters: " + ", ".join(f"{n} {_count(getattr(bb, n, None))}"
                                        for n in ("unet" if unet is not None else "transformer", "vae", "text_encoder")),
             "", f"feature_info (layers={layers!r}):", f"  {'name':<40} {'channels':>8} {'reduction':>9}"]
    lines += [f"  {f.name:<40} {f.channels:>8} {f.reduction:>9}" for f in bb.feature_info]
    if unet is None:  # SD3 / FLUX: attention maps come from joint attention (attention=True)
        lines += ["", "attention: image->text maps of the joint attention of each tapped block (attention=True)"]
        return "\n".join(lines)
    reds = attention_reductions(bb)
    lines += ["", f"cross-attention layers ({len(reds)}; maps are averaged per reduction):",
              f"  {'name':<56} {'reduction':>9}"]
    lines += [f"  {n:<56} {r:>9}" for n, r in reds.items()]
    return "\n".join(lines)
