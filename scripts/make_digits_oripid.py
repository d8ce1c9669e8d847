"""A small OriPID-style origin-identification check with the bundled digits model (ID², ICML 2025).

Wang et al., "Origin Identification for Text-Guided Image-to-Image Diffusion Models" (ICML 2025)
train a linear map W of VAE latents so that a text-guided image-to-image translation lands
near its origin. This script rebuilds that setting in miniature, with nothing downloaded:

1. Origins are scikit-learn digits. Queries are translations of them made by the bundled
   ``digits`` model itself (diffusers' StableDiffusionImg2ImgPipeline, DDIM, guidance 7.5), each
   prompted with *another* digit's caption ("a photo of the digit three" for a seven) at
   strength 0.3-0.7. Files are written in the OriPID/ID² naming (``R<id>.png`` origins,
   ``T<id>_<k>.png`` training translations, a ``query,origin_id`` CSV for the test queries).
2. W is trained with ``OriginIDTask`` (CosFace s=64 m=0.35, Adam, warm-up + cosine, EMA) on
   translations of training-split digits 0-699, with and without BatchNorm and at two
   learning rates; digits 700-799 are the validation set that picks one (by mAP).
3. Test: queries are translations of the 297 held-out digits (1500-1796, never seen by the
   diffusion model or W); the gallery is those 297 origins plus 700 distractor digits
   (800-1499). Acc@1 and mAP for the raw-VAE embedding and each W, overall and per strength,
   and Acc@1 of the selected W once more through ``diffperc index build``'s code and FAISS.

    python scripts/make_digits_oripid.py --out digits_oripid    # ~20 min on 2 busy CPU cores

Results and their reading: docs/origin_digits.md. Reruns reuse the images already written.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from diffperc.backbones.registry import bundled_model_path
from diffperc.data.digits import caption, load

TRAIN_STRENGTHS = (0.3, 0.4, 0.5, 0.6, 0.7)
TEST_STRENGTHS = (0.3, 0.5, 0.7)


def _save_png(image: torch.Tensor, path: Path) -> None:
    """(3, H, W) in [0, 1] -> PNG via a temp name and a rename."""
    array = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    tmp.replace(path)


def _jobs(indices: list[int], labels: torch.Tensor, strengths: tuple[float, ...], per_origin: int,
          rng: np.random.Generator, prefix: str) -> list[dict]:
    """One job per translation: origin index, k, strength, target digit (never the origin's own)."""
    jobs = []
    for idx in indices:
        for k in range(per_origin):
            strength = strengths[k % len(strengths)] if per_origin == len(strengths) else float(rng.choice(strengths))
            target = int(rng.choice([d for d in range(10) if d != int(labels[idx])]))
            jobs.append({"origin": idx, "k": k, "strength": strength, "target": target,
                         "name": f"{prefix}{idx:04d}_{k}.png"})
    return jobs


def _model_folder(model: str) -> Path:
    """The diffusers folder of ``model``: the bundled one for "digits", else the folder given."""
    if model == "digits":
        return bundled_model_path()
    folder = Path(model).expanduser()
    if not (folder / "model_index.json").exists():
        raise SystemExit(f"--model {model!r}: not 'digits' and no model_index.json there; pass a diffusers folder")
    return folder


@torch.no_grad()
def translate(jobs: list[dict], images: torch.Tensor, out_dir: Path, steps: int, guidance: float, seed: int,
              batch_size: int, model: str = "digits") -> None:
    """Run img2img for every job not on disk yet, batched by strength."""
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline

    todo = [j for j in jobs if not (out_dir / j["name"]).exists()]
    if not todo:
        return
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(_model_folder(model), torch_dtype=torch.float32,
                                                          safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(todo), desc=f"img2img -> {out_dir.name}", unit="img")
    for strength in sorted({j["strength"] for j in todo}):
        group = [j for j in todo if j["strength"] == strength]
        for start in range(0, len(group), batch_size):
            batch = group[start : start + batch_size]
            gen = torch.Generator().manual_seed(seed + batch[0]["origin"] * 10 + batch[0]["k"])
            result = pipe([caption(j["target"]) for j in batch], image=images[[j["origin"] for j in batch]],
                          strength=strength, num_inference_steps=steps, guidance_scale=guidance, generator=gen,
                          output_type="pt").images
            for j, img in zip(batch, result, strict=True):
                _save_png(img.cpu(), out_dir / j["name"])
            bar.update(len(batch))
    bar.close()


def make_dataset(out: Path, args: argparse.Namespace) -> dict[str, list[dict]]:
    """Write origins, translations and pairs CSVs under ``out`` (reuses files already there)."""
    train_images, train_labels = load("train")
    held_images, held_labels = load("heldout")
    images = torch.cat([train_images, held_images])  # index = digit number 0-1796
    labels = torch.cat([train_labels, held_labels])
    rng = np.random.default_rng(args.seed)
    fit_ids = list(range(0, 700))
    val_ids = list(range(700, 800))
    distractor_ids = list(range(800, 1500))
    test_ids = list(range(1500, len(images)))
    for folder, ids in (("origins_train", fit_ids + val_ids), ("origins_test", test_ids + distractor_ids)):
        (out / folder).mkdir(parents=True, exist_ok=True)
        for i in ids:
            if not (out / folder / f"R{i:04d}.png").exists():
                _save_png(images[i], out / folder / f"R{i:04d}.png")
    jobs = {"train": _jobs(fit_ids, labels, TRAIN_STRENGTHS, args.per_train, rng, "T"),
            "val": _jobs(val_ids, labels, TEST_STRENGTHS, len(TEST_STRENGTHS), rng, "Q"),
            "test": _jobs(test_ids, labels, TEST_STRENGTHS, len(TEST_STRENGTHS), rng, "Q")}
    for split, split_jobs in jobs.items():
        translate(split_jobs, images, out / split, args.steps, args.guidance, args.seed, args.batch_size, args.model)
        rows = [f"{split}/{j['name']},R{j['origin']:04d}" for j in split_jobs]
        (out / f"{split}_pairs.csv").write_text("query,origin_id\n" + "\n".join(rows) + "\n")
    (out / "jobs.json").write_text(json.dumps(jobs))
    return jobs


def train_projection(out: Path, args: argparse.Namespace, batch_norm: bool, lr: float) -> tuple[Path, dict]:
    """Fit OriginIDTask on the training translations; return the exported EMA W and its validation metrics.

    Validation = translations of origins 700-799 searched among the 800 training-split origins;
    it is the only thing used to choose between settings.
    """
    from lightning.pytorch import Trainer, seed_everything

    from diffperc.data.origin import OriginPairsDataModule
    from diffperc.tasks.origin import OriginIDTask

    seed_everything(args.seed)
    name = f"w_bn{int(batch_norm)}_lr{lr:g}"
    dm = OriginPairsDataModule(str(out / "train"), str(out / "origins_train"), str(out / "val_pairs.csv"),
                               str(out / "origins_train"), image_size=32, batch_size=args.train_batch,
                               num_instances=4, include_origins=True, samples_per_epoch=4 * 700 * 2,
                               eval_batch_size=256)
    task = OriginIDTask(backbone=args.model, input_size=32, features=args.features, lr=lr, batch_norm=batch_norm,
                        warmup_epochs=5, constant_epochs=5, ema_decay=0.9999, cache_dir=str(out / "vae_cache"),
                        export_path=str(out / f"{name}.safetensors"))
    trainer = Trainer(max_epochs=args.epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_model_summary=False, enable_progress_bar=False, check_val_every_n_epoch=5,
                      num_sanity_val_steps=0)
    trainer.fit(task, dm)
    val = {k: round(float(v), 4) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    print(name, val, flush=True)
    return out / f"{name}.safetensors", val


def _read(paths: list[Path]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB")).copy()).permute(2, 0, 1)
                        for p in paths]).float() / 255


def evaluate(out: Path, jobs: list[dict], weights: dict[str, Path | None], model: str = "digits") -> dict:
    """Acc@1 / mAP of each embedding on the held-out queries (gallery: 297 origins + 700 distractors)."""
    from diffperc.retrieval.embedder import OriginEmbedder
    from diffperc.retrieval.metrics import retrieval_metrics

    gallery_paths = sorted((out / "origins_test").glob("R*.png"))
    gallery_ids = torch.tensor([int(p.stem[1:]) for p in gallery_paths])
    query_ids = torch.tensor([j["origin"] for j in jobs])
    strengths = torch.tensor([j["strength"] for j in jobs])
    gallery, queries = _read(gallery_paths), _read([out / "test" / j["name"] for j in jobs])
    results = {}
    for name, proj in weights.items():
        emb = OriginEmbedder.from_model(model, proj, image_size=32)
        g, q = emb.embed(gallery, 256), emb.embed(queries, 256)
        row = {"all": retrieval_metrics(q, query_ids, g, gallery_ids)}
        for s in TEST_STRENGTHS:
            keep = strengths == s
            row[f"strength {s}"] = retrieval_metrics(q[keep], query_ids[keep], g, gallery_ids)
        results[name] = row
    return results


def _index_check(out: Path, weight_path: Path, jobs: list[dict], model: str = "digits") -> float:
    """Acc@1 of W through the real path: `diffperc index build` on the gallery folder, then search."""
    from diffperc.retrieval.cli import build_index
    from diffperc.retrieval.embedder import OriginEmbedder
    from diffperc.retrieval.index import OriginIndex

    index_dir = out / "index_w"
    build_index(out / "origins_test", index_dir, model=model, projection=str(weight_path), overwrite=True,
                err=io.StringIO())
    index, emb = OriginIndex.open(index_dir), OriginEmbedder.from_config(index_dir)
    vectors = emb.embed(_read([out / "test" / j["name"] for j in jobs]), 256).numpy()
    hits = index.search(vectors, k=1)
    index.close(snapshot=False)
    return float(np.mean([h[0].id == f"R{j['origin']:04d}" for h, j in zip(hits, jobs, strict=True)]))


def report(results: dict) -> str:
    lines = ["| embedding | val Acc@1 / mAP | subset | test Acc@1 | test mAP |", "|---|---|---|---|---|"]
    for name, rows in results["test"].items():
        val = results["val"].get(name, {})
        val_txt = f"{val['val/acc1']:.3f} / {val['val/mAP']:.3f}" if val else "-"
        for subset, m in rows.items():
            lines.append(f"| {name} | {val_txt} | {subset} ({m['queries']} queries) | {m['acc1']:.3f} | {m['mAP']:.3f} |")
    lines.append(f"\nselected on validation mAP: {results['selected']}; its Acc@1 through `diffperc index build` + "
                 f"FAISS search: {results['index_acc1']:.3f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="digits_oripid", help="output folder (reused if it exists)")
    parser.add_argument("--model", default="digits",
                        help="the bundled 'digits' model or a diffusers folder of another digits model (default: digits)")
    parser.add_argument("--per-train", type=int, default=5, help="translations per training origin")
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps at strength 1 (img2img runs strength x steps)")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance (diffusers default)")
    parser.add_argument("--batch-size", type=int, default=128, help="img2img batch")
    parser.add_argument("--features", type=int, default=256, help="output size of W")
    parser.add_argument("--lrs", type=float, nargs="+", default=[3.5e-4, 3.5e-3],
                        help="learning rates tried (ID²: 3.5e-4 over 50k steps; here ~1k steps)")
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--train-batch", type=int, default=128, help="training batch (32 origins x 4)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    start = time.time()
    jobs = make_dataset(out, args)
    print(f"dataset ready in {time.time() - start:.0f} s: {sum(len(v) for v in jobs.values())} translations")
    weights: dict[str, Path | None] = {"raw VAE": None}
    val: dict[str, dict] = {}
    for batch_norm in (True, False):  # BatchNorm (the issue) vs Identity (the released ID² code)
        for lr in args.lrs:
            path, metrics = train_projection(out, args, batch_norm, lr)
            name = f"ID² W, BN {'on' if batch_norm else 'off'}, lr {lr:g}"
            weights[name], val[name] = path, metrics
            val["raw VAE"] = {"val/acc1": metrics["val/raw_vae_acc1"], "val/mAP": metrics["val/raw_vae_mAP"]}
    selected = max((n for n in weights if n != "raw VAE"), key=lambda n: val[n]["val/mAP"])
    results = {"val": val, "test": evaluate(out, jobs["test"], weights, args.model), "selected": selected}
    results["index_acc1"] = _index_check(out, weights[selected], jobs["test"], args.model)
    results["settings"] = vars(args)
    results["seconds"] = round(time.time() - start, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(report(results))


if __name__ == "__main__":
    main()
