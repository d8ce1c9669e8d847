"""Real check of the MLLM path on the bundled digits model: a tiny LLaVA answering questions about held-out digits.

A tiny random Llama (word-level tokenizer) and the LLaVA-1.5 mlp2x_gelu projector are trained jointly,
in LLaVA's vicuna_v1 format, on ``--n-train`` digits drawn from 0-1499 (sklearn), and evaluated by
greedy generation on the held-out digits 1500-1796 with three questions: "which digit is this ?",
"is it a {w} ?" (w the true digit for half of the images, else one fixed wrong digit per image),
"is the digit even ?". Visual tokens (16 per image) come from:

  (a) diffusion features without a prompt: the UNet at ``--tap`` (Mustafar's
      up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_q), ``--timestep`` (50), 8x8 map pooled to 4x4;
  (b) the same conditioned on the question (Mustafar), guidance scale s = 1 and s = 4;
  (c) raw 8x8 pixel patches (no encoder).

Leakage (same setup, captioning "describe the digit ." -> "a photo of the digit seven"): models trained
with the true caption as the diffusion prompt, with caption dropout 0.5, or with no prompt (Mustafar's
no-prompt pre-training) are conditioned at test time on the caption of another digit; we count how often
the generated caption repeats it. A linear probe recovers the prompt's digit from pooled visual tokens.

Tokens are standardised per channel (mean / std of the training images' maps; pixel patches alike) before
the projector, as LLaVA's CLIP tokens come layer-normed: unstandardised (``--raw-tokens``) the tiny LM learnt
only the per-question answer prior in 1,500 steps on three of the four arms (which digit 0.101 on the v2
model; only s = 4 broke out), while 400 steps on standardised s = 4 tokens already read the digit (0.636).

Speed: only the images used are encoded, and each image runs the UNet only under the prompts it is
asked with (8 per image: "", the 3 question types with its own is-it-a words, its true, mismatched and
probe captions) instead of all 23; latents and noise are fixed per image; features go to an on-disk
:class:`~diffperc.feature_cache.FeatureCache` (``--cache``) keyed by model, tap, timestep, seed and
prompt, so a rerun skips the UNet. f_s = f("") + s (f(q) - f("")) as DiffusionTower computes it.

    python scripts/mllm_digits.py --n-train 300 --steps 400 --out mllm_digits.json --cache /tmp/mllm_cache
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch

from diffperc.data.digits import CLASS_WORDS, HELDOUT_START, caption, load
from diffperc.feature_cache import FeatureCache, text_key
from diffperc.mllm.encoder import VisionEncoder
from diffperc.mllm.leakage import mismatched, prompt_probe, repetition_rates
from diffperc.mllm.model import LlavaModel, tiny_llama
from diffperc.mllm.towers import MUSTAFAR_TAP, DiffusionTower, PixelPatchTower

WHICH, EVEN, DESCRIBE = "which digit is this ?", "is the digit even ?", "describe the digit ."
ARMS = ("a_diffusion_no_prompt", "b_question_prompt_s1", "b_question_prompt_s4", "c_pixel_patches")
MITIGATIONS = {"caption_prompt": 0.0, "caption_dropout_0.5": 0.5, "no_prompt_pretraining": 1.0}


def is_a(w: str) -> str:
    return f"is it a {w} ?"


class Setup:
    """The images used (train positions first, then held-out), their labels and fixed per-image choices."""

    def __init__(self, n_train: int, heldout: int | None, seed: int, captions: bool = True) -> None:
        self.captions = captions  # False: no leakage runs, so no caption prompts to extract
        tr_img, tr_lab = load("train")
        te_img, te_lab = load("heldout")
        g = torch.Generator().manual_seed(seed)
        pick = torch.randperm(len(tr_lab), generator=g)[:n_train].sort().values
        n_te = len(te_lab) if heldout is None else min(heldout, len(te_lab))
        self.images = torch.cat([tr_img[pick], te_img[:n_te]])  # (N, 3, 32, 32)
        self.labels = torch.cat([tr_lab[pick], te_lab[:n_te]])
        self.source = torch.cat([pick, torch.arange(HELDOUT_START, HELDOUT_START + n_te)])  # sklearn index
        self.train, self.test = torch.arange(len(pick)), torch.arange(len(pick), len(pick) + n_te)
        self.wrong_word = mismatched(self.labels, 10, seed=seed + 1)  # the is-it-a distractor of each image
        self.wrong_caption = mismatched(self.labels, 10, seed=seed)  # leakage test prompt
        self.probe_caption = torch.randint(0, 10, (len(self.labels),), generator=g)  # independent of the digit

    def prompts_of(self, i: int) -> list[str]:
        y = int(self.labels[i])
        caps = {y, int(self.wrong_caption[i]), int(self.probe_caption[i])} if self.captions else set()
        return ["", WHICH, EVEN, is_a(CLASS_WORDS[y]), is_a(CLASS_WORDS[int(self.wrong_word[i])]),
                *(caption(c) for c in sorted(caps))]


class Features:
    """Pooled tower features f(prompt) of the setup's images, extracted once per (prompt, image) needed."""

    def __init__(self, setup: Setup, model: str, tap: str, timestep: int, seed: int, cache: Path | None,
                 batch: int = 512, log=print) -> None:
        self.tower = DiffusionTower(model, layer=tap, timestep=timestep, image_size=None, pool=2)
        need: dict[str, list[int]] = defaultdict(list)
        for i in range(len(setup.labels)):
            for p in setup.prompts_of(i):
                need[p].append(i)
        self.calls = sum(len(v) for v in need.values())
        self.seed = seed
        self._latents: torch.Tensor | None = None
        self._noise: torch.Tensor | None = None
        self.slot: dict[tuple[str, int], int] = {}
        chunks = []
        store = FeatureCache(cache, {"model": str(model), "tap": tap, "timestep": timestep, "seed": seed, "pool": 2,
                                     "script": "mllm_digits"}, "mllm_digits") if cache else None
        for p, idx in need.items():
            idx_t = torch.tensor(idx)
            item = text_key(p + "|" + ",".join(map(str, setup.source[idx_t].tolist())))
            got = store.load(item) if store else None
            if got is None:
                f = self._extract(setup, idx_t, p, batch)
                if store:
                    store.save(item, {"features": f})
            else:
                f = got["features"]
            for j, i in enumerate(idx):
                self.slot[(p, i)] = sum(len(c) for c in chunks) + j
            chunks.append(f)
        self.table = torch.cat(chunks)  # (slots, C, 4, 4)
        self.hits = store.hits if store else 0
        log(f"features: {len(need)} prompts, {self.calls} (prompt, image) UNet inputs, cache hits {self.hits}/{len(need)}")

    @torch.no_grad()
    def _extract(self, setup: Setup, idx: torch.Tensor, prompt: str, batch: int) -> torch.Tensor:
        bb = self.tower.backbone
        if self._latents is None:
            self._latents = torch.cat([bb.encode_images(setup.images[i : i + batch])
                                       for i in range(0, len(setup.images), batch)])
            # the noise of sklearn image k is the k-th draw, whatever subset is used
            g = torch.Generator().manual_seed(self.seed)
            self._noise = torch.randn((1797, *self._latents.shape[1:]), generator=g)
        lat, noise = self._latents[idx], self._noise[setup.source[idx]]
        out = [bb(latents=lat[i : i + batch], prompts=prompt, noise=noise[i : i + batch]).features[0]
               for i in range(0, len(idx), batch)]
        return torch.nn.functional.avg_pool2d(torch.cat(out), self.tower.pool)

    def standardize(self, train: torch.Tensor) -> None:
        """Per-channel z-score of every stored map with the mean / std of the training images' f(""): an affine
        map, so f("") + s (f(q) - f("")) of the standardised maps is the standardised guided map."""
        self.table = zscore(self.table, self.table[[self.slot[("", k)] for k in train.tolist()]])

    def guided(self, idx: torch.Tensor, prompts: list[str], s: float) -> torch.Tensor:
        """f("") + s (f(q) - f("")) for image idx[k] under prompts[k]: (B, C, 4, 4)."""
        i = idx.tolist()
        f0 = self.table[[self.slot[("", k)] for k in i]]
        if s == 0:
            return f0
        fq = self.table[[self.slot[(p, k)] for p, k in zip(prompts, i, strict=True)]]
        return f0 + s * (fq - f0)


def zscore(maps: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) maps z-scored per channel with the mean / std of ``ref`` (M, C, h, w)."""
    return (maps - ref.mean(dim=(0, 2, 3), keepdim=True)) / ref.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)


def qa_sample(setup: Setup, idx: torch.Tensor, g: torch.Generator) -> list[tuple[str, str, str]]:
    """A random question type per image: (question, answer, diffusion prompt = the question)."""
    out = []
    for i, k in zip(idx.tolist(), torch.randint(0, 3, (len(idx),), generator=g).tolist(), strict=True):
        y = int(setup.labels[i])
        if k == 0:
            q, a = WHICH, CLASS_WORDS[y]
        elif k == 1:
            w = y if torch.rand(1, generator=g).item() < 0.5 else int(setup.wrong_word[i])
            q, a = is_a(CLASS_WORDS[w]), "yes" if w == y else "no"
        else:
            q, a = EVEN, "yes" if y % 2 == 0 else "no"
        out.append((q, a, q))
    return out


def qa_test(setup: Setup) -> tuple[torch.Tensor, list[tuple[str, str]]]:
    """Every held-out image under each of the 3 question types (is-it-a true for even positions)."""
    items = []
    for kind in range(3):
        for j, i in enumerate(setup.test.tolist()):
            y = int(setup.labels[i])
            if kind == 0:
                items.append((WHICH, CLASS_WORDS[y]))
            elif kind == 1:
                w = y if j % 2 == 0 else int(setup.wrong_word[i])
                items.append((is_a(CLASS_WORDS[w]), "yes" if w == y else "no"))
            else:
                items.append((EVEN, "yes" if y % 2 == 0 else "no"))
    return torch.cat([setup.test] * 3), items


def new_model(in_channels: int, hidden: int, seed: int) -> LlavaModel:
    words = [*CLASS_WORDS, *"yes no which digit is this it a the even describe photo of".split()]
    lm, tok = tiny_llama(words, hidden_size=hidden, layers=2, heads=4, seed=seed)
    tower = PixelPatchTower(8)  # only its out_channels matter here: tokens are given precomputed
    tower.out_channels = in_channels
    torch.manual_seed(seed)
    return LlavaModel(VisionEncoder(hidden, tower), lm, tok)


def tokens(model: LlavaModel, maps: torch.Tensor) -> torch.Tensor:
    return model.encoder.projector(maps.float().flatten(2).transpose(1, 2))


def train(model: LlavaModel, visual, samples, pool: torch.Tensor, steps: int, batch: int, lr: float, seed: int) -> float:
    """visual(idx, prompts) -> maps; samples(idx, g) -> [(question, answer, prompt)]. Returns the last loss."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1),
                                                pct_start=min(0.5, max(0.05, 3 / max(steps, 1))))
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        idx = pool[torch.randint(0, len(pool), (batch,), generator=g)]
        items = samples(idx, g)
        convs = [[{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}] for q, a, _ in items]
        loss = model(None, convs, image_tokens=tokens(model, visual(idx, [p for *_, p in items])))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return float(loss.detach())


@torch.no_grad()
def answer(model: LlavaModel, visual, idx: torch.Tensor, questions: list[str], prompts: list[str],
           max_new_tokens: int = 2) -> list[str]:
    model.eval()
    return model.generate(None, questions, image_tokens=tokens(model, visual(idx, prompts)),
                          max_new_tokens=max_new_tokens)


def per_type(got: list[str], items: list[tuple[str, str]], n: int) -> dict[str, float]:
    hit = [g.split(" ")[0] == a if g else False for g, (_, a) in zip(got, items, strict=True)]
    names = ("which_digit", "is_it_a", "is_even")
    acc = {names[k]: round(sum(hit[k * n : (k + 1) * n]) / n, 4) for k in range(3)}
    acc["mean"] = round(sum(hit) / len(hit), 4)
    return acc


def run_qa(setup: Setup, feats: Features, pix: torch.Tensor, arms, steps, batch, hidden, lr, seed, log) -> dict:
    test_idx, test_items = qa_test(setup)
    qs = [q for q, _ in test_items]
    visuals = {
        "a_diffusion_no_prompt": lambda idx, ps: feats.guided(idx, ps, 0.0),
        "b_question_prompt_s1": lambda idx, ps: feats.guided(idx, ps, 1.0),
        "b_question_prompt_s4": lambda idx, ps: feats.guided(idx, ps, 4.0),
        "c_pixel_patches": lambda idx, ps: pix[idx],
    }
    out = {}
    for name in arms:
        t1, visual = time.time(), visuals[name]
        model = new_model(pix.shape[1] if name.startswith("c") else feats.table.shape[1], hidden, seed)
        loss = train(model, visual, lambda idx, g: qa_sample(setup, idx, g), setup.train, steps, batch, lr, seed)
        got = answer(model, visual, test_idx, qs, qs)
        out[name] = {"final_train_loss": round(loss, 4), **per_type(got, test_items, len(setup.test)),
                     "seconds": round(time.time() - t1, 1)}
        log(f"{name}: {out[name]}")
    return out


def run_leakage(setup: Setup, feats: Features, steps, batch, hidden, lr, seed, log) -> dict:
    cap = [caption(int(y)) for y in setup.labels]
    te = setup.test
    out = {}
    for name, drop in MITIGATIONS.items():
        t1 = time.time()
        model = new_model(feats.table.shape[1], hidden, seed)

        def samples(idx, g, drop=drop):
            keep = torch.rand(len(idx), generator=g) >= drop
            return [(DESCRIBE, cap[i], cap[i] if k else "") for i, k in zip(idx.tolist(), keep.tolist(), strict=True)]

        def visual(idx, ps):
            return feats.guided(idx, ps, 1.0)

        train(model, visual, samples, setup.train, steps, batch, lr, seed)
        wrong = [caption(int(w)) for w in setup.wrong_caption[te]]
        true = [cap[i] for i in te.tolist()]
        out_wrong = answer(model, visual, te, [DESCRIBE] * len(te), wrong, max_new_tokens=8)
        out_none = answer(model, visual, te, [DESCRIBE] * len(te), [""] * len(te), max_new_tokens=8)
        out[name] = {"mismatched_prompt": repetition_rates(out_wrong, wrong, true),
                     "no_prompt": repetition_rates(out_none, wrong, true), "seconds": round(time.time() - t1, 1)}
        log(f"leakage {name}: {out[name]}")
    return out


def run_digit_probe(setup: Setup, feats: Features, pix: torch.Tensor) -> dict:
    """What each arm's tokens carry, without the LM: a linear probe of the digit (train -> held-out images)
    on the pooled tokens of (a) f(""), (b) f("which digit is this ?") at s = 1 and 4, (c) pixel patches."""
    idx = torch.arange(len(setup.labels))
    which = [WHICH] * len(idx)
    maps = {"a_diffusion_no_prompt": feats.guided(idx, which, 0.0),
            "b_question_prompt_s1": feats.guided(idx, which, 1.0),
            "b_question_prompt_s4": feats.guided(idx, which, 4.0), "c_pixel_patches": pix}
    y, tr, te = setup.labels, setup.train, setup.test
    return {k: prompt_probe(m[tr], y[tr], m[te], y[te]) for k, m in maps.items()}


def run_probe(setup: Setup, feats: Features, scales=(0.0, 1.0, 4.0)) -> dict:
    """Linear probe: which caption conditioned the tokens (train images -> held-out images)."""
    n = len(setup.labels)
    idx = torch.arange(n)
    ps = [caption(int(c)) for c in setup.probe_caption]
    y = setup.probe_caption
    out = {}
    for s in scales:
        f = feats.guided(idx, ps, s)
        out[f"s={s:g}"] = prompt_probe(f[setup.train], y[setup.train], f[setup.test], y[setup.test])
    return out


def run(model: str = "digits", tap: str = MUSTAFAR_TAP, timestep: int = 50, n_train: int = 600,
        heldout: int | None = None, steps: int = 1500, batch: int = 64, hidden: int = 64, lr: float = 3e-3,
        seed: int = 0, cache: Path | None = None, arms=ARMS, leakage: bool = True, leakage_lm: bool = True,
        standardize: bool = True, log=print) -> dict:
    t0 = time.time()
    setup = Setup(n_train, heldout, seed, captions=leakage)
    feats = Features(setup, model, tap, timestep, seed, cache, log=log)
    pix = PixelPatchTower(8)(setup.images)  # (N, 192, 4, 4)
    if standardize:  # every arm's tokens z-scored per channel on the training images (see the module docstring)
        feats.standardize(setup.train)
        pix = zscore(pix, pix[setup.train])
    t_feat = time.time() - t0
    res: dict = {"setup": {"model": model, "tap": tap, "timestep": timestep, "n_train": len(setup.train),
                           "heldout": len(setup.test), "train_steps": steps, "leakage_steps": steps // 2,
                           "batch": batch, "hidden": hidden, "lr": lr, "seed": seed, "tokens": 16,
                           "standardize": standardize,
                           "unet_inputs": feats.calls, "cache_hits": feats.hits, "feature_seconds": round(t_feat, 1)},
                 "chance": {"which_digit": 0.1, "is_it_a": 0.5,
                            "is_even": round(max(float((setup.labels[setup.test] % 2 == 0).float().mean()),
                                                 float((setup.labels[setup.test] % 2 == 1).float().mean())), 4)}}
    res["digit_probe"] = run_digit_probe(setup, feats, pix)
    log(f"digit probe: {res['digit_probe']}")
    res["qa"] = run_qa(setup, feats, pix, arms, steps, batch, hidden, lr, seed, log)
    if leakage:
        if leakage_lm:
            res["leakage"] = run_leakage(setup, feats, steps // 2, batch, hidden, lr, seed, log)
        res["probe"] = run_probe(setup, feats)
        log(f"probe: {res['probe']}")
    res["seconds"] = round(time.time() - t0, 1)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="digits", help="backbone preset or diffusers folder (default: bundled digits)")
    ap.add_argument("--tap", default=MUSTAFAR_TAP, help="UNet module whose output are the tokens")
    ap.add_argument("--timestep", type=int, default=50)
    ap.add_argument("--n-train", type=int, default=600, help="training digits drawn (seeded) from 0-1499")
    ap.add_argument("--heldout", type=int, default=None, help="use only the first N held-out digits (default all 297)")
    ap.add_argument("--steps", type=int, default=1500, help="training steps per QA model (leakage models: half)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", type=Path, default=None, help="feature cache folder (reruns skip the UNet)")
    ap.add_argument("--arms", default=",".join(ARMS), help="comma-separated QA arms to train ('none': only the features and the digit probe)")
    ap.add_argument("--raw-tokens", action="store_true",
                    help="feed the maps unstandardised (the LM then learnt only the answer prior in 1,500 steps)")
    ap.add_argument("--no-leakage", action="store_true", help="skip the leakage runs and the probe")
    ap.add_argument("--no-leakage-lm", action="store_true",
                    help="skip the captioning (LM) leakage runs, keep the linear prompt probe")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 is fastest for this tiny LM on a shared CPU)")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    arms = [a for a in args.arms.split(",") if a and a != "none"]
    bad = sorted(set(arms) - set(ARMS))
    if bad:
        ap.error(f"unknown --arms {bad}; choose from {list(ARMS)}")
    res = run(args.model, args.tap, args.timestep, args.n_train, args.heldout, args.steps, args.batch, args.hidden,
              args.lr, args.seed, args.cache, arms, not args.no_leakage, not args.no_leakage_lm, not args.raw_tokens)
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        from diffperc._io import write_text_atomic

        write_text_atomic(args.out, text + "\n")


if __name__ == "__main__":
    main()
