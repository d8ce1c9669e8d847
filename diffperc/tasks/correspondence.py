"""Zero-shot semantic correspondence benchmark: DIFT and SD-DINO on SPair-71k / PF-Pascal.

DIFT: Tang et al., NeurIPS 2023, arXiv 2306.03881, repo Tsingularity/dift (eval_spair.py).
SD-DINO: Zhang et al., NeurIPS 2023, arXiv 2305.15347, repo Junyi42/sd-dino (pck_spair_pascal.py).
Recipes, settings and published numbers: ANCHORS.md sections 2a, 2b and A5; what each step
ports: docs/fidelity/dift.md and docs/fidelity/sd_dino.md.

    diffperc test --config configs/correspondence/spair_dift_sd21.yaml
    diffperc test --config configs/correspondence/spair_sddino_sd15.yaml

Training-free: ``test`` (and ``validate``) featurise each distinct image once (an LRU cache
keyed by image and prompt, as DIFT's eval_spair.py:56-69 computes every test image once and
reuses it for all its pairs), match the source keypoints into the target and report PCK@alpha
per keypoint, per image, per category and SD-DINO's category averages
(:class:`~diffperc.zeroshot.correspondence.PCKTally`). Noise is seeded per image, so an
image's features do not depend on the pair order, the batch or the cache.
"""

from __future__ import annotations

import json
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from .._io import write_text_atomic
from ..zeroshot.correspondence import (
    PCKTally,
    from_frame,
    match_patches,
    match_points,
    pck_correct,
    pck_threshold,
    sd_dino_descriptors,
    to_frame,
)
from ._base import PerceptionTask

__all__ = ["CorrespondenceTask", "image_seed"]


def image_seed(seed: int, key: str) -> int:
    """The noise seed of one image (or pair): ``(seed * 1_000_003 + crc32(key)) mod 2**63``."""
    return (int(seed) * 1_000_003 + zlib.crc32(key.encode("utf-8"))) % 2**63


class _FeatureCache:
    """LRU cache of per-image feature tuples, kept in host memory and bounded by ``max_mb``."""

    def __init__(self, max_mb: float) -> None:
        self.max_bytes, self.bytes = int(max_mb * 2**20), 0
        self.store: OrderedDict[tuple[str, str], tuple[Tensor, ...]] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: tuple[str, str]) -> tuple[Tensor, ...] | None:
        if key in self.store:
            self.store.move_to_end(key)
            self.hits += 1
            return self.store[key]
        self.misses += 1
        return None

    def put(self, key: tuple[str, str], value: tuple[Tensor, ...]) -> None:
        size = sum(t.numel() * t.element_size() for t in value)
        if size > self.max_bytes:
            return
        self.store[key] = tuple(t.detach().cpu() for t in value)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self.store.popitem(last=False)
            self.bytes -= sum(t.numel() * t.element_size() for t in old)

    def clear(self) -> None:
        self.store.clear()
        self.bytes = self.hits = self.misses = 0


class CorrespondenceTask(PerceptionTask):
    """Match keypoints of image pairs with frozen backbone features and score them with PCK.

    Batches come from :class:`~diffperc.data.correspondence.CorrespondenceDataModule`
    (``collate_pairs``): ``src_image``/``trg_image`` (B, 3, h, w) in [0, 1] (and
    ``*_image_dino`` with the data's ``dino_image_size``), ``src_kps_orig``, ``trg_kps_orig``
    (B, N, 2), ``kps_valid`` (B, N), ``src_size``/``trg_size`` (B, 2), ``*_frame`` (B, 4),
    ``pck_ref`` (B, 4), ``src_id``/``trg_id``, ``category`` and ``name`` lists of str.

    Args:
        backbone, backbone_kwargs: see :class:`~diffperc.tasks._base.PerceptionTask`. DIFT:
            ``"sd21"`` with ``{layers: dift, timestep: 261, ensemble_size: 8, latent_sample:
            sample}``; SD-DINO: a fused preset such as ``"sd15_dinov2b"``.
        method: ``"dift"``: one backbone map (``feature_index``). ``"sd_dino"``: per pair,
            co-PCA of each SD level to ``pca_dims``, chained and fused with DINOv2 (needs a
            :class:`~diffperc.backbones.fused.FusedBackbone`); PCK judged with SD-DINO's rule.
        prompt: text prompt; ``{category}`` becomes the pair's category ("" = unconditional).
            DIFT: "a photo of a {category}"; SD-DINO's ``--TEXT_INPUT``: "a photo of {category}".
        alphas: PCK tolerances (fractions of the reference's longer side).
        feature_index: which backbone feature map ``"dift"`` matches with.
        pca_dims: SD-DINO channels per SD level after co-PCA (one int, or one per level).
        matcher: ``"pixel"``: both maps upsampled to the original images, cosine argmax over
            target pixels (DIFT). ``"patch"``: source patch of each keypoint in the (DINOv2)
            input frame, nearest target patch, its centre mapped back (SD-DINO); PCK is then
            computed in that frame when it is a letterbox (one scale), as SD-DINO does.
            None = ``"patch"`` for ``sd_dino``, ``"pixel"`` for ``dift``.
        distance: patch matcher distance, ``"l2"`` (SD-DINO's for fused features) or ``"cos"``.
        soft_window: pixel matcher: 0 = hard argmax; k > 0 = window soft-argmax over (2k+1)^2 pixels.
        feature_cache_mb: host memory for cached per-image features (0 = recompute every time).
        save_matches: write PNGs of the first this many pairs (source | target, coloured
            matches; rings = ground truth, green/red = within alpha[0] or not).
        output_dir: where ``matches/`` and ``pck.json`` go; None = the trainer's root dir.
        seed: seeds the diffusion noise of each image (:func:`image_seed` of its id) and the
            randomised co-PCA of each pair (of its name).
    """

    def __init__(
        self, backbone: str = "sd21", backbone_kwargs: dict[str, Any] | None = None,
        method: Literal["dift", "sd_dino"] = "dift", prompt: str = "a photo of a {category}",
        alphas: tuple[float, ...] = (0.1, 0.05, 0.01), feature_index: int = 0, pca_dims: int | list[int] = 256,
        matcher: Literal["pixel", "patch"] | None = None, distance: Literal["l2", "cos"] = "l2",
        soft_window: int = 0, feature_cache_mb: float = 4096, save_matches: int = 0, output_dir: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(backbone, backbone_kwargs)
        if method not in ("dift", "sd_dino"):
            raise ValueError(f"method must be 'dift' or 'sd_dino', got {method!r}")
        if method == "sd_dino" and not (hasattr(self.backbone, "sd_levels") and hasattr(self.backbone, "dino_map")):
            raise ValueError(f"method='sd_dino' needs a fused SD + DINOv2 backbone (e.g. 'sd15_dinov2b', "
                             f"'test_sd_dinov2'), got {backbone!r} ({type(self.backbone).__name__})")
        try:
            prompt.format(category="cat")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"prompt may only use the placeholder {{category}}, got {prompt!r}") from err
        n_maps = len(self.backbone.feature_info)
        if method == "dift" and not -n_maps <= feature_index < n_maps:
            raise ValueError(f"feature_index must index the backbone's {n_maps} feature maps, got {feature_index}")
        dims = [pca_dims] if isinstance(pca_dims, int) else list(pca_dims)
        if save_matches < 0 or not dims or any(d < 1 for d in dims) or feature_cache_mb < 0:
            raise ValueError(f"save_matches and feature_cache_mb must be >= 0 and pca_dims >= 1, got "
                             f"{save_matches}, {feature_cache_mb}, {pca_dims}")
        matcher = matcher or ("patch" if method == "sd_dino" else "pixel")
        if matcher not in ("pixel", "patch") or distance not in ("l2", "cos"):
            raise ValueError(f"matcher must be 'pixel' or 'patch' and distance 'l2' or 'cos', got {matcher!r}, "
                             f"{distance!r}")
        self.method, self.prompt, self.feature_index, self.pca_dims = method, prompt, feature_index, pca_dims
        self.matcher, self.distance = matcher, distance
        self.soft_window, self.save_matches, self.output_dir, self.seed = soft_window, save_matches, output_dir, seed
        rule = "sd_dino" if method == "sd_dino" else "dift"
        self.tallies = {stage: PCKTally(alphas, rule) for stage in ("val", "test")}
        self.cache = _FeatureCache(feature_cache_mb)
        self.featurised = 0  # images computed (not served by the cache) in the current epoch
        self.results: dict[str, float] = {}
        self._saved = 0

    # ------------------------------------------------------------------ features
    def image_features(self, image: Tensor, category: str, image_id: str, dino_image: Tensor | None = None
                       ) -> tuple[Tensor, ...]:
        """Features of one image, from the cache or computed with noise seeded by ``image_id``.

        Args:
            image: (3, h, w) in [0, 1]; dino_image: the DINOv2 view (``sd_dino``; None = ``image``).
            category: fills the prompt; image_id: identifies the image (the cache key with the prompt).

        Returns:
            ``dift``: ((C, h', w'),); ``sd_dino``: the SD levels then the DINOv2 map, each (C, h', w').
        """
        prompt = self.prompt.format(category=category)
        cached = self.cache.get((image_id, prompt)) if self.cache.max_bytes else None
        if cached is not None:
            return tuple(t.to(self.device) for t in cached)
        gen = torch.Generator(device=self.device).manual_seed(image_seed(self.seed, image_id))
        self.featurised += 1
        with torch.no_grad():
            if self.method == "dift":
                out = (self.backbone(image[None], prompts=[prompt], generator=gen).features[self.feature_index][0],)
            else:
                levels, _ = self.backbone.sd_levels(image[None], prompts=[prompt], generator=gen)
                dino = (self.backbone.dino_map(image[None]) if dino_image is None
                        else self.backbone.dino_map(dino_image[None], prepared=True))
                out = (*(f[0] for f in levels), dino[0])
        if self.cache.max_bytes:
            self.cache.put((image_id, prompt), out)
        return out

    def _side_features(self, batch: dict[str, Any], side: str, i: int) -> tuple[Tensor, ...]:
        image_id = batch[f"{side}_id"][i] if f"{side}_id" in batch else f"{batch['name'][i]}:{side}"
        dino = batch[f"{side}_image_dino"][i] if f"{side}_image_dino" in batch else None
        return self.image_features(batch[f"{side}_image"][i], batch["category"][i], image_id, dino)

    def pair_descriptors(self, fs: tuple[Tensor, ...], ft: tuple[Tensor, ...], name: str) -> tuple[Tensor, Tensor]:
        """(C, h, w) source and target descriptor maps of one pair from its images' features."""
        if self.method == "dift":
            return fs[0], ft[0]
        devices = [fs[0].device] if fs[0].device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # pca_lowrank draws from the global RNG: seed it per pair
            torch.manual_seed(image_seed(self.seed, name))
            return sd_dino_descriptors(list(fs[:-1]), list(ft[:-1]), fs[-1], ft[-1], pca_dims=self.pca_dims,
                                       weights=self.backbone.weights, size=self.backbone.grid)

    def match_pair(self, batch: dict[str, Any], i: int) -> tuple[Tensor, tuple[Tensor, Tensor, Any]]:
        """Prediction of pair ``i`` (valid keypoints, original target pixels) and the PCK inputs (pred, gt, ref)."""
        valid = batch["kps_valid"][i]
        ds, dt = self.pair_descriptors(self._side_features(batch, "src", i), self._side_features(batch, "trg", i),
                                       batch["name"][i])
        src_orig, gt = batch["src_kps_orig"][i][valid], batch["trg_kps_orig"][i][valid].cpu()
        if self.matcher == "pixel":
            pred = match_points(ds, dt, src_orig, batch["src_size"][i].tolist(), batch["trg_size"][i].tolist(),
                                soft_window=self.soft_window).cpu()
            return pred, (pred, gt, batch["pck_ref"][i].cpu())
        key, img = ("frame_dino", "image_dino") if "src_frame_dino" in batch else ("frame", "image")
        f_src, f_trg = batch[f"src_{key}"][i].cpu(), batch[f"trg_{key}"][i].cpu()
        frame_size = tuple(batch[f"trg_{img}"].shape[-2:])
        pred_frame = match_patches(ds, dt, to_frame(src_orig.cpu(), f_src), frame_size, self.distance).cpu()
        pred = from_frame(pred_frame, f_trg)
        if f_trg[0] != f_trg[1]:  # not a letterbox: judge in original pixels
            return pred, (pred, gt, batch["pck_ref"][i].cpu())
        side = pck_threshold(batch["pck_ref"][i].cpu()) * float(f_trg[0])  # pck_spair_pascal.py:88
        return pred, (pred_frame, to_frame(gt, f_trg), side)

    def match_batch(self, batch: dict[str, Any]) -> list[Tensor]:
        """Predicted target keypoints (N_i, 2) per pair, in original target pixels (valid keypoints only)."""
        return [self.match_pair(batch, i)[0] for i in range(len(batch["name"]))]

    # ------------------------------------------------------------------ loops
    def _eval_step(self, batch: dict[str, Any], batch_idx: int, stage: str) -> None:
        tally = self.tallies[stage]
        for i in range(len(batch["name"])):
            pred, (p, g, ref) = self.match_pair(batch, i)
            tally.update(p, g, ref, batch["category"][i])
            if stage == "test" and self._saved < self.save_matches:
                self._save_picture(batch, i, pred, batch["trg_kps_orig"][i][batch["kps_valid"][i]].cpu())

    def _save_picture(self, batch: dict[str, Any], i: int, pred: Tensor, gt: Tensor) -> None:
        from ..viz import save_png, to_pil
        from ..zeroshot.correspond_cli import draw_matches

        valid = batch["kps_valid"][i].cpu()
        src_img, trg_img = to_pil(batch["src_image"][i]), to_pil(batch["trg_image"][i])
        src_kps = to_frame(batch["src_kps_orig"][i].cpu()[valid], batch["src_frame"][i].cpu())  # shown pixels
        pred_t, gt_t = (to_frame(p, batch["trg_frame"][i].cpu()) for p in (pred, gt))
        thr = self.tallies["test"].alphas[0]
        correct = pck_correct(pred, gt, batch["pck_ref"][i].cpu(), thr, self.tallies["test"].rule)
        picture = draw_matches(src_img, trg_img, src_kps, pred_t, gt_trg=gt_t, correct=correct,
                               title=f"{batch['name'][i]}  PCK@{thr:g}: {int(correct.sum())}/{len(gt)}")
        name = batch["name"][i].replace(":", "_").replace("/", "_")
        save_png(picture, self._out_dir() / "matches" / f"{self._saved:04d}_{name}.png")
        self._saved += 1

    def _out_dir(self) -> Path:
        return Path(self.output_dir or self.trainer.default_root_dir)

    def _epoch_start(self, stage: str) -> None:
        self.tallies[stage].reset()
        self.cache.clear()
        self.featurised = self._saved = 0

    def _epoch_end(self, stage: str) -> None:
        tally = self.tallies[stage]
        if not tally.pairs:
            return
        res = tally.compute()
        self.results = res
        for key, value in res.items():
            self.log(f"{stage}/{key}", value, prog_bar=key == f"pck@{tally.alphas[0]:g}/per_image")
        self.print(f"\n{stage} PCK (%) over {len(tally.pairs)} pairs; img = per image, kpt = per keypoint; "
                   f"{self.featurised} images featurised, {self.cache.hits} cache hits\n" + tally.table())
        write = self.output_dir is not None or not self.trainer.fast_dev_run  # smoke runs leave no files behind
        if stage == "test" and self.trainer.is_global_zero and write:
            write_text_atomic(self._out_dir() / "pck.json", json.dumps({"pairs": len(tally.pairs), **res}, indent=1))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "test")

    def on_validation_epoch_start(self) -> None:
        self._epoch_start("val")

    def on_test_epoch_start(self) -> None:
        self._epoch_start("test")

    def on_validation_epoch_end(self) -> None:
        self._epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._epoch_end("test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[Tensor]:
        """Predicted target keypoints per pair (original target pixels)."""
        return self.match_batch(batch)
