"""Training-step time and memory of the OVCIS instance head vs the VPD head, SD-1.5 architecture, random weights.

One step = ``training_step`` (VAE encode, UNet to the last tap, head, loss), backward and an AdamW step, for
  (a) ``vpd_semseg``: VPD's semantic segmentation recipe (UNet fine-tuned at 0.1x lr, cross-attention maps
      of 2 class tokens concatenated at 1/16 and 1/32, Semantic FPN head): the baseline;
  (a') ``vpd_semseg_frozen``: the same VPD head and taps with the UNet frozen (``trainable: False``): only the
      head, the text adapter and AdamW's state for them; what fits where (a) does not (a CPU box with under
      ~16 GB free), and the like-for-like comparison with (b), whose UNet is frozen too;
  (b) ``ovcis``: the OVCIS recipe (frozen UNet at t = 0, MSFF + Mask2Former pixel decoder (6 deformable
      layers) + masked-attention decoder (9 layers, 100 queries) + CIN + TVA, Hungarian matching and
      point-sampled losses on 12544 points, deep supervision), 3 random instances per image;
  (c) ``ovcis_cached``: (b) with ``feature_cache=`` (a temporary folder): the warm-up step runs the
      backbone and writes the features; the timed steps read them back from disk (what every epoch after
      the first costs on a small dataset).
Each setting runs in its own subprocess (peak memory is its own): on a CPU the peak resident memory
(VmHWM, weights included) and the peak above the memory after building; on a GPU
``torch.cuda.max_memory_allocated``. Median of ``--steps`` steps after one warm-up step.

    python benchmarks/bench_instance.py                       # CPU, 256 px, batch 2
    python benchmarks/bench_instance.py --device cuda --size 512 --batch 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch
from _proc import run_settings_in_children, vm_mb  # benchmarks/_proc.py, beside this script
from bench_train import PRESET, register_preset  # the SD-1.5-shaped random-weight preset

SETTINGS = ("vpd_semseg", "vpd_semseg_frozen", "ovcis", "ovcis_cached")


def _batch(args: argparse.Namespace) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    b, s = args.batch, args.size
    masks = [(torch.rand(3, s, s, generator=g) > 0.7).to(torch.uint8) for _ in range(b)]
    label_map = torch.randint(0, 2, (b, s, s), generator=g)
    return {"image": torch.rand(b, 3, s, s, generator=g), "masks": masks,
            "labels": [torch.zeros(3, dtype=torch.long) for _ in range(b)], "mask": label_map, "name": ["x"] * b}


def _to(batch: dict[str, Any], device: str) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else [x.to(device) for x in v] if k in ("masks", "labels")
            else v for k, v in batch.items()}


def build(name: str, cache_dir: str | None = None) -> torch.nn.Module:
    if name.startswith("vpd_semseg"):
        from diffperc.tasks._dense import VPD_BACKBONE_ATTENTION
        from diffperc.tasks.semseg import SemSegTask

        kw = {**VPD_BACKBONE_ATTENTION, "trainable": name == "vpd_semseg"}
        return SemSegTask(backbone=PRESET, backbone_kwargs=kw, num_classes=2, class_names=["thing", "background"],
                          templates=["a photo of a {}."], slide_crop=None)
    from diffperc.tasks.instance import InstanceSegTask

    return InstanceSegTask(backbone=PRESET, class_names=["foreground"], feature_cache=cache_dir)


def run_setting(name: str, args: argparse.Namespace) -> dict[str, Any]:
    import warnings

    warnings.filterwarnings("ignore")  # self.log outside a Trainer
    torch.set_num_threads(args.threads)
    register_preset()
    import tempfile

    t0 = time.perf_counter()
    cache_dir = tempfile.mkdtemp(prefix="bench_instance_") if name == "ovcis_cached" else None
    task = build(name, cache_dir).to(args.device)
    task.train()
    groups = task.parameter_groups()
    opt = torch.optim.AdamW(groups, lr=1e-4, weight_decay=0.05)
    batch = _to(_batch(args), args.device)
    step_fn = task.training_step
    build_s = time.perf_counter() - t0
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_mb = torch.cuda.memory_allocated() / 2**20
    else:
        base_mb = vm_mb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := current RSS
    times = []
    for step in range(1 + args.steps):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = step_fn(batch, step)
        loss.backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        if step > 0:
            times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else vm_mb("VmHWM")
    if cache_dir:
        import shutil

        shutil.rmtree(cache_dir, ignore_errors=True)
    n_train = sum(p.numel() for g in groups for p in g["params"])
    return {"setting": name, "step_s": statistics.median(times), "times": times, "build_s": build_s,
            "peak_mb": peak, "extra_mb": peak - base_mb, "trainable_params": n_train}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=2, help="timed steps per setting (after one warm-up step)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    p.add_argument("--child", choices=SETTINGS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(run_setting(args.child, args)))
        return
    results = run_settings_in_children(__file__, args.settings, args)
    print(f"Training step, SD-1.5 architecture (random weights), {args.device} fp32, image {args.size}, batch "
          f"{args.batch}, threads {args.threads}, AdamW, median of {args.steps} steps after 1 warm-up")
    mem = "peak GPU MB" if args.device.startswith("cuda") else "peak RSS MB"
    print(f"| setting | trainable params | s / step | vs VPD | {mem} | vs VPD | above model MB | vs VPD |")
    print("|---|---|---|---|---|---|---|---|")
    ref = results.get("vpd_semseg") or results.get("vpd_semseg_frozen")
    if ref is not None:
        print(f"(ratios against {ref['setting']})")
    for name, r in results.items():
        rel = {k: f"{r[k] / ref[k]:.2f}x" if ref else "-" for k in ("step_s", "peak_mb", "extra_mb")}
        print(f"| {name} | {r['trainable_params'] / 1e6:.1f}M | {r['step_s']:.2f} | {rel['step_s']} | {r['peak_mb']:.0f} "
              f"| {rel['peak_mb']} | {r['extra_mb']:.0f} | {rel['extra_mb']} |")
    for name, r in results.items():
        print(f"{name}: build {r['build_s']:.0f} s, step times {[round(t, 2) for t in r['times']]}")


if __name__ == "__main__":
    main()
