"""Zero-shot classification with a text-to-image diffusion model (image-text matching: ``matching.py``).

The Diffusion Classifier: Li, Prabhudesai, Duggal, Brown, Pathak, "Your Diffusion Model is
Secretly a Zero-Shot Classifier", ICCV 2023, arXiv 2303.16203; origin repo
diffusion-classifier/diffusion-classifier (MIT; ``eval_prob_adaptive.py``,
``run_winoground.py``). Recipe and numbers: ANCHORS.md sections 3 and A4; how each step
compares with the released code: docs/fidelity/diffusion_classifier.md and
tests/test_fidelity_diffclf.py.

For an image latent x0 (VAE posterior mean x scaling factor), a class prompt c_k and a pair
(t, eps), x_t = scheduler.add_noise(x0, eps, t) and the error is the mean over latent elements
of loss(eps - eps_hat(x_t, t, c_k)); a class's score is the (weighted) mean error over pairs
(a Monte-Carlo ELBO estimate) and the lowest score wins. The pairs are fixed by a seed and
**shared by every class and image** (a paired comparison; the released script shares them
across classes and draws new ones per image unless ``--noise_path`` gives a saved set); one
UNet batch carries many classes for the same x_t.

Adaptive evaluation (the paper's ``--n_samples 50 500 --to_keep 5 1``): the S pairs are a
grid of S timesteps evenly spaced over [0, T) (or a narrower ``timestep_range``) with one
seeded noise each (S = the last round's ``n_samples``). Round r scores the classes still in play on the evenly spaced ``n_samples_r``
pairs of that grid, reusing every (pair, class) error computed in earlier rounds, and keeps
the ``keep_r`` classes of lowest mean error. Since the noise belongs to the grid slot, a naive
run (``schedule=[(S, 1)]``: all classes on all S pairs) and an adaptive run give the same
error for the same (pair, class). An image with one class left costs nothing more. Beyond the
paper, ``eliminate`` adds successive elimination: after a round, classes whose paired t
statistic against the leader exceeds the threshold are dropped even when ``keep`` would keep
them, so easy images stop early (:meth:`DiffusionClassifier._eliminate`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backbones._checks import check_latents

__all__ = ["DEFAULT_TEMPLATE", "TEMPLATE_FILE", "ClassifierOutput", "DiffusionClassifier", "class_prompts",
           "default_template", "evenly_spaced"]

LOSSES = ("l2", "l1", "huber", "l2_norm")
PROMPT_ENSEMBLES = ("errors", "embeddings")
PAPER_SCHEDULE = ((50, 5), (500, 1))  # CIFAR-10 in the paper's commands.md
ELIMINATE_MIN_PAIRS = 8  # a t statistic over fewer shared pairs is too noisy to drop a class on
DEFAULT_TEMPLATE = "a photo of a {}."  # the paper's ImageNet / STL-10 prompts (prompts/*.csv)
TEMPLATE_FILE = "prompt_template.txt"  # optional, in a model folder: the caption template it was trained with
_BUNDLED_TEMPLATE = "a photo of the digit {}"  # the bundled digits model's caption (scripts/train_digits.py)


# ---------------------------------------------------------------------------- helpers
def default_template(backbone: Any) -> str:
    """The prompt template to classify with on ``backbone`` when none is given.

    A model is best queried with the captions it was trained on: the bundled digits model
    never saw "a photo of a five." (with it, "five" ranks first for every held-out digit) but
    was trained on "a photo of the digit five". The template comes from, in order:
    ``<model folder>/prompt_template.txt`` (one line with ``{}``; a folder a training script
    wrote can carry it), the bundled model's training caption ``"a photo of the digit {}"``,
    else :data:`DEFAULT_TEMPLATE` ``"a photo of a {}."`` (the paper's ImageNet prompts).
    """
    source = (getattr(backbone, "config", None) or {}).get("name_or_path")
    folder = Path(str(source)).expanduser() if source else None
    if folder is None or not folder.is_dir():
        return DEFAULT_TEMPLATE
    file = folder / TEMPLATE_FILE
    if file.is_file():
        template = file.read_text().strip()
        if "{}" not in template:
            raise ValueError(f"{file} must hold one prompt template with '{{}}' for the class name, got {template!r}")
        return template
    from ..backbones.registry import bundled_model_path

    try:
        bundled = bundled_model_path().resolve()
    except FileNotFoundError:
        return DEFAULT_TEMPLATE
    return _BUNDLED_TEMPLATE if folder.resolve() == bundled else DEFAULT_TEMPLATE


def class_prompts(classes: Sequence[str], templates: str | Sequence[str] = DEFAULT_TEMPLATE) -> list[list[str]]:
    """Prompts of each class: every template with ``{}`` replaced by the class name.

    Args:
        classes: K >= 2 distinct, non-empty class names (e.g. ``["cat", "dog"]``).
        templates: one template or several, each containing ``{}``.

    Returns:
        K lists of prompts, one per template (``[["a photo of a cat."], ["a photo of a dog."]]``).
    """
    if isinstance(classes, str):
        raise TypeError(f"classes must be a list of names, got the string {classes!r} (split it first)")
    classes = list(classes)
    if len(classes) < 2:
        raise ValueError(f"need at least two classes to classify, got {len(classes)}: {classes}")
    if not all(isinstance(c, str) and c.strip() for c in classes):
        raise ValueError(f"class names must be non-empty strings, got {classes}")
    dupes = sorted({c for c in classes if classes.count(c) > 1})
    if dupes:
        raise ValueError(f"duplicate class names {dupes}: each class must appear once")
    templates = [templates] if isinstance(templates, str) else list(templates)
    if not templates:
        raise ValueError("templates is empty: give at least one, e.g. 'a photo of a {}.'")
    for tpl in templates:
        if not isinstance(tpl, str) or "{}" not in tpl:
            raise ValueError(f"prompt template {tpl!r} has no '{{}}' for the class name, e.g. 'a photo of a {{}}.'")
    return [[tpl.replace("{}", c) for tpl in templates] for c in classes]


def evenly_spaced(n: int, total: int) -> Tensor:
    """``n`` distinct indices evenly spaced over ``range(total)``, centred: floor((i + 0.5) total / n).

    Equals the paper's grid (start ``total // n // 2``, stride ``total // n``) whenever n divides
    ``total``, e.g. 500 of 1000 timesteps -> 1, 3, ..., 999 and 50 of those 500 -> every 10th.
    """
    if not 1 <= n <= total:
        raise ValueError(f"cannot pick {n} evenly spaced values out of {total}")
    return ((torch.arange(n, dtype=torch.float64) + 0.5) * total / n).floor().long()


def _check_schedule(schedule: Sequence[Sequence[int]], n_train: int) -> tuple[tuple[int, int], ...]:
    """Rounds ``(n_samples, keep)`` with n_samples increasing, keep >= 1 non-increasing."""
    try:
        rounds = tuple((int(n), int(k)) for n, k in schedule)
    except (TypeError, ValueError):
        raise ValueError(f"schedule must be a list of (n_samples, keep) pairs such as [(50, 5), (500, 1)], "
                         f"got {schedule!r}") from None
    if not rounds:
        raise ValueError("schedule is empty: give rounds (n_samples, keep), e.g. [(50, 5), (500, 1)]")
    ns, keeps = [n for n, _ in rounds], [k for _, k in rounds]
    if ns[0] < 1 or any(b <= a for a, b in pairwise(ns)) or ns[-1] > n_train:
        raise ValueError(f"schedule n_samples must increase from >= 1 to at most the {n_train} training "
                         f"timesteps (of timestep_range), got {ns}")
    if keeps[-1] < 1 or any(b > a for a, b in pairwise(keeps)):
        raise ValueError(f"schedule keep counts must be >= 1 and not increase, got {keeps}")
    return rounds


def _stack_images(images: Tensor | Sequence[Tensor]) -> Tensor:
    """A (B, 3, H, W) tensor from a tensor or a list of (3, H, W) images of one size."""
    if isinstance(images, Tensor):
        return images
    images = list(images)
    if not images or not all(isinstance(im, Tensor) and im.ndim == 3 for im in images):
        raise ValueError("images must be a (B, 3, H, W) tensor or a non-empty list of (3, H, W) tensors")
    sizes = [tuple(im.shape[-2:]) for im in images]
    for i, size in enumerate(sizes):
        if size != sizes[0]:
            raise ValueError(f"images have different sizes: {sizes[0][0]}x{sizes[0][1]} (image 0) and "
                             f"{size[0]}x{size[1]} (image {i}); resize them to one size first")
    return torch.stack(images)


@dataclass
class ClassifierOutput:
    """Result of :meth:`DiffusionClassifier.classify` for B images and K classes.

    Attributes:
        pred: (B,) predicted class indices.
        ranking: (B, K) class indices best first: classes that reached a later round first, then
            by score (so ``ranking[:, :5]`` is a top-5 when a round keeps 5).
        scores: (B, K) mean error of each class over the pairs it was scored on; comparable
            between classes with the same ``n_pairs``.
        n_pairs: (B, K) how many (t, eps) pairs each class was scored on.
        unet_evals: (B,) UNet evaluations (one per latent x condition) each image cost.
        naive_evals: UNet evaluations per image of the naive schedule (every condition on all S pairs).
    """

    pred: Tensor
    ranking: Tensor
    scores: Tensor
    n_pairs: Tensor
    unet_evals: Tensor
    naive_evals: int


# ---------------------------------------------------------------------------- classifier
class DiffusionClassifier:
    """Zero-shot classifier over K text prompts from a Stable-Diffusion-style backbone.

    Not an ``nn.Module``: it holds no weights and follows the backbone's device and dtype
    (``backbone.to("cuda")`` moves everything). Only ``backbone.unet`` (called with
    ``encoder_hidden_states``), ``.scheduler`` (its ``alphas_cumprod`` and
    ``config.prediction_type``), ``.encode_images`` and ``.encode_prompt`` are used.

    Args:
        backbone: a :class:`~diffperc.backbones.diffusion.DiffusionBackbone`.
        prompts: one entry per class: a prompt, or a list of prompts (see ``prompt_ensemble``).
            :func:`class_prompts` builds them from class names and templates.
        class_names: K display names; default the first prompt of each class.
        schedule: adaptive rounds ``[(n_samples, keep), ...]``: round r scores the classes still
            in play on ``n_samples`` evenly spaced pairs (the paper's cumulative samples per stage;
            earlier pairs are reused) and keeps the ``keep`` best (classes kept per stage).
            ``[(S, 1)]`` is the naive schedule. Default: the paper's CIFAR-10 ``((50, 5), (500, 1))``.
        loss: ``"l2"`` (mean squared error, the paper's default), ``"l1"`` (its CIFAR-10/Pets/Flowers/
            STL-10 runs), ``"huber"``, or ``"l2_norm"``: the Euclidean norm of the residual over all
            latent elements, DiffusionITM's unit (Krojer et al. 2023; see ``matching.py``).
        huber_delta: threshold of the Huber loss (PyTorch's default 1.0, as the paper).
        prompt_ensemble: with several prompts per class, ``"errors"`` (default) averages the
            errors of the prompts (one UNet evaluation per prompt) and ``"embeddings"`` averages
            their text embeddings into one condition (one evaluation per class).
        weighting: maps timesteps (S,) to non-negative weights (S,) of the mean over pairs;
            None is uniform (the paper found uniform best).
        timestep_range: ``(lo, hi)``: the default pairs' timesteps are evenly spaced over
            [lo, hi) instead of [0, T). None (default) is the paper's full range. The paper's
            ablation found the full range best for SD; a small model can carry its class
            information in part of it (the bundled model v1 scored 85.5 % naive over [700, 1000)
            against 75.1 % over [0, 1000); ``benchmarks/bench_classifier.py --ranges`` picks a range on
            training digits), and a narrower range then costs fewer pairs.
        eliminate: optional successive elimination on top of the rounds' ``keep`` caps: after every
            round but the last, a class whose paired t statistic against the leading class
            (mean over the >= 8 shared pairs of the error difference / its standard error) exceeds
            ``eliminate`` is dropped, so easy images stop early while hard ones keep up to
            ``keep`` classes. None (default) is the paper's fixed ``keep``. An image with one
            class left is never evaluated again (with or without elimination).
        batch_size: latents per UNet call (pairs x conditions, packed in order).
        seed: seed of the shared noise (drawn on the CPU, so the same on every device).
        progress: show a progress bar over UNet calls.
    """

    def __init__(
        self, backbone: Any, prompts: Sequence[str | Sequence[str]], class_names: Sequence[str] | None = None,
        schedule: Sequence[Sequence[int]] = PAPER_SCHEDULE, loss: str = "l2", huber_delta: float = 1.0,
        prompt_ensemble: str = "errors", weighting: Callable[[Tensor], Tensor] | None = None,
        timestep_range: Sequence[int] | None = None, eliminate: float | None = None, batch_size: int = 32,
        seed: int = 0, progress: bool = False,
    ) -> None:
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if prompt_ensemble not in PROMPT_ENSEMBLES:
            raise ValueError(f"prompt_ensemble must be one of {PROMPT_ENSEMBLES}, got {prompt_ensemble!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.backbone, self.loss, self.huber_delta, self.prompt_ensemble = backbone, loss, huber_delta, prompt_ensemble
        self.weighting, self.batch_size, self.seed, self.progress = weighting, batch_size, seed, progress
        self.prompts = self._check_prompts(prompts)
        self.class_names = [p[0] for p in self.prompts] if class_names is None else list(class_names)
        if len(self.class_names) != len(self.prompts) or len(set(self.class_names)) != len(self.class_names):
            raise ValueError(f"class_names must be {len(self.prompts)} distinct names, got {self.class_names}")
        self.num_train_timesteps = int(backbone.scheduler.config.num_train_timesteps)
        self.timestep_range = self._check_range(timestep_range)
        self.eliminate = self._check_eliminate(eliminate)
        self.schedule = self._check_schedule(schedule)
        if prompt_ensemble == "errors":
            self._cond_prompts = [p for ps in self.prompts for p in ps]
            self._cond_class = torch.tensor([k for k, ps in enumerate(self.prompts) for _ in ps])
        else:
            self._cond_prompts = [p[0] for p in self.prompts]
            self._cond_class = torch.arange(len(self.prompts))
        self._embeds: Tensor | None = None
        self._noise: dict[tuple[int, ...], Tensor] = {}

    @classmethod
    def from_classes(cls, backbone: Any, classes: Sequence[str], templates: str | Sequence[str] | None = None,
                     **kwargs: Any) -> DiffusionClassifier:
        """Build from class names and prompt templates (see :func:`class_prompts`); None: the model's
        :func:`default_template`."""
        templates = default_template(backbone) if templates is None else templates
        return cls(backbone, class_prompts(classes, templates), class_names=list(classes), **kwargs)

    @staticmethod
    def _check_prompts(prompts: Sequence[str | Sequence[str]]) -> list[list[str]]:
        if isinstance(prompts, str):
            raise TypeError(f"prompts must be a list with one entry per class, got the string {prompts!r}")
        out = [[p] if isinstance(p, str) else list(p) for p in prompts]
        if len(out) < 2:
            raise ValueError(f"need at least two classes (prompts) to classify, got {len(out)}")
        if not all(ps and all(isinstance(p, str) for p in ps) for ps in out):
            raise ValueError("each class needs a prompt string or a non-empty list of prompt strings")
        flat = [p for ps in out for p in ps]
        dupes = sorted({p for p in flat if flat.count(p) > 1})
        if dupes:
            raise ValueError(f"duplicate prompts {dupes}: two classes with one prompt cannot be told apart")
        return out

    def _check_range(self, timestep_range: Sequence[int] | None) -> tuple[int, int]:
        T = self.num_train_timesteps
        if timestep_range is None:
            return 0, T
        try:
            lo, hi = (int(v) for v in timestep_range)
        except (TypeError, ValueError):
            raise ValueError(f"timestep_range must be (lo, hi) with 0 <= lo < hi <= {T}, got {timestep_range!r}") from None
        if not 0 <= lo < hi <= T:
            raise ValueError(f"timestep_range must be (lo, hi) with 0 <= lo < hi <= {T}, got ({lo}, {hi})")
        return lo, hi

    def _check_schedule(self, schedule: Sequence[Sequence[int]]) -> tuple[tuple[int, int], ...]:
        lo, hi = self.timestep_range
        return _check_schedule(schedule, hi - lo)

    def grid(self, n: int) -> Tensor:
        """The default pairs' timesteps: ``n`` evenly spaced over ``timestep_range`` (default [0, T)), (n,)."""
        lo, hi = self.timestep_range
        return lo + evenly_spaced(n, hi - lo)

    @property
    def num_classes(self) -> int:
        return len(self.prompts)

    @property
    def num_conditions(self) -> int:
        """Text conditions per pair: K, or the total number of prompts with ``prompt_ensemble="errors"``."""
        return len(self._cond_prompts)

    # ------------------------------------------------------------------ inputs
    def encode(self, images: Tensor | Sequence[Tensor]) -> Tensor:
        """(B, 3, H, W) images in [0, 1] (or a list of same-size (3, H, W)) -> latents (B, C, h, w), once."""
        with torch.no_grad():
            return self.backbone.encode_images(_stack_images(images).to(self.backbone.device)).float()

    def _latents(self, images: Tensor | Sequence[Tensor] | None, latents: Tensor | None) -> Tensor:
        if (images is None) == (latents is None):
            raise ValueError("pass exactly one of images (B, 3, H, W) in [0, 1] or latents (B, C, h, w)")
        if images is not None:
            return self.encode(images)
        cfg = self.backbone.unet.config
        latents = check_latents(latents, cfg.in_channels, 2 ** (len(cfg.block_out_channels) - 1))
        return latents.to(self.backbone.device, torch.float32)

    def pairs(self, n: int, latent_shape: Sequence[int]) -> tuple[Tensor, Tensor]:
        """The default S = n pairs: timesteps (n,) evenly spaced over ``timestep_range`` ([0, T) by default) and
        seeded noise (n, C, h, w)."""
        shape = (n, *latent_shape)
        if shape not in self._noise:
            self._noise[shape] = torch.randn(shape, generator=torch.Generator().manual_seed(self.seed))
        return self.grid(n), self._noise[shape]

    def _check_pairs(self, x0: Tensor, timesteps: Tensor | None, noise: Tensor | None) -> tuple[Tensor, Tensor]:
        if timesteps is None and noise is None:
            return self.pairs(self.schedule[-1][0], x0.shape[1:])
        if timesteps is None:
            timesteps = self.grid(len(noise))
        timesteps = torch.as_tensor(timesteps)
        if timesteps.ndim != 1 or timesteps.is_floating_point() or len(timesteps) == 0:
            raise ValueError(f"timesteps must be a non-empty 1-D integer tensor (S,), got {tuple(timesteps.shape)} "
                             f"{timesteps.dtype}")
        if timesteps.min() < 0 or timesteps.max() >= self.num_train_timesteps:
            raise ValueError(f"timesteps must be in [0, {self.num_train_timesteps}), got "
                             f"[{int(timesteps.min())}, {int(timesteps.max())}]")
        if noise is None:
            noise = self.pairs(len(timesteps), x0.shape[1:])[1]
        if noise.shape != (len(timesteps), *x0.shape[1:]):
            raise ValueError(f"noise must have shape (S, C, h, w) = {(len(timesteps), *x0.shape[1:])} (one per "
                             f"timestep, shared by all classes and images), got {tuple(noise.shape)}")
        return timesteps.long(), noise.float()

    def _weights(self, timesteps: Tensor) -> Tensor:
        if self.weighting is None:
            return torch.ones(len(timesteps))
        w = torch.as_tensor(self.weighting(timesteps), dtype=torch.float32).cpu()
        if w.shape != timesteps.shape or not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"weighting must map timesteps (S,) to finite weights >= 0 with a positive sum, got "
                             f"shape {tuple(w.shape)}")
        return w

    def _embeddings(self) -> Tensor:
        """(N_cond, L, D) text embeddings, encoded once (averaged per class for ``"embeddings"``)."""
        if self._embeds is None:
            with torch.no_grad():
                if self.prompt_ensemble == "errors":
                    self._embeds = self.backbone.encode_prompt(self._cond_prompts)
                else:
                    self._embeds = torch.stack([self.backbone.encode_prompt(ps).mean(0) for ps in self.prompts])
        return self._embeds.to(self.backbone.device, self.backbone.dtype)

    # ------------------------------------------------------------------ UNet errors
    def _pred_to_eps(self, pred: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The model output as a noise prediction eps_hat (B, C, h, w), from eps, v or x0 prediction."""
        kind = self.backbone.scheduler.config.prediction_type
        if kind == "epsilon":
            return pred
        a = self.backbone.scheduler.alphas_cumprod.to(x_t.device, torch.float32)[t].view(-1, 1, 1, 1)
        if kind == "v_prediction":  # v = sqrt(a) eps - sqrt(1-a) x0  =>  eps = sqrt(a) v + sqrt(1-a) x_t
            return a.sqrt() * pred + (1 - a).sqrt() * x_t
        if kind == "sample":
            return (x_t - a.sqrt() * pred) / (1 - a).sqrt()
        raise ValueError(f"unsupported scheduler prediction_type {kind!r} (epsilon, v_prediction, sample)")

    def _error(self, eps: Tensor, eps_hat: Tensor) -> Tensor:
        """Mean over latent elements of the loss, or the residual's norm (``"l2_norm"``): (N, C, h, w) x 2 -> (N,)."""
        if self.loss == "l2_norm":
            return torch.linalg.vector_norm((eps - eps_hat).flatten(1), dim=1)
        kw = {"delta": self.huber_delta} if self.loss == "huber" else {}
        fn = {"l2": F.mse_loss, "l1": F.l1_loss, "huber": F.huber_loss}[self.loss]
        return fn(eps_hat, eps, reduction="none", **kw).flatten(1).mean(1)

    @torch.no_grad()
    def _run(self, x0: Tensor, b: Tensor, s: Tensor, c: Tensor, timesteps: Tensor, noise: Tensor) -> Tensor:
        """Errors (J,) of the jobs (image b, pair s, condition c), ``batch_size`` latents per UNet call."""
        unet, dev = self.backbone.unet, x0.device
        embeds = self._embeddings()
        out = torch.empty(len(b))
        chunks = range(0, len(b), self.batch_size)
        if self.progress:
            from tqdm.auto import tqdm

            chunks = tqdm(chunks, desc="diffusion classifier", unit="call", leave=False)
        for start in chunks:
            sl = slice(start, start + self.batch_size)
            t = timesteps[s[sl]].to(dev)
            eps = noise[s[sl]].to(dev)
            x_t = self.backbone.scheduler.add_noise(x0[b[sl]], eps, t)  # (n, C, h, w) fp32
            pred = unet(x_t.to(self.backbone.dtype), t, encoder_hidden_states=embeds[c[sl].to(dev)]).sample
            pred = pred[:, : x_t.shape[1]].float()  # models that also predict a variance
            out[sl] = self._error(eps, self._pred_to_eps(pred, x_t, t)).cpu()
        return out

    def _fill(self, err: Tensor, need: Tensor, x0: Tensor, timesteps: Tensor, noise: Tensor) -> Tensor:
        """Compute the (image, class, pair) errors marked in ``need`` (B, K, S) into ``err`` (B, N_cond, S).

        Jobs are ordered image, pair, condition, so one UNet call carries the conditions of one x_t.
        Returns the UNet evaluations per image (B,).
        """
        need_c = need[:, self._cond_class, :]  # (B, N_cond, S)
        b, s, c = need_c.permute(0, 2, 1).nonzero(as_tuple=True)
        if len(b):
            err[b, c, s] = self._run(x0, b, s, c, timesteps, noise)
        return torch.bincount(b, minlength=len(x0))

    def _class_errors(self, err: Tensor) -> Tensor:
        """(B, N_cond, S) condition errors -> (B, K, S) class errors (mean over the class's prompts)."""
        if self.num_conditions == self.num_classes:
            return err
        out = torch.zeros(err.shape[0], self.num_classes, err.shape[2]).index_add_(1, self._cond_class, err)
        return out / torch.bincount(self._cond_class, minlength=self.num_classes).view(1, -1, 1)

    def pair_errors(self, images: Tensor | Sequence[Tensor] | None = None, latents: Tensor | None = None,
                    timesteps: Tensor | None = None, noise: Tensor | None = None,
                    classes: Sequence[int] | None = None) -> Tensor:
        """Errors of every image, class and pair: (B, K', S) (K' = ``len(classes)``, default all K).

        Args:
            images: (B, 3, H, W) in [0, 1] (encoded once), or pass ``latents`` (B, C, h, w).
            timesteps: (S,) integers in [0, T); default the schedule's S evenly spaced ones.
            noise: (S, C, h, w), pair s's noise, shared by every class and image; default seeded.
            classes: score only these class indices.
        """
        x0 = self._latents(images, latents)
        timesteps, noise = self._check_pairs(x0, timesteps, noise)
        idx = torch.arange(self.num_classes) if classes is None else torch.as_tensor(list(classes), dtype=torch.long)
        if idx.ndim != 1 or len(idx) == 0 or idx.min() < 0 or idx.max() >= self.num_classes:
            raise ValueError(f"classes must be indices in [0, {self.num_classes}), got {classes}")
        need = torch.zeros(len(x0), self.num_classes, len(timesteps), dtype=torch.bool)
        need[:, idx] = True
        err = torch.full((len(x0), self.num_conditions, len(timesteps)), math.nan)
        self._fill(err, need, x0, timesteps, noise)
        return self._class_errors(err)[:, idx]

    def score(self, images: Tensor | Sequence[Tensor] | None = None, latents: Tensor | None = None,
              timesteps: Tensor | None = None, noise: Tensor | None = None,
              classes: Sequence[int] | None = None) -> Tensor:
        """Mean error over the S pairs (weighted by ``weighting``) of every image and class: (B, K').

        Lower is a better match. Arguments as :meth:`pair_errors`.
        """
        x0 = self._latents(images, latents)
        timesteps, noise = self._check_pairs(x0, timesteps, noise)
        w = self._weights(timesteps)
        return (self.pair_errors(latents=x0, timesteps=timesteps, noise=noise, classes=classes) * w).sum(-1) / w.sum()

    # ------------------------------------------------------------------ adaptive prediction
    def classify(self, images: Tensor | Sequence[Tensor] | None = None, latents: Tensor | None = None,
                 schedule: Sequence[Sequence[int]] | None = None, eliminate: float | None = None,
                 noise: Tensor | None = None) -> ClassifierOutput:
        """Adaptive classification of B images (images encoded once); see the class docstring.

        Args:
            images: (B, 3, H, W) in [0, 1], or ``latents`` (B, C, h, w).
            schedule: rounds ``[(n_samples, keep), ...]`` for this call; default ``self.schedule``.
            eliminate: this call's elimination threshold (see the class docstring); default ``self.eliminate``.
            noise: (S, C, h, w) noise of the S grid slots (slot s = the s-th of :meth:`grid` (S)),
                shared by every class and image; default the seeded one.
        """
        rounds = self.schedule if schedule is None else self._check_schedule(schedule)
        x0 = self._latents(images, latents)
        n_pairs = rounds[-1][0]
        timesteps, noise = self._check_pairs(x0, self.grid(n_pairs), noise)
        err = torch.full((len(x0), self.num_conditions, n_pairs), math.nan)
        return self._adaptive(rounds, len(x0), lambda need: self._fill(err, need, x0, timesteps, noise),
                              lambda: self._class_errors(err), eliminate)

    def classify_errors(self, errors: Tensor, schedule: Sequence[Sequence[int]] | None = None,
                        eliminate: float | None = None) -> ClassifierOutput:
        """Adaptive classification replayed from precomputed errors, without a UNet call.

        Given the (B, K, S) errors of every image, class and pair from :meth:`pair_errors` on the
        default pairs (S = the schedule's last ``n_samples``), this returns exactly what
        :meth:`classify` returns for the same images, with ``unet_evals`` counting only the errors
        the schedule would have computed. One naive run therefore prices and scores any number of
        adaptive schedules (``benchmarks/bench_classifier.py`` chooses its schedule this way).

        Args:
            errors: (B, K, S) class errors on the S evenly spaced seeded pairs.
            schedule: rounds ``[(n_samples, keep), ...]`` with last ``n_samples`` = S; default ``self.schedule``.
            eliminate: as in :meth:`classify`.
        """
        rounds = self.schedule if schedule is None else self._check_schedule(schedule)
        if errors.ndim != 3 or errors.shape[1] != self.num_classes or errors.shape[2] != rounds[-1][0]:
            raise ValueError(f"errors must be (B, K={self.num_classes}, S={rounds[-1][0]}) (pair_errors on the "
                             f"schedule's S pairs), got {tuple(errors.shape)}")
        if not torch.isfinite(errors).all():
            raise ValueError("errors has NaN or inf entries: compute every (image, class, pair) with pair_errors")
        per_class = torch.bincount(self._cond_class, minlength=self.num_classes)  # UNet evaluations per pair
        errors = errors.detach().float().cpu()
        return self._adaptive(rounds, len(errors), lambda need: (need * per_class[:, None]).sum((1, 2)),
                              lambda: errors, eliminate)

    def _adaptive(self, rounds: tuple[tuple[int, int], ...], n_img: int, fill: Callable[[Tensor], Tensor],
                  class_errors: Callable[[], Tensor], eliminate: float | None) -> ClassifierOutput:
        """The rounds of adaptive evaluation. ``fill(need)`` computes the (B, K, S) errors marked in
        ``need`` and returns UNet evaluations per image (B,); ``class_errors()`` gives (B, K, S) errors."""
        eliminate = self._check_eliminate(self.eliminate if eliminate is None else eliminate)
        n_cls, n_pairs = self.num_classes, rounds[-1][0]
        w = self._weights(self.grid(n_pairs))
        done = torch.zeros(n_img, n_cls, n_pairs, dtype=torch.bool)
        alive = torch.ones(n_img, n_cls, dtype=torch.bool)
        stage = torch.zeros(n_img, n_cls, dtype=torch.long)
        evals = torch.zeros(n_img, dtype=torch.long)
        for r, (n, keep) in enumerate(rounds):
            sel = torch.zeros(n_pairs, dtype=torch.bool)
            sel[evenly_spaced(n, n_pairs)] = True
            decided = alive.sum(1) == 1  # one class left: its image costs nothing more
            need = alive[:, :, None] & sel & ~done & ~decided[:, None, None]
            evals += fill(need)
            done |= need
            stage[alive] = r
            class_err = class_errors()
            scores = self._reduce(class_err, done, w)
            alive = self._keep(scores, alive, keep)
            if eliminate is not None and r < len(rounds) - 1:
                alive = self._eliminate(class_err, done, scores, alive, eliminate)
        ranking = _rank(scores, stage)
        return ClassifierOutput(pred=ranking[:, 0], ranking=ranking, scores=scores, n_pairs=done.sum(-1),
                                unet_evals=evals, naive_evals=self.num_conditions * n_pairs)

    def predict(self, images: Tensor | Sequence[Tensor] | None = None, latents: Tensor | None = None,
                schedule: Sequence[Sequence[int]] | None = None) -> Tensor:
        """Predicted class indices (B,); :meth:`classify` also gives ranking, scores and evaluation counts."""
        return self.classify(images, latents, schedule).pred

    @staticmethod
    def _reduce(class_err: Tensor, done: Tensor, w: Tensor) -> Tensor:
        """(B, K) weighted mean error of each class over its evaluated pairs; ``class_err`` (B, K, S)."""
        wd = w * done  # (B, K, S)
        den = wd.sum(-1)
        if (den <= 0).any():
            raise ValueError("weighting gives zero weight to every pair of a round; no class can be scored")
        return (class_err.nan_to_num(0.0) * wd).sum(-1) / den

    @staticmethod
    def _check_eliminate(z: float | None) -> float | None:
        if z is not None and not (isinstance(z, int | float) and math.isfinite(z) and z > 0):
            raise ValueError(f"eliminate must be a positive t threshold such as 3.0, or None, got {z!r}")
        return None if z is None else float(z)

    @staticmethod
    def _eliminate(class_err: Tensor, done: Tensor, scores: Tensor, alive: Tensor, z: float) -> Tensor:
        """Drop the alive classes whose paired t statistic against the leader exceeds ``z``.

        For class k and the leader b (lowest score among the alive), over the n pairs both were
        scored on, d = e_k - e_b and t = mean(d) / (std(d) / sqrt(n)) (unweighted); nothing is
        dropped before n reaches ``ELIMINATE_MIN_PAIRS``.
        """
        leader = scores.masked_fill(~alive, math.inf).argmin(1)  # (B,)
        idx = leader.view(-1, 1, 1).expand(-1, 1, class_err.shape[2])
        both = done & done.gather(1, idx)  # (B, K, S)
        d = (class_err - class_err.gather(1, idx)).nan_to_num(0.0) * both
        n = both.sum(-1).float()
        mean = d.sum(-1) / n.clamp_min(1)
        var = ((d - mean[..., None]) ** 2 * both).sum(-1) / (n - 1).clamp_min(1)
        t = mean / (var / n.clamp_min(1)).sqrt()
        drop = alive & (n >= ELIMINATE_MIN_PAIRS) & (t > z)  # NaN (no spread, no difference) never drops
        drop[torch.arange(len(leader)), leader] = False
        return alive & ~drop

    @staticmethod
    def _keep(scores: Tensor, alive: Tensor, keep: int) -> Tensor:
        """The ``keep`` classes of lowest score among those alive (all of them if fewer)."""
        idx = scores.masked_fill(~alive, math.inf).topk(min(keep, scores.shape[1]), dim=1, largest=False).indices
        return torch.zeros_like(alive).scatter_(1, idx, True) & alive


def _rank(scores: Tensor, stage: Tensor) -> Tensor:
    """(B, K) classes ordered by last round reached (later first), then by score (lower first)."""
    by_score = scores.argsort(dim=1, stable=True)
    by_stage = (-stage).gather(1, by_score).argsort(dim=1, stable=True)
    return by_score.gather(1, by_stage)
