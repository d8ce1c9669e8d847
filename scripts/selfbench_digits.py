"""Toy-scale check of Self-Bench's domain-gap finding on the bundled digits model (issue 14, item 6).

Jeong et al. (NeurIPS 2025 D&B) find diffusion classifiers discriminate best on images the model
generated itself (Self-Bench) and worse across a domain gap, and that learned timestep weights
recover part of it. Here: the bundled digits model generates its own Self-Bench (one prompt per
digit, its training caption, CFG 9.0 as released, seeded, cached), the same classifier (10 captions,
30 released timesteps, shared noise, L2-norm error as the released default) is run on it and on the
297 held-out real digits (sklearn digits 1500-1796), and timestep weights fitted on 20 real digits
(no new UNet calls: the saved per-timestep errors) are evaluated on the other 277 and on Self-Bench.

    OMP_NUM_THREADS=1 python scripts/selfbench_digits.py --out /tmp/selfbench_digits

Writes <out>/9.0/digits/... (the Self-Bench in the released layout), <out>/errors_{real,selfbench}.pt
(error banks), <out>/summary.md (the table) and <out>/selfbench_grid.png (the generated digits).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from diffperc.backbones.registry import load_backbone
from diffperc.data import digits
from diffperc.data.compositional import CompositionalDataset, load_selfbench
from diffperc.zeroshot.classifier import DiffusionClassifier, default_template
from diffperc.zeroshot.compositional import ErrorBank, task_metrics
from diffperc.zeroshot.compositional_selfbench import generate_selfbench
from diffperc.zeroshot.compositional_weights import choice_accuracy, fit_timestep_weights
from diffperc.zeroshot.flow import RELEASED_START_SD, released_grid


def errors_of(clf: DiffusionClassifier, images: torch.Tensor, timesteps: torch.Tensor, chunk: int) -> torch.Tensor:
    """(N, K, S) per-timestep errors, ``chunk`` images at a time."""
    from tqdm.auto import tqdm

    out = [clf.pair_errors(images[i : i + chunk], timesteps=timesteps)
           for i in tqdm(range(0, len(images), chunk), desc="scoring", unit="chunk")]
    return torch.cat(out)


def bank_of(errors: torch.Tensor, labels: torch.Tensor, timesteps: torch.Tensor, name: str) -> ErrorBank:
    bank = ErrorBank(info={"set": name})
    for i, (e, y) in enumerate(zip(errors, labels, strict=True)):
        bank.add(e[:, None], None, int(y), "text", name, str(i), timesteps)
    return bank


def grid_png(images: torch.Tensor, path: Path, per_row: int) -> None:
    from PIL import Image

    n, _, h, w = images.shape
    rows = (n + per_row - 1) // per_row
    canvas = torch.zeros(3, rows * h, per_row * w)
    for i, im in enumerate(images):
        r, c = divmod(i, per_row)
        canvas[:, r * h : (r + 1) * h, c * w : (c + 1) * w] = im
    arr = (canvas.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()
    Image.fromarray(arr).resize((per_row * w * 3, rows * h * 3), Image.NEAREST).save(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("selfbench_digits"))
    p.add_argument("--model", default="digits", help="preset or diffusers folder (default: the bundled digits model)")
    p.add_argument("--per-digit", type=int, default=10, help="Self-Bench images per digit prompt")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps of the generation")
    p.add_argument("--cfg", type=float, default=9.0, help="guidance scale (9.0 as released)")
    p.add_argument("--fit", type=int, default=20, help="real digits the timestep weights are fitted on")
    p.add_argument("--real", type=int, default=297, help="held-out real digits scored (a seeded subset; 297 = all)")
    p.add_argument("--loss", default="l2_norm", choices=["l2_norm", "l2"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk", type=int, default=30, help="images per classifier call (x 10 captions x 30 timesteps)")
    a = p.parse_args()
    t0 = time.time()
    bb = load_backbone(a.model)
    template = default_template(bb)
    prompts = [template.format(w) for w in digits.CLASS_WORDS]
    meta = [{"tag": "digit", "prompt": pr, "include": [{"class": w, "count": 1}]}
            for pr, w in zip(prompts, digits.CLASS_WORDS, strict=True)]
    generate_selfbench(bb, meta, a.out, "digits", {"digit": prompts}, guidance_scale=a.cfg, n_samples=a.per_digit,
                       num_inference_steps=a.steps, image_size=digits.IMAGE_SIZE, seed=a.seed)
    t_gen = time.time() - t0
    items = load_selfbench(a.out, subtask="digit", model="digits", cfg=a.cfg)
    ds = CompositionalDataset(items, digits.IMAGE_SIZE)
    sb_images = torch.cat([ds[i]["images"] for i in range(len(ds))])
    sb_labels = torch.tensor([it.label for it in items])
    grid_png(sb_images, a.out / "selfbench_grid.png", a.per_digit)
    real_images, real_labels = digits.load("heldout")
    if a.real < len(real_images):
        keep = torch.randperm(len(real_images), generator=torch.Generator().manual_seed(a.seed + 1))[: a.real].sort().values
        real_images, real_labels = real_images[keep], real_labels[keep]

    clf = DiffusionClassifier(bb, prompts, schedule=[(30, 1)], loss=a.loss, seed=a.seed, batch_size=300)
    ts = released_grid(30, clf.num_train_timesteps, RELEASED_START_SD)
    real = errors_of(clf, real_images, ts, a.chunk)
    sb = errors_of(clf, sb_images, ts, a.chunk)
    bank_of(real, real_labels, ts, "real").save(a.out / "errors_real.pt")
    bank_of(sb, sb_labels, ts, "selfbench").save(a.out / "errors_selfbench.pt")
    t_score = time.time() - t0 - t_gen

    perm = torch.randperm(len(real), generator=torch.Generator().manual_seed(a.seed))
    fit_idx, held_idx = perm[: a.fit], perm[a.fit :]
    auto = fit_timestep_weights(real[fit_idx], real_labels[fit_idx], ts, mode="auto")
    free = fit_timestep_weights(real[fit_idx], real_labels[fit_idx], ts, mode="per_timestep", l2=1.0)
    fits = {"uniform": None, f"learned on {a.fit} real, auto ({auto.mode}, degree {auto.degree})": auto,
            f"learned on {a.fit} real, 30 free weights + L2 (l2=1)": free}
    rows = [f"| weights | real held-out (N={len(held_idx)}) | Self-Bench (N={len(sb)}) | gap (Self-Bench - real) |",
            "|---|---|---|---|"]
    for name, fit in fits.items():
        w = None if fit is None else fit.weights
        acc_r = choice_accuracy(real[held_idx], real_labels[held_idx], w)
        acc_s = choice_accuracy(sb, sb_labels, w)
        rows.append(f"| {name} | {acc_r:.1f} | {acc_s:.1f} | {acc_s - acc_r:+.1f} |")
    all_real = task_metrics(bank_of(real, real_labels, ts, "real"))["all"]["acc"]
    all_sb = task_metrics(bank_of(sb, sb_labels, ts, "selfbench"))["all"]["acc"]
    text = "\n".join([
        f"uniform weights on the {len(real)} real held-out digits: {all_real:.1f} %; on the {len(sb)} Self-Bench "
        f"images: {all_sb:.1f} % (gap {all_sb - all_real:+.1f} points)", "", *rows, "",
        f"auto fit: {auto.note}; fit-set accuracy {auto.fit_accuracy_uniform:.1f} -> {auto.fit_accuracy:.1f} %",
        "weights (auto, mean 1, timesteps " + ", ".join(str(int(t)) for t in ts[::6]) + ", ...): "
        + ", ".join(f"{v:.2f}" for v in auto.weights[::6].tolist()),
        f"time: generation {t_gen:.0f} s, scoring {t_score:.0f} s ({len(real) + len(sb)} images x 10 captions x 30 "
        f"timesteps), loss {a.loss}, CFG {a.cfg}, {a.steps} DDIM steps, seed {a.seed}"])
    (a.out / "summary.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
