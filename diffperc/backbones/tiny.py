"""Tiny random Stable-Diffusion-shaped components, built in code, for offline tests.

``tiny_sd_components()`` returns the five parts of a Stable Diffusion pipeline (VAE, UNet,
CLIP text encoder, CLIP tokenizer, DDPM scheduler) at toy width but with SD's block
structure: four UNet levels (three cross-attention down blocks, a plain one, the mirror on
the way up, two layers per block), so the ``"vpd"`` and ``"dift"`` layer presets resolve to
the same module paths as on SD 1.5. ``sd2=True`` gives SD 2.x's flavour (linear projections,
per-level head counts, v-prediction). The tokenizer is the real CLIP BPE cut to its first
8192 merges; its files ship in ``diffperc/assets/tokenizer`` (made by
``scripts/make_tokenizer.py``), so nothing touches the network.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import torch

__all__ = ["bundled_tokenizer", "tiny_sd_components", "tiny_sdxl_components", "TOKENIZER_DIR"]

TOKENIZER_DIR = resources.files("diffperc") / "assets" / "tokenizer"


def bundled_tokenizer(model_max_length: int = 77) -> Any:
    """The shipped CLIPTokenizer (8706 tokens; SD 1.5's ids for every non-special token)."""
    from transformers import CLIPTokenizer

    with resources.as_file(TOKENIZER_DIR) as folder:
        return CLIPTokenizer.from_pretrained(str(folder), model_max_length=model_max_length)


def tiny_sd_components(seed: int = 0, sd2: bool = False, max_length: int = 77) -> dict[str, Any]:
    """Random tiny SD-shaped parts: {"vae", "unet", "text_encoder", "tokenizer", "scheduler"}.

    Args:
        seed: torch seed for the random weights (same seed, same weights).
        sd2: SD 2.x flavour (linear projections in transformers, head counts per level,
            ``v_prediction``) instead of SD 1.x (``epsilon``).
        max_length: tokenizer max length (77 as in SD).

    The VAE downsamples 2x and the UNet 8x, so images must be multiples of 16 pixels.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = bundled_tokenizer(max_length)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(8, 8, 16, 16), norm_num_groups=4, cross_attention_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            attention_head_dim=(2, 2, 4, 4) if sd2 else 2, use_linear_projection=sd2,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(4, 8), norm_num_groups=2,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            layers_per_block=1, sample_size=32,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=8, intermediate_size=16, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=max_length, projection_dim=8,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ))
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="v_prediction" if sd2 else "epsilon", clip_sample=False,
    )
    return {"vae": vae.eval(), "unet": unet.eval(), "text_encoder": text_encoder.eval(),
            "tokenizer": tokenizer, "scheduler": scheduler}


def tiny_sdxl_components(seed: int = 0, max_length: int = 77) -> dict[str, Any]:
    """Random tiny SDXL-shaped parts: SD's five plus ``text_encoder_2`` / ``tokenizer_2``.

    The UNet has SDXL's layout at toy width: three levels (a plain down block, then two
    cross-attention ones; the mirror on the way up), 1/2/2 transformer layers per level, linear
    projections and ``addition_embed_type="text_time"`` (pooled text embeds + 6 time ids).
    ``text_encoder`` is a ``CLIPTextModel`` (hidden 8), ``text_encoder_2`` a
    ``CLIPTextModelWithProjection`` (hidden 8, projection 8): cross_attention_dim 16.
    The VAE downsamples 2x and the UNet 4x: images are multiples of 8 pixels.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = bundled_tokenizer(max_length)
    time_dim, proj = 4, 8
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(8, 16, 16),
            norm_num_groups=4, cross_attention_dim=16, transformer_layers_per_block=(1, 2, 2),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4, 4), use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=time_dim, projection_class_embeddings_input_dim=proj + 6 * time_dim,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(4, 8), norm_num_groups=2,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            layers_per_block=1, sample_size=32, scaling_factor=0.13025,
        )
        configs = [CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=8, intermediate_size=16, num_hidden_layers=3,
            num_attention_heads=2, max_position_embeddings=max_length, projection_dim=proj,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, hidden_act="gelu",
        ) for _ in range(2)]
        text_encoder = CLIPTextModel(configs[0])
        text_encoder_2 = CLIPTextModelWithProjection(configs[1])
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", prediction_type="epsilon", clip_sample=False)
    return {"vae": vae.eval(), "unet": unet.eval(), "text_encoder": text_encoder.eval(),
            "text_encoder_2": text_encoder_2.eval(), "tokenizer": tokenizer, "tokenizer_2": bundled_tokenizer(max_length),
            "scheduler": scheduler}
