"""The CLIP category pre-filter of OVDiff (karazijal/sdov ``utils/clip_class.py`` CLIPClassifierThresh).

The image (short side 448, then squashed to 512x512 with LANCZOS and to 224x224 bilinearly,
``mmdata.prep_sample`` + ``CLIP.aug``) is embedded by CLIP ViT-B/16; texts are "a {class}" for
the thing classes. Classes whose softmax over the **raw** cosines (no logit scale) reaches 1/C are
candidates (if none, the 10 best); more than 10 keep the 10 most probable. Every non-empty subset
of the candidates is written "a X and a Y ..." (in candidate order) and the subset whose text is
closest to the image is the image's vocabulary. Stuff classes skip the filter and are always kept
(``predict.py:300-309, 525-531``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from itertools import chain, combinations
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["CLIP_MEAN", "CLIP_STD", "CLIPClassFilter", "clip_input", "powerset", "select_classes"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def powerset(items: Sequence[int]) -> list[tuple[int, ...]]:
    """Non-empty subsets, by size then in order: (1,) (2,) (1, 2) for [1, 2] (``clip_class.powerset``)."""
    s = list(items)
    return list(chain.from_iterable(combinations(s, r) for r in range(1, len(s) + 1)))


def select_classes(image_emb: Tensor, encode_texts: Callable[[list[str]], Tensor], class_texts: Sequence[str],
                   topk: int = 10, connector: str = " and ") -> list[int]:
    """Indices (into ``class_texts``) of the classes CLIP finds in the image.

    Args:
        image_emb: (D,) L2-normalised image embedding.
        encode_texts: texts -> (n, D) L2-normalised text embeddings.
        class_texts: the candidate class words.
        topk: at most this many candidates go to the subset search (2^topk - 1 texts).
        connector: joins "a X" parts.
    """
    if not class_texts:
        return []
    scores = image_emb @ encode_texts([f"a {c}" for c in class_texts]).T  # (C,)
    probs = torch.softmax(scores, dim=-1)
    passed = probs >= 1 / len(class_texts)
    cands = torch.where(passed)[0].tolist()
    if not cands:
        cands = torch.topk(scores, min(topk, len(class_texts))).indices.tolist()
    if len(cands) > topk:
        cands = torch.topk(torch.where(passed, probs, torch.zeros_like(probs)), topk).indices.tolist()
    subsets = powerset(cands)
    texts = [connector.join(f"a {class_texts[i]}" for i in s) for s in subsets]
    best = int((image_emb @ encode_texts(texts).T).argmax())
    return list(subsets[best])


def clip_input(image: Tensor, size: int = 224) -> Tensor:
    """(3, H, W) in [0, 1] -> (1, 3, size, size) CLIP-normalised, through a 512x512 LANCZOS squash."""
    from PIL import Image

    pil = Image.fromarray((image.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).cpu().numpy())
    x = torch.from_numpy(np.array(pil.resize((512, 512), Image.LANCZOS))).permute(2, 0, 1).float()[None] / 255
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _tiny_clip() -> tuple[Any, Any]:
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    from ...backbones.tiny import bundled_tokenizer

    tok = bundled_tokenizer()
    text = CLIPTextConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, max_position_embeddings=77, projection_dim=8,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=8)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=8))
    return model.eval(), tok


class CLIPClassFilter:
    """Keeps the classes CLIP sees in an image (see the module docstring).

    Args:
        model: ``"openai/clip-vit-base-patch16"`` (transformers; weights from the hub or a local
            folder), ``"test_clip"`` (tiny random, offline), or a loaded ``(CLIPModel, tokenizer)``.
        topk: released 10.
        device: where the model runs.
    """

    def __init__(self, model: str | tuple[Any, Any] = "openai/clip-vit-base-patch16", topk: int = 10,
                 device: torch.device | str | None = None) -> None:
        if isinstance(model, str):
            self.name = model
            if model == "test_clip":
                model, tok = _tiny_clip()
            else:
                from transformers import CLIPModel, CLIPTokenizer

                try:
                    model, tok = CLIPModel.from_pretrained(model), CLIPTokenizer.from_pretrained(model)
                except OSError as err:
                    raise OSError(f"could not load CLIP {self.name!r} ({err}); it downloads from the Hugging Face "
                                  "hub once. Offline: pre-download it, pass a local folder, or clip_filter=None") from err
        else:
            model, tok = model
            self.name = type(model).__name__
        self.model, self.tokenizer, self.topk = model.eval(), tok, topk
        if device is not None:
            self.model.to(device)
        self.input_size = int(self.model.config.vision_config.image_size)
        self._cache: OrderedDict[str, Tensor] = OrderedDict()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @staticmethod
    def _pooled(out: Any) -> Tensor:
        return out if isinstance(out, Tensor) else out.pooler_output

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> Tensor:
        """(n, D) L2-normalised text embeddings (cached by text)."""
        todo = [t for t in dict.fromkeys(texts) if t not in self._cache]
        for i in range(0, len(todo), 256):
            chunk = todo[i : i + 256]
            tokens = self.tokenizer(chunk, padding=True, truncation=True, return_tensors="pt").to(self.device)
            emb = self._pooled(self.model.get_text_features(**tokens)).float()
            for t, e in zip(chunk, F.normalize(emb, dim=-1).cpu(), strict=True):
                self._cache[t] = e
        while len(self._cache) > 20000:
            self._cache.popitem(last=False)
        return torch.stack([self._cache[t] for t in texts])

    @torch.no_grad()
    def image_embedding(self, image: Tensor) -> Tensor:
        """(3, H, W) in [0, 1] -> (D,) L2-normalised."""
        x = clip_input(image, self.input_size).to(self.device, next(self.model.parameters()).dtype)
        return F.normalize(self._pooled(self.model.get_image_features(pixel_values=x)).float()[0], dim=-1).cpu()

    def __call__(self, image: Tensor, class_texts: Sequence[str]) -> list[int]:
        """Indices into ``class_texts`` kept for ``image``."""
        return select_classes(self.image_embedding(image), self.encode_texts, class_texts, self.topk)
