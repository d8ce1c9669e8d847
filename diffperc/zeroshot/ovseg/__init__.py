"""OVDiff: training-free open-vocabulary segmentation with support sets sampled from the diffusion model.

Karazija, Laina, Vedaldi, Rupprecht, "Diffusion Models for Open-Vocabulary Segmentation", ECCV 2024,
arXiv 2306.09316; released code karazijal/sdov. :class:`OVDiff` (``segmenter.py``) wires the steps:
``support.py`` (sampling with class-token attention heatmaps, cached), ``masks.py`` + ``maskcut.py``
(fg/bg masks), ``extractors.py`` (SD queries, DINO and CLIP keys), ``prototypes.py``,
``inference.py`` (scoring), ``clip_filter.py``, ``pamr.py``. See docs/ovseg.md.
"""

from .segmenter import OVDiff, default_cache_dir, prediction_picture

__all__ = ["OVDiff", "default_cache_dir", "prediction_picture"]
