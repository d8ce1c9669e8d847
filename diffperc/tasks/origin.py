"""Origin identification (ID²): learn a linear map of VAE latents under which translations meet their origin.

Wang et al., "Origin Identification for Text-Guided Image-to-Image Diffusion Models", ICML 2025
(arXiv 2501.02376; github.com/WangWenhao0716/ID2, CC-BY-NC-4.0). Each origin image is one
class; its text-guided image-to-image translations are that class's samples. The frozen VAE
encodes an image (256 px for SD 2 -> 4x32x32 -> 4096-d), a bias-free linear layer W maps it to
512-d and a CosFace classifier (s=64, m=0.35) gives the cross-entropy loss; the released code
has no normalisation between them (``nn.Identity`` in vit_vae.py; ``batch_norm=True`` adds a
BatchNorm1d as an option). Adam at 3.5e-4, its learning rate set once per epoch (LambdaLR
stepped after each epoch): 0.01 -> 1 linearly over 5 epochs, constant to epoch 10, then cosine
to epoch 25; an EMA of the weights (0.9999, torch_ema's warm-up) is what gets evaluated and
exported. Retrieval compares W x vae(image), L2-normalised, by cosine similarity.
Step-by-step comparison with the released code: docs/fidelity/id2.md.

The VAE is frozen, so its features are cached per image key after the first epoch: later
epochs never run the VAE (with ``latent_sample="sample"`` each image keeps the one posterior
draw it got first, as ID²'s precomputed feature files).
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor, nn

from .._io import atomic_file
from ..retrieval.embedder import OriginEmbedder, save_projection
from ..retrieval.metrics import retrieval_metrics

__all__ = ["CosFace", "OriginIDTask", "id2_lr_factor"]

_EMBEDDER = "embedder."


class CosFace(nn.Module):
    """Large-margin cosine classifier (Wang et al., "CosFace", CVPR 2018).

    logits[i, j] = s * (cos(x_i, w_j) - m * [j == y_i]); the loss is cross-entropy on them.

    Args:
        in_features: D of the embeddings.
        num_classes: C, here the number of training origins.
        scale: s (ID²: 64).
        margin: m (ID²: 0.35).
    """

    def __init__(self, in_features: int, num_classes: int, scale: float = 64.0, margin: float = 0.35) -> None:
        super().__init__()
        self.scale, self.margin = scale, margin
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.xavier_uniform_(self.weight)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """(B, D) embeddings, (B,) class ids -> (B, C) logits (no margin without labels)."""
        cosine = F.linear(F.normalize(x, dim=1), F.normalize(self.weight, dim=1))  # (B, C)
        if labels is None:
            return self.scale * cosine
        return self.scale * (cosine - self.margin * F.one_hot(labels, cosine.shape[1]).to(cosine))


def id2_lr_factor(epoch: float, warmup: float = 5.0, constant: float = 5.0, total: float = 25.0) -> float:
    """ID²'s learning-rate multiplier at an epoch: 0.01 -> 1 linearly, flat, then cosine to 0 at ``total``
    (the released script's ``f(epoch)``, evaluated at whole epochs there)."""
    if epoch < warmup:
        return 0.01 + 0.99 * epoch / warmup
    if epoch < warmup + constant:
        return 1.0
    span = max(total - warmup - constant, 1e-8)
    return 0.5 * (math.cos(min(epoch - warmup - constant, span) / span * math.pi) + 1)


class OriginIDTask(LightningModule):
    """Trains W (features -> D) on batches ``{"image", "label"[, "key"][, "role"]}`` (see data/origin.py).

    ``label`` is the origin's class index; ``key`` (a unique string per image) enables the
    VAE-feature cache; in validation/test, ``role`` 0 marks gallery images (origins) and 1
    queries (without ``role``, each image searches all the others).

    Args:
        backbone: whose VAE embeds: a preset (``sd21`` as ID², ``digits``, ``test_sd``), a
            diffusers folder or a hub id.
        input_size: side images are resized to before the VAE (ID²: 256); None:
            ``min(256, VAE sample size)``. (Not ``image_size``, so it never clashes with a
            datamodule's hyperparameter when Lightning logs both.)
        features: D, the output size of W (ID²: 512).
        num_origins: number of training origins (CosFace classes); None takes
            ``datamodule.num_classes``.
        scale, margin: CosFace s and m.
        batch_norm: BatchNorm1d between W and CosFace; False (default): none, as the released code.
        lr: Adam learning rate (no weight decay, as ID²).
        warmup_epochs, constant_epochs: the schedule, set once per epoch as the released script.
        schedule_epochs: the epoch where the cosine reaches 0 (the released script hard-codes 25);
            None: ``trainer.max_epochs``.
        ema_decay: EMA decay of W; the EMA is evaluated and exported.
        latent_sample: VAE posterior ``"mean"`` (default) or ``"sample"`` (ID²'s README; one draw
            per image, kept by the feature cache).
        cache_features: keep VAE features per ``key`` in memory (F x 4 bytes per image).
        cache_dir: also save/load the cache there as safetensors (across runs).
        export_path: write the EMA W there (``.safetensors``) at the end of fit, for
            ``diffperc index build --projection`` (not under ``fast_dev_run``).
    """

    def __init__(
        self, backbone: str = "sd21", input_size: int | None = 256, features: int = 512,
        num_origins: int | None = None, scale: float = 64.0, margin: float = 0.35, batch_norm: bool = False,
        lr: float = 3.5e-4, warmup_epochs: float = 5.0, constant_epochs: float = 5.0,
        schedule_epochs: int | None = None, ema_decay: float = 0.9999, latent_sample: str = "mean",
        cache_features: bool = True, cache_dir: str | None = None, export_path: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if features < 1 or lr <= 0 or not 0 <= ema_decay < 1:
            raise ValueError(f"need features >= 1, lr > 0 and 0 <= ema_decay < 1; got {features}, {lr}, {ema_decay}")
        self.embedder = OriginEmbedder.from_model(backbone, image_size=input_size, latent_sample=latent_sample)
        self.projection = nn.Linear(self.embedder.feature_dim, features, bias=False)  # W
        self.bn = nn.BatchNorm1d(features) if batch_norm else nn.Identity()
        self.classifier: CosFace | None = None
        if num_origins is not None:
            self._build_classifier(num_origins)
        self.register_buffer("ema_projection", self.projection.weight.detach().clone())
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))
        self._cache: dict[str, Tensor] = {}
        self._cache_saved = 0
        self._eval: dict[str, list[Tensor]] = {}
        self.strict_loading = False  # the frozen VAE is not in checkpoints

    # ------------------------------------------------------------------ setup and checkpoints
    def _build_classifier(self, num_origins: int) -> None:
        if num_origins < 2:
            raise ValueError(f"num_origins (training origins = CosFace classes) must be >= 2, got {num_origins}")
        self.classifier = CosFace(self.hparams.features, num_origins, self.hparams.scale, self.hparams.margin)
        self.hparams.num_origins = num_origins

    def setup(self, stage: str) -> None:
        if self.classifier is None and stage == "fit":
            dm = self.trainer.datamodule if self.trainer is not None else None
            n = getattr(dm, "num_classes", None)
            if n is None:
                raise ValueError("OriginIDTask needs num_origins: set model.init_args.num_origins or use a "
                                 "datamodule with a num_classes attribute (OriginPairsDataModule has one)")
            self._build_classifier(int(n))
        self._load_cache()

    def state_dict(self, *args: Any, destination: dict[str, Any] | None = None, prefix: str = "",
                   keep_vars: bool = False) -> dict[str, Any]:
        """Everything but the frozen VAE (rebuilt from ``backbone`` when loading)."""
        state = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        for key in [k for k in state if k.startswith(prefix + _EMBEDDER)]:
            del state[key]
        return state

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith(_EMBEDDER)]
        opt = torch.optim.Adam(params, lr=self.hparams.lr)
        hp = self.hparams
        total = hp.schedule_epochs
        if total is None:
            total = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 25
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: id2_lr_factor(
            epoch, hp.warmup_epochs, hp.constant_epochs, total))
        # stepped after each epoch, as the released script's lr_scheduler.step(): the lr is constant within an epoch
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    # ------------------------------------------------------------------ features
    def vae_features(self, batch: dict[str, Any]) -> Tensor:
        """(B, F) VAE features of a batch, from the cache where its ``key`` was seen before."""
        keys = batch.get("key")
        if keys is None or not self.hparams.cache_features:
            return self.embedder.vae_features(batch["image"])
        missing = [i for i, k in enumerate(keys) if k not in self._cache]
        if missing and batch["image"].numel() == 0:
            raise RuntimeError(f"{len(missing)} images of a features-only batch are not cached (e.g. {keys[missing[0]]})")
        if missing:
            fresh = self.embedder.vae_features(batch["image"][missing]).cpu()
            self._cache.update({keys[i]: f for i, f in zip(missing, fresh, strict=True)})
        return torch.stack([self._cache[k] for k in keys]).to(self.device)

    def _cache_file(self) -> Path | None:
        if not self.hparams.cache_dir:
            return None
        return Path(self.hparams.cache_dir) / f"vae_features_{self.embedder.fingerprint()[:16]}.safetensors"

    def _load_cache(self) -> None:
        path = self._cache_file()
        if path is not None and path.is_file() and not self._cache:
            from safetensors.torch import load_file

            self._cache = load_file(str(path))
            self._cache_saved = len(self._cache)

    def _save_cache(self) -> None:
        path = self._cache_file()
        if path is None or len(self._cache) == self._cache_saved or self.global_rank != 0:
            return
        if self._trainer is not None and self.trainer.fast_dev_run:
            return  # a smoke run writes nothing, as Lightning's own checkpoints
        from safetensors.torch import save_file

        with atomic_file(path) as tmp:
            save_file({k: v.contiguous() for k, v in self._cache.items()}, tmp)
        self._cache_saved = len(self._cache)

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        if self.classifier is None:
            raise RuntimeError("the CosFace classifier was not built: give num_origins")
        labels = batch["label"]
        emb = self.bn(self.projection(self.vae_features(batch)))  # (B, D)
        logits = self.classifier(emb, labels)  # (B, C)
        loss = F.cross_entropy(logits, labels)
        bs = len(labels)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/acc", (logits.argmax(1) == labels).float().mean(), prog_bar=True, batch_size=bs)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """EMA of W with torch_ema's warm-up: the n-th update (n = 1, 2, ...) uses min(decay, (1 + n) / (10 + n))."""
        n = int(self.ema_updates) + 1  # torch_ema counts the update before computing its decay
        decay = min(self.hparams.ema_decay, (1 + n) / (10 + n))
        self.ema_projection.mul_(decay).add_(self.projection.weight.detach(), alpha=1 - decay)
        self.ema_updates += 1

    def on_train_start(self) -> None:
        """Cache the VAE features of the whole training set in one pass, then stop decoding images.

        Applies to datasets with a ``features_only`` switch and ``keys`` (OriginImageDataset);
        others still skip the VAE for every image seen before.
        """
        dataset = getattr(getattr(self.trainer, "datamodule", None), "train_set", None)
        if not (self.hparams.cache_features and hasattr(dataset, "features_only") and hasattr(dataset, "keys")):
            return
        self._fill_cache(dataset, "VAE features (once)")
        self._save_cache()

    def _fill_cache(self, dataset: Any, desc: str) -> None:
        from torch.utils.data import DataLoader, Subset
        from tqdm.auto import tqdm

        todo = [i for i, k in enumerate(dataset.keys) if k not in self._cache]
        if todo:
            loader = DataLoader(Subset(dataset, todo), batch_size=256, num_workers=0)
            with torch.no_grad():
                for batch in tqdm(loader, desc=desc, unit="batch", disable=not self.trainer.is_global_zero):
                    self.vae_features(batch)
        dataset.features_only = True

    def on_train_epoch_end(self) -> None:
        self._save_cache()

    def on_fit_end(self) -> None:
        if self.hparams.export_path and self.global_rank == 0 and not self.trainer.fast_dev_run:
            self.export_projection(self.hparams.export_path)

    def export_projection(self, path: str | os.PathLike) -> Path:
        """Write the EMA W (D, F) to ``path`` (.safetensors) for ``OriginEmbedder`` / ``diffperc index build``."""
        meta = {"backbone": str(self.hparams.backbone), "image_size": str(self.embedder.image_size),
                "ema_updates": str(int(self.ema_updates))}
        return save_projection(self.ema_projection, path, meta)

    # ------------------------------------------------------------------ evaluation
    def embed(self, batch: dict[str, Any]) -> Tensor:
        """(B, D) unit embeddings with the EMA W."""
        return F.normalize(self.vae_features(batch) @ self.ema_projection.T, dim=1)

    def _collect(self, batch: dict[str, Any]) -> None:
        feats = self.vae_features(batch)
        role = batch.get("role", torch.full_like(batch["label"], -1))
        for name, value in (("ema", F.normalize(feats @ self.ema_projection.T, dim=1)),
                            ("raw", F.normalize(feats, dim=1)), ("label", batch["label"]), ("role", role)):
            self._eval.setdefault(name, []).append(value.detach().cpu())

    def _report(self, stage: str) -> None:
        data = {k: torch.cat(v) for k, v in self._eval.items()}
        self._eval = {}
        if not data:
            return
        query, gallery = data["role"] == 1, data["role"] == 0
        for name, prefix in (("ema", ""), ("raw", "raw_vae_")):
            emb, labels = data[name], data["label"]
            try:
                if query.any() and gallery.any():
                    m = retrieval_metrics(emb[query], labels[query], emb[gallery], labels[gallery])
                else:
                    m = retrieval_metrics(emb, labels)  # leave-one-out
            except ValueError as err:
                warnings.warn(f"{stage}: no retrieval metrics ({err})", stacklevel=2)
                return
            self.log(f"{stage}/{prefix}acc1", m["acc1"], prog_bar=not prefix)
            self.log(f"{stage}/{prefix}mAP", m["mAP"], prog_bar=not prefix)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._collect(batch)

    def on_validation_epoch_end(self) -> None:
        self._report("val")
        self._save_cache()
        self._eval_sets_features_only()

    def _eval_sets_features_only(self) -> None:
        """After a full pass over an eval set, later passes read features, not images."""
        dm = getattr(self.trainer, "datamodule", None)
        for dataset in getattr(dm, "eval_sets", {}).values():
            if hasattr(dataset, "features_only") and self.hparams.cache_features and \
                    all(k in self._cache for k in dataset.keys):
                dataset.features_only = True

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._collect(batch)

    def on_test_epoch_end(self) -> None:
        self._report("test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor]:
        """{"embedding": (B, D)} with the EMA W."""
        return {"embedding": self.embed(batch)}
