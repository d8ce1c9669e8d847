"""PerceptionTask / ProbeTask on the tiny test_sd backbone: light checkpoints, optimizer groups, learning."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer

from diffperc.data.digits import DigitsDataModule
from diffperc.data.fake import FakeDataModule
from diffperc.tasks.probe import ProbeTask

BB_KW = {"layers": "vpd", "timestep": 1, "add_noise": False}



def _trainer(**kw) -> Trainer:
    return Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, **kw)


def test_state_dict_drops_frozen_backbone():
    task = ProbeTask(backbone="test_sd", backbone_kwargs=BB_KW)
    keys = set(task.state_dict())
    assert {"head.1.weight", "head.1.bias", "head.0.running_mean"} <= keys
    assert not any(k.startswith("backbone.") for k in keys)
    assert task.head[1].in_features == sum(task.backbone.feature_info.channels())
    assert task.hparams["backbone"] == "test_sd" and task.hparams["backbone_kwargs"] == BB_KW
    assert "optimizer" not in task.hparams  # a callable: kept out so checkpoints load with weights_only


def test_trainable_backbone_keeps_unet_and_scales_its_lr():
    task = ProbeTask(backbone="test_sd", backbone_kwargs={**BB_KW, "trainable": True}, backbone_lr_mult=0.1,
                     optimizer=lambda groups: torch.optim.SGD(groups, lr=0.5))
    keys = set(task.state_dict())
    assert any(k.startswith("backbone.unet.") for k in keys)
    assert not any(k.startswith(("backbone.vae.", "backbone.text_encoder.")) for k in keys)
    opt = task.configure_optimizers()
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs == pytest.approx({"head": 0.5, "backbone": 0.05})
    n_unet = sum(p.numel() for p in task.backbone.unet.parameters())
    assert sum(p.numel() for p in opt.param_groups[1]["params"]) == n_unet


def test_training_steps_reduce_loss():
    task = ProbeTask(backbone="test_sd", backbone_kwargs=BB_KW,
                     optimizer=lambda groups: torch.optim.Adam(groups, lr=0.1))
    batch = {"image": torch.rand(8, 3, 32, 32), "label": torch.arange(8) % 4}
    opt = task.configure_optimizers()
    task.train()
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.cross_entropy(task(batch["image"]), batch["label"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_checkpoint_roundtrip_restores_head(tmp_path):
    task = ProbeTask(backbone="test_sd", backbone_kwargs=BB_KW)
    trainer = _trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(task, FakeDataModule(num_samples=8, batch_size=4))
    path = tmp_path / "probe.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    assert not any(k.startswith("backbone.") for k in ckpt["state_dict"])
    loaded = ProbeTask.load_from_checkpoint(path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.head.state_dict().values(), task.head.state_dict().values(), strict=True))
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.eval()(images), task.eval()(images), atol=1e-6)
    del ckpt["state_dict"]["head.1.weight"]
    torch.save(ckpt, tmp_path / "broken.ckpt")
    with pytest.raises(KeyError, match="head.1.weight"):
        ProbeTask.load_from_checkpoint(tmp_path / "broken.ckpt")


def test_digits_datamodule_batches():
    dm = DigitsDataModule(batch_size=4, limit=8)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["label"].shape == (4,)
    assert batch["image"].min() >= 0 and batch["image"].max() <= 1 and batch["label"].dtype == torch.int64
    assert len(dm.val_dataloader().dataset) == 8
