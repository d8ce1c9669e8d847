"""Diffusion-classifier scoring for rectified-flow models (SD3, FLUX-style MMDiT + flow matching).

Jeong et al., "Diffusion Classifiers Understand Compositionality, but Conditions Apply",
NeurIPS 2025 D&B (origin repo eugene6923/Diffusion-Classifiers-Compositionality; the SD3 path
is ``diffusers/src/diffusers/pipelines/stable_diffusion_3/pipeline_stable_diffusion_3_img2img.py``
of its bundled diffusers copy). For an image latent x0, a caption c and a pair (t, eps):
x_t = ``FlowMatchEulerDiscreteScheduler.scale_noise(x0, t, eps)`` = sigma_t eps + (1 - sigma_t) x0,
the model predicts the velocity v(x_t, t, c), the target is eps - x0 and the error is the MSE
(or the residual's L2 norm, the released CLI's default ``--use_normed_classifier``), optionally
times the SD3 training weighting of sigma_t (``sigma_sqrt``: sigma^-2, ``cosmap``).

Timesteps are positions k in [0, T) of the scheduler's T = 1000 training timesteps sorted
ascending (position 0 = the least noise). ``timesteps=``:

- ``"released"`` (default): the released grid, ``scheduler.timesteps[arange(20, 980, T // S)]``
  (its img2img defaults strength 0.6 and 50 inference steps give the 20), 30 for S = 30;
- ``"even"``: S positions evenly spaced over [0, T) (the epsilon path's grid);
- ``"later"``: S of the timesteps in [500, 1000] (``--later_timesteps``);
- ``"logit_normal"``, ``"mode"``, ``"uniform"``: S positions drawn once from SD3's timestep
  density (``compute_density_for_timestep_sampling``: logit-normal(0, 1), mode scale 1.29),
  seeded. The released code draws them anew for every caption from the global RNG, so its
  captions are not scored on the same timesteps; here they are (one shared bank per run).

The noise bank is one seeded (S, C, h, w) tensor shared by every caption and image (the
released pipeline keeps a bank of 1000 latents and uses bank[s] for the s-th timestep).
Everything else (adaptive rounds, successive elimination, replay from saved errors) is the
epsilon path's :class:`~diffperc.zeroshot.classifier.DiffusionClassifier`, which this extends.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones._base import DenoiserPlacement
from .classifier import DiffusionClassifier, evenly_spaced

__all__ = ["FLOW_TIMESTEPS", "FLOW_WEIGHTINGS", "RELEASED_START_SD", "RELEASED_START_SD3", "FlowMatchingClassifier",
           "FlowMatchingModel", "FluxFlowMatchingModel", "released_grid", "tiny_flow_model"]

FLOW_TIMESTEPS = ("released", "even", "later", "logit_normal", "mode", "uniform")
FLOW_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")
# The released img2img __call__ defaults (num_inference_steps=50 and strength 0.6 for SD3, 0.8 for SD) put the
# first grid index at 50 - int(50 * strength): 20 for SD3, 10 for SD (timesteps 32, 65, ..., 989).
RELEASED_START_SD3 = 50 - int(50 * 0.6)
RELEASED_START_SD = 50 - int(50 * 0.8)
SD3_MEDIUM = "stabilityai/stable-diffusion-3-medium-diffusers"


def released_grid(n: int, total: int = 1000, start: int = RELEASED_START_SD3) -> Tensor:
    """Ascending positions of the released grid: ``timesteps[arange(start, T - start, T // n)]`` reversed.

    ``sampled_timesteps`` of the released img2img pipelines (descending ``scheduler.timesteps``;
    position k = T - 1 - index). For n = 30 it gives 30 timesteps: 65.97 ... 993.24 on SD3's
    shifted schedule (start 20), 32, 65, ..., 989 on SD's (start 10, :data:`RELEASED_START_SD`).
    Raises if the grid does not have n entries.
    """
    idx = torch.arange(start, total - start, int(total / n))
    if len(idx) != n:
        raise ValueError(f"the released timestep grid has {len(idx)} entries for {n} sampling steps (it is exact "
                         f"for 30); use timesteps='even' for {n} evenly spaced timesteps")
    return (total - 1 - idx).flip(0)


def sd3_weighting(scheme: str, sigmas: Tensor) -> Tensor:
    """SD3's loss weighting of sigma (diffusers ``compute_loss_weighting_for_sd3``): (S,) -> (S,)."""
    if scheme == "sigma_sqrt":
        return sigmas.float() ** -2.0
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas.float() + 2 * sigmas.float() ** 2))
    return torch.ones_like(sigmas, dtype=torch.float32)


class FlowMatchingModel(DenoiserPlacement, nn.Module):
    """The parts of an SD3-style rectified-flow model that scoring and generation need.

    The small interface an SD3/FLUX backbone plugs into: :meth:`encode_prompt` (captions ->
    ``prompt_embeds`` (B, L, D), ``pooled_prompt_embeds`` (B, P)), :meth:`encode_images`
    ((B, 3, H, W) in [0, 1] -> latents (B, C, h, w)), :meth:`predict` (velocity) and
    ``scheduler`` (a ``FlowMatchEulerDiscreteScheduler``). Text goes through
    ``StableDiffusion3Pipeline.encode_prompt`` (CLIP-L + CLIP-G, T5 or zeros where
    ``text_encoder_3`` is None, the released ``--encoder_drop``).

    Args:
        transformer, scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2,
        text_encoder_3, tokenizer_3: the SD3 pipeline's components.
        max_sequence_length: T5 tokens (256, the pipeline's default).
        latent_sample: ``"mean"`` (default, DESIGN.md) or ``"sample"`` (the released code's
            ``retrieve_latents`` default).
        name_or_path: where it came from (shown in tables and Self-Bench folders).
    """

    _denoiser = "transformer"  # DenoiserPlacement: device / dtype are the transformer's

    def __init__(self, transformer: nn.Module, scheduler: Any, vae: nn.Module, text_encoder: nn.Module,
                 tokenizer: Any, text_encoder_2: nn.Module, tokenizer_2: Any, text_encoder_3: nn.Module | None = None,
                 tokenizer_3: Any = None, max_sequence_length: int = 256, latent_sample: str = "mean",
                 name_or_path: str = "") -> None:
        super().__init__()
        if latent_sample not in ("mean", "sample"):
            raise ValueError(f"latent_sample must be 'mean' or 'sample', got {latent_sample!r}")
        self.transformer, self.vae, self.text_encoder, self.text_encoder_2 = transformer, vae, text_encoder, text_encoder_2
        self.text_encoder_3 = text_encoder_3
        self.tokenizer, self.tokenizer_2, self.tokenizer_3 = tokenizer, tokenizer_2, tokenizer_3
        # A fresh copy: set_timesteps (generation) replaces timesteps/sigmas, scoring needs the training grid.
        self.scheduler = type(scheduler).from_config(scheduler.config)
        self.max_sequence_length, self.latent_sample, self.name_or_path = max_sequence_length, latent_sample, name_or_path
        self.config = {"name_or_path": name_or_path}
        self._prompt_cache: dict[str, tuple[Tensor, Tensor]] = {}
        self.requires_grad_(False).eval()

    @classmethod
    def from_pretrained(cls, path: str, torch_dtype: torch.dtype = torch.float32, drop_t5: bool = False,
                        **kwargs: Any) -> FlowMatchingModel:
        """Load an SD3 diffusers folder or hub id (``stabilityai/stable-diffusion-3-medium-diffusers``)."""
        from diffusers import StableDiffusion3Pipeline

        extra = {"text_encoder_3": None, "tokenizer_3": None} if drop_t5 else {}
        try:
            pipe = StableDiffusion3Pipeline.from_pretrained(path, torch_dtype=torch_dtype, **extra)
        except OSError as err:
            raise OSError(f"could not load the SD3 weights {path!r}: download them first (huggingface-cli download "
                          f"{path}, a gated model: accept its licence on the hub) or pass a local folder; offline, "
                          f"set HF_HUB_OFFLINE=1 with the weights in the cache ({err})") from err
        parts = {k: getattr(pipe, k) for k in ("transformer", "scheduler", "vae", "text_encoder", "tokenizer",
                                               "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")}
        return cls(**parts, name_or_path=str(path), **kwargs)

    @classmethod
    def from_backbone(cls, backbone: nn.Module, **kwargs: Any) -> FlowMatchingModel:
        """The scoring model of an :class:`~diffperc.backbones.SD3Backbone` or
        :class:`~diffperc.backbones.FluxBackbone`, sharing its modules (no copy).

        ``kwargs`` override ``max_sequence_length``, ``latent_sample`` (and, for FLUX, ``guidance_scale``);
        by default they are the backbone's.
        """
        from ..backbones.flux import FluxBackbone
        from ..backbones.sd3 import SD3Backbone

        if not isinstance(backbone, (SD3Backbone, FluxBackbone)):
            raise TypeError(f"from_backbone takes an SD3Backbone or a FluxBackbone, got {type(backbone).__name__} "
                            "(SD 1/2 backbones score with DiffusionClassifier)")
        common = {"transformer": backbone.transformer, "scheduler": backbone.scheduler, "vae": backbone.vae,
                  "text_encoder": backbone.text_encoder, "tokenizer": backbone.tokenizer,
                  "text_encoder_2": backbone.text_encoder_2, "tokenizer_2": backbone.tokenizer_2,
                  "name_or_path": backbone.config.get("name_or_path") or ""}
        opts = {"max_sequence_length": backbone.max_sequence_length, "latent_sample": backbone.latent_sample}
        if isinstance(backbone, FluxBackbone):
            return FluxFlowMatchingModel(**common, **{**opts, "guidance_scale": backbone.guidance_scale, **kwargs})
        return FlowMatchingModel(**common, text_encoder_3=backbone.text_encoder_3, tokenizer_3=backbone.tokenizer_3,
                                 **{**opts, **kwargs})

    @property
    def latent_multiple(self) -> int:
        """Latent sizes must be multiples of this (the patch size)."""
        return int(self.transformer.config.patch_size)

    @property
    def latent_channels(self) -> int:
        return int(self.transformer.config.in_channels)

    @property
    def size_multiple(self) -> int:
        """Image sizes must be multiples of this (VAE downsampling x patch size)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1) * int(self.transformer.config.patch_size)

    def pipeline(self) -> Any:
        """A ``StableDiffusion3Pipeline`` sharing these components (generation, text encoding)."""
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline(
            transformer=self.transformer, scheduler=copy.deepcopy(self.scheduler), vae=self.vae,
            text_encoder=self.text_encoder, tokenizer=self.tokenizer, text_encoder_2=self.text_encoder_2,
            tokenizer_2=self.tokenizer_2, text_encoder_3=self.text_encoder_3, tokenizer_3=self.tokenizer_3)

    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Captions -> (prompt_embeds (B, L, D), pooled_prompt_embeds (B, P)), cached by caption."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        new = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if new:
            warn_long_captions(new, self.tokenizer)
            pipe = self.pipeline()
            emb, _, pooled, _ = pipe.encode_prompt(prompt=new, prompt_2=None, prompt_3=None, device=self.device,
                                                   do_classifier_free_guidance=False,
                                                   max_sequence_length=self.max_sequence_length)
            for i, p in enumerate(new):
                self._prompt_cache[p] = (emb[i : i + 1].cpu(), pooled[i : i + 1].cpu())
        emb = torch.cat([self._prompt_cache[p][0] for p in prompts])
        pooled = torch.cat([self._prompt_cache[p][1] for p in prompts])
        return emb.to(self.device, self.dtype), pooled.to(self.device, self.dtype)

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> latents (B, C, H/f, W/f) = (z - shift_factor) * scaling_factor."""
        from ..backbones._checks import check_images

        images = check_images(images, self.size_multiple, pad=False, dtype=self.vae.dtype).to(self.device)
        dist = self.vae.encode(images * 2 - 1).latent_dist
        z = dist.mean if self.latent_sample == "mean" else dist.sample()
        shift = self.vae.config.shift_factor or 0.0
        return ((z - shift) * self.vae.config.scaling_factor).float()

    def predict(self, x_t: Tensor, timesteps: Tensor, prompt_embeds: Tensor, pooled_prompt_embeds: Tensor) -> Tensor:
        """Velocity prediction (B, C, h, w) for x_t (B, C, h, w) at float timesteps (B,) in [0, 1000]."""
        out = self.transformer(hidden_states=x_t.to(self.dtype), timestep=timesteps.to(self.dtype),
                               encoder_hidden_states=prompt_embeds, pooled_projections=pooled_prompt_embeds,
                               return_dict=False)[0]
        return out.float()


class FluxFlowMatchingModel(FlowMatchingModel):
    """:class:`FlowMatchingModel`'s interface on a FLUX model (``FluxPipeline``'s components).

    Text as ``FluxPipeline.encode_prompt`` (T5 prompt embeds, CLIP pooled output); latents are
    packed 2x2 into tokens for the transformer and its velocity unpacked back to (B, C, h, w)
    (``_pack_latents`` / ``_unpack_latents``); the transformer gets ``timestep / 1000`` and, where
    it has a guidance embedding (FLUX.1-dev), ``guidance_scale``. Target and noising are the SD3
    path's (flow matching: x_t = sigma eps + (1 - sigma) x0, v = eps - x0).

    Args:
        transformer, scheduler, vae, text_encoder, tokenizer (CLIP), text_encoder_2, tokenizer_2 (T5):
            the FLUX pipeline's components.
        max_sequence_length: T5 tokens (512 for FLUX.1-dev).
        guidance_scale: the guidance embedding's value (3.5, the pipeline's default).
        latent_sample, name_or_path: as :class:`FlowMatchingModel`.
    """

    def __init__(self, transformer: nn.Module, scheduler: Any, vae: nn.Module, text_encoder: nn.Module,
                 tokenizer: Any, text_encoder_2: nn.Module, tokenizer_2: Any, max_sequence_length: int = 512,
                 guidance_scale: float = 3.5, latent_sample: str = "mean", name_or_path: str = "") -> None:
        super().__init__(transformer, scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2,
                         max_sequence_length=max_sequence_length, latent_sample=latent_sample,
                         name_or_path=name_or_path)
        self.guidance_scale = float(guidance_scale)

    @property
    def latent_channels(self) -> int:
        return int(self.transformer.config.in_channels) // 4

    @property
    def latent_multiple(self) -> int:
        return 2 * int(self.transformer.config.patch_size)

    @property
    def size_multiple(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1) * self.latent_multiple

    def pipeline(self) -> Any:
        """A ``FluxPipeline`` sharing these components."""
        from diffusers import FluxPipeline

        return FluxPipeline(transformer=self.transformer, scheduler=copy.deepcopy(self.scheduler), vae=self.vae,
                            text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                            text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2)

    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Captions -> (T5 prompt_embeds (B, L, D), CLIP pooled (B, P)), cached by caption."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        new = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if new:
            warn_long_captions(new, self.tokenizer)
            emb, pooled, _ = self.pipeline().encode_prompt(prompt=new, prompt_2=None, device=self.device,
                                                           max_sequence_length=self.max_sequence_length)
            for i, p in enumerate(new):
                self._prompt_cache[p] = (emb[i : i + 1].cpu(), pooled[i : i + 1].cpu())
        emb = torch.cat([self._prompt_cache[p][0] for p in prompts])
        pooled = torch.cat([self._prompt_cache[p][1] for p in prompts])
        return emb.to(self.device, self.dtype), pooled.to(self.device, self.dtype)

    def predict(self, x_t: Tensor, timesteps: Tensor, prompt_embeds: Tensor, pooled_prompt_embeds: Tensor) -> Tensor:
        """Velocity (B, C, h, w) for x_t (B, C, h, w) at float timesteps (B,) in [0, 1000]."""
        from ..backbones.flux import latent_image_ids, pack_latents

        b, c, h, w = x_t.shape
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((b,), self.guidance_scale, device=x_t.device, dtype=torch.float32)
        out = self.transformer(
            hidden_states=pack_latents(x_t.to(self.dtype)), timestep=(timesteps / 1000).to(self.dtype),
            guidance=guidance, encoder_hidden_states=prompt_embeds, pooled_projections=pooled_prompt_embeds,
            txt_ids=torch.zeros(prompt_embeds.shape[1], 3, device=x_t.device, dtype=self.dtype),
            img_ids=latent_image_ids(h // 2, w // 2, x_t.device, self.dtype), return_dict=False)[0]
        out = out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)  # _unpack_latents
        return out.reshape(b, c, h, w).float()


def warn_long_captions(captions: Sequence[str], tokenizer: Any) -> int:
    """Warn (with the count) about captions longer than the tokenizer's max length; returns the count."""
    limit = int(getattr(tokenizer, "model_max_length", 10**9))
    n = sum(len(tokenizer(c, truncation=False)["input_ids"]) > limit for c in captions)
    if n:
        warnings.warn(f"{n} of {len(captions)} captions tokenize to more than the text encoder's {limit} tokens "
                      f"and are truncated (their ends are not scored)", stacklevel=3)
    return n


class FlowMatchingClassifier(DiffusionClassifier):
    """Zero-shot classifier / caption scorer over K prompts on a rectified-flow model.

    Same interface and adaptive machinery as :class:`DiffusionClassifier` (``score``,
    ``pair_errors``, ``classify`` with ``schedule`` and ``eliminate``, ``classify_errors``);
    timesteps are ascending positions in [0, 1000) of the scheduler's training timesteps.

    Args:
        model: a :class:`FlowMatchingModel` (SD3) or :class:`FluxFlowMatchingModel`; from a backbone:
            ``FlowMatchingModel.from_backbone(create_backbone("test_sd3"))``.
        prompts, class_names, schedule, prompt_ensemble, eliminate, batch_size, seed, progress:
            as :class:`DiffusionClassifier`. Default schedule: naive on the 30 released timesteps.
        loss: ``"l2"`` (MSE) or ``"l2_norm"`` (the residual's Euclidean norm; the released CLI default).
        weighting: ``"none"``, ``"sigma_sqrt"`` or ``"cosmap"`` (SD3 loss weighting of sigma_t; the
            released ``--time_weighting``), or a callable positions (S,) -> weights (S,).
        timesteps: how the S positions are chosen; see the module docstring.
    """

    def __init__(self, model: Any, prompts: Sequence[str | Sequence[str]], class_names: Sequence[str] | None = None,
                 schedule: Sequence[Sequence[int]] = ((30, 1),), loss: str = "l2",
                 weighting: str | Callable[[Tensor], Tensor] | None = None, timesteps: str = "released",
                 prompt_ensemble: str = "errors", eliminate: float | None = None, batch_size: int = 32, seed: int = 0,
                 progress: bool = False) -> None:
        if loss not in ("l2", "l2_norm"):
            raise ValueError(f"loss must be 'l2' (MSE) or 'l2_norm' for flow matching, got {loss!r}")
        if timesteps not in FLOW_TIMESTEPS:
            raise ValueError(f"timesteps must be one of {FLOW_TIMESTEPS}, got {timesteps!r}")
        self.timestep_mode = timesteps
        sched = model.scheduler
        self.train_timesteps = sched.timesteps.flip(0).float().cpu()  # (T,) ascending
        self.train_sigmas = sched.sigmas[: len(sched.timesteps)].flip(0).float().cpu()  # (T,)
        weighting = self._weighting_fn(weighting)
        super().__init__(model, prompts, class_names=class_names, schedule=schedule, loss=loss,
                         prompt_ensemble=prompt_ensemble, weighting=weighting, eliminate=eliminate,
                         batch_size=batch_size, seed=seed, progress=progress)

    def _weighting_fn(self, weighting: str | Callable[[Tensor], Tensor] | None) -> Callable[[Tensor], Tensor] | None:
        if weighting is None or callable(weighting):
            return weighting
        if weighting not in FLOW_WEIGHTINGS:
            raise ValueError(f"weighting must be one of {FLOW_WEIGHTINGS} or a callable, got {weighting!r}")
        if weighting == "none":
            return None
        return lambda pos: sd3_weighting(weighting, self.train_sigmas[pos])

    # the base class reads num_train_timesteps from scheduler.config; T here is the grid's length
    @property
    def num_train_timesteps(self) -> int:
        return len(self.train_timesteps)

    @num_train_timesteps.setter
    def num_train_timesteps(self, value: int) -> None:  # set by DiffusionClassifier.__init__; ours is fixed
        pass

    def grid(self, n: int) -> Tensor:
        """The run's S = n ascending timestep positions (n,), chosen by ``timesteps``; see the module docstring."""
        T, mode = self.num_train_timesteps, self.timestep_mode
        if mode == "released":
            return released_grid(n, T)
        if mode == "even":
            return evenly_spaced(n, T)
        desc = self.train_timesteps.flip(0)  # scheduler.timesteps order, as the released code indexes it
        if mode == "later":  # released order kept (descending), so noise slot s pairs with the same timestep
            valid = ((desc >= 500) & (desc <= 1000)).nonzero().flatten()
            if len(valid) < n:
                raise ValueError(f"only {len(valid)} timesteps lie in [500, 1000], fewer than {n}")
            return T - 1 - valid[torch.from_numpy(np.linspace(0, len(valid) - 1, n).astype(int))]
        g = torch.Generator().manual_seed(self.seed)
        if mode == "logit_normal":
            u = torch.sigmoid(torch.randn(n, generator=g))
        else:
            u = torch.rand(n, generator=g)
            if mode == "mode":
                u = 1 - u - 1.29 * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        idx = (u * T).long().clamp(0, T - 1)  # into the descending scheduler.timesteps, as released (draw order kept)
        return T - 1 - idx

    def sigmas(self, positions: Tensor) -> Tensor:
        """sigma_t of timestep positions (S,)."""
        return self.train_sigmas[positions]

    def _check_range(self, timestep_range: Sequence[int] | None) -> tuple[int, int]:
        return 0, len(self.train_timesteps)

    def encode(self, images: Tensor | Sequence[Tensor]) -> Tensor:
        from .classifier import _stack_images

        return self.backbone.encode_images(_stack_images(images).to(self.backbone.device)).float()

    def _latents(self, images: Tensor | Sequence[Tensor] | None, latents: Tensor | None) -> Tensor:
        if (images is None) == (latents is None):
            raise ValueError("pass exactly one of images (B, 3, H, W) in [0, 1] or latents (B, C, h, w)")
        if images is not None:
            return self.encode(images)
        from ..backbones._checks import check_latents

        latents = check_latents(latents, self.backbone.latent_channels, int(self.backbone.latent_multiple))
        return latents.to(self.backbone.device, torch.float32)

    def _embeddings(self) -> tuple[Tensor, Tensor]:
        if self._embeds is None:
            if self.prompt_ensemble == "errors":
                self._embeds = self.backbone.encode_prompt(self._cond_prompts)
            else:
                pairs = [self.backbone.encode_prompt(ps) for ps in self.prompts]
                self._embeds = (torch.stack([e.mean(0) for e, _ in pairs]), torch.stack([p.mean(0) for _, p in pairs]))
        return self._embeds

    def _error(self, target: Tensor, pred: Tensor) -> Tensor:
        if self.loss == "l2_norm":
            return torch.linalg.vector_norm((pred - target).flatten(1), dim=1)
        return F.mse_loss(pred, target, reduction="none").flatten(1).mean(1)

    @torch.no_grad()
    def _run(self, x0: Tensor, b: Tensor, s: Tensor, c: Tensor, timesteps: Tensor, noise: Tensor) -> Tensor:
        """Errors (J,) of the jobs (image b, pair s, condition c), ``batch_size`` latents per call."""
        dev = x0.device
        embeds, pooled = self._embeddings()
        sched = self.backbone.scheduler
        out = torch.empty(len(b))
        chunks = range(0, len(b), self.batch_size)
        if self.progress:
            from tqdm.auto import tqdm

            chunks = tqdm(chunks, desc="flow-matching classifier", unit="call", leave=False)
        for start in chunks:
            sl = slice(start, start + self.batch_size)
            t = self.train_timesteps[timesteps[s[sl]]].to(dev)  # (n,) float timesteps
            eps = noise[s[sl]].to(dev)
            x0_j = x0[b[sl]]
            x_t = sched.scale_noise(x0_j, t, eps)  # sigma eps + (1 - sigma) x0
            idx = c[sl].to(dev)
            pred = self.backbone.predict(x_t, t, embeds[idx], pooled[idx])
            out[sl] = self._error(eps - x0_j, pred).cpu()
        return out


def tiny_flow_model(seed: int = 0, t5: bool = True, sample_size: int = 8) -> FlowMatchingModel:
    """Tiny random SD3-shaped model built in code (offline, milliseconds): MMDiT, VAE, 2 CLIPs, T5.

    The CLIP tokenizer is the bundled one; the T5 encoder reads the same tokenizer's ids (a T5
    tokenizer's vocabulary does not ship offline), which exercises the same three-encoder path.
    Images must be multiples of 2 pixels (VAE 2x, patch 1); latents are (4, H/2, W/2).
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from ..backbones.tiny import bundled_tokenizer

    tok = bundled_tokenizer(77)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=sample_size, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
            num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64,
            out_channels=4)
        clip = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                    hidden_size=32, intermediate_size=37, layer_norm_eps=1e-05, num_attention_heads=4,
                    num_hidden_layers=2, vocab_size=len(tok), hidden_act="gelu", projection_dim=32,
                    max_position_embeddings=77)
        te1 = CLIPTextModelWithProjection(CLIPTextConfig(**clip))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**clip))
        te3 = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                      decoder_start_token_id=0)) if t5 else None
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(4, 8),
                            norm_num_groups=2, down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, sample_size=16,
                            shift_factor=0.0609, scaling_factor=1.5035)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return FlowMatchingModel(transformer, scheduler, vae, te1, tok, te2, copy.deepcopy(tok), te3,
                             copy.deepcopy(tok) if t5 else None, max_sequence_length=16,
                             name_or_path="test_sd3")
