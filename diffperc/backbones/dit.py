"""Shared base of the transformer (DiT) backbones: SD3 (MMDiT) and FLUX, on rectified flow.

What differs from the SD UNet (``diffusion.py``), and is held here once for every DiT family:

- **Tokens -> maps.** The denoiser sees patchified latents; its blocks output image tokens
  (B, (h/p)(w/p), C) that are returned as maps (B, C, h/p, w/p) (reduction = VAE factor x p).
- **Two streams.** A joint block returns ``(encoder_hidden_states, hidden_states)``: a tap
  ``"transformer_blocks.3"`` is the image stream, ``"transformer_blocks.3:context"`` the text
  stream (returned as (B, C, L), ``feature_info`` reduction 0), ``":input"`` /
  ``":context_input"`` the tensors entering the module. Attention modules return
  ``(hidden_states, encoder_hidden_states)``; any other module's token output is read as image
  tokens (a joint [text, image] sequence is cut to its image part).
- **Rectified-flow noising.** x_t = (1 - sigma) x0 + sigma eps (``FlowMatchEulerDiscreteScheduler
  .scale_noise``). ``timestep`` is an integer t in [0, 1000) with sigma = t / 1000 (the
  transformer's own time input is t = 1000 sigma), or ``sigma`` is given directly;
  ``shifted=True`` passes t / 1000 through the scheduler's shift first (SD3: static shift 3;
  FLUX: dynamic, mu from the image's token count), as the samplers space their steps.
- **Block-index presets.** ``layers=5`` or ``[3, 7]``: blocks counted in forward order over
  every block list (FLUX: the 19 double-stream blocks, then the 38 single-stream ones, as DiTF
  counts them).

Taps, early stop (a hook raises :class:`~diffperc.backbones._taps.StopForward` after the last
tap), ensembles, several timesteps, the prompt cache and ``BackboneOutput``/``feature_info`` are
the UNet backbone's; the generic steps (ensemble averaging, noise drawing, prompt caching) are
:class:`~diffperc.backbones.diffusion.DiffusionBackbone`'s own functions, reused, not copied. No
model forward is copied: diffusers runs its own.
"""

from __future__ import annotations

import difflib
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ._base import BackboneOutput, DenoiserPlacement, FeatureInfo, FeatureInfoList, ProbedFeatureInfo
from ._checks import check_images, check_latents, check_prompts, pad_to_multiple
from ._dit_taps import JointAttentionCapture, StreamTaps, split_stream_tap
from ._taps import run_tapped
from .attention import AttentionStore
from .diffusion import DiffusionBackbone

__all__ = ["DiTBackbone", "JointAttentionCapture", "StreamTaps"]

DEFAULT_TIMESTEP = 260  # DiTF's t (eval_spair.sh --t 260); also a mid-low noise level for SD3


class DiTBackbone(DenoiserPlacement, ProbedFeatureInfo, nn.Module):
    """Base of the DiT backbones; subclasses say how text is encoded and how the transformer is called.

    Args:
        vae, transformer, scheduler: the pipeline's ``AutoencoderKL``, transformer and
            ``FlowMatchEulerDiscreteScheduler``.
        layers: taps (module paths of the transformer with an optional ``:input``,
            ``:context``, ``:context_input``), block indices (``5``, ``[3, 7]``: forward order over
            all block lists), or a family preset (see the subclass).
        timestep: integer t in [0, 1000) (sigma = t / 1000) or several ([100, 260, 500]); default 260.
        sigma: noise levels sigma in [0, 1] instead of ``timestep`` (one or several).
        shifted: map t / 1000 through the scheduler's shift (static or dynamic) before noising.
        timestep_reduce: with several timesteps, ``"none"`` (every tap at every t, timestep-major,
            names ``"<tap>@t<t>"``) or ``"mean"``.
        add_noise: noise the latents to sigma (False: clean latents, the model still gets t).
        ensemble_size, ensemble_chunk: E noisy copies per image, run batched, averaged.
        attention: capture image->text joint-attention maps (see :class:`JointAttentionCapture`),
            averaged over the double-stream blocks that ran, per reduction.
        latent_sample: ``"mean"`` of the VAE posterior or a ``"sample"`` (one per copy).
        trainable, gradient_checkpointing: fine-tune the transformer (the VAE and text encoders stay frozen).
        pad: zero-pad images to ``size_multiple`` (bottom/right) and crop the maps back, instead of raising.
        name_or_path: where the weights came from.
    """

    _denoiser = "transformer"  # DenoiserPlacement: device / dtype are the transformer's

    pipeline_class = ""
    family = "dit"
    text_parts: tuple[str, ...] = ()

    def __init__(
        self, vae: nn.Module, transformer: nn.Module, scheduler: Any, layers: Any = None,
        timestep: int | Sequence[int] | None = None, sigma: float | Sequence[float] | None = None,
        shifted: bool = False, timestep_reduce: str = "none", add_noise: bool = True, ensemble_size: int = 1,
        ensemble_chunk: int | None = None, attention: bool = False, latent_sample: str = "mean",
        trainable: bool = False, gradient_checkpointing: bool = False, pad: bool = False,
        name_or_path: str | None = None,
    ) -> None:
        super().__init__()
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.vae, self.transformer = vae, transformer
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
        if timestep_reduce not in ("none", "mean"):
            raise ValueError(f"timestep_reduce must be 'none' or 'mean', got {timestep_reduce!r}")
        if ensemble_size < 1 or (ensemble_chunk is not None and ensemble_chunk < 1):
            raise ValueError(f"ensemble_size and ensemble_chunk must be >= 1, got {ensemble_size}, {ensemble_chunk}")
        if latent_sample not in ("mean", "sample"):
            raise ValueError(f"latent_sample must be 'mean' or 'sample', got {latent_sample!r}")
        self.timesteps, self.sigma_values = self._check_time(timestep, sigma)
        self.timestep = self.timesteps[0] if len(self.timesteps) == 1 else list(self.timesteps)
        self.shifted, self.timestep_reduce, self.add_noise = bool(shifted), timestep_reduce, add_noise
        self.ensemble_size, self.ensemble_chunk = ensemble_size, ensemble_chunk
        self.attention, self.latent_sample, self.trainable, self.pad = attention, latent_sample, trainable, pad
        self.vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.size_multiple = self.vae_factor * self.patch
        self.layers = self.resolve_layers(layers)
        self.config = {"name_or_path": name_or_path, "layers": self.layers, "timestep": self.timestep,
                       "sigma": sigma, "shifted": self.shifted, "timestep_reduce": timestep_reduce,
                       "add_noise": add_noise, "ensemble_size": ensemble_size, "ensemble_chunk": ensemble_chunk,
                       "attention": attention, "latent_sample": latent_sample, "trainable": trainable,
                       "gradient_checkpointing": gradient_checkpointing, "pad": pad}
        self.attention_resolutions = None
        self._store = AttentionStore()
        self.attention_layers = self._joint_attention_names()
        if attention:
            for name in self.attention_layers:
                m = transformer.get_submodule(name)
                m.set_processor(JointAttentionCapture(self._store, m.processor))
        self._prompt_cache: OrderedDict[str, Any] = OrderedDict()
        self.prompt_cache_stats = {"hits": 0, "misses": 0}
        self._feature_info: FeatureInfoList | None = None
        self._stop_after: str | None = None
        self._taps = StreamTaps(transformer, self._all_taps())
        vae.requires_grad_(False).eval()
        transformer.requires_grad_(trainable)
        if trainable and gradient_checkpointing:
            transformer.enable_gradient_checkpointing()

    # ------------------------------------------------------------------ what subclasses define
    @property
    def patch(self) -> int:
        """Latent pixels per token side (SD3: the transformer's patch_size; FLUX: 2, the 2x2 packing)."""
        return int(self.transformer.config.patch_size)

    @property
    def latent_channels(self) -> int:
        """Channels of the VAE latents (before any packing)."""
        return int(self.transformer.config.in_channels)

    @property
    def block_lists(self) -> tuple[str, ...]:
        return ("transformer_blocks",)

    def _extra_taps(self) -> list[str]:
        """Taps the family reads for itself beyond ``layers`` (FLUX DiTF: the block's modulation)."""
        return []

    def _all_taps(self) -> list[str]:
        return self.layers + [t for t in self._extra_taps() if t not in self.layers]

    def _encode_text(self, prompt: str) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _denoise(self, x: Tensor, sigma: Tensor, cond: dict[str, Tensor]) -> Any:
        raise NotImplementedError

    def _probe_cond(self) -> dict[str, Tensor]:
        raise NotImplementedError

    def _presets(self) -> dict[str, list[str]]:
        return {}

    # ------------------------------------------------------------------ checks
    def _model_time(self) -> str:
        return (f"{type(self).__name__}: the transformer receives t = 1000 * sigma and the latents are noised to "
                "sigma = t / 1000")

    def _check_time(self, timestep: Any, sigma: Any) -> tuple[list[int], list[float] | None]:
        if timestep is not None and sigma is not None:
            raise ValueError("pass timestep (integer t in [0, 1000)) or sigma (noise level in [0, 1]), not both")
        if sigma is not None:
            ss = [float(s) for s in ([sigma] if isinstance(sigma, (int, float)) else sigma)]
            if not ss or any(not 0.0 <= s <= 1.0 for s in ss):
                raise ValueError(f"sigma must be noise levels in [0, 1], got {ss} ({self._model_time()}); "
                                 "for an integer timestep t in [0, 1000) pass timestep=")
            if len(set(ss)) != len(ss):
                raise ValueError(f"sigma has duplicates: {ss}")
            return [round(s * 1000) for s in ss], ss
        t = DEFAULT_TIMESTEP if timestep is None else timestep
        ts = [t] if isinstance(t, (int, float)) or (isinstance(t, Tensor) and t.ndim == 0) else list(t)
        n = int(self.scheduler.config.num_train_timesteps)
        bad = [v for v in ts if not float(v).is_integer() or not 0 <= int(v) < n]
        if not ts or bad:
            hint = " (these look like sigmas: pass sigma= instead)" if bad and all(0 < float(v) < 1 for v in bad) else ""
            raise ValueError(f"timestep must be integers t in [0, {n}), got {bad or ts}{hint}. {self._model_time()}; "
                             "for a noise level in [0, 1] pass sigma=")
        ts = [int(v) for v in ts]
        if len(set(ts)) != len(ts):
            raise ValueError(f"timestep has duplicates: {ts}")
        return ts, None

    def _blocks(self) -> list[str]:
        return [f"{lst}.{i}" for lst in self.block_lists for i in range(len(getattr(self.transformer, lst)))]

    def resolve_layers(self, layers: Any) -> list[str]:
        """Block indices, a preset or taps -> validated taps (see the class Args)."""
        blocks, presets = self._blocks(), self._presets()
        if layers is None:
            layers = [blocks[len(blocks) // 2]]
        elif isinstance(layers, str) and layers in presets:
            layers = presets[layers]
        elif isinstance(layers, (str, int)):
            layers = [layers]
        out = []
        for tap in layers:
            if isinstance(tap, int) and not isinstance(tap, bool):
                if not -len(blocks) <= tap < len(blocks):
                    raise ValueError(f"block index {tap} out of range: this transformer has {len(blocks)} blocks "
                                     f"(0..{len(blocks) - 1}: {self._block_summary()})")
                tap = blocks[tap]
            out.append(str(tap))
        if not out:
            raise ValueError(f"layers is empty: give block indices, taps such as {blocks[:1]} or a preset "
                             f"{sorted(presets)}")
        if len(set(out)) != len(out):
            raise ValueError(f"layers has duplicates: {out}")
        modules = dict(self.transformer.named_modules())
        for tap in out:
            path, _ = split_stream_tap(tap)
            if path not in modules or path == "":
                close = difflib.get_close_matches(path, list(modules), n=6, cutoff=0.5)
                raise ValueError(
                    f"unknown transformer layer {path!r}. Valid block indices: 0..{len(blocks) - 1} "
                    f"({self._block_summary()}); presets: {sorted(presets) or 'none'}; close module paths: "
                    f"{close or 'none'}. Any path of dict(transformer.named_modules()) works, with ':input', "
                    "':context' or ':context_input' appended for the block's input / text stream.")
        return out

    def _block_summary(self) -> str:
        parts, start = [], 0
        for lst in self.block_lists:
            n = len(getattr(self.transformer, lst))
            parts.append(f"{start}..{start + n - 1} = {lst}.0..{n - 1}")
            start += n
        return ", ".join(parts)

    def _joint_attention_names(self) -> list[str]:
        """Attention modules with a text stream (``add_k_proj``): the double-stream blocks' ``attn``."""
        return [n for n, m in self.transformer.named_modules() if getattr(m, "add_k_proj", None) is not None
                and hasattr(m, "set_processor")]

    # ------------------------------------------------------------------ modes, loading, saving
    def train(self, mode: bool = True) -> DiTBackbone:
        """Only a trainable transformer follows train mode; VAE and text encoders stay in eval."""
        super().train(mode)
        for name, m in self.named_children():
            if name != "transformer":
                m.eval()
        self.transformer.train(mode and self.trainable)
        return self

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, **kwargs: Any) -> DiTBackbone:
        """A diffusers folder or hub id of this family (``DiffusionBackbone.from_pretrained`` does the loading
        and picks the class from model_index.json; see its Args)."""
        model = DiffusionBackbone.from_pretrained(name_or_path, **kwargs)
        if not isinstance(model, cls):
            raise ValueError(f"{name_or_path} holds a {type(model).__name__} model, not a {cls.__name__} one")
        return model

    def save_pretrained(self, folder: str | Path) -> None:
        """Write a diffusers folder (model_index.json names ``pipeline_class``) atomically."""
        from ._loading import save_components

        parts = {"transformer": self.transformer} | {k: getattr(self, k) for k in self.text_parts}
        text_encoder, tokenizer = parts.pop("text_encoder"), parts.pop("tokenizer")
        save_components(folder, self.vae, None, text_encoder, tokenizer, self.scheduler,
                        pipeline=self.pipeline_class, **parts)

    # ------------------------------------------------------------------ feature info
    @torch.no_grad()
    def _probe(self) -> None:
        """One tiny forward: name, channels, reduction of each map (reduction 0: text tokens (B, C, L))
        for ``feature_info`` (see :class:`~diffperc.backbones._base.ProbedFeatureInfo`)."""
        side = 2 * self.patch
        x = torch.zeros(1, self.latent_channels, side, side, device=self.device, dtype=self.dtype)
        was, self._store.active = self._store.active, False
        self._taps.start(None, n_img=4)
        try:
            self._denoise(x, torch.full((1,), 0.5, device=self.device), self._probe_cond())
        finally:
            self._store.active = was
            order, outs = list(self._taps.order), self._taps.stop()
        missing = [n for n in self._all_taps() if n not in outs]
        if missing:
            raise ValueError(f"layers {missing} did not run in the transformer forward; pick modules on its path")
        per_t = len(self.timesteps) > 1 and self.timestep_reduce == "none"
        info = FeatureInfoList()
        for t in self.timesteps if per_t else [None]:
            for name, (c, r) in self._tap_shapes(outs).items():
                info.append(FeatureInfo(name if t is None else f"{name}@t{t}", c, r))
        self._feature_info, self._stop_after = info, order[-1]

    def _tap_shapes(self, outs: dict[str, Tensor]) -> dict[str, tuple[int, int]]:
        shapes = {}
        for name in self.layers:
            f, kind = outs[name], split_stream_tap(name)[1]
            if f.ndim != 3:
                raise ValueError(f"tap {name!r} gives shape {tuple(f.shape)}, not tokens (B, N, C)")
            text = kind.startswith("context")
            if not text and f.shape[1] != 4:
                raise ValueError(f"tap {name!r} gives {f.shape[1]} tokens, not the image's: it reads the text "
                                 "stream (use ':context') or is not a token layer")
            shapes[name] = (f.shape[2], 0 if text else self.vae_factor * self.patch)
        return shapes

    # ------------------------------------------------------------------ steps
    def encode_images(self, images: Tensor, generator: torch.Generator | None = None, copies: int = 1) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> latents (B * copies, C, H/f, W/f) = (z - shift_factor) * scaling_factor.

        z is the VAE posterior mean (``latent_sample="mean"``) or one sample per copy.
        """
        images = check_images(images, self.size_multiple, pad=False, dtype=self.vae.dtype)
        with torch.no_grad():
            dist = self.vae.encode(images * 2 - 1).latent_dist
            z = dist.mean.repeat_interleave(copies, dim=0)
            if self.latent_sample == "sample":
                from diffusers.utils.torch_utils import randn_tensor

                eps = randn_tensor(z.shape, generator=generator, device=z.device, dtype=z.dtype)
                z = z + dist.std.repeat_interleave(copies, dim=0) * eps
        shift = self.vae.config.shift_factor or 0.0
        return (z - shift) * self.vae.config.scaling_factor

    def encode_prompt(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Prompts -> (prompt_embeds (B, L, D), pooled_prompt_embeds (B, P)), cached by prompt."""
        pairs = self._cached_prompts(list(prompts))
        return (torch.cat([p[0] for p in pairs]).to(self.device, self.dtype),
                torch.cat([p[1] for p in pairs]).to(self.device, self.dtype))

    _cached_prompts = DiffusionBackbone._cached_prompts
    _warn_truncation = staticmethod(DiffusionBackbone._warn_truncation)
    _draw_noise = DiffusionBackbone._draw_noise
    _ensemble = DiffusionBackbone._ensemble

    def sigmas_for(self, n_img_tokens: int) -> list[float]:
        """The run's noise levels: ``sigma``, or t / 1000 (through the scheduler's shift when ``shifted``)."""
        if self.sigma_values is not None:
            return list(self.sigma_values)
        s = [t / self.scheduler.config.num_train_timesteps for t in self.timesteps]
        if not self.shifted:
            return s
        cfg = self.scheduler.config
        if cfg.use_dynamic_shifting:  # FluxPipeline calculate_shift: mu linear in the image's token count
            m = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
            mu = n_img_tokens * m + cfg.base_shift - m * cfg.base_image_seq_len
            return [float(self.scheduler.time_shift(mu, 1.0, torch.tensor(v))) if v > 0 else 0.0 for v in s]
        return [cfg.shift * v / (1 + (cfg.shift - 1) * v) for v in s]  # the scheduler's static shift (__init__)

    def _noised(self, x0: Tensor, noise: Tensor | None) -> tuple[Tensor, Tensor]:
        """(N, C, h, w) clean latents -> (N*T, C, h, w) at each sigma (sample-major), and the sigmas (N*T,).

        x_t = sigma * eps + (1 - sigma) * x0, ``FlowMatchEulerDiscreteScheduler.scale_noise``'s formula.
        """
        n_img = (x0.shape[-2] // self.patch) * (x0.shape[-1] // self.patch)
        s = torch.tensor(self.sigmas_for(n_img), device=x0.device, dtype=torch.float32).repeat(x0.shape[0])
        x = x0.repeat_interleave(len(self.timesteps), dim=0)
        if noise is None:
            return x, s
        eps = noise.repeat_interleave(len(self.timesteps), dim=0)
        sig = s.to(x.dtype).view(-1, 1, 1, 1)
        return sig * eps + (1.0 - sig) * x, s

    def _run_unet(self, x: Tensor, cond: dict[str, Tensor], sigma: Tensor) -> tuple[list[Tensor], dict[int, Tensor]]:
        """One transformer call on (N, C, h, w) latents; returns the taps as maps and the attention maps."""
        if self._stop_after is None:
            self._probe()
        h, w = x.shape[-2] // self.patch, x.shape[-1] // self.patch
        if self.attention:  # tokens are latent pixels of a (h, w) grid at reduction vae_factor * patch
            self._store.begin((h, w), self.vae_factor * self.patch, None)
        self._taps.start(self._stop_after, n_img=h * w)
        feats, maps = run_tapped(self._taps, self._store, self.attention, lambda: self._denoise(x, sigma, cond))
        out = []
        for name in self._all_taps():
            f = feats[name]
            if name in self.layers and split_stream_tap(name)[1].startswith("context"):
                f = f.transpose(1, 2)  # text tokens (N, C, L)
            elif name in self.layers:
                f = f.transpose(1, 2).reshape(f.shape[0], f.shape[2], h, w)  # row-major tokens -> (N, C, h, w)
            out.append(f)
        return out, maps

    # ------------------------------------------------------------------ forward
    def _forward(self, images: Tensor | None, latents: Tensor | None, noise: Tensor | None,
                 generator: torch.Generator | None, prompts: str | Sequence[str] | None,
                 prompt_embeds: Tensor | None, pooled_prompt_embeds: Tensor | None) -> BackboneOutput:
        if (images is None) == (latents is None):
            raise ValueError("pass exactly one of images (B, 3, H, W) in [0, 1] or latents (B, C, h, w)")
        size = None
        if images is not None:
            size = tuple(images.shape[-2:]) if isinstance(images, Tensor) else None
            images = check_images(images, self.size_multiple, pad=self.pad, dtype=self.vae.dtype)
            if self.pad:
                images = pad_to_multiple(images, self.size_multiple)
            copies = self.encode_images(images, generator, copies=self.ensemble_size)
        else:
            latents = check_latents(latents, self.latent_channels, self.patch, dtype=self.dtype)
            copies = latents.repeat_interleave(self.ensemble_size, dim=0)
        batch = copies.shape[0] // self.ensemble_size
        cond = self._conditioning(batch, prompts, prompt_embeds, pooled_prompt_embeds)
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            feats, maps = self._ensemble(copies, cond, noise, generator)
        feats = self._postprocess(feats)
        if size is not None and self.pad:
            crop = [(-(-size[0] // r), -(-size[1] // r)) if r else None for r in self.feature_info.reductions()]
            feats = [f if c is None else f[..., : c[0], : c[1]] for f, c in zip(feats, crop, strict=True)]
            maps = {r: m[..., : -(-size[0] // r), : -(-size[1] // r)] for r, m in maps.items()}
        return BackboneOutput(features=feats, attention=maps if self.attention else None)

    def _postprocess(self, feats: list[Tensor]) -> list[Tensor]:
        """Ensemble-averaged taps -> the features returned (FLUX DiTF overrides); drops the extra taps."""
        n = len(self._all_taps())
        return [f for i, f in enumerate(feats) if i % n < len(self.layers)]

    def _conditioning(self, batch: int, prompts: str | Sequence[str] | None, prompt_embeds: Tensor | None,
                      pooled_prompt_embeds: Tensor | None) -> dict[str, Tensor]:
        """{"encoder_hidden_states": (B, L, D), "pooled_projections": (B, P)} (+ family extras)."""
        if prompts is not None and prompt_embeds is not None:
            raise ValueError("pass prompts or prompt_embeds, not both")
        if prompt_embeds is None:
            if pooled_prompt_embeds is not None:
                raise ValueError("pooled_prompt_embeds needs prompt_embeds too (or pass prompts)")
            embeds, pooled = self.encode_prompt(check_prompts(prompts, batch))
            return {"encoder_hidden_states": embeds, "pooled_projections": pooled}
        if pooled_prompt_embeds is None:
            raise ValueError(f"{type(self).__name__} needs pooled_prompt_embeds (B, P) with prompt_embeds: both come "
                             "from bb.encode_prompt(prompts)")
        dim, pdim = self.transformer.config.joint_attention_dim, self.transformer.config.pooled_projection_dim
        embeds = self._batched(prompt_embeds, batch, (dim,), "prompt_embeds", f"(B, L, {dim})")
        pooled = self._batched(pooled_prompt_embeds, batch, (pdim,), "pooled_prompt_embeds", f"(B, {pdim})")
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def _batched(self, x: Tensor, batch: int, tail: tuple[int, ...], what: str, want: str) -> Tensor:
        ok = isinstance(x, Tensor) and x.shape[-1:] == tail and x.ndim == (3 if what == "prompt_embeds" else 2)
        if not ok:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{what} must have shape {want}, got {shape}")
        if x.shape[0] == 1 and batch > 1:
            x = x.expand(batch, *x.shape[1:])
        if x.shape[0] != batch:
            raise ValueError(f"{what} has batch {x.shape[0]}, images have {batch}: pass B or 1")
        return x.to(self.device, self.dtype)

    def forward(self, images: Tensor | None = None, prompts: str | Sequence[str] | None = None,
                prompt_embeds: Tensor | None = None, pooled_prompt_embeds: Tensor | None = None,
                latents: Tensor | None = None, noise: Tensor | None = None,
                generator: torch.Generator | None = None) -> BackboneOutput:
        """Features (and joint-attention maps) of a batch.

        Args:
            images: (B, 3, H, W) in [0, 1]; H, W multiples of ``size_multiple`` (or ``pad=True``).
            prompts: one string or B strings (default the empty prompt).
            prompt_embeds, pooled_prompt_embeds: (B, L, D) and (B, P) instead of prompts (from :meth:`encode_prompt`).
            latents: (B, C, h, w) latents as :meth:`encode_images` returns them, instead of images.
            noise: (B*E, C, h, w) noise, image-major; default random (``generator``).

        Returns:
            BackboneOutput: ``features`` one map (B, C_i, H/r_i, W/r_i) per ``feature_info`` entry
            (text taps: (B, C, L)); ``attention`` {r: (B, L, H/r, W/r)} if enabled.
        """
        return self._forward(images, latents, noise, generator, prompts, prompt_embeds, pooled_prompt_embeds)

    def extra_repr(self) -> str:
        return (f"layers={self.layers}, timestep={self.timestep}, shifted={self.shifted}, "
                f"ensemble_size={self.ensemble_size}, attention={self.attention}, trainable={self.trainable}")
