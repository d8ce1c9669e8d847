"""MaskCut: training-free instance masks by repeated normalized cuts on self-supervised ViT keys.

Wang, Girdhar, Yu, Misra, "Cut and Learn for Unsupervised Object Detection and Instance
Segmentation" (CutLER), CVPR 2023, arXiv 2301.11320; code facebookresearch/CutLER
``maskcut/maskcut.py`` (vendored in karazijal/sdov under ``CutLER/``), built on TokenCut. OVDiff
uses the CutLER detector distilled from these masks (detectron2); MaskCut is the same idea with
no trained weights, so it runs wherever a DINO ViT does.

Per image (resized to ``fixed_size`` x ``fixed_size``): patch keys of the last block of DINO
ViT-B/8, a binary graph A_ij = [cos(k_i, k_j) > tau] (eps elsewhere), the second smallest
generalized eigenvector of (D - A) x = lambda D x, split at its mean; the side holding the
eigenvector's largest magnitude is the object unless three or more image corners fall on it;
the connected component of the seed patch is the mask. Then the mask's patches are zeroed and
the cut repeats, N times (``maskcut_forward``). A new mask that overlaps the previous one by IoU
> 0.5 or covers <= 1 % of the image is dropped; masks are made disjoint in order. The CRF
post-processing of ``maskcut.py`` (pydensecrf) is not applied.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["maskcut", "second_smallest_eigenvector"]


def _affinity(feats: Tensor, tau: float, eps: float = 1e-5) -> Tensor:
    """(D, N) features -> (N, N) float64 binary affinity with ``eps`` for non-edges (``get_affinity_matrix``)."""
    f = F.normalize(feats.double(), p=2, dim=0)
    a = (f.T @ f > tau).double()
    return torch.where(a == 0, torch.full_like(a, eps), a)


def second_smallest_eigenvector(a: Tensor, backend: str = "auto") -> Tensor:
    """The generalized eigenvector of (D - A) x = lambda D x with the second smallest eigenvalue.

    Args:
        a: (N, N) symmetric non-negative affinity (float64).
        backend: ``"scipy"`` (``scipy.linalg.eigh(D - A, D, subset_by_index=[1, 2])``, as released),
            ``"torch"`` (eigh of the symmetric normalised Laplacian on ``a``'s device, x = D^-1/2 y),
            ``"auto"``: torch on CUDA, scipy otherwise. Both normalise x^T D x = 1; the sign is arbitrary.
    """
    if backend == "auto":
        backend = "torch" if a.is_cuda else "scipy"
    d = a.sum(1)
    if backend == "scipy":
        from scipy.linalg import eigh

        an, dn = a.cpu().numpy(), d.cpu().numpy()
        _, vecs = eigh(np.diag(dn) - an, np.diag(dn), subset_by_index=[1, 2])
        return torch.from_numpy(vecs[:, 0].copy()).to(a.device)
    if backend != "torch":
        raise ValueError(f"backend must be 'auto', 'scipy' or 'torch', got {backend!r}")
    inv_sqrt = d.rsqrt()
    lap = torch.eye(len(a), dtype=a.dtype, device=a.device) - inv_sqrt[:, None] * a * inv_sqrt[None]
    _, vecs = torch.linalg.eigh(lap)
    return inv_sqrt * vecs[:, 1]


def _iou(m1: Tensor, m2: Tensor) -> float:
    union = (m1 | m2).sum()
    return float("nan") if union == 0 else float((m1 & m2).sum() / union)


def maskcut(feats: Tensor, num_masks: int = 3, tau: float = 0.15, backend: str = "auto") -> Tensor:
    """Up to ``num_masks`` disjoint object masks on the feature grid.

    Args:
        feats: (D, h, w) patch features (DINO keys).
        num_masks: N cuts (CutLER's ``--N 3``).
        tau: graph threshold on cosine similarity (CutLER's ``--tau 0.15``).
        backend: eigen-solver, see :func:`second_smallest_eigenvector`.

    Returns:
        (K, h, w) bool masks, K <= num_masks, empty masks removed.
    """
    from scipy import ndimage

    dim, h, w = feats.shape
    feats = feats.reshape(dim, h * w).double()
    painting = torch.zeros(h, w, dtype=torch.bool, device=feats.device)
    current = None
    masks: list[Tensor] = []
    for i in range(num_masks):
        if i > 0:  # get_masked_affinity_matrix: zero the patches of every earlier mask
            painting |= current
            feats = feats * (~painting).flatten().double()[None]
        vec = second_smallest_eigenvector(_affinity(feats, tau), backend).cpu().numpy()
        part = vec > vec.sum() / len(vec)  # get_salient_areas
        seed = int(np.argmax(np.abs(vec)))
        grid = part.reshape(h, w)
        corners = int(grid[0, 0]) + int(grid[0, -1]) + int(grid[-1, 0]) + int(grid[-1, -1])
        if corners >= 3 or part[seed] != 1:  # object-centric prior, then the eigenvector's peak
            part = np.logical_not(part)
            seed = int(np.argmax(-vec))
        else:
            seed = int(np.argmax(vec))
        labels, _ = ndimage.label(part.reshape(h, w))  # detect_box: the seed's connected component
        mask = torch.from_numpy(labels == labels[np.unravel_index(seed, (h, w))]).to(feats.device)
        if i > 0:
            ratio = float(mask.sum()) / (h * w)
            if _iou(current, mask) > 0.5 or ratio <= 0.01:
                mask = torch.zeros_like(mask)
        current = mask
        masks.append(mask)
    out, taken = [], torch.zeros(h, w, dtype=torch.bool, device=feats.device)
    for m in masks:  # bipartition_masked: remove what earlier masks took
        m = m & ~taken
        taken |= m
        if m.any():
            out.append(m)
    return torch.stack(out) if out else torch.zeros(0, h, w, dtype=torch.bool, device=feats.device)
