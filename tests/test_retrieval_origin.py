"""ID² training pieces: CosFace vs hand computation, LR schedule, metrics, pairs data, OriginIDTask with its cache."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer
from PIL import Image

from diffperc.data.origin import IdentitySampler, OriginPairsDataModule, list_origins, read_pairs
from diffperc.retrieval.embedder import OriginEmbedder, load_projection
from diffperc.retrieval.metrics import average_precision, retrieval_metrics
from diffperc.tasks.origin import CosFace, OriginIDTask, id2_lr_factor

ROOT = Path(__file__).resolve().parents[1]


def test_cosface_matches_hand_computation() -> None:
    head = CosFace(3, 4, scale=64.0, margin=0.35)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 2.0, 0], [0, 0, 1.0], [1.0, 1.0, 0]]))
    x = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, -2.0]])
    labels = torch.tensor([1, 2])
    # cosines by hand: x0 = (0.6, 0.8, 0); x1 = (0, 0, -1); w3 = (1, 1, 0) / sqrt(2)
    cos = torch.tensor([[0.6, 0.8, 0.0, 1.4 / math.sqrt(2)], [0.0, 0.0, -1.0, 0.0]])
    expected = 64.0 * (cos - 0.35 * torch.tensor([[0, 1.0, 0, 0], [0, 0, 1.0, 0]]))
    logits = head(x, labels)
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(head(x), 64.0 * cos)  # no margin at inference
    loss = F.cross_entropy(logits, labels)
    by_hand = -np.mean([expected[i, labels[i]].item() - torch.logsumexp(expected[i], 0).item() for i in range(2)])
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)


def test_id2_schedule() -> None:
    assert id2_lr_factor(0) == pytest.approx(0.01)
    assert id2_lr_factor(2.5) == pytest.approx(0.505)
    assert id2_lr_factor(5) == id2_lr_factor(9.9) == 1.0
    assert id2_lr_factor(17.5) == pytest.approx(0.5)
    assert id2_lr_factor(25) == pytest.approx(0.0, abs=1e-12)


def test_retrieval_metrics_by_hand() -> None:
    gallery = torch.eye(3)  # origins 0, 1, 2
    query = torch.tensor([[1.0, 0.1, 0], [1.0, 0.2, 0], [0, 0.1, 1.0]])  # true origins 0, 1, 2
    m = retrieval_metrics(query, torch.tensor([0, 1, 2]), gallery, torch.tensor([0, 1, 2]))
    # ranks of the true origin: 1, 2, 1 -> Acc@1 2/3, AP 1, 1/2, 1
    assert m["acc1"] == pytest.approx(2 / 3) and m["mAP"] == pytest.approx((1 + 0.5 + 1) / 3) and m["queries"] == 3
    loo = retrieval_metrics(torch.tensor([[1.0, 0], [0.9, 0.1], [0, 1.0], [0.1, 0.9]]), torch.tensor([0, 0, 1, 1]))
    assert loo["acc1"] == 1.0 and loo["mAP"] == 1.0


def test_average_precision_under_exact_ties_is_sklearns() -> None:
    """Tie-heavy rankings (scores from 4 levels): each row's AP equals sklearn's average_precision_score, and
    mAP does not depend on the gallery order (the released ID² evaluator calls sklearn per query)."""
    from sklearn.metrics import average_precision_score

    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (40, 25), generator=g).float() / 3
    positives = torch.rand(40, 25, generator=g) < 0.3
    positives[0] = False  # a row without positives: NaN, skipped by retrieval_metrics
    ap, acc1 = average_precision(scores, positives)
    assert math.isnan(ap[0])
    for i in range(1, 40):
        assert ap[i].item() == pytest.approx(average_precision_score(positives[i].numpy(), scores[i].numpy()),
                                             abs=1e-6)
        top = scores[i] == scores[i].max()  # expected top-1 under a random order of the tie at the top
        assert acc1[i].item() == pytest.approx(positives[i][top].float().mean().item())
    # one query, a 3-way tie at the top holding its only positive: AP = 1/3 whatever the order, Acc@1 = 1/3
    for order in ([0, 1, 2, 3], [2, 3, 1, 0], [3, 0, 2, 1]):
        emb = torch.tensor([[1.0, 0], [1.0, 0], [1.0, 0], [0, 1.0]])[order]
        labels = torch.tensor([7, 1, 2, 3])[order]
        m = retrieval_metrics(torch.tensor([[1.0, 0]]), torch.tensor([7]), emb, labels)
        assert m["mAP"] == pytest.approx(1 / 3) and m["acc1"] == pytest.approx(1 / 3)


def _fake_pairs(root: Path, n_origins: int, per_origin: int, seed: int) -> tuple[Path, Path]:
    """Origins = random images; translations = the origin plus small noise (an easy, learnable set)."""
    rng = np.random.default_rng(seed)
    (root / "origins").mkdir(parents=True)
    (root / "queries").mkdir()
    lines = ["query,origin_id"]
    for o in range(n_origins):
        base = rng.random((32, 32, 3))
        Image.fromarray((base * 255).astype("uint8")).save(root / "origins" / f"R{o:04d}.png")
        for k in range(per_origin):
            noisy = np.clip(base + rng.normal(0, 0.05, base.shape), 0, 1)
            Image.fromarray((noisy * 255).astype("uint8")).save(root / "queries" / f"T{o:04d}_{k}.png")
            lines.append(f"queries/T{o:04d}_{k}.png,R{o:04d}")
    (root / "pairs.csv").write_text("\n".join(lines) + "\n")
    return root / "pairs.csv", root / "origins"


def test_pairs_csv_id2_folder_and_errors(tmp_path: Path) -> None:
    csv_path, origins = _fake_pairs(tmp_path, 3, 2, seed=0)
    pairs = read_pairs(csv_path)
    assert len(pairs) == 6 and pairs[0] == (tmp_path / "queries" / "T0000_0.png", "R0000")
    by_name = read_pairs(tmp_path / "queries")  # ID² naming: T<origin>_<k>
    assert by_name[0] == (tmp_path / "queries" / "T0000_0.png", "0000")
    assert list_origins(origins)["0000"] == list_origins(origins)["R0000"] == origins / "R0000.png"
    (tmp_path / "bad.csv").write_text("image,label\na.png,1\n")
    with pytest.raises(ValueError, match="query,origin_id"):
        read_pairs(tmp_path / "bad.csv")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_pairs(tmp_path / "missing.csv")
    sampler = IdentitySampler([0, 0, 0, 1, 2, 2], num_instances=2, length=8)
    order = list(sampler)
    assert len(order) == 8 and all(len({[0, 0, 0, 1, 2, 2][i] for i in order[j : j + 2]}) == 1 for j in (0, 2, 4, 6))


def test_task_learns_and_caches_vae_features(tmp_path: Path) -> None:
    train_csv, train_origins = _fake_pairs(tmp_path / "train", 8, 3, seed=1)
    val_csv, val_origins = _fake_pairs(tmp_path / "val", 6, 2, seed=2)
    dm = OriginPairsDataModule(str(train_csv), str(train_origins), str(val_csv), str(val_origins), image_size=32,
                               batch_size=16, num_instances=4, eval_batch_size=32, samples_per_epoch=32)
    task = OriginIDTask(backbone="test_sd", input_size=32, features=16, ema_decay=0.9, lr=3e-3,
                        warmup_epochs=0.5, constant_epochs=1, cache_dir=str(tmp_path / "cache"),
                        export_path=str(tmp_path / "w.safetensors"))
    calls = {"n": 0}
    original = task.embedder.vae_features

    def counting(images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        calls["n"] += len(images)
        return original(images, batch_size)

    task.embedder.vae_features = counting
    trainer = Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(task, dm)
    assert task.classifier is not None and task.hparams.num_origins == 8
    # 8 origins + 24 translations in train, 6 + 12 in val: each image through the VAE exactly once
    assert calls["n"] == len(task._cache) == 32 + 18
    assert dm.train_set.features_only and dm.eval_sets["val"].features_only  # later epochs read no image files
    assert int(task.ema_updates) == 3 * 2 and not torch.equal(task.ema_projection, task.projection.weight)
    metrics = trainer.callback_metrics
    assert {"val/acc1", "val/mAP", "val/raw_vae_acc1", "val/raw_vae_mAP"} <= set(metrics)
    assert 0 <= float(metrics["val/mAP"]) <= 1
    assert list((tmp_path / "cache").glob("vae_features_*.safetensors"))
    w = load_projection(tmp_path / "w.safetensors")
    torch.testing.assert_close(w, task.ema_projection)
    emb = OriginEmbedder(task.embedder.vae, projection=w, image_size=32)  # what `index build --projection` uses
    assert emb.dim == 16
    assert "embedder.vae.encoder.conv_in.weight" not in task.state_dict()  # the frozen VAE stays out of checkpoints


def test_config_smoke_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """configs/origin/*.yaml with the tiny backbone and fake data, as the configs check in CI does."""
    from diffperc.cli import cli_main

    monkeypatch.chdir(tmp_path)
    cli_main(["fit", "--config", str(ROOT / "configs" / "origin" / "oripid_id2_sd2.yaml"),
              "--model.init_args.backbone=test_sd",
              "--data=diffperc.data.fake.FakeDataModule", "--trainer.fast_dev_run=1", "--trainer.accelerator=cpu"])
    assert not (tmp_path / "id2_sd2_w512.safetensors").exists()  # smoke runs write nothing
