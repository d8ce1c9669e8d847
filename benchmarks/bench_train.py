"""Training-step speed and memory of the VPD depth task on the SD-1.5 architecture (random weights, no download).

One step = forward (VAE encode, UNet to the last VPD tap, VPDDepthHead), SiLog loss, backward and
an AdamW step, through ``DepthTask.training_step``, for
  (a) a frozen backbone: only the head and the text adapter train (the UNet runs under no_grad),
  (b) the fine-tuned UNet (VPD's recipe; UNet at 0.01x lr),
  (c) the fine-tuned UNet with gradient checkpointing (diffusers' ``enable_gradient_checkpointing``).
All parts have SD 1.5's architecture (VAE, UNet, a CLIP ViT-L/14-shaped text encoder) with random
weights; one prompt template per scene keeps the scene-table set-up short (it is not timed).
Each setting runs in a fresh subprocess, so its peak memory is its own: on a CPU the process's
peak resident memory (VmHWM; it includes the ~4 GB of weights) and the peak above the resident
memory after the model was built (gradients, optimizer state, activations); on a GPU
``torch.cuda.max_memory_allocated``. A last, untimed forward counts the tensors autograd saves
for backward (activations), the part gradient checkpointing shrinks; at 256 px and batch 2 the
peak is set by weights + gradients + AdamW state (~14 GB fine-tuned), so checkpointing barely moves it. Times are the median of ``--steps`` steps after one warm-up
step (which also allocates the optimizer state).

    python benchmarks/bench_train.py                        # CPU, 256x256, batch 2
    python benchmarks/bench_train.py --device cuda --size 512 --batch 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch
from _proc import run_settings_in_children, vm_mb  # benchmarks/_proc.py, beside this script

SETTINGS: dict[str, dict[str, bool]] = {
    "a_frozen_backbone": {"trainable": False},
    "b_finetune_unet": {"trainable": True},
    "c_finetune_unet_checkpointing": {"trainable": True, "gradient_checkpointing": True},
}
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
)
PRESET = "bench_sd15_random"
SCENES = ["bedroom", "kitchen", "living_room", "bathroom"]


def register_preset() -> None:
    """Register ``bench_sd15_random``: SD-1.5-shaped VAE, UNet and ViT-L/14 text encoder, random weights."""
    from diffperc.backbones.registry import list_backbones, register_backbone

    if PRESET in list_backbones():
        return

    @register_backbone(PRESET)
    def _build(**kw: Any) -> torch.nn.Module:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        from diffperc import DiffusionBackbone
        from diffperc.backbones.tiny import bundled_tokenizer

        torch.manual_seed(0)
        tok = bundled_tokenizer()
        text = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
        sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
        return DiffusionBackbone(vae=AutoencoderKL(**SD15_VAE), unet=UNet2DConditionModel(**SD15_UNET),
                                 text_encoder=text, tokenizer=tok, scheduler=sched, name_or_path=PRESET, **kw)


def saved_activations_mb(task: torch.nn.Module, batch: dict[str, Any]) -> float:
    """MB of the tensors autograd keeps for backward in one forward + loss (each storage counted once).

    What gradient checkpointing saves; the peak-memory columns also hold weights, gradients and
    AdamW's state, which checkpointing does not change.
    """
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = task.training_step(batch, 0)
    del loss
    return sum(storages.values()) / 2**20


def run_setting(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Build the task for one setting and time its training steps (runs inside the child process)."""
    import warnings

    from diffperc.tasks.depth import DepthTask

    warnings.filterwarnings("ignore")  # self.log outside a Trainer warns at every step
    torch.set_num_threads(args.threads)
    register_preset()
    t0 = time.perf_counter()
    kw = {"layers": "vpd", "timestep": 1, "add_noise": False, **SETTINGS[name]}
    task = DepthTask(backbone=PRESET, backbone_kwargs=kw, scene_names=SCENES, templates=["a photo of a {}."],
                     flip_test=False).to(args.device)
    task.train()
    groups = task.parameter_groups()
    for g in groups:
        g["lr"] = args.lr * (task.backbone_lr_mult if g["name"] == "backbone" else 1.0)
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(args.batch, 3, args.size, args.size, generator=g).to(args.device),
             "depth": (0.5 + 9 * torch.rand(args.batch, 1, args.size, args.size, generator=g)).to(args.device),
             "scene": torch.arange(args.batch).remainder(len(SCENES)).to(args.device), "name": ["x"] * args.batch}
    build_s = time.perf_counter() - t0
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_mb = torch.cuda.memory_allocated() / 2**20
    else:
        import ctypes
        import gc

        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        base_mb = vm_mb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    times, losses = [], []
    for step in range(1 + args.steps):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = task.training_step(batch, step)
        loss.backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        if step > 0:
            times.append(time.perf_counter() - t)
        losses.append(loss.item())
    peak_mb = torch.cuda.max_memory_allocated() / 2**20 if cuda else vm_mb("VmHWM")
    saved_mb = saved_activations_mb(task, batch)
    n_train = sum(p.numel() for grp in groups for p in grp["params"])
    return {"setting": name, "step_s": statistics.median(times), "times": times, "build_s": build_s,
            "base_mb": base_mb, "peak_mb": peak_mb, "extra_mb": peak_mb - base_mb, "saved_mb": saved_mb, "losses": losses,
            "trainable_params": n_train}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed steps per setting (after one warm-up step)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--child", choices=list(SETTINGS), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(run_setting(args.child, args)))
        return
    results = run_settings_in_children(__file__, args.settings, args)
    print(f"VPD depth training step, SD-1.5 architecture (random weights), {args.device} fp32, image {args.size}, "
          f"batch {args.batch}, threads {args.threads}, AdamW, median of {args.steps} steps after 1 warm-up")
    mem = "peak GPU MB" if args.device.startswith("cuda") else "peak RSS MB"
    print(f"| setting | trainable params | s / step | vs (a) | {mem} | vs (a) | above model MB | vs (a) "
          "| saved for backward MB | vs (a) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    ref = results.get("a_frozen_backbone")
    for name, r in results.items():
        rel = {k: f"{r[k] / ref[k]:.2f}x" if ref else "-" for k in ("step_s", "peak_mb", "extra_mb", "saved_mb")}
        print(f"| {name} | {r['trainable_params'] / 1e6:.1f}M | {r['step_s']:.2f} | {rel['step_s']} | "
              f"{r['peak_mb']:.0f} | {rel['peak_mb']} | {r['extra_mb']:.0f} | {rel['extra_mb']} | "
              f"{r['saved_mb']:.0f} | {rel['saved_mb']} |")
    for name, r in results.items():
        print(f"{name}: build {r['build_s']:.0f} s, step times {[round(t, 2) for t in r['times']]}, "
              f"losses {[round(v, 3) for v in r['losses']]}")


if __name__ == "__main__":
    main()
