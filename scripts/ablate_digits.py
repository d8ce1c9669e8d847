"""Why was the v1 digits model weak? Train each suspect alone for a few minutes and score it.

Arms: v1's recipe, v2's recipe, and v2 with one of v1's choices put back each (cross-attention
at one level, batch 64, caption variants, the BPE tokenizer, EMA without warm-up, two layers per
block), plus v2 with
DDPM's linear betas instead of SD's scaled-linear ones (the terminal-SNR suspect). Starting from
the good recipe makes each choice's cost visible in a short run; 500 steps of v1 itself learn
almost nothing (22 % zero-shot, samples at chance), so one-change-from-v1 arms cannot rank. Each trains ``--steps`` UNet steps from one seed on
images 0-1199 with one VAE shared by all arms; scores come from images 1200-1499, so the
held-out digits 1500-1796 are never looked at while choosing the recipe:

- zero-shot naive classification, ``--pairs`` timesteps evenly spaced over [0, T);
- 10 samples per digit (guidance 3, DDIM 25 steps) read by a pixel logistic regression;
- the signal left at t = 999: sqrt(alpha_bar_999) and a logistic regression on x_999 latents.

Rows are written to ``--out`` (JSON) after every arm, and arms already there are skipped, so
an interrupted run resumes. ``scripts/eval_digits.py`` puts the table in the model card.

    python scripts/ablate_digits.py --out checkpoints/digits/ablation.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import eval_digits as ev  # noqa: E402
import train_digits as td  # noqa: E402

from diffperc._io import write_text_atomic  # noqa: E402
from diffperc.data.digits import load  # noqa: E402

V1 = td.PRESETS["v1"]
V2 = td.PRESETS["v2"]
ARMS = [
    ("v1", "v1's recipe", V1),
    ("v2", "v2's recipe", V2),
    ("xattn1", "v2, cross-attention at the 8x8 level only (v1)", dataclasses.replace(V2, cross_attention_levels=1)),
    ("batch64", "v2, batch 64 (v1)", dataclasses.replace(V2, batch=64)),
    ("variants", "v2, caption variants (v1)", dataclasses.replace(V2, captions="variants")),
    ("bpe", "v2, BPE tokenizer with 8192 merges (v1)", dataclasses.replace(V2, tokenizer="bpe")),
    ("noemawarmup", "v2, EMA 0.999 without warm-up (v1)", dataclasses.replace(V2, ema_warmup=False)),
    ("lpb2", "v2, 2 layers per block (v1)", dataclasses.replace(V2, layers_per_block=2)),
    ("linear", "v2, DDPM linear betas 1e-4-0.02 instead of SD's scaled-linear", dataclasses.replace(V2, beta_schedule="linear")),
    ("shift1", "v2 + random 1-pixel shifts (augmentation)", dataclasses.replace(V2, shift=1)),
]
VAL = slice(1200, 1500)


def terminal_signal(recipe: td.Recipe, latents: torch.Tensor, labels: torch.Tensor, split: int) -> tuple[float, float]:
    """sqrt(alpha_bar) at t = 999 and a logistic regression's accuracy reading the class from x_999."""
    from sklearn.linear_model import LogisticRegression

    abar = td.make_scheduler(recipe).alphas_cumprod[-1]
    g = torch.Generator().manual_seed(0)
    xt = abar.sqrt() * latents + (1 - abar).sqrt() * torch.randn(latents.shape, generator=g)
    x = xt.flatten(1).numpy()
    clf = LogisticRegression(max_iter=2000, C=0.1).fit(x[:split], labels[:split].numpy())
    return float(abar.sqrt()), float(clf.score(x[split:], labels[split:].numpy()))


def run_arm(name: str, recipe: td.Recipe, vae, data: dict, pairs: int, seed: int) -> dict:
    t0 = time.time()
    parts = td.train(recipe, data["train_x"], data["train_y"], seed=seed, vae=vae)
    errors = ev.zero_shot_errors(parts, data["val_x"], pairs)
    zs = ev.accuracy_from_errors(errors, data["val_y"])
    samples = ev.sample(parts, per_class=10, steps=25, guidance=3.0, seed=seed)
    rec = float(ev.recognised(data["pixel_clf"], samples).mean())
    lat = td.encode_all(vae, torch.cat([data["train_x"], data["val_x"]])) * vae.config.scaling_factor
    signal, probe = terminal_signal(recipe, lat, torch.cat([data["train_y"], data["val_y"]]), len(data["train_x"]))
    row = {"arm": name, "recipe": dataclasses.asdict(recipe), "s_per_step": parts["s_per_step"], "zero_shot": zs,
           "samples": rec, "terminal_signal": signal, "terminal_probe": probe, "minutes": (time.time() - t0) / 60}
    print(f"[ablation] {name}: zero-shot {zs:.3f}, samples {rec:.2f}, sqrt(abar_T) {signal:.4f}, "
          f"x_T probe {probe:.3f}, {row['minutes']:.1f} min", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("checkpoints/digits/ablation.json"))
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--arms", nargs="*", default=None, help=f"subset of {[a for a, _, _ in ARMS]}")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    images, labels = load("train")  # 0-1499; the held-out digits are not loaded at all
    data = {"train_x": images[:1200], "train_y": labels[:1200], "val_x": images[VAL], "val_y": labels[VAL]}
    data["pixel_clf"], pixel_acc = ev.pixel_classifier((data["train_x"], data["train_y"]), (data["val_x"], data["val_y"]))
    done = json.loads(args.out.read_text()) if args.out.exists() else {}
    if done and (done.get("steps"), done.get("pairs")) != (args.steps, args.pairs):
        raise SystemExit(f"{args.out} holds a run with steps={done.get('steps')} pairs={done.get('pairs')}; "
                         "pass the same settings to resume, or another --out")
    rows = {r["arm"]: r for r in done.get("rows", [])}
    torch.manual_seed(args.seed)
    vae = td.train_vae(data["train_x"], V1.vae_steps)
    for name, change, recipe in ARMS:
        if (args.arms and name not in args.arms) or name in rows:
            continue
        recipe = dataclasses.replace(recipe, unet_steps=args.steps)
        if not recipe.ema_warmup:  # leave the share of initial weights v1 ended with: 0.999^2400 = 9.1 %
            recipe = dataclasses.replace(recipe, ema=round(V1.ema ** (V1.unet_steps / args.steps), 6))
        rows[name] = dict(run_arm(name, recipe, vae, data, args.pairs, args.seed), change=change)
        order = [a for a, _, _ in ARMS if a in rows]
        write_text_atomic(args.out, json.dumps({"steps": args.steps, "pairs": args.pairs, "pixel_classifier_val": pixel_acc,
                                                "rows": [rows[a] for a in order], "notes": done.get("notes", "")},
                                               indent=1) + "\n")
    print(ev._ablation_table([rows[a] for a, _, _ in ARMS if a in rows]))
    print(f"mean arm time {np.mean([r['minutes'] for r in rows.values()]):.1f} min")


if __name__ == "__main__":
    main()
