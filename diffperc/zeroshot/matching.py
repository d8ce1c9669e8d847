"""Image-text matching with the Diffusion Classifier's score (Winoground-style text and image scores).

Li, Prabhudesai, Duggal, Brown, Pathak, "Your Diffusion Model is Secretly a Zero-Shot
Classifier", ICCV 2023, arXiv 2303.16203; origin repo diffusion-classifier/diffusion-classifier
(``run_winoground.py``). A caption fits an image better when the model denoises the image's
latent with lower error under it, on (t, eps) pairs shared by every caption and image
(:class:`~diffperc.zeroshot.classifier.DiffusionClassifier`). The defaults are the published
Winoground run (README: ``--t_interval 1 --noise_path noise_512.pt --randomize_noise``): all
T = 1000 timesteps, timestep t with the t-th noise of ``scripts/save_noise.py``'s bank
(``torch.manual_seed(42)``; seed 42 here draws the same tensors), mean squared error.

Comparing *images* under one caption is biased towards a priori likely images (the comment in
``run_winoground.py``, which reports the raw text score only). The correction used here,
subtracting each image's error under the empty prompt, is DiffusionITM's (Krojer et al., "Are
Diffusion Models Vision-And-Language Reasoners?", NeurIPS 2023, arXiv 2305.16397;
McGill-NLP/diffusion-itm ``--img_retrieval``). DiffusionITM subtracts per-timestep Euclidean
norms ``||eps - eps_hat(c)||_2 - ||eps - eps_hat("")||_2``; here the difference is taken in the
classifier's unit, mean squared error by default, and ``loss="l2_norm"`` gives DiffusionITM's.
Step-by-step comparison: docs/fidelity/diffusion_classifier.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from torch import Tensor

from .classifier import DiffusionClassifier

__all__ = ["WINOGROUND_SEED", "Match", "image_text_errors", "match_images", "match_texts", "winoground_scores"]

WINOGROUND_SEED = 42  # diffusion-classifier scripts/save_noise.py: torch.manual_seed(42); randn(1024, 4, 64, 64)


class Match(NamedTuple):
    """``errors`` (N,) of each candidate, lower = better match; ``index`` of the best."""

    errors: Tensor
    index: int


def image_text_errors(backbone: Any, captions: Sequence[str], images: Tensor | Sequence[Tensor] | None = None,
                      latents: Tensor | None = None, normalize: bool = False, n_samples: int | None = None,
                      timesteps: Tensor | None = None, noise: Tensor | None = None, seed: int = WINOGROUND_SEED,
                      **kwargs: Any) -> Tensor:
    """Error of every (caption, image) pair on shared (t, eps) pairs: (N_captions, N_images).

    Args:
        backbone: a DiffusionBackbone.
        captions: distinct, non-empty captions.
        images: (N, 3, H, W) in [0, 1] or a list of same-size (3, H, W); or ``latents``.
        normalize: subtract each image's error under the empty prompt, so errors of different
            images are comparable (log p(x | c) - log p(x) ~ log p(c | x)): DiffusionITM's
            image-retrieval score, in the unit of ``loss``.
        n_samples: S evenly spaced timesteps with one seeded noise each; None (default) is every
            training timestep 0..T-1, the published Winoground run (``--t_interval 1``).
        timesteps, noise: explicit pairs instead, (S,) and (S, C, h, w) (see
            :meth:`DiffusionClassifier.score`).
        seed: seed of the noise; the default 42 reproduces the paper's saved Winoground noise.
        **kwargs: ``loss`` (``"l2"``: MSE, default; ``"l2_norm"``: DiffusionITM's unit), ``huber_delta``,
            ``weighting``, ``batch_size``, ``progress`` of :class:`DiffusionClassifier`.
    """
    captions = [captions] if isinstance(captions, str) else list(captions)
    if not captions or not all(isinstance(c, str) and c.strip() for c in captions):
        raise ValueError(f"captions must be non-empty strings, got {captions}")
    extra = [""] if normalize or len(captions) < 2 else []
    T = int(backbone.scheduler.config.num_train_timesteps)
    n = len(timesteps) if timesteps is not None else len(noise) if noise is not None else n_samples or T
    clf = DiffusionClassifier(backbone, captions + extra, schedule=[(min(n, T), 1)], seed=seed, **kwargs)
    errors = clf.score(images, latents, timesteps=timesteps, noise=noise).T  # (N_captions + extra, N_images)
    return errors[:-1] - errors[-1:] if normalize else errors[: len(captions)]


def match_texts(backbone: Any, image: Tensor | None, captions: Sequence[str], latents: Tensor | None = None,
                **kwargs: Any) -> Match:
    """Which of N >= 2 captions fits one image best (Winoground's text score direction).

    Args:
        image: (3, H, W) or (1, 3, H, W) in [0, 1]; or ``latents`` (1, C, h, w).
        captions: N distinct captions.
        **kwargs: see :func:`image_text_errors` (``n_samples``, ``loss``, ``seed``, ...).
    """
    if isinstance(captions, str) or len(captions) < 2:
        raise ValueError(f"match_texts needs at least two captions to choose from, got {captions!r}")
    if image is not None and image.ndim == 3:
        image = image[None]
    if (image is not None and len(image) != 1) or (latents is not None and len(latents) != 1):
        raise ValueError("match_texts takes one image; use image_text_errors for several")
    errors = image_text_errors(backbone, captions, image, latents, normalize=False, **kwargs)[:, 0]
    return Match(errors, int(errors.argmin()))


def match_images(backbone: Any, images: Tensor | Sequence[Tensor] | None, caption: str,
                 latents: Tensor | None = None, normalize: bool = True, **kwargs: Any) -> Match:
    """Which of N >= 2 images fits one caption best (Winoground's image score direction).

    Args:
        images: (N, 3, H, W) in [0, 1] or a list of same-size (3, H, W); or ``latents``.
        caption: a non-empty caption.
        normalize: compare errors relative to each image's unconditional error (default,
            DiffusionITM's correction; see :func:`image_text_errors`). False gives the raw image
            score of the Diffusion Classifier's ``run_winoground.py``.
        **kwargs: see :func:`image_text_errors`.
    """
    n = len(images) if images is not None else len(latents) if latents is not None else 0
    if n < 2:
        raise ValueError(f"match_images needs at least two images to choose from, got {n}")
    errors = image_text_errors(backbone, [caption], images, latents, normalize=normalize, **kwargs)[0]
    return Match(errors, int(errors.argmin()))


def winoground_scores(errors: Tensor) -> dict[str, bool]:
    """Winoground's text, image and group correctness from errors[c, i] of caption c on image i (2, 2).

    Caption 0 belongs to image 0 and caption 1 to image 1. Text: each image prefers its caption;
    image: each caption prefers its image; group: both. Lower error = better match
    (:func:`image_text_errors`; ``normalize=True`` matters for the image and group scores only).
    Ties count as wrong, as the strict ``>`` of ``run_winoground.py``.
    """
    if errors.shape != (2, 2):
        raise ValueError(f"errors must be (2 captions, 2 images), got {tuple(errors.shape)}")
    e = errors.tolist()
    text = e[0][0] < e[1][0] and e[1][1] < e[0][1]
    image = e[0][0] < e[0][1] and e[1][1] < e[1][0]
    return {"text": text, "image": image, "group": text and image}
