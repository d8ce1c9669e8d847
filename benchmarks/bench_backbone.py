"""Backbone speed and memory on the SD-1.5 or SDXL UNet architecture (random weights, no download).

Compares, in one run and against a baseline measured in the same run:
  (a) baseline: a plain full UNet forward with forward hooks on the taps,
  (b) ``DiffusionBackbone`` early-stopped after the DIFT tap: ``up_blocks.1`` on SD 1.5 (the ``dift``
      preset); on SDXL ``up_blocks.0`` (1280 ch, 1/16), the tap ``configs/correspondence/spair_dift_sdxl.yaml``
      uses (the ``dift`` preset name would pick SDXL's 640-channel ``up_blocks.1``),
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
    python benchmarks/bench_backbone.py --arch sdxl --sizes 256 --no-compile   # SDXL base UNet, full depth
    python benchmarks/bench_backbone.py --arch sdxl --sdxl-transformer-layers 1 2 2 ...  # REDUCED depth
    python benchmarks/bench_backbone.py --arch tiny_sdxl --sizes 64 --no-memory   # seconds: the SDXL path

``--arch sdxl`` is the UNet2DConditionModel config of ``stabilityai/stable-diffusion-xl-base-1.0``
(``unet/config.json``: three levels of 320/640/1280 channels, DownBlock2D then two CrossAttnDownBlock2D,
transformer_layers_per_block (1, 2, 10), attention_head_dim (5, 10, 20), cross_attention_dim 2048, linear
projections, ``addition_embed_type="text_time"`` with 256-dim time embeds and 2816 = 6 * 256 + 1280
added-condition channels; 2.6 B parameters). ``SDXLBackbone`` is timed with what its pipeline passes:
prompt embeds (1, 77, 2048), pooled text embeds (1, 1280) and the time ids (H, W, 0, 0, H, W); the text
encoders are one-layer stand-ins of the right widths (768 + 1280, projection 1280) and are not timed.
``--sdxl-transformer-layers`` lowers the depth of the transformer stacks when the full one is too slow;
the printout then says REDUCED DEPTH.

SDXL measured once (2026-12-02, the shared 2-core CPU build machine with a higher-priority job on one
core: rough; ratios are the result), ``--arch sdxl --sizes 256 --reps 3 --no-compile --ensemble-size-px 128``,
full depth (2567.5 M params), fp32, 1 thread: (a) 7.21 s / image | (b) early stop after up_blocks.0 1.07x
faster (at 256 px the 10-layer 1280-channel level, which runs before the tap, is most of the work) |
attention capture +2.5 % over (c0) | peak extra memory 154 MB for all four | ensemble of 8 at 128 px:
batched (one UNet call of 8) 2.23x faster than ``ensemble_chunk=1``. At reduced depth (1, 2, 2), reps 2:
(a) 3.89 s, (b) 1.35x faster, capture +7.0 %.
"""

from __future__ import annotations

import argparse
import copy
import time
from functools import partial

import torch
from _proc import vm_mb  # benchmarks/_proc.py, beside this script
from _timing import sync, time_configs  # benchmarks/_timing.py

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8,
)
CONFIGS = ("a_full_hooks", "b_dift_early_stop", "c0_vpd", "c_vpd_attention")


TINY_UNET = dict(SD15_UNET, sample_size=8, block_out_channels=(8, 8, 16, 16), norm_num_groups=4, attention_head_dim=2)

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (the fields that are not diffusers' defaults)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
SDXL_TEXT = (768, 1280)  # hidden sizes of CLIP ViT-L and OpenCLIP ViT-bigG; projection_dim of the second: 1280
# SDXL's layout at toy width (the test_sdxl backbone's UNet): checks the SDXL path in seconds
TINY_SDXL_UNET = dict(
    SDXL_UNET, sample_size=8, block_out_channels=(8, 16, 16), norm_num_groups=4, transformer_layers_per_block=(1, 2, 2),
    attention_head_dim=(2, 4, 4), cross_attention_dim=16, addition_time_embed_dim=4,
    projection_class_embeddings_input_dim=8 + 6 * 4,
)
TINY_SDXL_TEXT = (8, 8)
# the tap DIFT-style early stop uses: the "dift" preset on SD 1.5; on SDXL the 1280-channel 1/16 level
# of configs/correspondence/spair_dift_sdxl.yaml
DIFT_TAP = {"sd15": "dift", "tiny": "dift", "sdxl": ["up_blocks.0"], "tiny_sdxl": ["up_blocks.0"]}
ARCH_NAMES = {"sd15": "SD-1.5", "tiny": "tiny", "sdxl": "SDXL base", "tiny_sdxl": "tiny SDXL-shaped"}


def unet_config(arch: str, sdxl_layers: tuple[int, ...] | None = None) -> dict:
    """The UNet2DConditionModel kwargs of ``arch``; ``sdxl_layers`` overrides SDXL's transformer depths."""
    cfg = {"sd15": SD15_UNET, "tiny": TINY_UNET, "sdxl": SDXL_UNET, "tiny_sdxl": TINY_SDXL_UNET}[arch]
    if sdxl_layers is not None and arch in ("sdxl", "tiny_sdxl"):
        cfg = dict(cfg, transformer_layers_per_block=tuple(sdxl_layers))
    return cfg


def is_sdxl(unet) -> bool:
    return getattr(unet.config, "addition_embed_type", None) == "text_time"


def inputs(unet, size: int, device: str, dtype: torch.dtype) -> tuple[torch.Tensor, dict, dict]:
    """Batch-1 latents, the backbone's conditioning kwargs and the raw UNet's (SDXL: + pooled embeds, time ids)."""
    lat = torch.randn(1, 4, size // 8, size // 8, device=device, dtype=dtype)
    emb = torch.randn(1, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    if not is_sdxl(unet):
        return lat, {"prompt_embeds": emb}, {"encoder_hidden_states": emb}
    pooled_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    pooled = torch.randn(1, pooled_dim, device=device, dtype=dtype)
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], device=device, dtype=dtype)  # SDXLBackbone.time_ids
    return (lat, {"prompt_embeds": emb, "pooled_prompt_embeds": pooled},
            {"encoder_hidden_states": emb, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}})


def _sdxl_text_encoders(tokenizer, hidden: tuple[int, int]):
    """One-layer CLIP text encoders of SDXL's widths (not timed: prompt embeds are passed directly)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def cfg(h: int) -> CLIPTextConfig:
        return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=h, intermediate_size=32, num_hidden_layers=1,
                              num_attention_heads=1, max_position_embeddings=77, projection_dim=hidden[1],
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)

    return CLIPTextModel(cfg(hidden[0])).eval(), CLIPTextModelWithProjection(cfg(hidden[1])).eval()


def build(device: str, dtype: torch.dtype, arch: str = "sd15", sdxl_layers: tuple[int, ...] | None = None):
    """A DiffusionBackbone (SD 1.5, tiny) or SDXLBackbone (sdxl, tiny_sdxl) factory with random UNet
    weights (shared by all configs).

    ``make(unet=None, **kw)`` builds a backbone around the shared UNet (or the one given).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from diffperc import DiffusionBackbone
    from diffperc.backbones.sdxl import SDXLBackbone
    from diffperc.backbones.tiny import tiny_sd_components

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_config(arch, sdxl_layers)).to(device, dtype).eval()
    tiny = tiny_sd_components()
    vae = AutoencoderKL(block_out_channels=(4, 4, 4, 4), norm_num_groups=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    extra = {}
    if is_sdxl(unet):
        te1, te2 = _sdxl_text_encoders(tiny["tokenizer"], SDXL_TEXT if arch == "sdxl" else TINY_SDXL_TEXT)
        extra = {"text_encoder_2": te2, "tokenizer_2": tiny["tokenizer"]}
        tiny = dict(tiny, text_encoder=te1)

    def make(unet_: torch.nn.Module | None = None, **kw) -> DiffusionBackbone:
        cls = SDXLBackbone if extra else DiffusionBackbone
        bb = cls(vae=vae, unet=unet if unet_ is None else unet_, text_encoder=tiny["text_encoder"],
                 tokenizer=tiny["tokenizer"], scheduler=sched, **extra, **kw)
        bb.vae.to(device, dtype)
        return bb

    return unet, make


def runners(unet, make, size: int, device: str, dtype: torch.dtype, dift_tap="dift") -> dict:
    """Config name -> zero-argument callable that runs one batch-1 forward."""
    from diffperc.backbones.diffusion import resolve_layers

    lat, cond, unet_cond = inputs(unet, size, device, dtype)
    vpd = resolve_layers(unet, "vpd")

    @torch.no_grad()
    def full_with_hooks() -> None:
        feats = {}
        hooks = [unet.get_submodule(n).register_forward_hook(partial(lambda n, m, a, o: feats.setdefault(n, o), n))
                 for n in vpd]
        try:
            unet(lat, torch.tensor([261], device=device), **unet_cond)
        finally:
            for h in hooks:
                h.remove()

    dift, c0, c = make(layers=dift_tap), make(layers="vpd"), make(layers="vpd", attention=True)
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
            bb(latents=lat, **cond)
        return run

    return {
        "a_full_hooks": plain_processors(full_with_hooks),
        "b_dift_early_stop": plain_processors(lambda: dift(latents=lat, **cond)),
        "c0_vpd": plain_processors(lambda: c0(latents=lat, **cond)),
        "c_vpd_attention": with_capture(c),
    }


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


def precision_and_compile(unet, make, size: int, device: str, dtype: torch.dtype, reps: int, dift_tap="dift"
                          ) -> tuple[dict[str, float], dict[str, float]]:
    """Median s / image of the DIFT backbone eager and compiled, in ``dtype`` and bfloat16; compile times."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())
    variants = [(str(dtype).removeprefix("torch."), unet, dtype)]
    if dtype != torch.bfloat16:  # with --dtype bfloat16 the baseline rows are already bf16
        variants.append(("bfloat16", copy.deepcopy(unet).to(torch.bfloat16), torch.bfloat16))
    runs, compile_s = {}, {}
    for label, net, dt in variants:
        lat, cond, _ = inputs(unet, size, device, dt)
        eager = make(net, layers=dift_tap)
        _ = eager.feature_info  # probe once, before compiling
        compiled = torch.compile(eager)
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            compiled(latents=lat, **cond)  # traces and compiles
        sync(device)
        compile_s[label] = time.perf_counter() - t0
        runs[f"eager {label}"] = partial(eager, latents=lat, **cond)
        runs[f"compiled {label}"] = partial(compiled, latents=lat, **cond)
    with torch.no_grad():
        return time_configs(runs, reps, device), compile_s


def ensemble_check(make, size: int, device: str, dtype: torch.dtype, reps: int, dift_tap="dift"
                   ) -> tuple[float, float, list, list]:
    batched = make(layers=dift_tap, ensemble_size=8)
    seq = make(layers=dift_tap, ensemble_size=8, ensemble_chunk=1)
    lat, cond, _ = inputs(batched.unet, size, device, dtype)
    calls: list[int] = []
    h = batched.unet.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    _ = batched.feature_info
    _ = seq.feature_info
    t = time_configs({"batched": lambda: batched(latents=lat, **cond),
                      "sequential": lambda: seq(latents=lat, **cond)}, reps, device)
    calls.clear()
    batched(latents=lat, **cond)
    b_calls = list(calls)
    calls.clear()
    seq(latents=lat, **cond)
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
    p.add_argument("--arch", choices=tuple(ARCH_NAMES), default="sd15",
                   help="sd15 / sdxl: the real architectures; tiny / tiny_sdxl: toy UNets to check the script")
    p.add_argument("--sdxl-transformer-layers", type=int, nargs=3, default=None, metavar="N",
                   help="SDXL transformer_layers_per_block per level (default SDXL's 1 2 10; fewer = REDUCED depth)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    unet, make = build(args.device, dtype, args.arch, args.sdxl_transformer_layers)
    tap = DIFT_TAP[args.arch]
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    depth = ""
    if is_sdxl(unet):
        layers = tuple(unet.config.transformer_layers_per_block)
        full = unet_config(args.arch)["transformer_layers_per_block"]
        depth = (f", transformer_layers_per_block {layers}" if layers == full else
                 f", REDUCED DEPTH: transformer_layers_per_block {layers} (the real model has {full})")
    print(f"{ARCH_NAMES[args.arch]} UNet ({sum(p.numel() for p in unet.parameters()) / 1e6:.1f}M "
          f"params, random weights{depth}), device {args.device} ({where}), {args.dtype}, batch 1, "
          f"threads {torch.get_num_threads()}, torch {torch.__version__}, median of {args.reps}; "
          f"early-stop tap {tap if isinstance(tap, str) else ', '.join(tap)}")
    print("| config | image | s / image | vs (a) | peak MB | vs (a) |\n|---|---|---|---|---|---|")
    for size in args.sizes:
        t = time_configs(runners(unet, make, size, args.device, dtype, tap), args.reps, args.device)
        run = runners(unet, make, size, args.device, dtype, tap)
        mem = {c: float("nan") if args.no_memory else peak_memory(run[c], args.device) for c in CONFIGS}
        for c in CONFIGS:
            print(f"| {c} | {size} | {t[c]:.3f} | {t['a_full_hooks'] / t[c]:.2f}x faster | {mem[c]:.0f} | "
                  f"{mem[c] / mem['a_full_hooks']:.2f} |")
        print(f"| attention capture overhead | {size} | {100 * (t['c_vpd_attention'] / t['c0_vpd'] - 1):+.1f}% | | | |")
    size = args.sizes[0]
    if not args.no_compile:
        t, comp = precision_and_compile(unet, make, size, args.device, dtype, args.reps, tap)
        base = t[f"eager {args.dtype}"]
        print(f"\n| precision / compile (dift) | image | s / image | vs eager {args.dtype} | first call (compile) s |")
        print("|---|---|---|---|---|")
        for name, sec in t.items():
            first = f"{comp[name.split()[1]]:.1f}" if name.startswith("compiled") else ""
            print(f"| {name} | {size} | {sec:.4f} | {base / sec:.2f}x faster | {first} |")
    tb, ts, cb, cs = ensemble_check(make, args.ensemble_size_px, args.device, dtype, args.reps, tap)
    print(f"\nEnsemble of 8 at {args.ensemble_size_px}px (dift): batched {tb:.3f} s in UNet calls of {cb}; "
          f"ensemble_chunk=1 {ts:.3f} s in calls of {cs}; batched is {ts / tb:.2f}x faster")


if __name__ == "__main__":
    main()
