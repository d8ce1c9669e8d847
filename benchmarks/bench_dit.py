"""DiT backbone speed (SD3 MMDiT, FLUX) on the real architectures' widths at reduced depth (random weights).

Per family, against a baseline measured in the same run (median of ``--reps``, round-robin):
  (a) baseline: the full transformer forward with a forward hook on the tap,
  (b) the backbone on the same tap, early-stopped after it (features identical, checked),
  (c) the same with joint-attention capture (image->text maps of every double-stream block that ran),
  (e) an ensemble of 4 as one batched call vs 4 sequential passes (``ensemble_chunk=1``).
The widths are SD3-medium's (24 heads x 64 = 1536, joint_attention_dim 4096, pooled 2048, 16 latent
channels, patch 2) and FLUX.1's (24 heads x 128 = 3072, joint 4096, pooled 768, 64 packed channels,
guidance embedding); the depth is cut to ``--sd3-depth`` joint blocks / ``--flux-depth`` double +
single blocks (the full 24 / 19 + 38 need 2 GB / 48 GB of fp32 weights: use ``--sd3-depth 24
--flux-depth 19 38`` on a GPU). Early stop skips what follows the tap (at the defaults: SD3's last joint
block; FLUX's last two single blocks).
Latents and prompt embeddings are passed directly (no VAE, no text encoders in the timing).

    python benchmarks/bench_dit.py                          # CPU defaults (256 px, 128 text tokens)
    python benchmarks/bench_dit.py --device cuda --dtype bfloat16 --size 1024 --text-tokens 333 --sd3-depth 24 --flux-depth 19 38
    python benchmarks/bench_dit.py --tiny                   # seconds: checks the script

Measured 2026-12-02 on the 2-core CPU with nothing else running, defaults, two runs (``--reps 3`` /
``--reps 5``); speed-up = reference time / row time:
    sd3   a_full_hook 0.65 / 0.70 s | b_early_stop 1.22x / 1.09x | c_early_stop_attention 1.09x / 0.59x | ensemble 4 batched 1.12x / 0.97x vs sequential
    flux  a_full_hook 2.55 / 2.44 s | b_early_stop 1.27x / 1.31x | c_early_stop_attention 1.17x / 1.28x | ensemble 4 batched 1.07x / 1.06x
    sd3 again, ``--families sd3 --reps 7``: 0.62 s | 1.23x | 1.15x | 1.13x (run 2's capture figure is the outlier)
Early-stopped features equal the full forward's exactly (max |diff| 0) for both. No GPU run yet.
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
from _timing import time_configs  # benchmarks/_timing.py, beside this script


def build(family: str, args: argparse.Namespace):
    """A backbone factory around one shared random transformer of ``family`` ("sd3" or "flux")."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    from diffperc.backbones import FluxBackbone, SD3Backbone
    from diffperc.backbones.tiny import tiny_flux_components, tiny_sd3_components

    torch.manual_seed(0)
    heads, head_dim = (2, 8) if args.tiny else (24, 64 if family == "sd3" else 128)
    joint = 48 if args.tiny and family == "sd3" else 24 if args.tiny else 4096
    if family == "sd3":
        parts = tiny_sd3_components()
        tr = SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=4 if args.tiny else 16, num_layers=args.sd3_depth,
            attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=joint,
            caption_projection_dim=heads * head_dim, pooled_projection_dim=32 if args.tiny else 2048,
            out_channels=4 if args.tiny else 16, pos_embed_max_size=192)
        cls = SD3Backbone
    else:
        parts = tiny_flux_components()
        tr = FluxTransformer2DModel(
            patch_size=1, in_channels=16 if args.tiny else 64, num_layers=args.flux_depth[0],
            num_single_layers=args.flux_depth[1], attention_head_dim=head_dim, num_attention_heads=heads,
            joint_attention_dim=joint, pooled_projection_dim=16 if args.tiny else 768, guidance_embeds=True,
            axes_dims_rope=(2, 2, 4) if args.tiny else (16, 56, 56))
        cls = FluxBackbone
    tr = tr.to(args.device, args.dtype).eval()
    parts["transformer"] = tr  # the tiny VAE and text encoders are never run: latents and embeddings are given

    def make(**kw):
        return cls(**parts, max_sequence_length=16, **kw)

    return tr, make


def runners(family: str, tr: torch.nn.Module, make, args: argparse.Namespace) -> tuple[dict, dict]:
    """Config name -> zero-argument callable (one batch-1 forward), and the feature check."""
    from diffperc.backbones.flux import latent_image_ids, pack_latents

    c = tr.config.in_channels // (1 if family == "sd3" else 4)
    side = args.size // 8  # the real models' VAEs downsample 8x
    lat = torch.randn(1, c, side, side, device=args.device, dtype=args.dtype)
    emb = torch.randn(1, args.text_tokens, tr.config.joint_attention_dim, device=args.device, dtype=args.dtype)
    pooled = torch.randn(1, tr.config.pooled_projection_dim, device=args.device, dtype=args.dtype)
    n_blocks = len(tr.transformer_blocks) + len(getattr(tr, "single_transformer_blocks", []))
    tap = n_blocks // 2
    early = make(layers=[tap], add_noise=False, timestep=500)
    attn = make(layers=[tap], add_noise=False, timestep=500, attention=True)
    name = early.layers[0]
    for bb in (early, attn):
        _ = bb.feature_info

    @torch.no_grad()
    def full_with_hook() -> torch.Tensor:
        got = {}
        h = tr.get_submodule(name).register_forward_hook(lambda m, a, o: got.update(x=o[1]))  # returns None
        try:
            t = torch.full((1,), 500.0 if family == "sd3" else 0.5, device=args.device, dtype=args.dtype)
            if family == "sd3":
                tr(hidden_states=lat, timestep=t, encoder_hidden_states=emb, pooled_projections=pooled)
            else:
                tr(hidden_states=pack_latents(lat), timestep=t, guidance=torch.full((1,), 3.5, device=args.device),
                   encoder_hidden_states=emb, pooled_projections=pooled,
                   txt_ids=torch.zeros(emb.shape[1], 3, device=args.device, dtype=args.dtype),
                   img_ids=latent_image_ids(side // 2, side // 2, args.device, args.dtype))
        finally:
            h.remove()
        return got["x"]

    def backbone(bb) -> torch.Tensor:
        with torch.no_grad():
            return bb(latents=lat, prompt_embeds=emb, pooled_prompt_embeds=pooled).features[0]

    ref = full_with_hook()
    got = backbone(early)
    check = {"tap": name, "blocks": n_blocks, "max_abs_diff": (got.flatten(2).transpose(1, 2) - ref).abs().max().item()}
    return {"a_full_hook": full_with_hook, "b_early_stop": partial(backbone, early),
            "c_early_stop_attention": partial(backbone, attn)}, check


def ensemble_runs(make, tr, family: str, args: argparse.Namespace) -> dict:
    c = tr.config.in_channels // (1 if family == "sd3" else 4)
    lat = torch.randn(1, c, args.size // 8, args.size // 8, device=args.device, dtype=args.dtype)
    emb = torch.randn(1, args.text_tokens, tr.config.joint_attention_dim, device=args.device, dtype=args.dtype)
    pooled = torch.randn(1, tr.config.pooled_projection_dim, device=args.device, dtype=args.dtype)
    batched = make(layers=[1], ensemble_size=4)
    seq = make(layers=[1], ensemble_size=4, ensemble_chunk=1)

    def run(bb) -> None:
        with torch.no_grad():
            bb(latents=lat, prompt_embeds=emb, pooled_prompt_embeds=pooled)

    return {"e_ensemble4_batched": partial(run, batched), "e_ensemble4_sequential": partial(run, seq)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--size", type=int, default=256, help="image side in pixels (latents = size / 8)")
    p.add_argument("--text-tokens", type=int, default=128, help="prompt tokens (SD3: 333, FLUX: 512 in the pipelines)")
    p.add_argument("--sd3-depth", type=int, default=4, help="joint blocks (SD3-medium: 24)")
    p.add_argument("--flux-depth", type=int, nargs=2, default=[1, 3], help="double, single blocks (FLUX.1: 19 38)")
    p.add_argument("--families", nargs="+", default=["sd3", "flux"], choices=["sd3", "flux"])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="toy widths (checks the script in seconds)")
    args = p.parse_args()
    args.dtype = getattr(torch, args.dtype)
    if args.tiny:
        args.size, args.text_tokens = min(args.size, 64), min(args.text_tokens, 16)
    print(f"device {args.device}, dtype {str(args.dtype).removeprefix('torch.')}, {args.size} px, "
          f"{args.text_tokens} text tokens, reps {args.reps}{', TINY widths' if args.tiny else ''}")
    print(f"{'family':<6} {'config':<24} {'s / image':>10} {'time vs ref':>12} {'speed-up':>9}   (ref: a; for batched: sequential)")
    for fam in args.families:
        tr, make = build(fam, args)
        run, check = runners(fam, tr, make, args)
        t = time_configs(run, args.reps, args.device)
        t |= time_configs(ensemble_runs(make, tr, fam, args), args.reps, args.device)
        base = t["a_full_hook"]
        depth = (f"{args.sd3_depth} joint blocks" if fam == "sd3"
                 else f"{args.flux_depth[0]} double + {args.flux_depth[1]} single blocks")
        for k, v in t.items():
            ref = t["e_ensemble4_sequential"] if k == "e_ensemble4_batched" else base
            print(f"{fam:<6} {k:<24} {v:>10.3f} {v / ref:>11.2f}x {ref / v:>8.2f}x")
        print(f"{fam:<6} tap {check['tap']} of {check['blocks']} ({depth}); early-stop features vs full forward: "
              f"max |diff| {check['max_abs_diff']:.2e}; batched ensemble ratio is vs sequential")


if __name__ == "__main__":
    main()
