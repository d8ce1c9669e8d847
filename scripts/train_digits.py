"""Train the bundled default model ``checkpoints/digits`` from a fixed seed, on this CPU.

A small text-conditional latent diffusion model in diffusers format, the same parts as
Stable Diffusion at toy size:

- AutoencoderKL: 32x32x3 images -> 4x8x8 latents (2 downsamples), trained first
  (L1 + MSE reconstruction, tiny KL), then its ``scaling_factor`` set to 1 / std(latents).
- CLIPTextModel (2 layers, width 64) + the bundled CLIP BPE tokenizer (``diffperc/assets``).
- UNet2DConditionModel (SD block pattern, channels 64/128, cross-attention dim 64), trained
  jointly with the text encoder on epsilon prediction with SD's scaled-linear DDPM schedule;
  10 % of captions dropped to "" (so classifier-free guidance works); EMA weights saved.

Data: scikit-learn's digits, images 0-1499 only (``diffperc.data.digits.load("train")``).
Images 1500-1796 are never seen. Weights are written as fp16 safetensors (under 20 MB).

    python scripts/train_digits.py --out checkpoints/digits   # ~32 min on 2 free CPU cores
    python scripts/train_digits.py --out /tmp/d --vae-steps 20 --unet-steps 20   # smoke run
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from diffperc.backbones._loading import save_components
from diffperc.backbones.tiny import bundled_tokenizer
from diffperc.data.digits import CLASS_WORDS, load

TEMPLATES = (
    "a photo of the digit {}",
    "a photo of the digit {}",
    "a photo of the digit {}",
    "the digit {}",
    "a handwritten {}",
    "the number {}",
    "{}",
)
MAX_LENGTH = 32


def build_components(tokenizer: CLIPTokenizer) -> tuple[AutoencoderKL, UNet2DConditionModel, CLIPTextModel]:
    """The untrained VAE, UNet and text encoder of the digits model."""
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=32, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64), norm_num_groups=32,
    )
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(64, 128), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
        attention_head_dim=8, norm_num_groups=32,
    )
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_LENGTH, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, projection_dim=64,
    )
    return vae, unet, CLIPTextModel(text_config)


def _warmup_cosine(steps: int):
    """Linear warm-up over min(100, steps/10) steps, then cosine decay to 0."""
    warmup = min(100, steps // 10 + 1)
    return lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))


def train_vae(vae: AutoencoderKL, images: torch.Tensor, steps: int, batch: int, log_every: int) -> None:
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(steps))
    vae.train()
    for step in range(steps):
        x = images[torch.randint(len(images), (batch,))] * 2 - 1
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        kl = post.kl().mean() / x[0].numel()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps - 1:
            print(f"[vae] step {step:5d}/{steps} loss {loss.item():.4f} kl {kl.item():.3f}", flush=True)
    vae.eval()


@torch.no_grad()
def encode_all(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([vae.encode(x * 2 - 1).latent_dist.mean for x in images.split(256)])


def tokenize(tokenizer: CLIPTokenizer, texts: list[str]) -> torch.Tensor:
    return tokenizer(texts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt").input_ids


def captions_for(labels: torch.Tensor, rng: random.Random, p_empty: float = 0.1) -> list[str]:
    out = []
    for y in labels.tolist():
        out.append("" if rng.random() < p_empty else rng.choice(TEMPLATES).format(CLASS_WORDS[y]))
    return out


def train_unet(
    unet: UNet2DConditionModel, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, latents: torch.Tensor,
    labels: torch.Tensor, scheduler: DDPMScheduler, steps: int, batch: int, log_every: int, seed: int,
) -> tuple[UNet2DConditionModel, CLIPTextModel]:
    """Joint epsilon-prediction training; returns the EMA copies of both models."""
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(steps))
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    ema_decay = 0.999 if steps > 1000 else 0.9
    rng = random.Random(seed)
    unet.train()
    text_encoder.train()
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(len(latents), (batch,))
        x0 = latents[idx]
        ids = tokenize(tokenizer, captions_for(labels[idx], rng))
        noise = torch.randn_like(x0)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,))
        xt = scheduler.add_noise(x0, noise, t)
        pred = unet(xt, t, encoder_hidden_states=text_encoder(ids).last_hidden_state).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for ema, live in ((ema_unet, unet), (ema_text, text_encoder)):
                for pe, p in zip(ema.parameters(), live.parameters(), strict=True):
                    pe.lerp_(p, 1 - ema_decay)
        if step % log_every == 0 or step == steps - 1:
            rate = (time.time() - t0) / (step + 1)
            print(f"[unet] step {step:5d}/{steps} loss {loss.item():.4f} ({rate:.2f} s/step)", flush=True)
    return ema_unet, ema_text


def main() -> None:
    parser = argparse.ArgumentParser(description="Train the bundled digits diffusion model.")
    parser.add_argument("--out", type=Path, default=Path("checkpoints/digits"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=600)
    parser.add_argument("--unet-steps", type=int, default=2400)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.time()
    images, labels = load("train")  # images 0-1499 only; 1500-1796 are held out
    tokenizer = bundled_tokenizer(model_max_length=MAX_LENGTH)
    vae, unet, text_encoder = build_components(tokenizer)
    print(f"params: vae {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M, "
          f"unet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M, "
          f"text {sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f}M", flush=True)
    train_vae(vae, images, args.vae_steps, batch=32, log_every=100)
    latents = encode_all(vae, images)
    scaling = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling)
    with torch.no_grad():
        rec = vae.decode(latents[:256]).sample
    print(f"[vae] scaling_factor {scaling:.4f}; train recon MSE on [0,1]: "
          f"{F.mse_loss((rec + 1) / 2, images[:256]).item():.2e}", flush=True)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", prediction_type="epsilon", clip_sample=False)
    unet_ema, text_ema = train_unet(unet, text_encoder, tokenizer, latents * scaling, labels, scheduler,
                                    args.unet_steps, args.batch, log_every=50, seed=args.seed)
    # fp16 weights keep the folder under 20 MB; DiffusionBackbone loads them as fp32 by default
    parts = [m.to(torch.float16) for m in (vae, unet_ema, text_ema)]
    save_components(args.out, *parts, tokenizer, scheduler)
    print(f"wrote {args.out} in {(time.time() - start) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
