"""Stable Diffusion (1.x / 2.x) UNet as a perception backbone.

Multi-scale features are the outputs of chosen UNet modules (diffusers module paths, taken
with forward hooks), for an image encoded by the VAE, noised to a chosen timestep with the
model's own DDPM schedule and conditioned on a prompt; cross-attention probabilities are
captured per resolution. Recipes: VPD (Zhao et al., ICCV 2023, arXiv 2303.02153; t=1, no
noise, four decoder taps, attention maps) and DIFT (Tang et al., NeurIPS 2023, arXiv
2306.03881; t=261, ``up_blocks.1``, ensemble of 8). See ANCHORS.md sections 1-2.

The UNet forward is never copied: hooks read outputs, and a hook on the last requested
layer raises a private sentinel so the rest of the UNet does not run (same results, less
compute).
"""

from __future__ import annotations

import logging
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._base import BackboneOutput, DenoiserPlacement, FeatureInfo, FeatureInfoList, ProbedFeatureInfo
from ._checks import check_images, check_latents, check_prompt_embeds, check_prompts, pad_to_multiple
from ._taps import StopForward, Taps, run_tapped, split_tap
from .attention import AttentionStore, cross_attention_names, install_attention_capture

__all__ = ["DiffusionBackbone", "LAYER_PRESETS", "resolve_layers"]

log = logging.getLogger(__name__)

LAYER_PRESETS = ("dift", "vpd", "cross_q", "ovdiff_q")
_COMPONENTS = ("vae", "unet", "text_encoder", "tokenizer", "scheduler", "name_or_path", "text_encoder_2",
               "tokenizer_2")
_PROMPT_CACHE_SIZE = 1024


def _cross_q(unet: nn.Module) -> list[str]:
    """Mustafar's tap (ANCHORS.md: SD 2.1 ``up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_q``), by rule:
    the cross-attention query of the first transformer block of ``attentions.1`` (else the last
    attention) in the lowest-resolution up block that has cross-attention (SDXL: ``up_blocks.0``)."""
    for i, block in enumerate(unet.up_blocks):
        if getattr(block, "attentions", None):
            j = 1 if len(block.attentions) > 1 else 0
            return [f"up_blocks.{i}.attentions.{j}.transformer_blocks.0.attn2.to_q"]
    raise ValueError("layers='cross_q' needs a UNet with cross-attention up blocks")


def _ovdiff_q(unet: nn.Module) -> list[str]:
    """OVDiff's nine ``attn2.to_q`` taps (karazijal/sdov sd.py LAYERS "0,6:13,15" of the 16 SD 1.5 layers):
    ``down_blocks.0.attentions.0``, ``mid_block``, all of ``up_blocks.1`` and ``up_blocks.2``, and
    ``up_blocks.3.attentions.2`` (each ``transformer_blocks.0.attn2.to_q``)."""
    stage = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}  # sdov counts in forward order: down, mid, up
    names = sorted(cross_attention_names(unet), key=lambda n: stage[n.split(".")[0]])  # stable within a stage
    if len(names) != 16:
        raise ValueError(f"layers='ovdiff_q' is defined on SD 1.x/2.x's 16 cross-attention layers; this UNet has "
                         f"{len(names)}: list the to_q paths yourself")
    return [names[i].removesuffix("attn2") + "attn2.to_q" for i in (0, 6, 7, 8, 9, 10, 11, 12, 15)]


def _check_timesteps(timestep: int | Sequence[int], n_train: int) -> list[int]:
    ts = [timestep] if isinstance(timestep, (int, float)) or (isinstance(timestep, Tensor) and timestep.ndim == 0) \
        else list(timestep)
    if not ts:
        raise ValueError("timestep is an empty list: give one t or several, e.g. [50, 150, 250]")
    bad = [t for t in ts if not float(t).is_integer() or not 0 <= int(t) < n_train]
    if bad:
        raise ValueError(f"timestep must be integers in [0, {n_train}) (the scheduler's training steps), got {bad}")
    ts = [int(t) for t in ts]
    if len(set(ts)) != len(ts):
        raise ValueError(f"timestep has duplicates: {ts}")
    return ts


VAE_PREFIX = "vae."


def is_vae_tap(tap: str) -> bool:
    """True for taps inside the VAE (``"vae.encoder.down_blocks.1"``, ``"vae.decoder.up_blocks.0:input"``)."""
    return tap.startswith(VAE_PREFIX)


def _check_vae_tap(vae: nn.Module | None, tap: str) -> None:
    """A VAE tap must name a module of ``vae.encoder`` or ``vae.decoder``; the error lists the blocks."""
    name, _ = split_tap(tap)
    path = name.removeprefix(VAE_PREFIX)
    if vae is None:
        raise ValueError(f"tap {tap!r} is in the VAE, but this backbone was built without one")
    valid = dict(vae.named_modules())
    if path.split(".")[0] in ("encoder", "decoder") and path in valid:
        return
    import difflib

    blocks = [f"{VAE_PREFIX}{n}" for n in valid if n.count(".") == 2 and n.split(".")[1] in ("down_blocks", "up_blocks")
              or n in ("encoder.mid_block", "decoder.mid_block")]
    close = difflib.get_close_matches(path, [n for n in valid if n.startswith(("encoder", "decoder"))], n=6, cutoff=0.5)
    raise ValueError(f"unknown VAE tap {name!r}. VAE blocks: {blocks}. Close matches: "
                     f"{[VAE_PREFIX + c for c in close] or 'none'}. Any 'vae.encoder.*' or 'vae.decoder.*' path of "
                     "`dict(vae.named_modules())` works, with ':input' appended for the tensor entering the module.")


def resolve_layers(unet: nn.Module, layers: str | Sequence[str], vae: nn.Module | None = None) -> list[str]:
    """Turn a preset name or a list of taps into validated taps.

    A tap is a module path (its output) or a module path + ``":input"`` (the tensor entering
    it, e.g. ``"up_blocks.1.resnets.0:input"``: the decoder's input after the skip concat).
    Presets: ``"dift"`` -> ``["up_blocks.1"]``; ``"vpd"`` -> per up block, the last layer
    before its upsampler (attention if the block has one, else resnet); for SD 1.5 that is
    LDM's output_blocks 1, 4, 7, 11: ``up_blocks.0.resnets.1, up_blocks.1.attentions.1,
    up_blocks.2.attentions.1, up_blocks.3.attentions.2``; ``"cross_q"`` -> one cross-attention
    query projection (Mustafar's, see :func:`_cross_q`); ``"ovdiff_q"`` -> OVDiff's nine queries.

    Taps starting with ``"vae."`` are in the VAE (ODISE also taps its encoder and decoder):
    ``"vae.encoder.down_blocks.N"``, ``"vae.encoder.mid_block"``, ``"vae.decoder.up_blocks.N"``
    or any other ``vae.encoder.*`` / ``vae.decoder.*`` module, output or ``:input``.
    """
    if isinstance(layers, str):
        if layers == "dift":
            layers = ["up_blocks.1"]
        elif layers == "vpd":
            layers = []
            for i, block in enumerate(unet.up_blocks):
                seq = "attentions" if getattr(block, "attentions", None) else "resnets"
                idx = len(getattr(block, seq)) - (2 if block.upsamplers is not None else 1)
                layers.append(f"up_blocks.{i}.{seq}.{idx}")
        elif layers == "cross_q":
            layers = _cross_q(unet)
        elif layers == "ovdiff_q":
            layers = _ovdiff_q(unet)
        else:
            layers = [layers]
    layers = list(layers)
    if not layers:
        raise ValueError("layers is empty: give module paths such as ['up_blocks.1'] or a preset 'dift'/'vpd'")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers has duplicates: {layers}")
    valid = dict(unet.named_modules())
    for tap in layers:
        name, _ = split_tap(tap)
        if is_vae_tap(name):
            _check_vae_tap(vae, tap)
            continue
        if name not in valid or name == "":
            import difflib

            close = difflib.get_close_matches(name, list(valid), n=8, cutoff=0.5)
            blocks = [n for n in valid if n.count(".") <= 1 and n.split(".")[0] in ("down_blocks", "mid_block", "up_blocks")]
            raise ValueError(
                f"unknown UNet layer {name!r}. Presets: {list(LAYER_PRESETS)}. Close matches: {close or 'none'}. "
                f"Blocks: {blocks}. Any path of `dict(unet.named_modules())` works, with ':input' appended "
                "for the tensor entering the module; VAE taps start with 'vae.' ('vae.encoder.down_blocks.N', "
                "'vae.encoder.mid_block', 'vae.decoder.up_blocks.N')."
            )
    return layers


class DiffusionBackbone(DenoiserPlacement, ProbedFeatureInfo, nn.Module):
    """Text-conditioned multi-scale UNet features and cross-attention maps.

    Args:
        vae, unet, text_encoder, tokenizer, scheduler: Stable Diffusion components
            (``AutoencoderKL``, ``UNet2DConditionModel``, ``CLIPTextModel``, ``CLIPTokenizer``,
            a scheduler whose config has the DDPM betas; it is rebuilt as ``DDPMScheduler``).
        layers: UNet module paths whose outputs are the features (``":input"`` appended: the tensor
            entering the module), or a preset (``"dift"``, ``"vpd"``, ``"cross_q"``, ``"ovdiff_q"``).
            Paths starting with ``"vae."`` tap the VAE (see :func:`resolve_layers`): encoder taps
            (``"vae.encoder.down_blocks.N"``, ``"vae.encoder.mid_block"``) are read while the image is
            encoded; decoder taps (``"vae.decoder.up_blocks.N"``...) run the decoder on the **clean**
            latents (before any noise; not a denoised prediction), stopping after its last tap. VAE
            taps do not depend on the timestep (with several t and ``timestep_reduce="none"`` they come
            once, first); with only VAE taps (and no attention) the UNet does not run.
        timestep: t in [0, num_train_timesteps) given to the UNet, or several (``[50, 150, 250]``):
            the UNet then runs once per t, all in one batch, on the same clean latents and the same noise.
        timestep_reduce: with several timesteps, ``"none"`` returns every tap at every t
            (``feature_info`` names ``"<tap>@t<t>"``, timestep-major) or ``"mean"`` averages them;
            attention maps are averaged over the timesteps either way.
        add_noise: noise the latents to t (DIFT) or feed the clean latents (VPD: t=1, False).
        ensemble_size: E noisy copies per image, run batched and averaged.
        ensemble_chunk: at most this many copies per UNet call (None: all E at once).
        attention: capture cross-attention maps.
        attention_resolutions: reductions (image size / map size) to keep; None keeps all.
        latent_sample: ``"mean"`` of the VAE posterior (default) or a ``"sample"`` of it; with
            an ensemble, one sample per copy (DIFT repeats the image E times, then samples).
        scale_latents: multiply the VAE latents by ``vae.config.scaling_factor`` before the
            UNet (as the diffusion model was trained, and as DIFT does). VPD feeds the UNet the
            unscaled posterior mode, so its recipes set this to False.
        trainable: fine-tune the UNet (VPD); the VAE and text encoder stay frozen.
        gradient_checkpointing: checkpoint UNet blocks when trainable.
        pad: zero-pad images whose size is not a multiple of ``size_multiple`` (bottom/right)
            and crop outputs back, instead of raising.
        name_or_path: where the weights came from (recorded in ``config``).
    """

    def __init__(
        self, vae: nn.Module, unet: nn.Module, text_encoder: nn.Module, tokenizer: Any, scheduler: Any,
        layers: str | Sequence[str] = "dift", timestep: int | Sequence[int] = 261, add_noise: bool = True,
        ensemble_size: int = 1, ensemble_chunk: int | None = None, attention: bool = False,
        attention_resolutions: Sequence[int] | None = None, latent_sample: str = "mean",
        scale_latents: bool = True, trainable: bool = False, gradient_checkpointing: bool = False, pad: bool = False,
        name_or_path: str | None = None, timestep_reduce: str = "none",
    ) -> None:
        super().__init__()
        from diffusers import DDPMScheduler

        self.vae, self.unet, self.text_encoder, self.tokenizer = vae, unet, text_encoder, tokenizer
        self.scheduler = DDPMScheduler.from_config(scheduler.config)
        self.timesteps = _check_timesteps(timestep, self.scheduler.config.num_train_timesteps)
        if timestep_reduce not in ("none", "mean"):
            raise ValueError(f"timestep_reduce must be 'none' or 'mean', got {timestep_reduce!r}")
        self.timestep_reduce = timestep_reduce
        if ensemble_size < 1 or (ensemble_chunk is not None and ensemble_chunk < 1):
            raise ValueError(f"ensemble_size and ensemble_chunk must be >= 1, got {ensemble_size}, {ensemble_chunk}")
        if latent_sample not in ("mean", "sample"):
            raise ValueError(f"latent_sample must be 'mean' or 'sample', got {latent_sample!r}")
        self.layers = resolve_layers(unet, layers, vae)
        self.timestep = self.timesteps[0] if len(self.timesteps) == 1 else list(self.timesteps)
        self.add_noise, self.latent_sample = add_noise, latent_sample
        self.scale_latents = bool(scale_latents)
        self.ensemble_size, self.ensemble_chunk = ensemble_size, ensemble_chunk
        self.attention = attention
        self.attention_resolutions = None if attention_resolutions is None else sorted(set(attention_resolutions))
        self.trainable, self.pad = trainable, pad
        self.vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.unet_factor = 2 ** (len(unet.config.block_out_channels) - 1)
        self.size_multiple = self.vae_factor * self.unet_factor
        self.config = {
            "name_or_path": name_or_path, "layers": self.layers, "timestep": self.timestep,
            "timestep_reduce": timestep_reduce,
            "add_noise": add_noise, "ensemble_size": ensemble_size, "ensemble_chunk": ensemble_chunk,
            "attention": attention, "attention_resolutions": self.attention_resolutions,
            "latent_sample": latent_sample, "scale_latents": self.scale_latents, "trainable": trainable,
            "gradient_checkpointing": gradient_checkpointing, "pad": pad,
        }
        self._store = AttentionStore()
        self.attention_layers = cross_attention_names(unet)
        if attention:
            install_attention_capture(unet, self._store)
        self._prompt_cache: OrderedDict[str, Tensor] = OrderedDict()
        self.prompt_cache_stats = {"hits": 0, "misses": 0}
        self._feature_info: FeatureInfoList | None = None
        self._stop_after: str | None = None
        self._unet_layers = [n for n in self.layers if not is_vae_tap(n)]
        self._taps = Taps(unet, self._unet_layers)
        vae_taps = [n.removeprefix(VAE_PREFIX) for n in self.layers if is_vae_tap(n)]
        self._enc_taps = Taps(vae, [n for n in vae_taps if n.startswith("encoder")])
        self._dec_taps = Taps(vae, [n for n in vae_taps if n.startswith("decoder")])
        self._dec_stop_after: str | None = None
        for module in (vae, text_encoder):
            module.requires_grad_(False).eval()
        unet.requires_grad_(trainable)
        if trainable and gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        self.train(False)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_components(cls, vae: nn.Module, unet: nn.Module, text_encoder: nn.Module, tokenizer: Any,
                        scheduler: Any, **kwargs: Any) -> DiffusionBackbone:
        """Build from already-loaded diffusers/transformers components (see class Args)."""
        return cls(vae, unet, text_encoder, tokenizer, scheduler, **kwargs)

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | Path, *, revision: str | None = None, variant: str | None = None,
        torch_dtype: torch.dtype | str | None = None, device: str | torch.device | None = None,
        local_files_only: bool | None = None, pretrained: bool = True, use_safetensors: bool = True,
        config: str | Path | None = None, unet_weights: str | Path | None = None, **kwargs: Any,
    ) -> DiffusionBackbone:
        """Load a diffusers-format SD model (hub id or local folder) or a single-file checkpoint.

        Args:
            name_or_path: e.g. ``"stable-diffusion-v1-5/stable-diffusion-v1-5"``,
                ``"stabilityai/stable-diffusion-2-1"``, a local folder with ``model_index.json``,
                or a ``.safetensors``/``.ckpt`` single file.
            revision, variant: hub revision and weight variant (e.g. ``"fp16"``).
            torch_dtype: dtype of the loaded weights, a ``torch.dtype`` or its name (None: float32;
                the Trainer picks the training precision).
            device: where to put the model.
            local_files_only: never touch the network (defaults to ``HF_HUB_OFFLINE``).
            pretrained: False builds the architecture from the model's config files (cached or in
                the folder) with random weights; no weight file is read.
            use_safetensors: read only ``.safetensors`` weights (default); False also allows
                pickled ``.bin`` files (read with ``torch.load(weights_only=True)``).
            config: for a single-file checkpoint, the diffusers layout to convert it into: a local
                diffusers folder or a hub id whose config files are cached. Needed offline.
            unet_weights: a UNet state dict loaded over the pipeline's UNet after the components
                (strict: every key must match): a ``.safetensors`` file, a diffusers UNet folder, a
                pipeline folder with ``unet/``, a hub repo ``org/name`` (UNet repo or pipeline) or a
                file in one, ``org/name/file.safetensors`` (CleanDIFT:
                ``"CompVis/cleandift/cleandift_sd21_unet.safetensors"``). See :func:`load_unet_weights`.
            **kwargs: backbone options (``layers``, ``timestep``, ...; see the class), checked
                before any weight is read.
        """
        from ._kwargs import as_dtype, check_kwargs, signature_names
        from ._loading import family_of, is_offline, load_components, model_index

        index, path = None, Path(str(name_or_path)).expanduser()
        if not path.is_file():  # a folder or hub id: its model_index.json picks the class
            offline = is_offline() if local_files_only is None else local_files_only
            source = str(path) if path.exists() else str(name_or_path)
            index = model_index(source, {"revision": revision, "local_files_only": offline})
            cls = cls._family_class(family_of(index))
        bases = [c.__init__ for c in cls.__mro__ if c not in (cls, nn.Module, object)]  # e.g. DiTBackbone's options
        check_kwargs(f"{cls.__name__}.from_pretrained", signature_names(
            cls.__init__, DiffusionBackbone.__init__, *bases, cls.from_pretrained, exclude=_COMPONENTS), kwargs)
        weights_file = None
        if unet_weights is not None:  # found (or not) before the pipeline is read: a typo fails in a second
            from ._loading import resolve_unet_weights

            weights_file = resolve_unet_weights(unet_weights, local_files_only=local_files_only)
        parts = load_components(name_or_path, revision=revision, variant=variant,
                                torch_dtype=as_dtype(torch_dtype, torch.float32), local_files_only=local_files_only,
                                pretrained=pretrained, use_safetensors=use_safetensors, config=config, index=index)
        if weights_file is not None:
            from ._loading import load_unet_weights

            load_unet_weights(parts["unet"], weights_file, use_safetensors=use_safetensors)
        model = cls(**parts, name_or_path=str(name_or_path), **kwargs)
        if unet_weights is not None:
            model.config["unet_weights"] = str(unet_weights)
        return model.to(device) if device is not None else model

    @classmethod
    def _family_class(cls, family: str) -> type[DiffusionBackbone]:
        """The backbone class for a family read from model_index.json (``DiffusionBackbone`` dispatches)."""
        from .flux import FluxBackbone
        from .sd3 import SD3Backbone
        from .sdxl import SDXLBackbone

        want = {"sd": DiffusionBackbone, "sdxl": SDXLBackbone, "sd3": SD3Backbone, "flux": FluxBackbone}[family]
        if cls is DiffusionBackbone or cls is want:
            return want
        raise ValueError(f"{cls.__name__}.from_pretrained got a {family!r} model; use {want.__name__} "
                         "(or DiffusionBackbone.from_pretrained, which picks the class from model_index.json)")

    def save_pretrained(self, folder: str | Path) -> None:
        """Write the components as a diffusers folder that :meth:`from_pretrained` reads back."""
        from ._loading import save_components

        save_components(folder, self.vae, self.unet, self.text_encoder, self.tokenizer, self.scheduler)

    # ------------------------------------------------------------------ mode
    def train(self, mode: bool = True) -> DiffusionBackbone:
        """Only a trainable UNet follows train mode; the VAE and text encoder stay in eval."""
        super().train(mode)
        self.vae.eval()
        self.text_encoder.eval()
        self.unet.train(mode and self.trainable)
        return self

    # ------------------------------------------------------------------ feature info
    @torch.no_grad()
    def _probe(self) -> None:
        """Run the UNet once at its smallest size to learn channels, reductions and run order
        (``feature_info``, see :class:`~diffperc.backbones._base.ProbedFeatureInfo`)."""
        side = self.unet_factor
        latents = torch.zeros(1, self.unet.config.in_channels, side, side, device=self.device, dtype=self.dtype)
        embeds = torch.zeros(1, 1, self.unet.config.cross_attention_dim, device=self.device, dtype=self.dtype)
        was_active, self._store.active = self._store.active, False
        self._taps.start(stop_after=None)
        try:
            self.unet(latents, torch.zeros(1, device=self.device, dtype=torch.long), encoder_hidden_states=embeds,
                      **self._probe_cond())
        finally:
            self._store.active = was_active
            order, outs = list(self._taps.order), self._taps.stop()
        missing = [n for n in self._unet_layers if n not in outs]
        if missing:
            raise ValueError(f"layers {missing} did not run in the UNet forward; pick modules on the forward path")
        vae_info = self._probe_vae(side)
        per_t = len(self.timesteps) > 1 and self.timestep_reduce == "none"
        info = FeatureInfoList(vae_info[n] for n in self.layers if n in vae_info) if per_t else FeatureInfoList()
        for t in self.timesteps if per_t else [None]:
            for name in self.layers:
                if name in vae_info:
                    if not per_t:
                        info.append(vae_info[name])
                    continue
                c, hw = self._map_shape(outs[name], (side, side))
                info.append(FeatureInfo(name if t is None else f"{name}@t{t}", c, self.vae_factor * side // hw[0]))
        self._feature_info, self._stop_after = info, (order[-1] if order else None)

    def _probe_vae(self, side: int) -> dict[str, FeatureInfo]:
        """Channels and reductions of the VAE taps: the encoder on a (1, 3, S, S) image, the decoder on a latent."""
        out: dict[str, FeatureInfo] = {}
        vae = self.vae
        for taps, run, image_side in (
            (self._enc_taps, lambda: vae.encode(torch.zeros(1, 3, side * self.vae_factor, side * self.vae_factor,
                                                            device=vae.device, dtype=vae.dtype)), side * self.vae_factor),
            (self._dec_taps, lambda: vae.decode(torch.zeros(1, vae.config.latent_channels, side, side,
                                                            device=vae.device, dtype=vae.dtype)), side * self.vae_factor),
        ):
            if not taps.names:
                continue
            taps.start(stop_after=None)
            try:
                run()
            finally:
                order, feats = list(taps.order), taps.stop()
            missing = [n for n in taps.names if n not in feats]
            if missing:
                raise ValueError(f"VAE taps {[VAE_PREFIX + n for n in missing]} did not run; pick modules on the "
                                 "encoder's or decoder's forward path")
            for n in taps.names:
                c, hw = self._map_shape(feats[n], (side, side))
                out[VAE_PREFIX + n] = FeatureInfo(VAE_PREFIX + n, c, max(1, image_side // hw[0]))
            if taps is self._dec_taps:
                self._dec_stop_after = order[-1]
        return out

    def layer_presets(self) -> dict[str, list[str] | str]:
        """Each layer preset of this model -> its taps (or why it does not apply), for ``diffperc info``."""
        out: dict[str, list[str] | str] = {}
        for name in LAYER_PRESETS:
            try:
                out[name] = resolve_layers(self.unet, name)
            except ValueError as err:
                out[name] = f"n/a ({err})"
        return out

    @torch.no_grad()
    def tap_table(self) -> FeatureInfoList:
        """Channels and reduction of the main tap points, measured by one tiny forward of the UNet and the VAE.

        Rows: every UNet block (``down_blocks.N``, ``mid_block``, ``up_blocks.N``) and its
        ``resnets.M`` / ``attentions.M``, the decoder inputs after the skip concat
        (``up_blocks.N.resnets.M:input``, ODISE's), and the VAE blocks (``vae.encoder.down_blocks.N``,
        ``vae.encoder.mid_block``, ``vae.decoder.mid_block``, ``vae.decoder.up_blocks.N``). Any other
        module path works as a tap too.
        """
        names = []
        for stage in ("down_blocks", "mid_block", "up_blocks"):
            blocks = [(stage, self.unet.mid_block)] if stage == "mid_block" else [
                (f"{stage}.{i}", b) for i, b in enumerate(getattr(self.unet, stage))]
            for path, block in blocks:
                if block is None:
                    continue
                names.append(path)
                n_res, n_att = (len(getattr(block, seq, None) or []) for seq in ("resnets", "attentions"))
                for j in range(max(n_res, n_att)):  # forward order: (skip concat,) resnet, attention
                    if j < n_res:
                        names += [f"{path}.resnets.{j}:input"] if stage == "up_blocks" else []
                        names.append(f"{path}.resnets.{j}")
                    if j < n_att:
                        names.append(f"{path}.attentions.{j}")
        vae_names = [f"encoder.down_blocks.{i}" for i in range(len(self.vae.encoder.down_blocks))]
        vae_names += ["encoder.mid_block", "decoder.mid_block"]
        vae_names += [f"decoder.up_blocks.{i}" for i in range(len(self.vae.decoder.up_blocks))]
        side, vf = self.unet_factor, self.vae_factor
        table = FeatureInfoList()
        taps = Taps(self.unet, names)
        was_active, self._store.active = self._store.active, False
        taps.start(stop_after=None)
        try:
            self.unet(torch.zeros(1, self.unet.config.in_channels, side, side, device=self.device, dtype=self.dtype),
                      torch.zeros(1, device=self.device, dtype=torch.long),
                      encoder_hidden_states=torch.zeros(1, 1, self.unet.config.cross_attention_dim, device=self.device,
                                                        dtype=self.dtype), **self._probe_cond())
        finally:
            self._store.active = was_active
            feats = taps.stop()
            taps.remove()
        for n in names:
            if n in feats:
                c, hw = self._map_shape(feats[n], (side, side))
                table.append(FeatureInfo(n, c, vf * side // hw[0]))
        vae = self.vae
        for prefix, run in (("encoder", lambda: vae.encode(torch.zeros(1, 3, side * vf, side * vf, device=vae.device,
                                                                        dtype=vae.dtype))),
                            ("decoder", lambda: vae.decode(torch.zeros(1, vae.config.latent_channels, side, side,
                                                                        device=vae.device, dtype=vae.dtype)))):
            part = [n for n in vae_names if n.startswith(prefix)]
            taps = Taps(vae, part)
            taps.start(stop_after=None)
            try:
                run()
            finally:
                feats = taps.stop()
                taps.remove()
            for n in part:
                if n in feats:
                    table.append(FeatureInfo(VAE_PREFIX + n, feats[n].shape[1], max(1, side * vf // feats[n].shape[-2])))
        return table

    def _probe_cond(self) -> dict[str, Any]:
        """Extra UNet keyword arguments of the probe forward (SDXL: its added conditions)."""
        return {}

    @staticmethod
    def _map_shape(x: Tensor, latent_hw: tuple[int, int]) -> tuple[int, tuple[int, int]]:
        if x.ndim == 4:
            return x.shape[1], tuple(x.shape[2:])
        if x.ndim == 3:  # (B, N, C) tokens of a transformer layer
            r = round((latent_hw[0] * latent_hw[1] / x.shape[1]) ** 0.5)
            return x.shape[2], (latent_hw[0] // r, latent_hw[1] // r)
        raise ValueError(f"layer output of shape {tuple(x.shape)} is not a feature map (B, C, h, w) or tokens (B, N, C)")

    # ------------------------------------------------------------------ steps
    def encode_images(self, images: Tensor, generator: torch.Generator | None = None, copies: int = 1) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> latents (B * copies, C, H/f, W/f), image-major.

        The VAE posterior mean (``latent_sample="mean"``, repeated ``copies`` times) or one
        posterior sample per copy (``"sample"``: mean + std * N(0, 1), the noise drawn from
        ``generator`` as diffusers' ``DiagonalGaussianDistribution.sample`` draws it), times
        ``vae.config.scaling_factor`` when ``scale_latents`` (default).
        """
        return self._encode(images, generator, copies)[0]

    def _encode(self, images: Tensor, generator: torch.Generator | None, copies: int) -> tuple[Tensor, dict[str, Tensor]]:
        """:meth:`encode_images` and the VAE encoder taps it recorded ({"vae.encoder...": (B, C, h, w)})."""
        images = check_images(images, self.size_multiple, pad=False, dtype=self.vae.dtype)
        with torch.no_grad():
            self._enc_taps.start(stop_after=None)  # the encoder always runs to the end: the latents are needed
            try:
                dist = self.vae.encode(images * 2 - 1).latent_dist
            finally:
                enc = {VAE_PREFIX + n: f for n, f in self._enc_taps.stop().items()}
            latents = dist.mean.repeat_interleave(copies, dim=0)
            if self.latent_sample == "sample":
                from diffusers.utils.torch_utils import randn_tensor

                eps = randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
                latents = latents + dist.std.repeat_interleave(copies, dim=0) * eps
        return (latents * self.vae.config.scaling_factor if self.scale_latents else latents), enc

    @torch.no_grad()
    def _decoder_features(self, copies: Tensor, distinct: bool) -> dict[str, Tensor]:
        """VAE decoder taps on the clean latents (B*E, C, h, w), image-major: {"vae.decoder...": (B, C, h', w')}.

        The decoder runs on the clean latents the UNet would see before noising (divided by the
        scaling factor when ``scale_latents``), not on a denoised prediction, and stops after its
        last tap. ``distinct``: the E copies differ (one posterior sample each) and their
        features are averaged; otherwise the decoder runs once per image.
        """
        if not self._dec_taps.names:
            return {}
        e = self.ensemble_size
        x = copies if distinct else copies[::e]
        n = e if distinct else 1
        z = (x / self.vae.config.scaling_factor if self.scale_latents else x).to(self.vae.dtype)
        self._dec_taps.start(self._dec_stop_after)
        try:
            self.vae.decode(z)
        except StopForward:
            pass
        finally:
            feats = self._dec_taps.stop()
        return {VAE_PREFIX + k: f.view(-1, n, *f.shape[1:]).mean(1) for k, f in feats.items()}

    def encode_prompt(self, prompts: Sequence[str]) -> Tensor:
        """Prompts -> text encoder last hidden states (B, L, D), cached by prompt string."""
        return torch.cat(self._cached_prompts(prompts)).to(self.device, self.dtype)

    def _cached_prompts(self, prompts: Sequence[str]) -> list[Any]:
        """``_encode_text(p)`` for each prompt, from an LRU cache keyed by the prompt string."""
        out = []
        for p in prompts:
            if p in self._prompt_cache:
                self._prompt_cache.move_to_end(p)
                self.prompt_cache_stats["hits"] += 1
            else:
                self.prompt_cache_stats["misses"] += 1
                self._prompt_cache[p] = self._encode_text(p)
                if len(self._prompt_cache) > _PROMPT_CACHE_SIZE:
                    self._prompt_cache.popitem(last=False)
            out.append(self._prompt_cache[p])
        return out

    @staticmethod
    def _warn_truncation(tok: Any, prompt: str) -> None:
        n_full = len(tok(prompt).input_ids)
        if n_full > tok.model_max_length:
            warnings.warn(f"prompt {prompt!r} has {n_full} tokens; truncated to the text encoder's "
                          f"{tok.model_max_length}", stacklevel=5)

    @torch.no_grad()
    def _encode_text(self, prompt: str) -> Tensor:
        tok = self.tokenizer
        self._warn_truncation(tok, prompt)
        ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        te = self.text_encoder
        return te(ids.to(te.device)).last_hidden_state.detach()

    def _draw_noise(self, copies: Tensor, noise: Tensor | None, generator: torch.Generator | None) -> Tensor | None:
        """(B*E, C, h, w) image-major noise shared by all timesteps, or None when add_noise is False."""
        if not self.add_noise:
            return None
        if noise is None:
            return torch.randn(copies.shape, generator=generator, device=copies.device, dtype=copies.dtype)
        if noise.shape != copies.shape:
            raise ValueError(f"noise must have shape (B*E, C, h, w) = {tuple(copies.shape)}, image-major; "
                             f"got {tuple(noise.shape)}")
        return noise.to(copies)

    def _noised(self, x0: Tensor, noise: Tensor | None) -> tuple[Tensor, Tensor]:
        """(N, C, h, w) clean latents -> (N*T, C, h, w) latents at each timestep (sample-major) and their t."""
        n, ts = x0.shape[0], self.timesteps
        t = torch.tensor(ts, device=x0.device, dtype=torch.long).repeat(n)  # (N*T,)
        x = x0.repeat_interleave(len(ts), dim=0)
        if noise is None:
            return x, t
        return self.scheduler.add_noise(x, noise.repeat_interleave(len(ts), dim=0), t), t

    def _denoise(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Any:
        """The denoiser call; families with other conditions (SDXL) override it."""
        return self.unet(x, t, encoder_hidden_states=cond["encoder_hidden_states"])

    def _run_unet(self, x: Tensor, cond: dict[str, Tensor], t: Tensor) -> tuple[list[Tensor], dict[int, Tensor]]:
        """One UNet call on (N, C, h, w) at timesteps t (N,); returns the tapped features and attention maps."""
        if self._feature_info is None:
            self._probe()
        keep_res = None if self.attention_resolutions is None else set(self.attention_resolutions)
        if self.attention:
            self._store.begin(tuple(x.shape[-2:]), self.vae_factor, keep_res)
        self._taps.start(self._stop_after)
        feats, maps = run_tapped(self._taps, self._store, self.attention, lambda: self._denoise(x, t, cond))
        out = []
        for name in self._unet_layers:
            f = feats[name]
            if f.ndim == 3:
                c, (h, w) = self._map_shape(f, tuple(x.shape[-2:]))
                f = f.transpose(1, 2).reshape(f.shape[0], c, h, w)
            out.append(f)
        return out, maps

    # ------------------------------------------------------------------ forward
    def forward(
        self, images: Tensor | None = None, prompts: str | Sequence[str] | None = None,
        prompt_embeds: Tensor | None = None, latents: Tensor | None = None, noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> BackboneOutput:
        """Features (and attention maps) of a batch.

        Args:
            images: (B, 3, H, W) floats in [0, 1]; H, W multiples of ``size_multiple`` (or ``pad=True``).
            prompts: one string for all images or B strings; default the empty prompt "".
            prompt_embeds: (B, L, D) or (1, L, D) text embeddings instead of prompts (any L).
            latents: (B, C, h, w) VAE latents instead of images, as :meth:`encode_images` returns
                them (x scaling_factor unless ``scale_latents=False``).
            noise: (B*E, C, h, w) noise, image-major (E copies of image 0 first); default random.
            generator: seeds the VAE samples (``latent_sample="sample"``, drawn first) and the noise.

        Returns:
            BackboneOutput: ``features`` one (B, C_i, H/r_i, W/r_i) per ``feature_info`` entry,
            averaged over the ensemble; ``attention`` {r: (B, L, H/r, W/r)} if enabled.
        """
        return self._forward(images, latents, noise, generator, prompts=prompts, prompt_embeds=prompt_embeds)

    def _forward(self, images: Tensor | None, latents: Tensor | None, noise: Tensor | None,
                 generator: torch.Generator | None, **text: Any) -> BackboneOutput:
        """The forward shared by the families; ``text`` goes to :meth:`_conditioning`."""
        if (images is None) == (latents is None):
            raise ValueError("pass exactly one of images (B, 3, H, W) in [0, 1] or latents (B, C, h, w)")
        size = None
        if images is not None:
            size = tuple(images.shape[-2:]) if isinstance(images, Tensor) else None
            images = check_images(images, self.size_multiple, pad=self.pad, dtype=self.vae.dtype)
            if self.pad:
                images = pad_to_multiple(images, self.size_multiple)
            copies, vae_feats = self._encode(images, generator, copies=self.ensemble_size)
        else:
            if self._enc_taps.names:
                raise ValueError(f"VAE encoder taps {[VAE_PREFIX + n for n in self._enc_taps.names]} need images; "
                                 "latents= skips the encoder: pass images instead")
            latents = check_latents(latents, self.unet.config.in_channels, self.unet_factor, dtype=self.dtype)
            copies, vae_feats = latents.repeat_interleave(self.ensemble_size, dim=0), {}
        if self._feature_info is None:
            self._probe()
        batch = copies.shape[0] // self.ensemble_size
        vae_feats |= self._decoder_features(copies, distinct=images is not None and self.latent_sample == "sample"
                                            and self.ensemble_size > 1)
        if self._unet_layers or self.attention:
            cond = self._conditioning(batch, tuple(d * self.vae_factor for d in copies.shape[-2:]), **text)
            with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
                feats, maps = self._ensemble(copies, cond, noise, generator)
        else:  # only VAE taps: the UNet does not run
            feats, maps = [], {}
        feats = self._with_vae(feats, vae_feats)
        if size is not None and self.pad:
            feats = [f[..., : -(-size[0] // r), : -(-size[1] // r)] for f, r in zip(feats, self._reductions(), strict=True)]
            maps = {r: m[..., : -(-size[0] // r), : -(-size[1] // r)] for r, m in maps.items()}
        return BackboneOutput(features=feats, attention=maps if self.attention else None)

    def _with_vae(self, unet_feats: list[Tensor], vae_feats: dict[str, Tensor]) -> list[Tensor]:
        """UNet features (``feature_info`` order without the VAE taps) merged with the VAE ones, as ``feature_info``."""
        if not vae_feats:
            return unet_feats
        if len(self.timesteps) > 1 and self.timestep_reduce == "none":  # VAE taps once, first (they have no t)
            return [vae_feats[n] for n in self.layers if n in vae_feats] + unet_feats
        it = iter(unet_feats)
        return [vae_feats[n] if n in vae_feats else next(it) for n in self.layers]

    def _reductions(self) -> list[int]:
        return self.feature_info.reductions()

    def _conditioning(self, batch: int, image_hw: tuple[int, int], prompts: str | Sequence[str] | None,
                      prompt_embeds: Tensor | None) -> dict[str, Tensor]:
        """What the denoiser is conditioned on, one row per image: {"encoder_hidden_states": (B, L, D)}."""
        return {"encoder_hidden_states": self._embeds(batch, prompts, prompt_embeds)}

    def _embeds(self, batch: int, prompts: str | Sequence[str] | None, prompt_embeds: Tensor | None) -> Tensor:
        if prompts is not None and prompt_embeds is not None:
            raise ValueError("pass prompts or prompt_embeds, not both")
        if prompt_embeds is not None:
            return check_prompt_embeds(prompt_embeds, batch, self.unet.config.cross_attention_dim).to(self.device, self.dtype)
        return self.encode_prompt(check_prompts(prompts, batch))

    def _ensemble(self, copies: Tensor, cond: dict[str, Tensor], noise: Tensor | None,
                  generator: torch.Generator | None) -> tuple[list[Tensor], dict[int, Tensor]]:
        """Run the (B*E, C, h, w) copies (chunked) and average features and maps over the E copies."""
        e, n_t = self.ensemble_size, len(self.timesteps)
        b, latent_shape = copies.shape[0] // e, copies.shape[1:]
        noise = self._draw_noise(copies, noise, generator)
        x = copies.view(b, e, *latent_shape)
        eps = None if noise is None else noise.view(b, e, *latent_shape)
        chunk = self.ensemble_chunk or e
        feat_sums: list[Tensor] | None = None
        map_sums: dict[int, Tensor] = {}
        for start in range(0, e, chunk):
            n = min(chunk, e - start)
            xs = x[:, start : start + n].reshape(b * n, *latent_shape)
            ns = None if eps is None else eps[:, start : start + n].reshape(b * n, *latent_shape)
            xt, t = self._noised(xs, ns)  # (b*n*T, C, h, w), image-major, then copy, then timestep
            cs = {k: v.repeat_interleave(n * n_t, dim=0) for k, v in cond.items()}  # image-major, as xt
            feats, maps = self._run_unet(xt, cs, t)
            feats = [f.view(b, n, n_t, *f.shape[1:]).sum(1) for f in feats]  # (b, T, C, h, w)
            feat_sums = feats if feat_sums is None else [a + f for a, f in zip(feat_sums, feats, strict=True)]
            for r, m in maps.items():
                m = m.view(b, n, n_t, *m.shape[1:]).sum(1).mean(1)
                map_sums[r] = map_sums[r] + m if r in map_sums else m
        if n_t == 1 or self.timestep_reduce == "mean":
            feats = [f.mean(1) / e for f in feat_sums]
        else:
            feats = [f[:, k] / e for k in range(n_t) for f in feat_sums]  # timestep-major, as feature_info
        maps = {r: (m / e).to(self.dtype) for r, m in map_sums.items()}
        return feats, maps

    def extra_repr(self) -> str:
        return (f"layers={self.layers}, timestep={self.timestep}, add_noise={self.add_noise}, "
                f"ensemble_size={self.ensemble_size}, attention={self.attention}, trainable={self.trainable}")


def interpolate_features(features: list[Tensor], size: tuple[int, int]) -> list[Tensor]:
    """Bilinearly resize every map of a feature list to ``size`` (align_corners=False)."""
    return [F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in features]
