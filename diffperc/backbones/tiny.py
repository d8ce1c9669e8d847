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

__all__ = ["bundled_tokenizer", "tiny_sd_components", "tiny_sdxl_components", "TOKENIZER_DIR", "tiny_sd3_components",
           "tiny_flux_components"]

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


def _tiny_flow_vae(seed_offset: int = 0) -> Any:
    """A 2x-downsampling VAE with SD3/FLUX's 16 -> here 4 latent channels and their shift/scale factors."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(4, 8),
                         norm_num_groups=2, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, sample_size=16,
                         shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False)


def _tiny_clip(tok: Any, projection: bool, hidden: int = 16) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         hidden_size=hidden, intermediate_size=24, num_attention_heads=2, num_hidden_layers=2,
                         vocab_size=len(tok), hidden_act="gelu", projection_dim=hidden, max_position_embeddings=77)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def _tiny_t5(tok: Any, d_model: int) -> Any:
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tok), d_model=d_model, d_kv=8, d_ff=24, num_layers=2, num_heads=2,
                                   decoder_start_token_id=0, pad_token_id=tok.pad_token_id))


def tiny_sd3_components(seed: int = 0, t5: bool = True, max_length: int = 77) -> dict[str, Any]:
    """Random tiny SD3-shaped parts (``StableDiffusion3Pipeline``'s nine components).

    An ``SD3Transformer2DModel`` with 3 joint blocks (the last one ``context_pre_only``, as in SD3),
    patch 2, width 16 (2 heads of 8); a 2x VAE with SD3's shift/scale factors; CLIP-L and CLIP-G
    stand-ins (``CLIPTextModelWithProjection``, hidden 16 + 16, padded to the T5 width 48) and a
    T5 encoder (d_model 48) that reads the bundled CLIP tokenizer's ids (no T5 vocabulary ships
    offline). ``t5=False`` drops T5 (``text_encoder_3=None``), as the pipeline allows. Images
    must be multiples of 4 pixels (VAE 2x, patch 2); latents are (4, H/2, W/2).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    tok = bundled_tokenizer(max_length)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=48, caption_projection_dim=16, pooled_projection_dim=32, out_channels=4,
            pos_embed_max_size=32)
        vae = _tiny_flow_vae()
        te1, te2 = _tiny_clip(tok, True), _tiny_clip(tok, True)
        te3 = _tiny_t5(tok, 48) if t5 else None
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return {"transformer": transformer.eval(), "vae": vae.eval(), "text_encoder": te1.eval(),
            "text_encoder_2": te2.eval(), "text_encoder_3": te3.eval() if t5 else None, "tokenizer": tok,
            "tokenizer_2": bundled_tokenizer(max_length), "tokenizer_3": bundled_tokenizer(max_length) if t5 else None,
            "scheduler": scheduler}


def tiny_flux_components(seed: int = 0, guidance: bool = True, max_length: int = 77) -> dict[str, Any]:
    """Random tiny FLUX-shaped parts (``FluxPipeline``'s seven components).

    A ``FluxTransformer2DModel`` with 2 double-stream and 3 single-stream blocks, width 16
    (2 heads of 8, RoPE axes (2, 2, 4)), 2x2-packed latents (in_channels 4 x 4 = 16) and, with
    ``guidance`` (FLUX.1-dev; schnell has none), a guidance embedding; a 2x VAE; a
    ``CLIPTextModel`` (pooled output 16) and a T5 encoder (d_model 24) on the bundled tokenizer;
    FLUX.1-dev's scheduler config (shift 3, dynamic shifting). Images must be multiples of 4
    pixels (VAE 2x, 2x2 packing); latents are (4, H/2, W/2).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    tok = bundled_tokenizer(max_length)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, out_channels=16, num_layers=2, num_single_layers=3, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=16, guidance_embeds=guidance,
            axes_dims_rope=(2, 2, 4))
        vae = _tiny_flow_vae()
        te1, te2 = _tiny_clip(tok, False), _tiny_t5(tok, 24)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096)
    return {"transformer": transformer.eval(), "vae": vae.eval(), "text_encoder": te1.eval(), "text_encoder_2": te2.eval(),
            "tokenizer": tok, "tokenizer_2": bundled_tokenizer(max_length), "scheduler": scheduler}
