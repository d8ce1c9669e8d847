"""ID² (origin identification) against literal ports of the released code, on a tiny random SD-shaped VAE.

Upstream: WangWenhao0716/ID2 @ cb88361 (Wang et al., ICML 2025):
- README.md:53-62 (Step 1: Resize((256, 256)), ToTensor, Normalize([0.5], [0.5]), ``latent_dist.sample()``,
  reshape) and :81-82 (Step 2: ``features @ W.T``, compared by cosine similarity);
- dg/models_gem_waveblock_balance_cos/vit_vae.py:43-50 (TransNetwork: bias-free fc1), :230-275
  (VisionTransformer: base, ``nn.Identity`` before the classifier, forward);
- dg/models_gem_waveblock_balance_cos/metric.py:128-158 (cosine_sim, MarginCosineProduct), :188-194
  (build_metric 'cos', s=64, m=0.35);
- dg/loss/crossentropy.py:19-35 (CrossEntropyLabelSmooth, epsilon 0 in the trainer);
- dg/trainers_cos_ema_ddpmm_vae_sd2.py:18, 44-74 (the training step: loss, zero_grad, backward, step,
  ema.update());
- train_single_source_gem_coslr_wb_balance_cos_ema_ddpmm_torch2_vae_sd2.py:194-207 (Adam, f(epoch),
  LambdaLR, ExponentialMovingAverage(decay=0.9999)), :237-240 (lr_scheduler.step() after each epoch);
- dg/utils/data/preprocessor.py:41 (a precomputed feature per item: ``torch.Tensor(np.load(f)).unsqueeze(0)``);
- torch_ema 0.3 (fadel/pytorch_ema torch_ema/ema.py ``update``: num_updates += 1, then
  decay = min(decay, (1 + n) / (10 + n)), shadow -= (1 - decay) (shadow - param));
- dg/evaluators.py:44-66 (pairwise_distance: squared Euclidean), dg/evaluation_metrics/ranking.py:18-115
  (cmc with first_match_break, mean_ap with sklearn's average_precision_score).

Each ``_port_*`` follows its upstream code step by step; diffperc is used only to build the tiny VAE and,
for the training comparison, its initial weights are copied into the port.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision
from lightning.pytorch import Callback, Trainer
from PIL import Image
from sklearn.metrics import average_precision_score
from torch import nn
from torch.nn import functional as F

from diffperc.backbones.registry import create_backbone
from diffperc.retrieval.embedder import OriginEmbedder
from diffperc.retrieval.metrics import retrieval_metrics
from diffperc.tasks.origin import OriginIDTask


# ---------------------------------------------------------------------------- ports
def _port_readme_features(vae, images, size, sample=True):
    """README.md:53-62, one image at a time; ``sample=False`` takes the posterior mean instead (diffperc's
    default, a documented difference)."""
    transforms = torchvision.transforms.Compose([
        torchvision.transforms.Resize((size, size)),
        torchvision.transforms.ToTensor(),
        torchvision.transforms.Normalize([0.5], [0.5]),
    ])
    out = []
    with torch.no_grad():
        for image in images:
            dist = vae.encode(transforms(image).unsqueeze(0)).latent_dist
            latents = dist.sample() if sample else dist.mean
            out.append(latents.reshape(len(latents), -1))
    return torch.cat(out)


class _PortTransNetwork(nn.Module):
    """vit_vae.py:43-50."""

    def __init__(self, num_features, in_features):
        super().__init__()
        self.fc1 = nn.Linear(in_features, num_features, bias=False)  # 4096 there; 4 x 16 x 16 for the tiny VAE

    def forward(self, x):
        return self.fc1(x)


def _port_cosine_sim(x1, x2, dim=1, eps=1e-8):
    """metric.py:128-132."""
    ip = torch.mm(x1, x2.t())
    w1 = torch.norm(x1, 2, dim)
    w2 = torch.norm(x2, 2, dim)
    return ip / torch.ger(w1, w2).clamp(min=eps)


class _PortMarginCosineProduct(nn.Module):
    """metric.py:135-158 (build_metric 'cos' :188-194 with s=64, m=0.35 from vit_vae.py:250)."""

    def __init__(self, in_features, out_features, s=64.0, m=0.35):
        super().__init__()
        self.s, self.m = s, m
        self.weight = nn.Parameter(torch.Tensor(out_features, in_features))
        nn.init.xavier_uniform_(self.weight)

    def forward(self, input, label):
        cosine = _port_cosine_sim(input, self.weight)
        one_hot = torch.zeros_like(cosine)
        one_hot.scatter_(1, label.view(-1, 1), 1.0)
        return self.s * (cosine - one_hot * self.m)


class _PortVisionTransformer(nn.Module):
    """vit_vae.py:230-275 (``.cuda()`` dropped)."""

    def __init__(self, num_features, num_classes, in_features):
        super().__init__()
        self.base = nn.Sequential(_PortTransNetwork(num_features, in_features))
        self.classifier = _PortMarginCosineProduct(num_features, num_classes, s=64, m=0.35)
        self.projector_feat_bn = nn.Sequential(nn.Identity())

    def forward(self, x, y=None):
        x = self.base(x)
        x = x.view(x.size(0), -1)
        bn_x = self.projector_feat_bn(x)
        prob = self.classifier(bn_x, y)
        return bn_x, prob


def _port_cross_entropy(inputs, targets, num_classes, epsilon=0.0):
    """crossentropy.py:25-35 (CrossEntropyLabelSmooth with epsilon 0, trainers_...:18)."""
    log_probs = nn.LogSoftmax(dim=1)(inputs)
    targets = torch.zeros_like(log_probs).scatter_(1, targets.unsqueeze(1), 1)
    targets = (1 - epsilon) * targets + epsilon / num_classes
    return (-targets * log_probs).mean(0).sum()


def _port_f(epoch):
    """train_single_source_...py:194-200."""
    if epoch < 5:
        return 0.99 * epoch / 5 + 0.01
    elif epoch >= 5 and epoch < 10:
        return 1
    else:
        return 0.5 * (math.cos((epoch - 10) / (25 - 10) * math.pi) + 1)


class _PortEMA:
    """torch_ema 0.3 ExponentialMovingAverage (use_num_updates=True): __init__ and update."""

    def __init__(self, parameters, decay):
        self.decay = decay
        self.num_updates = 0
        self.shadow_params = [p.clone().detach() for p in parameters if p.requires_grad]

    def update(self, parameters):
        decay = self.decay
        self.num_updates += 1
        decay = min(decay, (1 + self.num_updates) / (10 + self.num_updates))
        one_minus_decay = 1.0 - decay
        with torch.no_grad():
            parameters = [p for p in parameters if p.requires_grad]
            for s_param, param in zip(self.shadow_params, parameters, strict=True):
                s_param.sub_(one_minus_decay * (s_param - param))


def _port_train(model, batches, epochs, iters, lr, num_classes):
    """train_single_source_...py:202-207 and :237-240 around trainers_...py:44-74; returns the lr of each epoch."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    ema = _PortEMA(model.parameters(), decay=0.9999)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=lambda epoch: _port_f(epoch))
    lrs, step = [], 0
    for _epoch in range(epochs):
        model.train()
        lrs.append(optimizer.param_groups[0]["lr"])
        for _ in range(iters):
            feats, targets = batches[step % len(batches)]
            inputs = torch.stack([f.unsqueeze(0) for f in feats])  # preprocessor.py:41: (B, 1, F)
            _, s_cls_out = model(inputs, targets)
            loss = _port_cross_entropy(s_cls_out, targets, num_classes)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            ema.update(model.parameters())
            step += 1
        lr_scheduler.step()
    return ema, lrs


def _port_pairwise_distance(x, y):
    """evaluators.py:55-66 (query/gallery branch): squared Euclidean distances."""
    m, n = x.size(0), y.size(0)
    x, y = x.view(m, -1), y.view(n, -1)
    dist_m = torch.pow(x, 2).sum(dim=1, keepdim=True).expand(m, n) + \
        torch.pow(y, 2).sum(dim=1, keepdim=True).expand(n, m).t()
    return torch.addmm(dist_m, x, y.t(), beta=1, alpha=-2)  # dist_m.addmm_(1, -2, x, y.t())


def _port_mean_ap(distmat, query_ids, gallery_ids):
    """ranking.py:82-115 with the default cameras (query 0, gallery 1: every gallery item valid)."""
    distmat = distmat.numpy()
    m, n = distmat.shape
    query_ids, gallery_ids = np.asarray(query_ids), np.asarray(gallery_ids)
    query_cams, gallery_cams = np.zeros(m).astype(np.int32), np.ones(n).astype(np.int32)
    indices = np.argsort(distmat, axis=1)
    matches = gallery_ids[indices] == query_ids[:, np.newaxis]
    aps = []
    for i in range(m):
        valid = (gallery_ids[indices[i]] != query_ids[i]) | (gallery_cams[indices[i]] != query_cams[i])
        y_true = matches[i, valid]
        y_score = -distmat[i][indices[i]][valid]
        if not np.any(y_true):
            continue
        aps.append(average_precision_score(y_true, y_score))
    return np.mean(aps)


def _port_cmc_top1(distmat, query_ids, gallery_ids):
    """ranking.py:18-79 with first_match_break=True (the 'market1501' setting of evaluators.py:88-92), top-1."""
    distmat = distmat.numpy()
    query_ids, gallery_ids = np.asarray(query_ids), np.asarray(gallery_ids)
    indices = np.argsort(distmat, axis=1)
    matches = gallery_ids[indices] == query_ids[:, np.newaxis]
    ret, num_valid_queries = np.zeros(1), 0
    for i in range(len(distmat)):
        if not np.any(matches[i]):
            continue
        index = np.nonzero(matches[i])[0]
        if index[0] < 1:
            ret[index[0]] += 1
        num_valid_queries += 1
    return ret.cumsum()[0] / num_valid_queries


# ---------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def vae():
    return create_backbone("test_sd").vae


def _images(n, seed):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (int(rng.integers(30, 60)), int(rng.integers(30, 60)), 3),
                                        dtype=np.uint8)) for _ in range(n)]


@pytest.mark.parametrize("latent_sample", ["sample", "mean"])
def test_embedding_matches_the_readme(vae, latent_sample):
    """OriginEmbedder.embed_pil = normalise(README features @ W.T); 'sample' draws the same posterior sample
    from the same global RNG state as the README's latent_dist.sample()."""
    images, size = _images(5, seed=0), 32
    weight = torch.randn(8, 4 * 16 * 16, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(123)
    expected = _port_readme_features(vae, images, size, sample=latent_sample == "sample") @ weight.T  # README :82
    emb = OriginEmbedder(vae, projection=weight, image_size=size, latent_sample=latent_sample)
    torch.manual_seed(123)
    got = torch.from_numpy(emb.embed_pil(images, batch_size=2))
    torch.testing.assert_close(got, F.normalize(expected, dim=1), rtol=1e-4, atol=1e-6)
    cosine = F.normalize(expected, dim=1) @ F.normalize(expected, dim=1).T  # "comparing cosine similarity"
    torch.testing.assert_close(got @ got.T, cosine, rtol=1e-4, atol=1e-5)


class _LearningRates(Callback):
    def __init__(self):
        self.lrs = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_training_matches_the_released_loop():
    """OriginIDTask on fixed features vs the port of the released model, loss, Adam, per-epoch LambdaLR and
    torch_ema: same W, same EMA of W and the same learning rate at each epoch, over 12 epochs of 6 steps
    (through warm-up, the constant part and into the cosine)."""
    n_origins, per_origin, dim, epochs, lr = 6, 4, 16, 12, 3e-3
    task = OriginIDTask(backbone="test_sd", input_size=32, features=dim, num_origins=n_origins, lr=lr,
                        schedule_epochs=25, ema_decay=0.9999)
    g = torch.Generator().manual_seed(2)
    centres = torch.randn(n_origins, task.embedder.feature_dim, generator=g)
    feats = {f"T{o}_{k}": centres[o] + 0.5 * torch.randn(task.embedder.feature_dim, generator=g)
             for o in range(n_origins) for k in range(per_origin)}
    task._cache = dict(feats)  # features are precomputed upstream too (preprocessor.py:41)
    batches = []  # 2 origins x 4 instances per batch, as --num-instances 4
    for pair in [(0, 1), (2, 3), (4, 5), (1, 4), (3, 0), (5, 2)]:
        keys = [f"T{o}_{k}" for o in pair for k in range(per_origin)]
        batches.append({"image": torch.empty(0), "key": keys,
                        "label": torch.tensor([int(k[1]) for k in keys])})

    port = _PortVisionTransformer(dim, n_origins, task.embedder.feature_dim)
    with torch.no_grad():  # same initial weights on both sides
        port.base[0].fc1.weight.copy_(task.projection.weight)
        port.classifier.weight.copy_(task.classifier.weight)
    iters = len(batches)  # an epoch = the 6 batches in order, on both sides
    ema, port_lrs = _port_train(port, [([feats[k] for k in b["key"]], b["label"]) for b in batches],
                                epochs, iters, lr, n_origins)

    recorder = _LearningRates()
    trainer = Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder])
    trainer.fit(task, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))  # same order
    assert recorder.lrs == pytest.approx(port_lrs, rel=1e-9)
    assert port_lrs[0] == pytest.approx(0.01 * lr) and port_lrs[7] == pytest.approx(lr)
    torch.testing.assert_close(task.projection.weight, port.base[0].fc1.weight, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(task.ema_projection, ema.shadow_params[0], rtol=1e-4, atol=1e-6)
    assert int(task.ema_updates) == ema.num_updates == epochs * iters
    assert not torch.allclose(task.projection.weight, task.ema_projection)  # the EMA is not a copy


def _query_gallery(seed, ties):
    g = torch.Generator().manual_seed(seed)
    if ties:  # one-hot embeddings: every similarity is exactly 0 or 1 (distance 2 or 0), ties everywhere
        q_lab, g_lab = torch.randint(0, 3, (12,), generator=g), torch.randint(0, 3, (20,), generator=g)
        q = F.one_hot(torch.randint(0, 4, (12,), generator=g), 4).float()
        gal = F.one_hot(torch.randint(0, 4, (20,), generator=g), 4).float()
        gal[g_lab == 0] = F.one_hot(torch.tensor(0), 4).float()
    else:
        q_lab, g_lab = torch.arange(10) % 7, torch.arange(7)
        gal = torch.randn(7, 6, generator=g)
        q = gal[q_lab] + 0.8 * torch.randn(10, 6, generator=g)
    return F.normalize(q, dim=1), q_lab, F.normalize(gal, dim=1), g_lab


@pytest.mark.parametrize("ties", [False, True])
def test_retrieval_metrics_match_the_released_evaluator(ties):
    """mAP = ranking.py mean_ap (sklearn AP on -squared distance) with and without exact ties, for any gallery
    order; Acc@1 = cmc top-1 where there are no ties (under ties the released cmc depends on np.argsort's order,
    diffperc counts the expected top-1: see diffperc/retrieval/metrics.py)."""
    q, q_lab, gal, g_lab = _query_gallery(3, ties)
    distmat = _port_pairwise_distance(q, gal)
    m = retrieval_metrics(q, q_lab, gal, g_lab)
    assert m["mAP"] == pytest.approx(_port_mean_ap(distmat, q_lab, g_lab), abs=1e-6)
    perm = torch.randperm(len(gal), generator=torch.Generator().manual_seed(4))
    assert retrieval_metrics(q, q_lab, gal[perm], g_lab[perm])["mAP"] == pytest.approx(m["mAP"], abs=1e-7)
    if not ties:
        assert m["acc1"] == pytest.approx(_port_cmc_top1(distmat, q_lab, g_lab))
    else:
        assert 0 < m["mAP"] < 1 and (distmat.unique().numel() <= 2)
