"""Backbone speed and memory on the SD-1.5 UNet architecture (random weights, no download).

Compares, in one run and against a baseline measured in the same run:
  (a) baseline: a plain full UNet forward with forward hooks on the taps,
  (b) ``DiffusionBackbone`` early-stopped after ``up_blocks.1`` (DIFT),
  (c0) the ``vpd`` layers without attention capture, (c) the same with capture,
  (e) an ensemble of 8 as one batched call vs 8 sequential passes (``ensemble_chunk=1``),
  (p) precision and compilation: the DIFT backbone eager in ``--dtype`` (the baseline), eager in
      bfloat16, and ``torch.compile``d in both (first-call compile time reported apart; a compiled
      forward with graph breaks would show up as a smaller speed-up).
Latents are passed directly (``latents=``) so the VAE is not part of the timing, and a
fixed prompt embedding stands in for the text encoder. Configs are timed round-robin (median
of ``--reps``) so machine noise hits all alike. Peak memory: CUDA's peak allocation on a
GPU; on a CPU the peak resident memory of the forward above the resident memory before it.

    python benchmarks/bench_backbone.py                 # CPU, sizes 256 and 512
    python benchmarks/bench_backbone.py --device cuda --dtype float16 --sizes 512 768
    python benchmarks/bench_backbone.py --arch tiny --sizes 64 --no-memory   # seconds: checks the script
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from functools import partial

import torch
from _proc import vm_mb  # benchmarks/_proc.py, beside this script

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8,
)
CONFIGS = ("a_full_hooks", "b_dift_early_stop", "c0_vpd", "c_vpd_attention")


TINY_UNET = dict(SD15_UNET, sample_size=8, block_out_channels=(8, 8, 16, 16), norm_num_groups=4, attention_head_dim=2)


def build(device: str, dtype: torch.dtype, arch: str = "sd15"):
    """An SD-1.5-shaped DiffusionBackbone factory with random UNet weights (shared by all configs).

    ``make(unet=None, **kw)`` builds a backbone around the shared UNet (or the one given).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from diffperc import DiffusionBackbone
    from diffperc.backbones.tiny import tiny_sd_components

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**(SD15_UNET if arch == "sd15" else TINY_UNET)).to(device, dtype).eval()
    tiny = tiny_sd_components()
    vae = AutoencoderKL(block_out_channels=(4, 4, 4, 4), norm_num_groups=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)

    def make(unet_: torch.nn.Module | None = None, **kw) -> DiffusionBackbone:
        bb = DiffusionBackbone(vae=vae, unet=unet if unet_ is None else unet_, text_encoder=tiny["text_encoder"],
                               tokenizer=tiny["tokenizer"], scheduler=sched, **kw)
        bb.vae.to(device, dtype)
        return bb

    return unet, make


def runners(unet, make, size: int, device: str, dtype: torch.dtype) -> dict:
    """Config name -> zero-argument callable that runs one batch-1 forward."""
    from diffperc.backbones.diffusion import resolve_layers

    lat = torch.randn(1, 4, size // 8, size // 8, device=device, dtype=dtype)
    emb = torch.randn(1, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    vpd = resolve_layers(unet, "vpd")

    @torch.no_grad()
    def full_with_hooks() -> None:
        feats = {}
        hooks = [unet.get_submodule(n).register_forward_hook(partial(lambda n, m, a, o: feats.setdefault(n, o), n))
                 for n in vpd]
        try:
            unet(lat, torch.tensor([261], device=device), encoder_hidden_states=emb)
        finally:
            for h in hooks:
                h.remove()

    dift, c0, c = make(layers="dift"), make(layers="vpd"), make(layers="vpd", attention=True)
    for bb in (dift, c0, c):
        _ = bb.feature_info  # probe once, outside the timing
    from diffusers.models.attention_processor import AttnProcessor2_0

    def plain_processors(fn):
        def run() -> None:
            unet.set_attn_processor(AttnProcessor2_0())
            fn()
        return run

    def with_capture(bb):
        def run() -> None:
            from diffperc.backbones.attention import install_attention_capture

            install_attention_capture(unet, bb._store)
            bb(latents=lat, prompt_embeds=emb)
        return run

    return {
        "a_full_hooks": plain_processors(full_with_hooks),
        "b_dift_early_stop": plain_processors(lambda: dift(latents=lat, prompt_embeds=emb)),
        "c0_vpd": plain_processors(lambda: c0(latents=lat, prompt_embeds=emb)),
        "c_vpd_attention": with_capture(c),
    }


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_configs(run: dict, reps: int, device: str) -> dict[str, float]:
    times = {k: [] for k in run}
    for fn in run.values():  # warm-up
        fn()
    for _ in range(reps):
        for name, fn in run.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def peak_memory(fn, device: str) -> float:
    """Peak extra memory (MB) of one call of ``fn``: CUDA peak allocation, or on a CPU the peak
    RSS (VmHWM, reset through /proc/self/clear_refs after returning freed heap with malloc_trim)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    base = vm_mb("VmRSS")
    fn()
    return vm_mb("VmHWM") - base


def precision_and_compile(unet, make, size: int, device: str, dtype: torch.dtype, reps: int
                          ) -> tuple[dict[str, float], dict[str, float]]:
    """Median s / image of the DIFT backbone eager and compiled, in ``dtype`` and bfloat16; compile times."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())
    variants = [(str(dtype).removeprefix("torch."), unet, dtype)]
    if dtype != torch.bfloat16:  # with --dtype bfloat16 the baseline rows are already bf16
        variants.append(("bfloat16", copy.deepcopy(unet).to(torch.bfloat16), torch.bfloat16))
    runs, compile_s = {}, {}
    for label, net, dt in variants:
        lat = torch.randn(1, 4, size // 8, size // 8, device=device, dtype=dt)
        emb = torch.randn(1, 77, unet.config.cross_attention_dim, device=device, dtype=dt)
        eager = make(net, layers="dift")
        _ = eager.feature_info  # probe once, before compiling
        compiled = torch.compile(eager)
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            compiled(latents=lat, prompt_embeds=emb)  # traces and compiles
        sync(device)
        compile_s[label] = time.perf_counter() - t0
        runs[f"eager {label}"] = partial(eager, latents=lat, prompt_embeds=emb)
        runs[f"compiled {label}"] = partial(compiled, latents=lat, prompt_embeds=emb)
    with torch.no_grad():
        return time_configs(runs, reps, device), compile_s


def ensemble_check(make, size: int, device: str, dtype: torch.dtype, reps: int) -> tuple[float, float, list, list]:
    lat = torch.randn(1, 4, size // 8, size // 8, device=device, dtype=dtype)
    emb = torch.randn(1, 77, make().unet.config.cross_attention_dim, device=device, dtype=dtype)
    batched, seq = make(layers="dift", ensemble_size=8), make(layers="dift", ensemble_size=8, ensemble_chunk=1)
    calls: list[int] = []
    h = batched.unet.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    _ = batched.feature_info
    _ = seq.feature_info
    t = time_configs({"batched": lambda: batched(latents=lat, prompt_embeds=emb),
                      "sequential": lambda: seq(latents=lat, prompt_embeds=emb)}, reps, device)
    calls.clear()
    batched(latents=lat, prompt_embeds=emb)
    b_calls = list(calls)
    calls.clear()
    seq(latents=lat, prompt_embeds=emb)
    h.remove()
    return t["batched"], t["sequential"], b_calls, list(calls)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--ensemble-size-px", type=int, default=256)
    p.add_argument("--arch", choices=("sd15", "tiny"), default="sd15", help="tiny: a toy UNet to check the script")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    unet, make = build(args.device, dtype, args.arch)
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    print(f"{'SD-1.5' if args.arch == 'sd15' else 'tiny'} UNet ({sum(p.numel() for p in unet.parameters()) / 1e6:.1f}M "
          f"params, random weights), device {args.device} ({where}), {args.dtype}, batch 1, "
          f"threads {torch.get_num_threads()}, torch {torch.__version__}, median of {args.reps}")
    print("| config | image | s / image | vs (a) | peak MB | vs (a) |\n|---|---|---|---|---|---|")
    for size in args.sizes:
        t = time_configs(runners(unet, make, size, args.device, dtype), args.reps, args.device)
        run = runners(unet, make, size, args.device, dtype)
        mem = {c: float("nan") if args.no_memory else peak_memory(run[c], args.device) for c in CONFIGS}
        for c in CONFIGS:
            print(f"| {c} | {size} | {t[c]:.3f} | {t['a_full_hooks'] / t[c]:.2f}x faster | {mem[c]:.0f} | "
                  f"{mem[c] / mem['a_full_hooks']:.2f} |")
        print(f"| attention capture overhead | {size} | {100 * (t['c_vpd_attention'] / t['c0_vpd'] - 1):+.1f}% | | | |")
    size = args.sizes[0]
    if not args.no_compile:
        t, comp = precision_and_compile(unet, make, size, args.device, dtype, args.reps)
        base = t[f"eager {args.dtype}"]
        print(f"\n| precision / compile (dift) | image | s / image | vs eager {args.dtype} | first call (compile) s |")
        print("|---|---|---|---|---|")
        for name, sec in t.items():
            first = f"{comp[name.split()[1]]:.1f}" if name.startswith("compiled") else ""
            print(f"| {name} | {size} | {sec:.4f} | {base / sec:.2f}x faster | {first} |")
    tb, ts, cb, cs = ensemble_check(make, args.ensemble_size_px, args.device, dtype, args.reps)
    print(f"\nEnsemble of 8 at {args.ensemble_size_px}px (dift): batched {tb:.3f} s in UNet calls of {cb}; "
          f"ensemble_chunk=1 {ts:.3f} s in calls of {cs}; batched is {ts / tb:.2f}x faster")


if __name__ == "__main__":
    main()
