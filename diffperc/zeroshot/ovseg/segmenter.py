"""OVDiff end to end: a vocabulary in, a training-free segmenter out.

    from diffperc import create_backbone
    from diffperc.zeroshot.ovseg import OVDiff

    ovdiff = OVDiff(create_backbone("sd15"), extractors=["sd", "dino_vitb8", "clip_vitb16"],
                    clip_filter="openai/clip-vit-base-patch16", cache_dir="~/.cache/diffperc/ovseg")
    ovdiff.prepare(["cat", "dog", "sofa"])      # support sets, masks, prototypes (cached, resumable)
    labels = ovdiff.predict(image)              # (H, W): 0 = background, 1 = cat, 2 = dog, 3 = sofa

Paper: Karazija, Laina, Vedaldi, Rupprecht, "Diffusion Models for Open-Vocabulary Segmentation",
ECCV 2024, arXiv 2306.09316; code karazijal/sdov. The steps live in ``support.py`` (sampling and
heatmaps), ``masks.py`` (fg/bg), ``extractors.py`` (features), ``prototypes.py``, ``inference.py``
(scores), ``clip_filter.py`` and ``pamr.py``; this module wires them with the released defaults.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from .extractors import create_extractor, resize_short_side
from .inference import crop_boxes, labels_from_scores, score_features
from .masks import load_proposer, support_masks
from .prototypes import PrototypeBank, assemble_prototypes, class_prototypes, load_prototypes, save_prototypes
from .support import NEGATIVE_PROMPT, TEMPLATE, SupportSet, build_pipeline, sample_support_set, slug

__all__ = ["OVDiff", "default_cache_dir", "resize_for_inference"]


def default_cache_dir() -> Path:
    """``$DIFFPERC_CACHE/ovseg`` (default ``~/.cache/diffperc/ovseg``)."""
    return Path(os.environ.get("DIFFPERC_CACHE", "~/.cache/diffperc")).expanduser() / "ovseg"


def resize_for_inference(image: Tensor, size: int) -> Tensor:
    """(3, H, W) in [0, 1] -> short side ``size`` with PIL's LANCZOS (``predict.py`` EvalDataset)."""
    h, w = image.shape[-2:]
    nh, nw = resize_short_side(h, w, size)
    if (nh, nw) == (h, w):
        return image
    pil = Image.fromarray((image.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).cpu().numpy())
    return torch.from_numpy(np.array(pil.resize((nw, nh), Image.LANCZOS))).permute(2, 0, 1).float() / 255


class OVDiff:
    """Training-free open-vocabulary segmentation from prototypes of sampled support sets.

    Args:
        backbone: a :class:`~diffperc.backbones.diffusion.DiffusionBackbone` (samples the support
            sets; its UNet gives the ``"sd"`` features).
        extractors: names (``"sd"``, ``"dino_vitb8"``, ``"clip_vitb16"``, ``"test_dino"``, ``"test_clip"``)
            or extractor objects; scores are averaged over all of them (released: all three).
        mask_proposer: ``"threshold"`` (released fallback), ``"maskcut"``, ``"maskcut:<vit>"`` or
            ``"package.module:function"`` (CutLER / SAM hook), see :mod:`.masks`.
        clip_filter: ``"openai/clip-vit-base-patch16"``, ``"test_clip"``, a
            :class:`~diffperc.zeroshot.ovseg.clip_filter.CLIPClassFilter`, or None (keep every class).
        cache_dir: support sets, masks and prototypes; default :func:`default_cache_dir`.
        n_support, support_seed, template, negative_prompt, guidance_scale, num_inference_steps,
            sample_batch_size, support_size: support-set sampling (released 32, 42,
            "A good picture of a {}", the negative prompt, 8.0, 30, 8, 512).
        kmeans: part prototypes per set (released 32).
        sd_layers, sd_timestep, sd_feat_size, sd_input_size, proto_seed: the ``"sd"`` extractor
            (``"ovdiff"`` layers, 200, 64, 512, 43).
        vit_size: ViT test-crop size (448).
        size, crops, strides: test images get short side ``size``; sliding ``crops`` with ``strides``
            plus the whole image (448; 448, 336; 224, 224).
        feat_mode, stuff_threshold: prototype assembly (``"all"``, 0.85).
        threshold: scores at or below it count as 0 before the argmax (0).
        topk: the CLIP filter's candidate cap (10).
        pamr: refine the scores with PAMR (10 iterations, dilations 1-24).
        fg_thresh, bg_thresh: heatmap thresholds of the masks (0.5, 0.2).
        seed: seeds the SD noise of each test image (the same for every image).
        progress: progress bars while preparing.
    """

    def __init__(
        self, backbone: nn.Module, extractors: Sequence[Any] = ("sd",), mask_proposer: str = "threshold",
        clip_filter: Any = None, cache_dir: str | Path | None = None, n_support: int = 32, support_seed: int = 42,
        template: str = TEMPLATE, negative_prompt: str | None = NEGATIVE_PROMPT, guidance_scale: float = 8.0,
        num_inference_steps: int = 30, sample_batch_size: int = 8, support_size: int | None = None, kmeans: int = 32,
        sd_layers: str | Sequence[str] = "ovdiff", sd_timestep: int = 200, sd_feat_size: int | None = None,
        sd_input_size: int | None = None, proto_seed: int = 43, vit_size: int = 448, size: int = 448,
        crops: Sequence[int] = (448, 336), strides: Sequence[int] = (224, 224), feat_mode: str = "all",
        stuff_threshold: float = 0.85, threshold: float = 0.0, topk: int = 10, pamr: bool = False,
        fg_thresh: float = 0.5, bg_thresh: float = 0.2, seed: int = 0, progress: bool = True,
    ) -> None:
        if not extractors:
            raise ValueError("extractors is empty: give at least one of 'sd', 'dino_vitb8', 'clip_vitb16'")
        if n_support < 1 or size < 1:
            raise ValueError(f"n_support and size must be >= 1, got {n_support}, {size}")
        self.backbone = backbone
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        self.sampling = {"num_images": n_support, "seed": support_seed, "template": template,
                         "negative_prompt": negative_prompt, "guidance_scale": guidance_scale,
                         "num_inference_steps": num_inference_steps, "batch_size": sample_batch_size,
                         "size": support_size}
        self.extractors = [self._extractor(e, sd_layers, sd_timestep, sd_feat_size, sd_input_size, proto_seed, vit_size)
                           for e in extractors]
        self.proposer = load_proposer(mask_proposer, backbone.device) if isinstance(mask_proposer, str) else mask_proposer
        if isinstance(clip_filter, str):
            from .clip_filter import CLIPClassFilter

            clip_filter = CLIPClassFilter(clip_filter, topk=topk, device=backbone.device)
        self.clip_filter = clip_filter
        self.kmeans, self.feat_mode, self.stuff_threshold = kmeans, feat_mode, stuff_threshold
        self.size, self.crops, self.strides, self.threshold = size, tuple(crops), tuple(strides), threshold
        self.pamr, self.fg_thresh, self.bg_thresh, self.seed, self.progress = pamr, fg_thresh, bg_thresh, seed, progress
        self.classes: list[str] = []
        self.prompts: dict[str, str] = {}
        self.stuff: list[str] = []
        self.banks: list[PrototypeBank] = []
        self.supports: dict[str, SupportSet] = {}
        self._pipe = None

    def _extractor(self, spec: Any, layers: Any, timestep: int, feat_size: int | None, input_size: int | None,
                   seed: int, vit_size: int) -> Any:
        if not isinstance(spec, str):
            return spec
        if spec == "sd":
            return create_extractor("sd", self.backbone, layers=layers, timestep=timestep, feat_size=feat_size,
                                    input_size=input_size, seed=seed)
        return create_extractor(spec, self.backbone, size=vit_size)

    # ------------------------------------------------------------------ preparation
    def support(self, category: str) -> SupportSet:
        """The (cached) support set of a category of the prepared vocabulary, or of any word."""
        if category not in self.supports:
            if self._pipe is None:
                self._pipe = build_pipeline(self.backbone)
            self.supports[category] = sample_support_set(
                self.backbone, category, self.prompts.get(category, category), cache_dir=self.cache_dir,
                pipe=self._pipe, progress=self.progress, **self.sampling)
        return self.supports[category]

    def _class_prototypes(self, category: str) -> list[dict[str, Tensor]]:
        support = self.support(category)
        masks = None
        out = []
        for ext in self.extractors:
            name = f"{ext.key}__{self.proposer.key}__fg{self.fg_thresh:g}_bg{self.bg_thresh:g}__k{self.kmeans}".replace("/", "+")
            path = Path(support.folder) / "protos" / f"{name}.safetensors"
            protos = load_prototypes(path)
            if protos is None:
                if masks is None:
                    masks = support_masks(support, self.proposer, self.fg_thresh, self.bg_thresh, self.progress)
                feats = ext.support_features(support.float_images())
                protos = class_prototypes(feats, masks[0], masks[1], self.kmeans)
                save_prototypes(protos, path)
            out.append(protos)
        return out

    def prepare(self, classes: Sequence[str], prompts: dict[str, str] | None = None, stuff: Sequence[str] = ()) -> None:
        """Build (or load) everything a vocabulary needs: support sets, masks, prototypes, banks.

        Args:
            classes: the class names without background; label c + 1 is ``classes[c]``.
            prompts: class name -> word(s) in the prompt (VOC's "pottedplant" -> "potted plant").
            stuff: classes that are "stuff" (sky, wall, ...): always kept by the CLIP filter, no
                bg prototypes, and the stuff filter compares bg prototypes with them.
        """
        classes = list(classes)
        if not classes or len(set(classes)) != len(classes):
            raise ValueError(f"classes must be a non-empty list of distinct names, got {classes}")
        bad = [c for c in stuff if c not in classes]
        if bad:
            raise ValueError(f"stuff classes {bad} are not in classes")
        self.classes, self.prompts, self.stuff = classes, dict(prompts or {}), list(stuff)
        from tqdm.auto import tqdm

        per_ext: list[dict[str, dict[str, Tensor]]] = [{} for _ in self.extractors]
        for c in tqdm(classes, desc="OVDiff prototypes", disable=not self.progress):
            for i, protos in enumerate(self._class_prototypes(c)):
                per_ext[i][c] = protos
        self.banks = [assemble_prototypes(p, classes, self.stuff, self.feat_mode, self.stuff_threshold)
                      for p in per_ext]

    # ------------------------------------------------------------------ inference
    def kept_classes(self, image: Tensor) -> Tensor:
        """(C,) bool: the CLIP filter's thing classes plus every stuff class (all when there is no filter)."""
        keep = torch.ones(len(self.classes), dtype=torch.bool)
        if self.clip_filter is None:
            return keep
        things = [i for i, c in enumerate(self.classes) if c not in self.stuff]
        chosen = self.clip_filter(image, [self.prompts.get(self.classes[i], self.classes[i]) for i in things])
        keep[:] = False
        keep[[things[j] for j in chosen]] = True
        keep[[i for i, c in enumerate(self.classes) if c in self.stuff]] = True
        return keep

    @torch.no_grad()
    def scores(self, image: Tensor, keep: Tensor | None = None) -> Tensor:
        """(1 + C, h, w) averaged scores of an image already resized for inference (see :meth:`predict`)."""
        if not self.banks:
            raise RuntimeError("call prepare(classes) first")
        return self.score_sets(image, [self.banks], keep)[0]

    @torch.no_grad()
    def score_sets(self, image: Tensor, bank_sets: Sequence[Sequence[PrototypeBank]],
                   keep: Tensor | None = None) -> list[Tensor]:
        """Scores of one image against several sets of banks (one bank per extractor each), computing
        every crop's features once (ablations: other masks, no background prototypes, ...)."""
        h, w = image.shape[-2:]
        n_cls = len(bank_sets[0][0].classes)
        totals = [torch.zeros(1 + n_cls, h, w) for _ in bank_sets]
        counts = torch.zeros(1, h, w)
        boxes = crop_boxes(h, w, self.crops, self.strides)
        for e, ext in enumerate(self.extractors):
            gen = torch.Generator(ext.device).manual_seed(self.seed)
            crops = [image[:, y1:y2, x1:x2] for y1, x1, y2, x2 in boxes]
            if hasattr(ext, "crop_features_batch"):  # SD: every crop is resized to one size, so they batch
                feats = ext.crop_features_batch(crops, gen)
            else:
                feats = [ext.crop_features(c, gen) for c in crops]
            for (y1, x1, y2, x2), f in zip(boxes, feats, strict=True):
                for total, banks in zip(totals, bank_sets, strict=True):
                    s = score_features(f, banks[e].to(ext.device), keep)
                    s = torch.nn.functional.interpolate(s[None], size=(y2 - y1, x2 - x1), mode="bilinear",
                                                        align_corners=False)[0].clamp(-1, 1)
                    total[:, y1:y2, x1:x2] += s.cpu()
                counts[:, y1:y2, x1:x2] += 1
        out = [total / counts.clamp_min(1) for total in totals]
        if self.pamr:
            from .pamr import pamr

            out = [pamr((image * 255)[None], avg[None])[0] for avg in out]
        return out

    def predict(self, image: Tensor, size: tuple[int, int] | None = None, drop_background: bool = False) -> Tensor:
        """Labels of one image.

        Args:
            image: (3, H, W) in [0, 1] at its original size.
            size: output (h, w); default (H, W).
            drop_background: argmax over the classes only (labels 0..C-1; Pascal Context 59).

        Returns:
            (h, w) int64: 0 = background, c + 1 = ``classes[c]`` (or c with ``drop_background``).
        """
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"image must be (3, H, W) in [0, 1], got shape {tuple(image.shape)}")
        small = resize_for_inference(image.float().cpu(), self.size)
        scores = self.scores(small, self.kept_classes(small))
        return labels_from_scores(scores, size or tuple(image.shape[-2:]), self.threshold, drop_background)

    # ------------------------------------------------------------------ pictures
    def support_picture(self, category: str, per_row: int = 8) -> Image.Image:
        """The support images of a class, foreground tinted green and background blue."""
        from ...viz import image_grid, mask_overlay

        support = self.support(category)
        fg, bg = support_masks(support, self.proposer, self.fg_thresh, self.bg_thresh)
        tiles = []
        for img, f, b in zip(support.float_images(), fg, bg, strict=True):
            m = torch.full(f.shape, 255, dtype=torch.long)
            m[b], m[f] = 1, 0
            tiles.append(mask_overlay(img, m, palette=[(0, 200, 0), (30, 80, 255)], alpha=0.45))
        return image_grid(tiles, nrow=per_row, labels=[f"{i}" for i in range(len(tiles))])

    def support_dir(self, category: str) -> Path:
        """The cache folder of a class's support set (images, heatmaps, masks, prototypes)."""
        return Path(self.support(category).folder or self.cache_dir / slug(category))


def class_colours(n: int) -> np.ndarray:
    """(n, 3) uint8: the PASCAL VOC colour map of ids 0 .. n-1 (0 = background = black)."""
    from ...viz import label_palette

    return np.concatenate([np.zeros((1, 3), np.uint8), label_palette(max(n - 1, 1))])[:n]


def prediction_picture(image: Tensor, pred: Tensor, names: Sequence[str], gt: Tensor | None = None,
                       ignore_index: int = 255) -> Image.Image:
    """[image | ground truth | prediction] with class colours and a legend of the classes shown.

    Args:
        image: (3, H, W) in [0, 1].
        pred, gt: (H, W) label maps (ids index ``names``; ``ignore_index`` and id 0 are drawn plain
            when ``names[0]`` is the background).
        names: class name per id.
    """
    from PIL import ImageDraw

    from ...viz import _font, mask_overlay, to_pil

    pal = class_colours(len(names))
    bg = 0 if names and "background" in names[0] else None
    panels = [to_pil(image)] + [mask_overlay(image, m, palette=pal, alpha=0.6, ignore_index=ignore_index,
                                             background=bg) for m in ([gt] if gt is not None else []) + [pred]]
    shown = sorted({int(v) for m in ([gt] if gt is not None else []) + [pred] for v in m.unique().tolist()
                    if int(v) != ignore_index and 0 <= int(v) < len(names)})
    font, line = _font(12), 16
    w, h = image.shape[-1], image.shape[-2]
    titles = ["image"] + (["ground truth"] if gt is not None else []) + ["prediction"]
    out = Image.new("RGB", (len(panels) * (w + 4) + 4, h + 24 + line * max(1, -(-len(shown) // 3)) + 4), "white")
    draw = ImageDraw.Draw(out)
    for i, (p, t) in enumerate(zip(panels, titles, strict=True)):
        out.paste(p, (4 + i * (w + 4), 20))
        draw.text((4 + i * (w + 4), 3), t, fill=(0, 0, 0), font=font)
    col_w = max(1, out.width // 3)
    for j, cid in enumerate(shown):
        x, y = 4 + (j % 3) * col_w, h + 26 + (j // 3) * line
        draw.rectangle([x, y + 2, x + 10, y + 12], fill=tuple(int(c) for c in pal[cid]), outline=(0, 0, 0))
        draw.text((x + 14, y), f"{cid} {names[cid]}", fill=(0, 0, 0), font=font)
    return out
