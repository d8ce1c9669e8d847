"""Train the bundled default model ``checkpoints/digits`` from a fixed seed, on this CPU.

A small text-conditional latent diffusion model in diffusers format, the same parts as
Stable Diffusion at toy size (so every recipe runs on it unchanged):

- AutoencoderKL: 32x32x3 images -> 4x8x8 latents (2 downsamples), trained first
  (L1 + MSE reconstruction, tiny KL), then its ``scaling_factor`` set to 1 / std(latents).
- CLIPTextModel (2 layers, width 64) + a CLIPTokenizer: byte-level (v2 default: 514 tokens,
  every character a token) or the bundled CLIP BPE cut to 8192 merges (v1).
- UNet2DConditionModel, channels 64/128, cross-attention dim 64, trained jointly with the text
  encoder on epsilon prediction with a DDPM schedule; 10 % of captions dropped to "" (so
  classifier-free guidance works); EMA weights saved.

Data: scikit-learn's digits, images 0-1499 only (``diffperc.data.digits.load("train")``).
Images 1500-1796 are never seen. Weights are written as fp16 safetensors.

The default preset ``bundled`` (v2 with 1-pixel shift augmentation, batch 64: 2400 steps in
under 40 minutes on 2 cores) is what ``checkpoints/digits`` was trained with. Every difference
between v1 and v2 is a flag (``--preset v1`` rebuilds v1's recipe), so ``scripts/ablate_digits.py``
can train each one alone; its table is in the model card.

    python scripts/train_digits.py --out checkpoints/digits          # the bundled model, then scripts/eval_digits.py
    python scripts/train_digits.py --preset v1 --out /tmp/digits_v1  # the v1 recipe
    python scripts/train_digits.py --out /tmp/d --vae-steps 20 --unet-steps 20   # smoke run
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from diffperc._io import write_text_atomic
from diffperc.backbones._loading import save_components
from diffperc.backbones.tiny import bundled_tokenizer
from diffperc.data.digits import CLASS_WORDS, load

CAPTION = "a photo of the digit {}"
VARIANTS = (CAPTION, CAPTION, CAPTION, "the digit {}", "a handwritten {}", "the number {}", "{}")
MAX_LENGTH = 32


@dataclass
class Recipe:
    """Everything that defines a training run. Defaults are v2; :data:`PRESETS` ``"v1"`` is v1."""

    cross_attention_levels: int = 2  # 2: CrossAttn{Down,Up}Block2D at both levels; 1: only at 8x8 (v1)
    layers_per_block: int = 1
    batch: int = 128
    unet_steps: int = 2400
    lr: float = 6e-4
    captions: str = "single"  # "single": always CAPTION; "variants": VARIANTS (v1)
    tokenizer: str = "byte"  # "byte": byte-level CLIPTokenizer; "bpe": bundled CLIP BPE, 8192 merges (v1)
    beta_schedule: str = "scaled_linear"  # DDPMScheduler's: "scaled_linear" (SD's), "linear", "squaredcos_cap_v2"
    shift: int = 0  # augmentation: random translation by up to this many pixels (0: none)
    p_empty: float = 0.1
    vae_steps: int = 600
    ema: float = 0.999
    ema_warmup: bool = True  # decay min(ema, (1 + step) / (10 + step)); v1 had none


PRESETS = {
    # what checkpoints/digits was trained with: v2 + 1-pixel shifts at batch 64 (fits 40 min on 2 cores)
    "bundled": Recipe(shift=1, batch=64),
    "v2": Recipe(),
    "v1": Recipe(cross_attention_levels=1, layers_per_block=2, batch=64, unet_steps=2400, lr=5e-4,
                 captions="variants", tokenizer="bpe", ema_warmup=False),
}


def byte_tokenizer(model_max_length: int = MAX_LENGTH) -> CLIPTokenizer:
    """A CLIPTokenizer with no merges: 256 byte characters, the same with ``</w>``, start and end."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length, bos_token="<|startoftext|>",
                         eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>")


def make_tokenizer(recipe: Recipe) -> CLIPTokenizer:
    return byte_tokenizer() if recipe.tokenizer == "byte" else bundled_tokenizer(model_max_length=MAX_LENGTH)


def make_scheduler(recipe: Recipe) -> DDPMScheduler:
    """DDPM, 1000 steps; SD's scaled-linear betas 0.00085-0.012, or DDPM's linear 1e-4-0.02, or cosine."""
    betas = (0.00085, 0.012) if recipe.beta_schedule == "scaled_linear" else (1e-4, 0.02)
    return DDPMScheduler(num_train_timesteps=1000, beta_start=betas[0], beta_end=betas[1],
                         beta_schedule=recipe.beta_schedule, prediction_type="epsilon", clip_sample=False,
                         steps_offset=1)  # as SD 1.x/2.x scheduler configs


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=32, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64), norm_num_groups=32,
    )


def build_unet(recipe: Recipe) -> UNet2DConditionModel:
    both = recipe.cross_attention_levels == 2
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=recipe.layers_per_block,
        block_out_channels=(64, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D" if both else "DownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D" if both else "UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32,
    )


def build_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_LENGTH, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, projection_dim=64,
    ))


def _warmup_cosine(steps: int):
    """Linear warm-up over min(100, steps/10) steps, then cosine decay to 0."""
    warmup = min(100, steps // 10 + 1)
    return lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))


def train_vae(images: torch.Tensor, steps: int, batch: int = 32, log_every: int = 100) -> AutoencoderKL:
    """A fresh VAE trained on ``images`` (N, 3, 32, 32) in [0, 1]; its scaling factor is 1 / std(latents)."""
    vae = build_vae()
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
    latents = encode_all(vae, images)
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    with torch.no_grad():
        rec = vae.decode(latents[:256]).sample
    print(f"[vae] scaling_factor {vae.config.scaling_factor:.4f}; train recon MSE on [0,1]: "
          f"{F.mse_loss((rec + 1) / 2, images[:256]).item():.2e}", flush=True)
    return vae


@torch.no_grad()
def encode_all(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """(N, 3, 32, 32) in [0, 1] -> unscaled posterior means (N, 4, 8, 8)."""
    return torch.cat([vae.encode(x * 2 - 1).latent_dist.mean for x in images.split(256)])


def shifted(images: torch.Tensor, shift: int) -> torch.Tensor:
    """Every translation of the images by (dy, dx) in [-shift, shift]^2, zero-filled: (n_shifts, N, 3, H, W)."""
    out = []
    pad = F.pad(images, (shift,) * 4)
    h, w = images.shape[-2:]
    for dy in range(-shift, shift + 1):
        for dx in range(-shift, shift + 1):
            out.append(pad[..., shift - dy : shift - dy + h, shift - dx : shift - dx + w])
    return torch.stack(out)


def training_latents(vae: AutoencoderKL, images: torch.Tensor, shift: int) -> torch.Tensor:
    """Scaled latents of every shifted copy: (n_shifts, N, 4, 8, 8) (n_shifts = 1 without augmentation)."""
    copies = shifted(images, shift) if shift else images[None]
    return torch.stack([encode_all(vae, c) for c in copies]) * vae.config.scaling_factor


def captions_for(labels: torch.Tensor, rng: random.Random, recipe: Recipe) -> list[str]:
    templates = (CAPTION,) if recipe.captions == "single" else VARIANTS
    return ["" if rng.random() < recipe.p_empty else rng.choice(templates).format(CLASS_WORDS[y])
            for y in labels.tolist()]


def train_unet(recipe: Recipe, tokenizer: CLIPTokenizer, latents: torch.Tensor, labels: torch.Tensor,
               scheduler: DDPMScheduler, seed: int, log_every: int = 100,
               ) -> tuple[UNet2DConditionModel, CLIPTextModel, float]:
    """Joint epsilon-prediction training on (n_shifts, N, 4, 8, 8) latents.

    Returns the EMA copies of the UNet and the text encoder and the seconds per step.
    """
    torch.manual_seed(seed)
    unet, text_encoder = build_unet(recipe), build_text_encoder(tokenizer)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(recipe.unet_steps))
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    rng = random.Random(seed)
    unet.train()
    text_encoder.train()
    n_shift, n = latents.shape[:2]
    t0 = time.time()
    for step in range(recipe.unet_steps):
        idx = torch.randint(n, (recipe.batch,))
        x0 = latents[torch.randint(n_shift, (recipe.batch,)), idx]
        ids = tokenizer(captions_for(labels[idx], rng, recipe), padding="max_length", max_length=MAX_LENGTH,
                        truncation=True, return_tensors="pt").input_ids
        noise = torch.randn_like(x0)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (recipe.batch,))
        pred = unet(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=text_encoder(ids).last_hidden_state).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        # EMA with warm-up, as diffusers' EMAModel / torch_ema: without it, a 0.999 EMA still holds
        # 0.999^2400 = 9 % of the random initial weights after 2400 steps (v1 shipped that way)
        ema_decay = min(recipe.ema, (1 + step) / (10 + step)) if recipe.ema_warmup else recipe.ema
        with torch.no_grad():
            for ema, live in ((ema_unet, unet), (ema_text, text_encoder)):
                for pe, p in zip(ema.parameters(), live.parameters(), strict=True):
                    pe.lerp_(p, 1 - ema_decay)
        if step % log_every == 0 or step == recipe.unet_steps - 1:
            rate = (time.time() - t0) / (step + 1)
            print(f"[unet] step {step:5d}/{recipe.unet_steps} loss {loss.item():.4f} ({rate:.2f} s/step)", flush=True)
    return ema_unet, ema_text, (time.time() - t0) / max(recipe.unet_steps, 1)


def train(recipe: Recipe, images: torch.Tensor, labels: torch.Tensor, seed: int = 0,
          vae: AutoencoderKL | None = None) -> dict:
    """Train a model on (images, labels); returns its diffusers components (fp32) and timings."""
    start = time.time()
    torch.manual_seed(seed)
    tokenizer = make_tokenizer(recipe)
    vae = vae if vae is not None else train_vae(images, recipe.vae_steps)
    scheduler = make_scheduler(recipe)
    latents = training_latents(vae, images, recipe.shift)
    unet, text_encoder, s_per_step = train_unet(recipe, tokenizer, latents, labels, scheduler, seed)
    print(f"params: vae {_millions(vae)}M, unet {_millions(unet)}M, text {_millions(text_encoder)}M", flush=True)
    return {"vae": vae, "unet": unet, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler,
            "s_per_step": s_per_step, "minutes": (time.time() - start) / 60}


def _millions(m: torch.nn.Module) -> str:
    return f"{sum(p.numel() for p in m.parameters()) / 1e6:.2f}"


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    recipe = PRESETS[args.preset]
    changes = {f.name: getattr(args, f.name) for f in dataclasses.fields(Recipe) if getattr(args, f.name) is not None}
    return dataclasses.replace(recipe, **changes)


def add_recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default="bundled",
                        help="bundled (default): the recipe of checkpoints/digits, v2 + 1-pixel shifts at batch 64; "
                             "v2: without the shifts, at batch 128; v1: the first bundled model's recipe")
    for f in dataclasses.fields(Recipe):
        kind = _yes_no if isinstance(f.default, bool) else type(f.default)
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=None,
                            help=f"default: the preset's ({getattr(PRESETS['bundled'], f.name)!r} in bundled)")


def _yes_no(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "1", "yes")


def main() -> None:
    parser = argparse.ArgumentParser(description="Train the bundled digits diffusion model.")
    parser.add_argument("--out", type=Path, default=Path("checkpoints/digits"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    add_recipe_args(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipe = recipe_from_args(args)
    print(f"recipe: {recipe}", flush=True)
    images, labels = load("train")  # images 0-1499 only; 1500-1796 are held out
    cpu0 = time.process_time()
    parts = train(recipe, images, labels, seed=args.seed)
    # fp16 weights keep the folder small; DiffusionBackbone loads them as fp32 by default
    modules = [parts[k].to(torch.float16) for k in ("vae", "unet", "text_encoder")]
    save_components(args.out, *modules, parts["tokenizer"], parts["scheduler"])
    info = {"recipe": dataclasses.asdict(recipe), "seed": args.seed, "threads": args.threads,
            "wall_minutes": round(parts["minutes"], 1), "cpu_minutes": round((time.process_time() - cpu0) / 60, 1),
            "s_per_step": round(parts["s_per_step"], 3)}
    write_text_atomic(args.out / "training.json", json.dumps(info, indent=1) + "\n")
    # the caption to query the model with (diffperc.zeroshot.classifier.default_template reads it)
    write_text_atomic(args.out / "prompt_template.txt", CAPTION + "\n")
    print(f"wrote {args.out} in {parts['minutes']:.1f} min ({info['cpu_minutes']} CPU-min)", flush=True)


if __name__ == "__main__":
    main()
