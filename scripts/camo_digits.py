"""The real check of the OVCIS head: camouflaged digit scenes, frozen bundled-model features vs baselines.

Scenes (64 x 64): a smooth random colour texture as background; 1-3 sklearn digits (training
digits 0-1499 for training scenes, held-out digits 1500-1796 for test scenes) pasted in distinct
quadrants (jitter +-4 px, a later digit occludes an earlier one); each digit's strokes (ink > 0.5 of
the upsampled 32 px digit: the mask is exact by construction) carry *another sample of the same
texture*, brightened by ``contrast`` (0 = only the texture's seams give the digit away). Instances
smaller than 20 pixels are dropped.

The same small OVCIS head (MSFF + Mask2Former + CIN + TVA, class-agnostic: one class "digit",
no-object = the "background" prompt, both embedded by the bundled model's CLIP text encoder) is
trained on three frozen feature sources, features computed once per scene and cached:
- ``digits``: the bundled model's UNet ("vpd" taps: 1/8 and 1/4, t = 0, clean latents);
- ``random_unet``: the same architecture with the UNet re-initialised (PyTorch default init, seed 0;
  VAE and text encoder stay the bundled ones);
- ``pixels``: the raw image, space-to-depth to the same 1/4 and 1/8 grids (lossless).
Mask AP / AP50 / AP75 (COCOeval) on the test scenes, per contrast.

    python scripts/camo_digits.py                 # full: 2 contrasts x 3 sources (about 25 min on 2 busy cores)
    python scripts/camo_digits.py --quick         # a short version
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from diffperc._io import write_text_atomic
from diffperc.backbones.registry import load_backbone
from diffperc.data.digits import load as load_digits
from diffperc.heads.instance import OVCISHead
from diffperc.heads.mask2former import SetCriterion
from diffperc.metrics_instance import InstanceAP
from diffperc.tasks._text import class_embeddings
from diffperc.tasks.instance import image_instances, instance_overlay

SOURCES = ("digits", "random_unet", "pixels")


# ---------------------------------------------------------------------------- scenes
def _texture(rng: np.random.Generator, size: int, sigma: float = 1.5) -> np.ndarray:
    """(size, size) smooth noise, zero mean, unit std."""
    from scipy.ndimage import gaussian_filter

    t = gaussian_filter(rng.standard_normal((size, size)), sigma, mode="wrap")
    return (t - t.mean()) / (t.std() + 1e-8)


def camo_scenes(num: int, split: str, contrast: float, seed: int = 0, canvas: int = 64, max_digits: int = 3,
                jitter: int = 4, texture_std: float = 0.12) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Camouflage scenes of digits.

    Returns:
        images (num, 3, canvas, canvas) in [0, 1]; per scene ``masks`` (T, canvas, canvas) bool (disjoint)
        and ``labels`` (T,) digit classes.
    """
    digits, classes = load_digits(split)  # (N, 3, 32, 32)
    ink = digits[:, 0].numpy()
    side, half = ink.shape[-1], canvas // 2
    rng = np.random.default_rng(seed)
    images = torch.zeros(num, 3, canvas, canvas)
    targets = []
    for s in range(num):
        colour = rng.uniform(0.25, 0.75, 3)
        bg = colour[:, None, None] + texture_std * _texture(rng, canvas)[None] * rng.uniform(0.6, 1.4, (3, 1, 1))
        fg = colour[:, None, None] + texture_std * _texture(rng, canvas)[None] * rng.uniform(0.6, 1.4, (3, 1, 1))
        fg = fg + contrast * (1 if rng.random() < 0.5 else -1)
        owner = np.full((canvas, canvas), -1)
        k = int(rng.integers(1, max_digits + 1))
        labels = []
        for j, q in enumerate(rng.permutation(4)[:k]):
            idx = int(rng.integers(len(ink)))
            y = min(max(int(q // 2) * half + int(rng.integers(-jitter, jitter + 1)), 0), canvas - side)
            x = min(max(int(q % 2) * half + int(rng.integers(-jitter, jitter + 1)), 0), canvas - side)
            stroke = np.zeros((canvas, canvas), bool)
            stroke[y : y + side, x : x + side] = ink[idx] > 0.5
            owner[stroke] = j
            labels.append(int(classes[idx]))
        img = np.where(owner[None] >= 0, fg, bg)
        images[s] = torch.from_numpy(np.clip(img, 0, 1)).float()
        masks = [owner == j for j in range(k)]
        keep = [j for j in range(k) if masks[j].sum() >= 20]
        targets.append({"masks": torch.from_numpy(np.stack([masks[j] for j in keep])) if keep
                        else torch.zeros(0, canvas, canvas, dtype=torch.bool),
                        "labels": torch.tensor([labels[j] for j in keep], dtype=torch.long)})
    return images, targets


# ---------------------------------------------------------------------------- features
def backbones(source: str, model: str = "digits") -> Any:
    bb = load_backbone(model, layers="vpd", timestep=0, add_noise=False)
    if source == "random_unet":
        with torch.random.fork_rng():
            torch.manual_seed(0)
            for m in bb.unet.modules():
                if hasattr(m, "reset_parameters") and m is not bb.unet:
                    m.reset_parameters()
    return bb


@torch.no_grad()
def extract(source: str, images: torch.Tensor, bb: Any, batch: int = 64) -> list[torch.Tensor]:
    """Frozen features of every scene, once: one (N, C_i, h_i, w_i) tensor per level."""
    if source == "pixels":
        return [F.pixel_unshuffle(images, 8), F.pixel_unshuffle(images, 4)]  # 1/8 (192 ch), 1/4 (48 ch)
    chunks = [bb(images[i : i + batch]).features for i in range(0, len(images), batch)]
    return [torch.cat([c[j] for c in chunks]).float() for j in range(len(chunks[0]))]


def reductions(source: str, bb: Any) -> list[int]:
    return [8, 4] if source == "pixels" else bb.feature_info.reductions()


# ---------------------------------------------------------------------------- head
def make_head(channels: list[int], reds: list[int], text_dim: int, seed: int, args: argparse.Namespace) -> OVCISHead:
    torch.manual_seed(seed)
    return OVCISHead(channels, reds, text_dim, hidden_dim=args.hidden, mask_dim=args.hidden, num_queries=args.queries,
                     decoder_layers=args.decoder_layers, encoder_layers=args.encoder_layers, num_heads=4,
                     dim_feedforward=2 * args.hidden, encoder_feedforward_dim=2 * args.hidden)


def train_head(head: OVCISHead, feats: list[torch.Tensor], targets: list[dict[str, torch.Tensor]], text: torch.Tensor,
               bg: torch.Tensor, args: argparse.Namespace) -> list[float]:
    crit = SetCriterion(num_points=args.points)
    opt = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (1 - s / args.steps) ** 0.9)
    gen = torch.Generator().manual_seed(args.seed)
    n, losses = len(targets), []
    head.train()
    for _ in range(args.steps):
        idx = torch.randint(0, n, (args.batch,), generator=gen)
        out = head([f[idx] for f in feats], text, bg)
        tg = [{"labels": torch.zeros(len(targets[i]["labels"]), dtype=torch.long),
               "masks": targets[i]["masks"].float()} for i in idx.tolist()]
        loss, _ = crit(out, tg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    return losses


@torch.no_grad()
def evaluate(head: OVCISHead, feats: list[torch.Tensor], targets: list[dict[str, torch.Tensor]], text: torch.Tensor,
             bg: torch.Tensor, canvas: int) -> tuple[dict[str, float], list[dict[str, torch.Tensor]]]:
    head.eval()
    metric, preds = InstanceAP(1), []
    for i in range(0, len(targets), 32):
        out = head([f[i : i + 32] for f in feats], text, bg)
        for j, (cl, ml) in enumerate(zip(out["class_logits"][-1], out["mask_logits"][-1], strict=True)):
            p = image_instances(cl, ml, (canvas, canvas), (canvas, canvas), (canvas, canvas))
            t = targets[i + j]
            metric.update(p, {"masks": t["masks"], "labels": torch.zeros(len(t["labels"]), dtype=torch.long)})
            preds.append(p)
    return metric.compute(), preds


# ---------------------------------------------------------------------------- main
def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="digits", help="preset or diffusers folder whose UNet gives the 'digits' and "
                   "'random_unet' features (default: the bundled digits model)")
    p.add_argument("--contrasts", type=float, nargs="+", default=[0.3, 0.05])
    p.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES)
    p.add_argument("--train", type=int, default=400, help="training scenes")
    p.add_argument("--test", type=int, default=100, help="test scenes")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--points", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--queries", type=int, default=8)
    p.add_argument("--decoder-layers", type=int, default=4)
    p.add_argument("--encoder-layers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="camo_digits_out")
    p.add_argument("--quick", action="store_true", help="short run: 200 train / 60 test scenes, 150 steps")
    args = p.parse_args(argv)
    if args.quick:
        args.train, args.test, args.steps = 200, 60, 150
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    torch.set_num_threads(1)
    out_dir = Path(args.out)
    canvas = 64
    models = {s: backbones(s, args.model) for s in args.sources if s != "pixels"}
    ref = models.get("digits") or backbones("digits", args.model)
    text = class_embeddings(ref.text_encoder, ref.tokenizer, ["digit"], ["a photo of the {}"], 32)
    bg = class_embeddings(ref.text_encoder, ref.tokenizer, ["background"], ["{}"], 32)[0]
    results: dict[str, dict[str, Any]] = {}
    examples = {}
    for c in args.contrasts:
        tr_img, tr_tg = camo_scenes(args.train, "train", c, seed=args.seed)
        te_img, te_tg = camo_scenes(args.test, "heldout", c, seed=args.seed + 1)
        for source in args.sources:
            t0, c0 = time.time(), time.process_time()
            bb = models.get(source)
            ftr, fte = extract(source, tr_img, bb), extract(source, te_img, bb)
            head = make_head([f.shape[1] for f in ftr], reductions(source, bb), text.shape[1], args.seed, args)
            losses = train_head(head, ftr, tr_tg, text, bg, args)
            scores, preds = evaluate(head, fte, te_tg, text, bg, canvas)
            key = f"{source}@{c:g}"
            results[key] = {**{k: round(v, 2) for k, v in scores.items()}, "final_loss": round(float(np.mean(losses[-20:])), 3),
                            "seconds": round(time.time() - t0, 1),
                            "cpu_seconds": round(time.process_time() - c0, 1)}
            examples[key] = preds[:4]
            print(f"contrast {c:g} {source:12s} AP {scores['ap']:.1f} AP50 {scores['ap50']:.1f} AP75 {scores['ap75']:.1f} "
                  f"loss {results[key]['final_loss']} ({results[key]['seconds']} s wall, {results[key]['cpu_seconds']} s CPU)",
                  flush=True)
            out_dir.mkdir(parents=True, exist_ok=True)  # partial results survive an interrupted run
            write_text_atomic(out_dir / "results.json", json.dumps({"args": vars(args), "results": results}, indent=1))
        examples[f"images@{c:g}"] = te_img[:4]
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "results.json", json.dumps({"args": vars(args), "results": results}, indent=1))
    _grid(examples, args, out_dir / "examples.png")
    print(table(results, args))
    return {"results": results, "args": vars(args)}


def table(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    lines = ["| contrast | features | AP | AP50 | AP75 |", "|---|---|---|---|---|"]
    for c in args.contrasts:
        for s in args.sources:
            r = results[f"{s}@{c:g}"]
            lines.append(f"| {c:g} | {s} | {r['ap']:.1f} | {r['ap50']:.1f} | {r['ap75']:.1f} |")
    return "\n".join(lines)


def _grid(examples: dict[str, Any], args: argparse.Namespace, path: Path) -> None:
    """Rows: per contrast the scenes, then each source's predicted instances (score >= 0.5)."""
    from diffperc import viz

    tiles = []
    for c in args.contrasts:
        imgs = examples[f"images@{c:g}"]
        tiles.append([viz.to_pil(im) for im in imgs])
        for s in args.sources:
            tiles.append([instance_overlay(im, p, ["digit"], 0.5) for im, p in zip(imgs, examples[f"{s}@{c:g}"],
                                                                                  strict=True)])
    w, h = tiles[0][0].size
    from PIL import Image

    sheet = Image.new("RGB", (w * len(tiles[0]), h * len(tiles)))
    for r, row in enumerate(tiles):
        for k, tile in enumerate(row):
            sheet.paste(tile, (k * w, r * h))
    viz.save_png(sheet.resize((sheet.width * 2, sheet.height * 2), Image.NEAREST), path)


if __name__ == "__main__":
    main(sys.argv[1:])
