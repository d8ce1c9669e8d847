"""Text prompts of the VPD tasks: class/scene embeddings and sentence token embeddings.

VPD (Zhao et al., ICCV 2023, arXiv 2303.02153; repo wl-zhao/VPD) conditions the UNet on
- depth: one token per image, the embedding of its NYU *scene* (``depth/dump_nyu_text_embeddings.py``:
  for each name, the CLIP text encoder's pooled output of the 80 ImageNet prompt templates,
  ``max_length=20``, averaged over the templates; ``_`` in names becomes a space);
- semantic segmentation: the K class-name embeddings, made the same way (``class_embeddings.pth``);
- referring segmentation: the sentence's token embeddings (frozen text encoder ``last_hidden_state``,
  40 tokens for RefCOCO/RefCOCO+, 77 for G-Ref).
The pooled output is the final hidden state of the end-of-text token (after the final layer norm).
VPD ships the tables it trained with (``segmentation/class_embeddings.pth``, 150 x 768, and
``depth/nyu_class_embeddings.pth``, 27 x 768); :func:`load_embedding_table` reads them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["IMAGENET_TEMPLATES", "class_embeddings", "encode_sentences", "load_embedding_table"]

# The 80 prompt templates of CLIP's ImageNet zero-shot evaluation (Radford et al., 2021), in the
# order of VPD's dump script.
IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "a photo of a {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.",
    "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
)


def _check_length(text_encoder: nn.Module, max_length: int, arg: str) -> None:
    limit = getattr(getattr(text_encoder, "config", None), "max_position_embeddings", None)
    if max_length < 2 or (limit is not None and max_length > limit):
        raise ValueError(f"{arg} must be in [2, {limit}] (the text encoder's max_position_embeddings), "
                         f"got {max_length}")


def _tokenize(tokenizer: Any, texts: Sequence[str], max_length: int, device: torch.device) -> Tensor:
    ids = tokenizer(list(texts), padding="max_length", max_length=max_length, truncation=True,
                    return_tensors="pt").input_ids
    return ids.to(device)  # (N, max_length)


@torch.no_grad()
def class_embeddings(
    text_encoder: nn.Module, tokenizer: Any, names: Sequence[str], templates: Sequence[str] = IMAGENET_TEMPLATES,
    max_length: int = 20, batch_size: int = 512,
) -> Tensor:
    """One embedding per name: the pooled text-encoder output averaged over prompt templates (VPD).

    Args:
        text_encoder: a ``CLIPTextModel`` (its ``pooler_output`` is used).
        tokenizer: its tokenizer.
        names: K class or scene names; ``_`` becomes a space (``living_room`` -> ``living room``).
        templates: prompts with one ``{}`` for the name (default: the 80 ImageNet templates).
        max_length: tokens per prompt, padded/truncated (VPD: 20).
        batch_size: prompts per text-encoder call.

    Returns:
        (K, D) float32 embeddings on the text encoder's device.
    """
    if not names:
        raise ValueError("names is empty: give at least one class or scene name")
    if not templates or any(t.count("{}") != 1 for t in templates):
        bad = [t for t in templates if t.count("{}") != 1]
        raise ValueError(f"templates must be a non-empty list of strings with exactly one '{{}}', got {bad[:3] or '[]'}")
    _check_length(text_encoder, max_length, "max_length")
    device = next(text_encoder.parameters()).device
    prompts = [t.format(n.replace("_", " ")) for n in names for t in templates]  # name-major
    pooled = []
    for start in range(0, len(prompts), batch_size):
        ids = _tokenize(tokenizer, prompts[start : start + batch_size], max_length, device)
        pooled.append(text_encoder(input_ids=ids).pooler_output.float())  # (n, D)
    return torch.cat(pooled).view(len(names), len(templates), -1).mean(1)  # (K, D)


@torch.no_grad()
def encode_sentences(text_encoder: nn.Module, tokenizer: Any, sentences: Sequence[str], max_length: int = 40) -> Tensor:
    """Token embeddings of sentences: the text encoder's ``last_hidden_state`` (VPD referring segmentation).

    Args:
        sentences: B strings.
        max_length: tokens per sentence with start/end tokens, padded/truncated (VPD: 40 for
            RefCOCO/RefCOCO+, 77 for G-Ref).

    Returns:
        (B, max_length, D) float32 on the text encoder's device.
    """
    if isinstance(sentences, str) or not sentences:
        raise ValueError(f"sentences must be a non-empty list of strings, got {sentences!r}")
    _check_length(text_encoder, max_length, "max_tokens")
    device = next(text_encoder.parameters()).device
    ids = _tokenize(tokenizer, sentences, max_length, device)
    return text_encoder(input_ids=ids).last_hidden_state.float()


def load_embedding_table(path: str | Path, num: int, dim: int) -> Tensor:
    """A (num, dim) embedding table saved with ``torch.save`` (VPD's ``class_embeddings.pth``), as float32 on CPU.

    Read with ``weights_only=True``; a missing file, another object or another shape is an error
    naming the path.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"class embeddings file {path} does not exist (VPD ships segmentation/"
                                "class_embeddings.pth and depth/nyu_class_embeddings.pth)")
    table = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(table, Tensor) or table.ndim != 2:
        raise ValueError(f"{path} must hold one (K, D) tensor, got {type(table).__name__} "
                         f"{tuple(table.shape) if isinstance(table, Tensor) else ''}")
    if tuple(table.shape) != (num, dim):
        raise ValueError(f"{path} holds a {tuple(table.shape)} table; expected ({num}, {dim}): one row per "
                         f"class/scene name and the UNet's cross_attention_dim")
    return table.float()
