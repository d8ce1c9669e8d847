"""Zero-shot semantic correspondence benchmark: DIFT and SD-DINO on SPair-71k / PF-Pascal.

DIFT: Tang et al., NeurIPS 2023, arXiv 2306.03881, repo Tsingularity/dift (eval_spair.py).
SD-DINO: Zhang et al., NeurIPS 2023, arXiv 2305.15347, repo Junyi42/sd-dino.
Recipes, settings and published numbers: ANCHORS.md sections 2a, 2b and A5.

    diffperc test --config configs/correspondence/spair_dift_sd21.yaml
    diffperc test --config configs/correspondence/spair_sddino_sd15.yaml

Training-free: ``test`` (and ``validate``) run the backbone on both images of each pair,
match the source keypoints into the target (:func:`~diffperc.zeroshot.correspondence.match_points`,
in original image pixels as DIFT does) and report PCK@alpha per keypoint, per image and per
category (:class:`~diffperc.zeroshot.correspondence.PCKTally`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from .._io import write_text_atomic
from ..zeroshot.correspondence import PCKTally, match_points, pck_correct, sd_dino_descriptors
from ._base import PerceptionTask

__all__ = ["CorrespondenceTask"]


class CorrespondenceTask(PerceptionTask):
    """Match keypoints of image pairs with frozen backbone features and score them with PCK.

    Batches come from :class:`~diffperc.data.correspondence.CorrespondenceDataModule`
    (``collate_pairs``): ``src_image``/``trg_image`` (B, 3, h, w) in [0, 1], ``src_kps_orig``,
    ``trg_kps_orig`` (B, N, 2), ``kps_valid`` (B, N), ``src_size``/``trg_size`` (B, 2),
    ``pck_ref`` (B, 4), ``category`` list of str.

    Args:
        backbone, backbone_kwargs: see :class:`~diffperc.tasks._base.PerceptionTask`. DIFT:
            ``"sd21"`` with ``{layers: dift, timestep: 261, ensemble_size: 8}``; SD-DINO: a
            fused preset such as ``"sd15_dinov2b"``.
        method: ``"dift"``: cosine nearest neighbour on one backbone map (``feature_index``).
            ``"sd_dino"``: per pair, co-PCA of each SD level to ``pca_dims``, fused with DINOv2
            (needs a :class:`~diffperc.backbones.fused.FusedBackbone`).
        prompt: text prompt; ``{category}`` becomes the pair's category ("" = unconditional).
        alphas: PCK tolerances (fractions of the reference's longer side).
        feature_index: which backbone feature map ``"dift"`` matches with.
        pca_dims: SD-DINO channels per SD level after co-PCA.
        soft_window: 0 = hard argmax; k > 0 = window soft-argmax over (2k+1)^2 pixels.
        save_matches: write PNGs of the first this many pairs (source | target, coloured
            matches; rings = ground truth, green/red = within alpha[0] or not).
        output_dir: where ``matches/`` and ``pck.json`` go; None = the trainer's root dir.
        seed: seeds the diffusion noise of each batch (reproducible runs).
    """

    def __init__(
        self, backbone: str = "sd21", backbone_kwargs: dict[str, Any] | None = None,
        method: Literal["dift", "sd_dino"] = "dift", prompt: str = "a photo of a {category}",
        alphas: tuple[float, ...] = (0.1, 0.05, 0.01), feature_index: int = 0, pca_dims: int = 256,
        soft_window: int = 0, save_matches: int = 0, output_dir: str | None = None, seed: int = 0,
    ) -> None:
        super().__init__(backbone, backbone_kwargs)
        if method not in ("dift", "sd_dino"):
            raise ValueError(f"method must be 'dift' or 'sd_dino', got {method!r}")
        if method == "sd_dino" and not (hasattr(self.backbone, "sd") and hasattr(self.backbone, "dino")):
            raise ValueError(f"method='sd_dino' needs a fused SD + DINOv2 backbone (e.g. 'sd15_dinov2b', "
                             f"'test_sd_dinov2'), got {backbone!r} ({type(self.backbone).__name__})")
        try:
            prompt.format(category="cat")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"prompt may only use the placeholder {{category}}, got {prompt!r}") from err
        n_maps = len(self.backbone.feature_info)
        if method == "dift" and not -n_maps <= feature_index < n_maps:
            raise ValueError(f"feature_index must index the backbone's {n_maps} feature maps, got {feature_index}")
        if save_matches < 0 or pca_dims < 1:
            raise ValueError(f"save_matches must be >= 0 and pca_dims >= 1, got {save_matches}, {pca_dims}")
        self.method, self.prompt, self.feature_index, self.pca_dims = method, prompt, feature_index, pca_dims
        self.soft_window, self.save_matches, self.output_dir, self.seed = soft_window, save_matches, output_dir, seed
        self.tallies = {stage: PCKTally(alphas) for stage in ("val", "test")}
        self.results: dict[str, float] = {}
        self._saved = 0

    # ------------------------------------------------------------------ features
    def _prompts(self, categories: Sequence[str]) -> list[str]:
        return [self.prompt.format(category=c) for c in categories]

    def pair_descriptors(self, src: Tensor, trg: Tensor, categories: Sequence[str],
                         generator: torch.Generator | None = None) -> list[tuple[Tensor, Tensor]]:
        """Descriptor maps of B pairs: B tuples of (C, h, w) source and target maps.

        Args:
            src, trg: (B, 3, h, w) images in [0, 1] (one backbone call on the 2B images).
            categories: B category names for the prompt.
            generator: seeds the diffusion noise.
        """
        b = len(src)
        images = torch.cat([src, trg])  # (2B, 3, h, w)
        prompts = self._prompts(categories) * 2
        if self.method == "dift":
            feats = self.backbone(images, prompts=prompts, generator=generator).features[self.feature_index]
            return [(feats[i], feats[b + i]) for i in range(b)]
        from ..backbones.dinov2 import resize_images

        bb = self.backbone
        sd_out = bb.sd(images, prompts=prompts, generator=generator).features
        levels = [sd_out[i] for i in bb.sd_index]
        dino = bb.dino(images if bb.dino_size is None else resize_images(images, bb.dino_size)).features[0]
        return [sd_dino_descriptors([f[i] for f in levels], [f[b + i] for f in levels], dino[i], dino[b + i],
                                    pca_dims=self.pca_dims, weights=bb.weights, size=bb.grid) for i in range(b)]

    def match_batch(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> list[Tensor]:
        """Predicted target keypoints (N_i, 2) per pair, in original target pixels (valid keypoints only)."""
        pairs = self.pair_descriptors(batch["src_image"], batch["trg_image"], batch["category"], generator)
        preds = []
        for i, (fs, ft) in enumerate(pairs):
            valid = batch["kps_valid"][i]
            preds.append(match_points(fs, ft, batch["src_kps_orig"][i][valid], batch["src_size"][i].tolist(),
                                      batch["trg_size"][i].tolist(), soft_window=self.soft_window))
        return preds

    # ------------------------------------------------------------------ loops
    def _eval_step(self, batch: dict[str, Any], batch_idx: int, stage: str) -> None:
        gen = torch.Generator(device=self.device).manual_seed(self.seed + batch_idx)
        with torch.no_grad():
            preds = self.match_batch(batch, gen)
        tally = self.tallies[stage]
        for i, pred in enumerate(preds):
            gt = batch["trg_kps_orig"][i][batch["kps_valid"][i]]
            tally.update(pred.cpu(), gt.cpu(), batch["pck_ref"][i].cpu(), batch["category"][i])
            if stage == "test" and self._saved < self.save_matches:
                self._save_picture(batch, i, pred.cpu(), gt.cpu())

    def _save_picture(self, batch: dict[str, Any], i: int, pred: Tensor, gt: Tensor) -> None:
        from ..viz import save_png, to_pil
        from ..zeroshot.correspond_cli import draw_matches

        valid = batch["kps_valid"][i].cpu()
        src_img, trg_img = to_pil(batch["src_image"][i]), to_pil(batch["trg_image"][i])
        to_src = torch.tensor(src_img.size) / batch["src_size"][i].cpu().flip(0)  # (x, y) scale orig -> shown
        to_trg = torch.tensor(trg_img.size) / batch["trg_size"][i].cpu().flip(0)
        thr = self.tallies["test"].alphas[0]
        correct = pck_correct(pred, gt, batch["pck_ref"][i].cpu(), thr)
        picture = draw_matches(src_img, trg_img, batch["src_kps_orig"][i].cpu()[valid] * to_src, pred * to_trg,
                               gt_trg=gt * to_trg, correct=correct,
                               title=f"{batch['name'][i]}  PCK@{thr:g}: {int(correct.sum())}/{len(gt)}")
        name = batch["name"][i].replace(":", "_").replace("/", "_")
        save_png(picture, self._out_dir() / "matches" / f"{self._saved:04d}_{name}.png")
        self._saved += 1

    def _out_dir(self) -> Path:
        return Path(self.output_dir or self.trainer.default_root_dir)

    def _epoch_start(self, stage: str) -> None:
        self.tallies[stage].reset()
        self._saved = 0

    def _epoch_end(self, stage: str) -> None:
        tally = self.tallies[stage]
        if not tally.pairs:
            return
        res = tally.compute()
        self.results = res
        for key, value in res.items():
            self.log(f"{stage}/{key}", value, prog_bar=key == f"pck@{tally.alphas[0]:g}/per_image")
        self.print(f"\n{stage} PCK (%) over {len(tally.pairs)} pairs; img = per image, kpt = per keypoint\n"
                   + tally.table())
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
        gen = torch.Generator(device=self.device).manual_seed(self.seed + batch_idx)
        return self.match_batch(batch, gen)
