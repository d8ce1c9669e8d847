"""Real check of the MLLM path on the bundled digits model: a tiny LLaVA answering questions about held-out digits.

A tiny random Llama (word-level tokenizer) and the LLaVA-1.5 mlp2x_gelu projector are trained jointly,
in LLaVA's vicuna_v1 format, on digits 0-1499 (sklearn), and evaluated by greedy generation on the
held-out digits 1500-1796 with three questions: "which digit is this ?", "is it a {w} ?" (w the true
digit for half of the images), "is the digit even ?". Visual tokens (16 per image) come from:

  (a) diffusion features without a prompt: the bundled UNet at Mustafar's tap
      up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_q, t=50, 8x8 map pooled to 4x4;
  (b) the same conditioned on the question (Mustafar), guidance scale s = 1 and s = 4;
  (c) raw 8x8 pixel patches (no encoder).

Leakage (same setup, captioning "describe the digit ." -> "a photo of the digit seven"): models trained
with the true caption as the diffusion prompt, with caption dropout 0.5, or with no prompt (Mustafar's
no-prompt pre-training) are conditioned at test time on the caption of another digit; we count how often
the generated caption repeats it. A linear probe recovers the prompt's digit from pooled visual tokens.

Features are extracted once (latents and noise fixed per image; f_s = f("") + s (f(q) - f("")) as
DiffusionTower computes it). Run (a few CPU minutes):

    OMP_NUM_THREADS=1 python scripts/mllm_digits.py --out mllm_digits.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from diffperc.data.digits import CLASS_WORDS, caption, load
from diffperc.mllm.encoder import VisionEncoder
from diffperc.mllm.leakage import mismatched, prompt_probe, repetition_rates
from diffperc.mllm.model import LlavaModel, tiny_llama
from diffperc.mllm.towers import MUSTAFAR_TAP, DiffusionTower, PixelPatchTower

WHICH, EVEN, DESCRIBE = "which digit is this ?", "is the digit even ?", "describe the digit ."


def is_a(w: str) -> str:
    return f"is it a {w} ?"


PROMPTS = ["", WHICH, EVEN, *(is_a(w) for w in CLASS_WORDS), *(caption(i) for i in range(10))]


@torch.no_grad()
def extract(tower: DiffusionTower, images: torch.Tensor, batch: int = 600, seed: int = 0) -> torch.Tensor:
    """(P, N, C, 4, 4) features of every image under every prompt of PROMPTS (s = 1), fixed noise per image."""
    bb = tower.backbone
    g = torch.Generator().manual_seed(seed)
    latents = torch.cat([bb.encode_images(images[i : i + batch]) for i in range(0, len(images), batch)])
    noise = torch.randn(latents.shape, generator=g)
    out = []
    for p in PROMPTS:
        feats = [bb(latents=latents[i : i + batch], prompts=p, noise=noise[i : i + batch]).features[0]
                 for i in range(0, len(images), batch)]
        out.append(torch.nn.functional.avg_pool2d(torch.cat(feats), tower.pool))
    return torch.stack(out)


def guided(feats: torch.Tensor, prompt_idx: torch.Tensor, images: torch.Tensor, s: float) -> torch.Tensor:
    """f("") + s (f(q) - f("")) for image i under prompt prompt_idx[i]: (B, C, h, w)."""
    f0, fq = feats[0, images], feats[prompt_idx, images]
    return f0 + s * (fq - f0)


def qa(indices: torch.Tensor, labels: torch.Tensor, g: torch.Generator) -> list[tuple[str, str]]:
    """For each image, a random question type and its answer (is-it-a: true digit half the time)."""
    out = []
    kinds = torch.randint(0, 3, (len(indices),), generator=g).tolist()
    for i, k in zip(indices.tolist(), kinds, strict=True):
        y = int(labels[i])
        if k == 0:
            out.append((WHICH, CLASS_WORDS[y]))
        elif k == 1:
            w = y if torch.rand(1, generator=g).item() < 0.5 else (y + int(torch.randint(1, 10, (1,), generator=g))) % 10
            out.append((is_a(CLASS_WORDS[w]), "yes" if w == y else "no"))
        else:
            out.append((EVEN, "yes" if y % 2 == 0 else "no"))
    return out


def new_model(in_channels: int, hidden: int, seed: int) -> LlavaModel:
    words = [*CLASS_WORDS, *"yes no which digit is this it a the even describe photo of".split()]
    lm, tok = tiny_llama(words, hidden_size=hidden, layers=2, heads=4, seed=seed)
    tower = PixelPatchTower(8)  # only its out_channels matter here: tokens are given precomputed
    tower.out_channels = in_channels
    torch.manual_seed(seed)
    return LlavaModel(VisionEncoder(hidden, tower), lm, tok)


def tokens(model: LlavaModel, maps: torch.Tensor) -> torch.Tensor:
    return model.encoder.projector(maps.float().flatten(2).transpose(1, 2))


def train(model: LlavaModel, visual, samples, steps: int, batch: int, lr: float, seed: int) -> float:
    """visual(idx, prompts) -> maps; samples(idx, g) -> [(question, answer, prompt)]. Returns the last loss."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    model.train()
    loss = torch.tensor(0.0)
    for _ in range(steps):
        idx = torch.randint(0, HELD, (batch,), generator=g)
        items = samples(idx, g)
        convs = [[{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}] for q, a, _ in items]
        loss = model(None, convs, image_tokens=tokens(model, visual(idx, [p for *_, p in items])))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return float(loss)


@torch.no_grad()
def answer(model: LlavaModel, visual, idx: torch.Tensor, questions: list[str], prompts: list[str],
           max_new_tokens: int = 2) -> list[str]:
    model.eval()
    return model.generate(None, questions, image_tokens=tokens(model, visual(idx, prompts)),
                          max_new_tokens=max_new_tokens)


HELD = 1500


def run(n_train_steps: int = 1500, batch: int = 64, hidden: int = 64, lr: float = 3e-3, heldout: int | None = None,
        seed: int = 0, log=print) -> dict:
    t0 = time.time()
    tr_img, tr_lab = load("train")
    te_img, te_lab = load("heldout")
    if heldout:
        te_img, te_lab = te_img[:heldout], te_lab[:heldout]
    images, labels = torch.cat([tr_img, te_img]), torch.cat([tr_lab, te_lab])
    n_te = len(te_lab)
    te = torch.arange(HELD, HELD + n_te)
    tower = DiffusionTower("digits", layer=MUSTAFAR_TAP, timestep=50, image_size=None, pool=2)
    feats = extract(tower, images, seed=seed)  # (P, N, C, 4, 4)
    pix = PixelPatchTower(8)(images)  # (N, 192, 4, 4)
    log(f"features {tuple(feats.shape)} in {time.time() - t0:.0f} s")
    pid = {p: i for i, p in enumerate(PROMPTS)}
    res: dict = {"setup": {"train_steps": n_train_steps, "batch": batch, "hidden": hidden, "lr": lr, "heldout": n_te,
                           "tap": MUSTAFAR_TAP, "timestep": 50, "tokens": 16}}

    # ---------------- QA: (a) no prompt, (b) question prompt s=1 / s=4, (c) pixels
    test_qa = [item for k in range(3) for item in _all_types(te, labels, seed, k)]  # every type for every image
    variants = {
        "a_diffusion_no_prompt": lambda idx, ps: guided(feats, torch.zeros_like(idx), idx, 1.0),
        "b_question_prompt_s1": lambda idx, ps: guided(feats, torch.tensor([pid[p] for p in ps]), idx, 1.0),
        "b_question_prompt_s4": lambda idx, ps: guided(feats, torch.tensor([pid[p] for p in ps]), idx, 4.0),
        "c_pixel_patches": lambda idx, ps: pix[idx],
    }
    res["qa"] = {}
    for name, visual in variants.items():
        t1 = time.time()
        model = new_model(pix.shape[1] if name.startswith("c") else feats.shape[2], hidden, seed)
        loss = train(model, visual, lambda idx, g_: [(q, a, q) for q, a in qa(idx, labels, g_)],
                     n_train_steps, batch, lr, seed)
        idx = torch.cat([te] * 3)
        qs = [q for q, _ in test_qa]
        got = answer(model, visual, idx, qs, qs)
        acc = _per_type(got, test_qa, n_te)
        res["qa"][name] = {"final_train_loss": round(loss, 4), **acc, "seconds": round(time.time() - t1, 1)}
        log(f"{name}: {res['qa'][name]}")

    # ---------------- leakage: captioning with mismatched captions
    cap = [caption(int(y)) for y in labels]
    wrong = mismatched(labels, 10, seed=seed)
    cap_id = {caption(i): pid[caption(i)] for i in range(10)}
    res["leakage"] = {}
    mitigations = {"caption_prompt": 0.0, "caption_dropout_0.5": 0.5, "no_prompt_pretraining": 1.0}
    for name, drop in mitigations.items():
        t1 = time.time()
        model = new_model(feats.shape[2], hidden, seed)

        def samples(idx, g_, drop=drop):
            keep = torch.rand(len(idx), generator=g_) >= drop
            return [(DESCRIBE, cap[i], cap[i] if k else "") for i, k in zip(idx.tolist(), keep.tolist(), strict=True)]

        def visual(idx, ps):
            return guided(feats, torch.tensor([cap_id.get(p, 0) for p in ps]), idx, 1.0)

        train(model, visual, samples, n_train_steps // 2, batch, lr, seed)
        prompts_wrong = [caption(int(w)) for w in wrong[te]]
        out_wrong = answer(model, visual, te, [DESCRIBE] * n_te, prompts_wrong, max_new_tokens=8)
        out_none = answer(model, visual, te, [DESCRIBE] * n_te, [""] * n_te, max_new_tokens=8)
        true = [cap[i] for i in te.tolist()]
        res["leakage"][name] = {
            "mismatched_prompt": repetition_rates(out_wrong, prompts_wrong, true),
            "no_prompt": repetition_rates(out_none, prompts_wrong, true),
            "seconds": round(time.time() - t1, 1),
        }
        log(f"leakage {name}: {res['leakage'][name]}")

    # ---------------- linear probe: which caption conditioned the tokens?
    gp = torch.Generator().manual_seed(seed + 2)
    rand_cap = torch.randint(0, 10, (len(labels),), generator=gp)
    p_idx = torch.tensor([pid[caption(int(c))] for c in rand_cap])
    tr = torch.arange(HELD)
    res["probe"] = {}
    for s in (0.0, 1.0, 4.0):
        f = guided(feats, p_idx, torch.arange(len(labels)), s)
        res["probe"][f"s={s:g}"] = prompt_probe(f[tr], rand_cap[tr], f[te], rand_cap[te])
    log(f"probe: {res['probe']}")
    res["seconds"] = round(time.time() - t0, 1)
    return res


def _all_types(te: torch.Tensor, labels: torch.Tensor, seed: int, kind: int) -> list[tuple[str, str]]:
    """Held-out questions of one type, fixed: which / is-it-a (true digit for even positions) / even."""
    g = torch.Generator().manual_seed(seed + 10)
    out = []
    for j, i in enumerate(te.tolist()):
        y = int(labels[i])
        if kind == 0:
            out.append((WHICH, CLASS_WORDS[y]))
        elif kind == 1:
            w = y if j % 2 == 0 else (y + int(torch.randint(1, 10, (1,), generator=g))) % 10
            out.append((is_a(CLASS_WORDS[w]), "yes" if w == y else "no"))
        else:
            out.append((EVEN, "yes" if y % 2 == 0 else "no"))
    return out


def _per_type(got: list[str], items: list[tuple[str, str]], n: int) -> dict[str, float]:
    hit = [g.split(" ")[0] == a if g else False for g, (_, a) in zip(got, items, strict=True)]
    names = ("which_digit", "is_it_a", "is_even")
    acc = {names[k]: round(sum(hit[k * n : (k + 1) * n]) / n, 4) for k in range(3)}
    acc["mean"] = round(sum(hit) / len(hit), 4)
    return acc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=1500, help="training steps per QA model (leakage models: half)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    res = run(args.steps, args.batch, args.hidden, args.lr, seed=args.seed)
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        from diffperc._io import write_text_atomic

        write_text_atomic(args.out, text + "\n")


if __name__ == "__main__":
    main()
