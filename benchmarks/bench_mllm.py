"""Visual tokens per second: Mustafar's diffusion tower vs LLaVA-1.5's CLIP ViT-L/14-336 tower (random weights).

Both towers are built at their real architecture with random weights (no download) and fed the same
batch of images in [0, 1]:

  (clip)   CLIPVisionModel ViT-L/14-336 (24 layers, 576 patch tokens, penultimate layer) - the baseline;
  (t1)     DiffusionTower on the SD 2.1 (512) UNet + SD VAE: encode, noise to t=50, UNet stopped after
           up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_q (256 tokens), guidance s=1;
  (t4)     the same at s=4: empty and question branches in ONE batched UNet call;
  (t4seq)  s=4 as two separate UNet calls (what batching saves);
  (full)   s=1 without early stop (the whole UNet runs; what early stop saves).

Question embeddings are cached by the tower, so after the warm-up the text encoder does not run; a
one-layer text encoder of SD 2.1's width stands in for OpenCLIP ViT-H. Median of ``--reps``, configs
round-robin. ``--clip-layers``/``--unet-scale`` shrink the models where memory or time is short.

    python benchmarks/bench_mllm.py --batch 1 --reps 2
    python benchmarks/bench_mllm.py --batch 1 --reps 1 --threads 1 --configs t1 t4   # smallest
    python benchmarks/bench_mllm.py --device cuda --dtype bfloat16 --batch 16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from diffperc.mllm.towers import MUSTAFAR_TAP, CLIPTower, DiffusionTower, clip_vit_l14_336_config

CONFIGS = ("clip", "t1", "t4", "t4seq", "full")
SD21_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=1024,
    attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
)


def build_backbone(device: str, dtype: torch.dtype, layers: list[str]):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffperc import DiffusionBackbone
    from diffperc.backbones.tiny import bundled_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD21_UNET)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4, layers_per_block=2,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    tok = bundled_tokenizer()
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=1024, intermediate_size=1024,
                                        num_hidden_layers=1, num_attention_heads=16))
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          prediction_type="v_prediction")
    bb = DiffusionBackbone(vae=vae, unet=unet, text_encoder=text, tokenizer=tok, scheduler=sched, layers=layers,
                           timestep=50)
    return bb.to(device, dtype)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--clip-layers", type=int, default=24, help="CLIP depth (24 = ViT-L/14)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS,
                    help="towers to time (clip is always timed: it is the baseline)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    dev = args.device
    bb = build_backbone(dev, dtype, [MUSTAFAR_TAP])
    t1 = DiffusionTower(bb, guidance_scale=1.0, image_size=512)
    t4 = DiffusionTower(bb, guidance_scale=4.0, image_size=512)
    full_bb = type(bb)(vae=bb.vae, unet=bb.unet, text_encoder=bb.text_encoder, tokenizer=bb.tokenizer,
                       scheduler=bb.scheduler, layers=[MUSTAFAR_TAP, "conv_out"], timestep=50)

    def run_full(images, prompts):
        lat = bb.encode_images(torch.nn.functional.interpolate(images, size=(512, 512), mode="bicubic").clamp(0, 1))
        return full_bb(latents=lat, prompts=prompts).features[0]

    clip = CLIPTower(clip_vit_l14_336_config(args.clip_layers)).to(dev, dtype)
    images = torch.rand(args.batch, 3, 336, 336, device=dev, dtype=dtype)
    prompts = ["is the door of the car open or closed?"] * args.batch

    def t4seq(images, prompts):  # two UNet calls, same noise: what the one batched call replaces
        g = torch.Generator(device=dev).manual_seed(0)
        lat = bb.encode_images(torch.nn.functional.interpolate(images, size=(512, 512), mode="bicubic").clamp(0, 1))
        noise = torch.randn(lat.shape, generator=g, device=dev, dtype=dtype)
        f0 = bb(latents=lat, prompts=[""] * len(lat), noise=noise).features[0]
        fq = bb(latents=lat, prompts=prompts, noise=noise).features[0]
        return f0 + 4 * (fq - f0)

    configs = {"clip": (lambda: clip(images), 576), "t1": (lambda: t1(images, prompts), 256),
               "t4": (lambda: t4(images, prompts), 256), "t4seq": (lambda: t4seq(images, prompts), 256),
               "full": (lambda: run_full(images, prompts), 256)}
    configs = {k: v for k, v in configs.items() if k == "clip" or k in args.configs}
    times: dict[str, list[float]] = {k: [] for k in configs}
    with torch.no_grad():
        for fn, _ in configs.values():  # warm-up (fills the prompt cache)
            fn()
        for _ in range(args.reps):
            for name, (fn, _) in configs.items():
                sync(dev)
                t0 = time.perf_counter()
                fn()
                sync(dev)
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nbatch {args.batch}, {dev} {args.dtype}, {torch.get_num_threads()} threads, median of {args.reps}; "
          f"CLIP depth {args.clip_layers}")
    print("| tower | tokens / image | s / batch | images / s | tokens / s | tokens/s vs CLIP |")
    print("|---|---|---|---|---|---|")
    base = configs["clip"][1] * args.batch / med["clip"]
    for name, (_, n) in configs.items():
        tps = n * args.batch / med[name]
        print(f"| {name} | {n} | {med[name]:.3f} | {args.batch / med[name]:.2f} | {tps:.0f} | {tps / base:.2f}x |")
    if {"t4", "t4seq"} <= med.keys():
        print(f"\nbatched guidance (t4) vs two calls (t4seq): {med['t4seq'] / med['t4']:.2f}x faster")
    if {"t1", "full"} <= med.keys():
        print(f"early stop (t1) vs full UNet (full): {med['full'] / med['t1']:.2f}x faster")


if __name__ == "__main__":
    main()
