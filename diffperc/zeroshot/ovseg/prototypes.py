"""OVDiff prototypes: per class, fg and bg class / instance / part (k-means) vectors, and their assembly.

Per class and extractor (karazijal/sdov ``gen_proto_sd.py:219-330``, ``gen_proto_vit.py:150-247``):
each support image's fg and bg masks are resized bilinearly to the feature grid and every grid
cell the resized mask touches (``.bool()`` of the interpolation) is kept; images whose fg mask
misses the grid are skipped (for both fg and bg). Instance prototypes are the per-image means;
the class prototype is the mean of all kept cells (a mask-size weighted mean of the instances);
part prototypes are the centres of k-means (scikit-learn ``KMeans(k, random_state=0,
n_init="auto")``, k = 32) over all kept cells. The same for the background.

Assembly for a vocabulary (``protos.py`` ``build_prototypes`` with ``predict.py``'s defaults:
``feat_mode="all"``, ``bgmode="all"``, ``ctx_mode=True``, ``filter_bg_thres=0.85``): per class the
fg set is [class, instances, parts]; the bg set the same minus non-finite rows (an image with an
empty bg mask has a NaN mean); with stuff classes in the vocabulary, stuff classes get no bg
prototypes and a bg prototype is dropped when its cosine to any fg prototype of a stuff class
exceeds 0.85 (the stuff filter; a no-op on VOC, which has no stuff class). Sets are padded to one
size, L2-normalised and masked (``predict.py:396-442``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["PROTO_KEYS", "PrototypeBank", "assemble_prototypes", "class_prototypes", "kmeans_centers",
           "load_prototypes", "save_prototypes", "stuff_filter"]

PROTO_KEYS = ("proto", "proto_bg", "ind", "ind_bg", "kmeans", "kmeans_bg")


def kmeans_centers(x: Tensor, k: int) -> Tensor:
    """(M, D) -> (k, D) k-means centres (sklearn ``KMeans(k, random_state=0, n_init="auto")``, as released).

    With fewer than k points, k drops to their number (the released code would raise).
    """
    from sklearn.cluster import KMeans

    data = x.float().cpu().numpy()
    k = min(k, len(data))
    if k < 1:
        return torch.zeros(0, x.shape[-1])
    return torch.from_numpy(KMeans(n_clusters=k, random_state=0, n_init="auto").fit(data).cluster_centers_).float()


def _cells(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """(H, W) mask -> (h * w,) bool: grid cells the bilinearly resized mask touches (``gen_proto_sd.py:230-232``)."""
    m = F.interpolate(mask.float().view(1, 1, *mask.shape[-2:]), size=size, mode="bilinear", align_corners=False)
    return m[0].bool().flatten()


def class_prototypes(feats: Tensor, fg: Tensor, bg: Tensor, kmeans: int = 32) -> dict[str, Tensor]:
    """The prototypes of one class from one extractor.

    Args:
        feats: (N, D, h, w) features of the N support images.
        fg, bg: (N, H, W) bool masks at the support images' size.
        kmeans: part prototypes per set (0 = none).

    Returns:
        {"proto": (D,), "proto_bg": (D,), "ind": (n, D), "ind_bg": (n, D), "kmeans": (k, D),
        "kmeans_bg": (k, D)} float32 on the CPU; n = images with a non-empty fg.
    """
    if not (len(feats) == len(fg) == len(bg)):
        raise ValueError(f"feats, fg and bg must have one entry per support image, got {len(feats)}, {len(fg)}, {len(bg)}")
    n, d, h, w = feats.shape
    fg_cells, bg_cells = [], []
    for i in range(n):
        cmap = _cells(fg[i], (h, w))
        if cmap.sum() == 0:  # gen_proto_sd.py:234
            continue
        flat = feats[i].float().permute(1, 2, 0).reshape(h * w, d).cpu()
        fg_cells.append(flat[cmap.cpu()])
        bg_cells.append(flat[_cells(bg[i], (h, w)).cpu()])
    if not fg_cells:
        raise ValueError("no support image has a foreground mask on the feature grid: the class cannot get prototypes")
    out = {"ind": torch.stack([f.mean(0) for f in fg_cells]), "ind_bg": torch.stack([f.mean(0) for f in bg_cells])}
    all_fg, all_bg = torch.cat(fg_cells), torch.cat(bg_cells)
    out["proto"], out["proto_bg"] = all_fg.mean(0), all_bg.mean(0)
    out["kmeans"] = kmeans_centers(all_fg, kmeans) if kmeans > 0 else torch.zeros(0, d)
    out["kmeans_bg"] = kmeans_centers(all_bg, kmeans) if kmeans > 0 and len(all_bg) else torch.zeros(0, d)
    return out


def save_prototypes(protos: dict[str, Tensor], path: Path) -> None:
    """Write one class's prototypes as safetensors, atomically."""
    from safetensors.torch import save_file

    from ..._io import atomic_file

    with atomic_file(path) as tmp:
        save_file({k: protos[k].contiguous() for k in PROTO_KEYS}, str(tmp))


def load_prototypes(path: Path) -> dict[str, Tensor] | None:
    """One class's prototypes, or None if the file is missing or incomplete."""
    if not Path(path).exists():
        return None
    from safetensors.torch import load_file

    data = load_file(str(path))
    return data if all(k in data for k in PROTO_KEYS) else None


# ---------------------------------------------------------------------------- assembly
@dataclass
class PrototypeBank:
    """Normalised prototypes of a vocabulary for one extractor.

    Attributes:
        protos: (2, C, K, D) L2-normalised, zero where masked; [0] = background, [1] = foreground sets.
        mask: (2, C, K) bool, True for real prototypes.
        classes: the C class names (no background).
    """

    protos: Tensor
    mask: Tensor
    classes: list[str]

    def to(self, device: torch.device | str) -> PrototypeBank:
        return PrototypeBank(self.protos.to(device), self.mask.to(device), self.classes)


def stuff_filter(bg: Tensor, fg: Tensor, threshold: float) -> Tensor:
    """Drop bg rows whose cosine to any row of ``fg`` exceeds ``threshold`` (``protos.py`` filter_proto_bg2allfg).

    Sets of at most one row are kept whole, and an empty ``fg`` drops nothing, as released.
    """
    if bg.shape[0] <= 1:
        return bg
    sim = (bg / bg.norm(dim=-1, keepdim=True).clamp_min(1e-6)) @ (fg / fg.norm(dim=-1, keepdim=True).clamp_min(1e-6)).T
    return bg[(sim <= threshold).all(-1)]


def _stack(parts: Sequence[Tensor], d: int) -> Tensor:
    return torch.cat([p.reshape(-1, d) for p in parts], dim=0) if parts else torch.zeros(0, d)


def assemble_prototypes(
    per_class: dict[str, dict[str, Tensor]], classes: Sequence[str], stuff: Sequence[str] = (),
    feat_mode: str = "all", stuff_threshold: float = 0.85, ctx_mode: bool = True,
) -> PrototypeBank:
    """The normalised (2, C, K, D) bank of a vocabulary (``protos.py:148-285``, ``predict.py:396-442``).

    Args:
        per_class: class name -> :func:`class_prototypes` output.
        classes: the C classes in label order (no background).
        stuff: which of them are "stuff" (Context: sky, wall, ...).
        feat_mode: which prototypes: ``"all"`` (class + instances + parts, released), ``"mean"``,
            ``"ind"``, ``"kmeans"``, ``"mean_ind"``, ``"mean_kmeans"``, ``"ind_kmeans"``.
        stuff_threshold: the stuff filter's cosine threshold (0 disables it).
        ctx_mode: stuff classes get no bg prototypes and the filter compares with stuff fg sets
            (released default); False: the filter compares each class's bg with the other classes' fg.
    """
    modes = {"all": ("proto", "ind", "kmeans"), "mean": ("proto",), "ind": ("ind",), "kmeans": ("kmeans",),
             "mean_ind": ("proto", "ind"), "mean_kmeans": ("proto", "kmeans"), "ind_kmeans": ("ind", "kmeans")}
    if feat_mode not in modes:
        raise ValueError(f"feat_mode must be one of {sorted(modes)}, got {feat_mode!r}")
    missing = [c for c in classes if c not in per_class]
    if missing:
        raise KeyError(f"no prototypes for classes {missing}")
    d = per_class[classes[0]]["proto"].shape[-1]
    stuff = set(stuff)
    fg_sets = [_stack([per_class[c][k] for k in modes[feat_mode]], d) for c in classes]
    stuff_fg = _stack([fg for c, fg in zip(classes, fg_sets, strict=True) if c in stuff], d)
    bg_sets = []
    for ci, c in enumerate(classes):
        if ctx_mode and c in stuff:  # protos.py:223: stuff classes contribute no background
            bg_sets.append(torch.zeros(0, d))
            continue
        bg = _stack([per_class[c][k + "_bg" if k != "proto" else "proto_bg"] for k in modes[feat_mode]], d)
        bg = bg[bg.isfinite().any(-1)]
        if stuff_threshold > 0:
            others = stuff_fg if ctx_mode else _stack([f for j, f in enumerate(fg_sets) if j != ci], d)
            bg = stuff_filter(bg, others, stuff_threshold)
        bg_sets.append(bg)
    k = max(max(len(s) for s in fg_sets), max((len(s) for s in bg_sets), default=0))
    protos = torch.zeros(2, len(classes), k, d)
    mask = torch.zeros(2, len(classes), k, dtype=torch.bool)
    for ci, (fg, bg) in enumerate(zip(fg_sets, bg_sets, strict=True)):
        protos[1, ci, : len(fg)], mask[1, ci, : len(fg)] = fg, True
        protos[0, ci, : len(bg)], mask[0, ci, : len(bg)] = bg, True
    protos = protos / protos.norm(dim=-1, keepdim=True).clamp(min=1e-6) * mask[..., None]
    return PrototypeBank(protos, mask, list(classes))
