"""Zero-shot semantic correspondence with diffusion features: DIFT and SD-DINO matching, PCK.

DIFT: Tang et al., "Emergent Correspondence from Image Diffusion", NeurIPS 2023, arXiv
2306.03881, repo Tsingularity/dift (src/models/dift_sd.py, eval_spair.py). Both feature maps
are bilinearly upsampled (align_corners=False) to their image's size; a source keypoint takes
the feature at its pixel; its match is the target pixel of highest cosine similarity.
:func:`match_points` computes exactly that, but in row chunks of the upsampled target map, so
a 768x768 pair of 1280-channel maps needs a few hundred MB instead of 2 x 3 GB.

SD-DINO: Zhang et al., "A Tale of Two Features", NeurIPS 2023, arXiv 2305.15347, repo
Junyi42/sd-dino (pck_spair_pascal.py, utils/utils_correspondence.py): per SD level a joint
PCA of both images' features (256 dims each), chained onto the s3 grid, DINOv2 patch
features, both parts L2-normalised, weighted and concatenated (:func:`sd_dino_descriptors`);
matching patch to patch in the letterboxed DINOv2 frame (:func:`match_patches`).

PCK (:func:`pck`, :class:`PCKTally`): a keypoint is correct when its error is within alpha x
the longer side of a reference: the target bounding box (SPair-71k) or the target image
(PF-Pascal). ``rule="dift"``: error / side <= alpha in float64 (DIFT eval_spair.py:121-122);
``rule="sd_dino"``: float32 error < float32(alpha) x side (pck_spair_pascal.py:420-428).
Averages, named as such: **per keypoint** (all correct keypoints / all keypoints), **per
image** (mean over pairs of each pair's fraction), and SD-DINO's two: per category pooled
over its keypoints, then the plain mean over categories ("Average") and the mean weighted
by the categories' pair counts ("Weighted", its headline; pck_spair_pascal.py:512-539).
ANCHORS.md sections 2 and A5 give the recipes and the published numbers.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ..backbones.fused import co_pca, fuse_features

__all__ = ["PCKTally", "from_frame", "match_patches", "match_points", "mutual_nn", "pck", "pck_correct",
           "pck_threshold", "sd_dino_descriptors", "to_frame", "upsampled_at", "upsampled_rows"]

_CHUNK_BYTES = 256 * 2**20  # working memory of one row chunk in match_points


# ---------------------------------------------------------------------------- checks
def _check_feat(name: str, feat: Tensor) -> Tensor:
    if not isinstance(feat, Tensor) or feat.ndim != 3 or 0 in feat.shape:
        shape = tuple(feat.shape) if isinstance(feat, Tensor) else type(feat).__name__
        raise ValueError(f"{name} must be one image's feature map (C, h, w), got {shape}")
    if not feat.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {feat.dtype}")
    return feat


def _check_size(name: str, size: Sequence[int] | Tensor) -> tuple[int, int]:
    vals = size.tolist() if isinstance(size, Tensor) else list(size)
    if len(vals) != 2 or any(int(v) != v or v < 1 for v in vals):
        raise ValueError(f"{name} must be an image size (H, W) of two positive ints, got {size!r}")
    return int(vals[0]), int(vals[1])


def _check_points(name: str, points: Tensor, size: tuple[int, int]) -> Tensor:
    """(N, 2) finite x, y inside the image: 0 <= x <= W and 0 <= y <= H."""
    if not isinstance(points, Tensor) or points.ndim != 2 or points.shape[1] != 2:
        shape = tuple(points.shape) if isinstance(points, Tensor) else type(points).__name__
        raise ValueError(f"{name} must be (N, 2) pixel coordinates (x, y), got {shape}")
    points = points.double()
    if not torch.isfinite(points).all():
        raise ValueError(f"{name} contains NaN or Inf")
    h, w = size
    outside = (points[:, 0] < 0) | (points[:, 0] > w) | (points[:, 1] < 0) | (points[:, 1] > h)
    if outside.any():
        idx = outside.nonzero()[:, 0].tolist()
        raise ValueError(f"{name} has {len(idx)} point(s) outside the {h}x{w} (HxW) image, e.g. index {idx[0]} at "
                         f"(x, y) = {tuple(points[idx[0]].tolist())}; expected 0 <= x <= {w}, 0 <= y <= {h}")
    return points


def _pixel_index(points: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Rounded (half up) integer pixels, clamped into the image: xs, ys (N,) int64."""
    xs = torch.floor(points[:, 0] + 0.5).long().clamp(0, size[1] - 1)
    ys = torch.floor(points[:, 1] + 0.5).long().clamp(0, size[0] - 1)
    return xs, ys


# ---------------------------------------------------------------------------- upsampling
def _linear_taps(out_size: int, in_size: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Source indices i0, i1 and weight of i1 per output index, as ``F.interpolate(bilinear, align_corners=False)``.

    Same float32 formula as PyTorch: src = max(0, (dst + 0.5) * in / out - 0.5). Past the
    last input index the weight is set to 0 (PyTorch mixes the same value with itself), so
    clamped border pixels are bitwise equal and their ties go to the first one.
    """
    scale = torch.tensor(in_size / out_size, dtype=torch.float32)
    src = ((torch.arange(out_size, dtype=torch.float32) + 0.5) * scale - 0.5).clamp_min(0)
    i0 = src.floor().long().clamp(max=in_size - 1)
    i1 = (i0 + 1).clamp(max=in_size - 1)
    weight = torch.where(i1 > i0, src - i0, torch.zeros_like(src))
    return i0.to(device), i1.to(device), weight.to(device)


def upsampled_rows(feat: Tensor, rows: Tensor, size: tuple[int, int]) -> Tensor:
    """Rows of ``F.interpolate(feat[None], size, mode="bilinear", align_corners=False)[0]`` without the full map.

    Args:
        feat: (C, h, w) feature map.
        rows: (R,) int64 output row indices in [0, H).
        size: output size (H, W).

    Returns:
        (C, R, W) float32.
    """
    (h, w), (big_h, big_w) = feat.shape[-2:], size
    r0, r1, rl = (t[rows] for t in _linear_taps(big_h, h, feat.device))
    c0, c1, cl = _linear_taps(big_w, w, feat.device)
    f = feat.float()
    slab = torch.lerp(f[:, r0], f[:, r1], rl[:, None])  # (C, R, w)
    return torch.lerp(slab[:, :, c0], slab[:, :, c1], cl)  # (C, R, W)


def upsampled_at(feat: Tensor, xs: Tensor, ys: Tensor, size: tuple[int, int]) -> Tensor:
    """Vectors of the bilinearly upsampled map (``size`` = (H, W)) at integer pixels: (N,) xs, ys -> (N, C) float32."""
    h, w = feat.shape[-2:]
    r0, r1, rl = (t[ys] for t in _linear_taps(size[0], h, feat.device))
    c0, c1, cl = (t[xs] for t in _linear_taps(size[1], w, feat.device))
    f = feat.float()
    top = f[:, r0, c0] * (1 - cl) + f[:, r0, c1] * cl  # (C, N)
    bottom = f[:, r1, c0] * (1 - cl) + f[:, r1, c1] * cl
    return (top * (1 - rl) + bottom * rl).T


# ---------------------------------------------------------------------------- matching
def match_points(
    feat_src: Tensor, feat_trg: Tensor, points_src: Tensor, size_src: Sequence[int], size_trg: Sequence[int],
    soft_window: int = 0, soft_temperature: float = 0.01, chunk_bytes: int = _CHUNK_BYTES,
) -> Tensor:
    """DIFT nearest-neighbour matching of source keypoints into the target image.

    Args:
        feat_src: (C, h, w) source features (any grid; upsampled to ``size_src``).
        feat_trg: (C, h', w') target features (upsampled to ``size_trg``).
        points_src: (N, 2) source keypoints (x, y) in pixels of an image of ``size_src``,
            0 <= x <= W, 0 <= y <= H; each takes the feature at its rounded pixel.
        size_src: source image size (H, W) that the source features are upsampled to.
        size_trg: target image size (H', W').
        soft_window: 0 = hard argmax (DIFT). k > 0: window soft-argmax (GeoAware-SC): the
            similarity-weighted mean position, softmax(sim / ``soft_temperature``), over the
            (2k+1)^2 pixels around the argmax.
        soft_temperature: temperature of the window softmax.
        chunk_bytes: working memory per chunk of target rows (results do not depend on it).

    Returns:
        (N, 2) float32 target points (x, y) in pixels of the target image; integers for the
        hard argmax. Ties go to the first pixel in row-major order.
    """
    feat_src, feat_trg = _check_feat("feat_src", feat_src), _check_feat("feat_trg", feat_trg)
    if feat_src.shape[0] != feat_trg.shape[0]:
        raise ValueError(f"feat_src and feat_trg must have the same channels, got {feat_src.shape[0]} and "
                         f"{feat_trg.shape[0]}")
    size_src, size_trg = _check_size("size_src", size_src), _check_size("size_trg", size_trg)
    points = _check_points("points_src", points_src, size_src)
    if soft_window < 0 or soft_temperature <= 0:
        raise ValueError(f"soft_window must be >= 0 and soft_temperature > 0, got {soft_window}, {soft_temperature}")
    if len(points) == 0:
        return torch.zeros(0, 2, dtype=torch.float32, device=points_src.device)
    xs, ys = _pixel_index(points.to(feat_src.device), size_src)
    query = torch.nn.functional.normalize(upsampled_at(feat_src, xs, ys, size_src), dim=1)  # (N, C)
    best, where = _argmax_cosine(query, feat_trg, size_trg, chunk_bytes)
    out = torch.stack([where % size_trg[1], where // size_trg[1]], dim=1).float()  # (N, 2) x, y
    if soft_window:
        out = _window_soft_argmax(query, feat_trg, out.long(), size_trg, soft_window, soft_temperature)
    return out.to(points_src.device)


def _argmax_cosine(query: Tensor, feat: Tensor, size: tuple[int, int], chunk_bytes: int) -> tuple[Tensor, Tensor]:
    """Best cosine similarity (N,) and its flat pixel index (N,) over the upsampled ``feat``, in row chunks."""
    (c, _, _), (big_h, big_w), n = feat.shape, size, len(query)
    rows_per_chunk = max(1, chunk_bytes // (4 * big_w * (3 * c + 2 * n)))  # gathers + lerp output, sims
    best = torch.full((n,), -float("inf"), device=feat.device)
    where = torch.zeros(n, dtype=torch.long, device=feat.device)
    for start in range(0, big_h, rows_per_chunk):
        rows = torch.arange(start, min(start + rows_per_chunk, big_h), device=feat.device)
        up = upsampled_rows(feat, rows, size).flatten(1)  # (C, R*W)
        norm = torch.linalg.vector_norm(up, dim=0).clamp_min(1e-12)  # same eps as F.normalize
        sim = (query @ up) / norm  # (N, R*W); dividing after the product saves a pass over the chunk
        val, idx = sim.max(dim=1)
        better = val > best  # strict: an earlier chunk keeps ties
        best = torch.where(better, val, best)
        where = torch.where(better, idx + start * big_w, where)
    return best, where


def _window_soft_argmax(query: Tensor, feat: Tensor, peak: Tensor, size: tuple[int, int], k: int,
                        temperature: float) -> Tensor:
    """Similarity-softmax-weighted mean (x, y) over the (2k+1)^2 window around each peak (clipped to the image)."""
    offsets = torch.arange(-k, k + 1, device=feat.device)
    out = []
    for q, (px, py) in zip(query, peak.tolist(), strict=True):
        xs = (px + offsets).clamp(0, size[1] - 1).unique()
        ys = (py + offsets).clamp(0, size[0] - 1).unique()
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        vec = torch.nn.functional.normalize(upsampled_at(feat, gx.flatten(), gy.flatten(), size), dim=1)
        w = torch.softmax(vec @ q / temperature, dim=0)  # (M,)
        out.append(torch.stack([(w * gx.flatten()).sum(), (w * gy.flatten()).sum()]))
    return torch.stack(out).float()


def mutual_nn(
    feat_src: Tensor, feat_trg: Tensor, points_src: Tensor, points_trg: Tensor, size_src: Sequence[int],
    size_trg: Sequence[int], radius: float | None = None, chunk_bytes: int = _CHUNK_BYTES,
) -> Tensor:
    """Mutual nearest-neighbour check of matches: does each target point match back to its source point?

    Args:
        feat_src, feat_trg, size_src, size_trg: as in :func:`match_points`.
        points_src: (N, 2) source points (x, y).
        points_trg: (N, 2) their matches in the target (e.g. from :func:`match_points`).
        radius: tolerance in source pixels; None = one source feature cell (image side / grid side).

    Returns:
        (N,) bool: True where the backward match lands within ``radius`` of the rounded source point.
    """
    size_src, size_trg = _check_size("size_src", size_src), _check_size("size_trg", size_trg)
    back = match_points(feat_trg, feat_src, points_trg, size_trg, size_src, chunk_bytes=chunk_bytes)
    xs, ys = _pixel_index(_check_points("points_src", points_src, size_src), size_src)
    if radius is None:
        radius = max(size_src[0] / feat_src.shape[-2], size_src[1] / feat_src.shape[-1])
    dist = (back.double().cpu() - torch.stack([xs, ys], dim=1).double().cpu()).norm(dim=1)
    return (dist <= radius).to(points_src.device)


def sd_dino_descriptors(
    sd_src: Sequence[Tensor], sd_trg: Sequence[Tensor], dino_src: Tensor, dino_trg: Tensor,
    pca_dims: int | Sequence[int] = 256, weights: tuple[float, float] = (1.0, 1.0),
    size: tuple[int, int] | None = None,
) -> tuple[Tensor, Tensor]:
    """SD-DINO descriptors of an image pair: co-PCA per SD level, then fusion with DINOv2.

    Args:
        sd_src: per SD level (s5, s4, s3 in SD-DINO) the source map (C_i, h_i, w_i).
        sd_trg: the same levels of the target image.
        dino_src: (C_d, h, w) DINOv2 patch features of the source; dino_trg: of the target.
        pca_dims: output channels per level (SD-DINO: 256 each), capped at the level's channels.
        weights: (SD, DINOv2) weights of the two L2-normalised parts (SD-DINO's code: 1, 1).
        size: grid of the descriptors; None = each image's DINOv2 grid (SD-DINO: 60x60).

    Returns:
        (sum dims + C_d, h, w) source and target descriptors: the levels' PCA projections
        chained finest first ([s3, s4, s5]; s5 -> s4 grid -> s3 grid, as
        utils_correspondence.py:418-436), then the DINOv2 part. The PCA draws its random start
        from the global torch RNG, levels in the given order (seed it to reproduce a run).
    """
    if len(sd_src) != len(sd_trg) or not sd_src:
        raise ValueError(f"sd_src and sd_trg must list the same SD levels (>= 1), got {len(sd_src)} and {len(sd_trg)}")
    dims = [pca_dims] * len(sd_src) if isinstance(pca_dims, int) else list(pca_dims)
    if len(dims) != len(sd_src) or any(d < 1 for d in dims):
        raise ValueError(f"pca_dims must be a positive int or one per SD level ({len(sd_src)}), got {pca_dims!r}")
    red_src, red_trg = [], []
    for a, b, dim in zip(sd_src, sd_trg, dims, strict=True):
        a, b = _check_feat("sd_src level", a), _check_feat("sd_trg level", b)
        dim = min(dim, a.shape[0], a[0].numel() + b[0].numel())
        pa, pb = co_pca(a[None], b[None], dim)
        red_src.append(pa)
        red_trg.append(pb)
    dino_src, dino_trg = _check_feat("dino_src", dino_src), _check_feat("dino_trg", dino_trg)
    src = fuse_features(red_src, dino_src[None], size or tuple(dino_src.shape[-2:]), weights)[0]
    trg = fuse_features(red_trg, dino_trg[None], size or tuple(dino_trg.shape[-2:]), weights)[0]
    return src, trg


# ---------------------------------------------------------------------------- patch matching
def to_frame(points: Tensor, frame: Tensor | Sequence[float]) -> Tensor:
    """Original pixels (N, 2) -> a resized or letterboxed frame, in float32 as SD-DINO computes it.

    ``frame`` = (sx, sy, ox, oy): x * sx + ox, y * sy + oy (pck_spair_pascal.py:29-43: the
    float32 keypoints times the scale, then the integer offset added).
    """
    sx, sy, ox, oy = (float(v) for v in (frame.tolist() if isinstance(frame, Tensor) else frame))
    pts = points.float().clone()
    pts[:, 0] *= sx
    pts[:, 1] *= sy
    pts[:, 0] += ox
    pts[:, 1] += oy
    return pts


def from_frame(points: Tensor, frame: Tensor | Sequence[float]) -> Tensor:
    """Frame points (N, 2) back to original pixels: ((x - ox) / sx, (y - oy) / sy), float32."""
    sx, sy, ox, oy = (float(v) for v in (frame.tolist() if isinstance(frame, Tensor) else frame))
    pts = points.double()
    return torch.stack([(pts[:, 0] - ox) / sx, (pts[:, 1] - oy) / sy], dim=1).float()


def match_patches(desc_src: Tensor, desc_trg: Tensor, points_src: Tensor, frame_size: Sequence[int],
                  distance: str = "l2") -> Tensor:
    """SD-DINO's patch-to-patch nearest neighbour (pck_spair_pascal.py:200-204, 365-388).

    Args:
        desc_src: (C, g_h, g_w) source descriptors on the patch grid; desc_trg: the target's.
        points_src: (N, 2) source keypoints (x, y) in the frame the grid covers (SD-DINO: the
            840 px letterboxed DINOv2 input).
        frame_size: (H, W) of that frame, multiples of the grid (the patch side, 14).
        distance: ``"l2"`` (SD-DINO's for fused features: the largest -||a - b + 1e-6||, as
            ``torch.nn.PairwiseDistance``) or ``"cos"`` (cosine, its choice for one feature).

    Returns:
        (N, 2) float32 target points (x, y) in the frame: the centre of the best target patch,
        p * s + s // 2 - 0.5 with s the patch side. A keypoint's source patch is
        trunc(g / H * y), trunc(g / W * x) in float32, as SD-DINO computes it.
    """
    desc_src, desc_trg = _check_feat("desc_src", desc_src), _check_feat("desc_trg", desc_trg)
    if desc_src.shape != desc_trg.shape:
        raise ValueError(f"desc_src and desc_trg must have the same shape (C, g_h, g_w), got {tuple(desc_src.shape)} "
                         f"and {tuple(desc_trg.shape)}")
    if distance not in ("l2", "cos"):
        raise ValueError(f"distance must be 'l2' or 'cos', got {distance!r}")
    (c, gh, gw), (fh, fw) = desc_src.shape, _check_size("frame_size", frame_size)
    if fh % gh or fw % gw or fh // gh != fw // gw:
        raise ValueError(f"frame_size {fh}x{fw} must be the {gh}x{gw} grid times one patch side")
    points = _check_points("points_src", points_src, (fh, fw)).float()
    if len(points) == 0:
        return torch.zeros(0, 2, dtype=torch.float32, device=points_src.device)
    # pck_spair_pascal.py:201-204: (num_patches / img_size * kp).astype(np.int32), in float32
    px = (points[:, 0].cpu().numpy() * np.float32(gw / fw)).astype(np.int32).clip(0, gw - 1)
    py = (points[:, 1].cpu().numpy() * np.float32(gh / fh)).astype(np.int32).clip(0, gh - 1)
    rows = torch.from_numpy(py.astype(np.int64) * gw + px).to(desc_src.device)
    src = desc_src.reshape(c, -1).T[rows]  # (N, C)
    trg = desc_trg.reshape(c, -1).T  # (g_h*g_w, C)
    best = []
    for q in src:  # one source token at a time, as utils_correspondence.py:220-246
        if distance == "l2":
            sim = -torch.nn.functional.pairwise_distance(q[None], trg, p=2)  # PairwiseDistance(p=2) * -1
        else:
            sim = torch.nn.functional.cosine_similarity(q[None], trg, dim=1)
        best.append(torch.argmax(sim))
    nn = torch.stack(best).cpu()
    s = fh // gh  # patch side = stride (14)
    x = (nn % gw) * s + s // 2 - 0.5  # pck_spair_pascal.py:386: (p - 1) * stride + stride + patch // 2 - .5
    y = (nn // gw) * s + s // 2 - 0.5
    return torch.stack([x, y], dim=1).float().to(points_src.device)


# ---------------------------------------------------------------------------- PCK
def pck_threshold(ref: Tensor | Sequence[float] | float) -> float:
    """Longer side of the PCK reference: bbox (x1, y1, x2, y2) -> max(x2 - x1, y2 - y1); size (H, W) -> max(H, W).

    A single number is taken as the side itself.
    """
    r = torch.as_tensor(ref, dtype=torch.float64).flatten()
    if r.numel() == 4:
        side = max(float(r[2] - r[0]), float(r[3] - r[1]))
        if r[2] < r[0] or r[3] < r[1]:
            raise ValueError(f"ref bbox must be (x1, y1, x2, y2) with x2 >= x1 and y2 >= y1, got {r.tolist()}")
    elif r.numel() in (1, 2):
        side = float(r.max())
    else:
        raise ValueError(f"ref must be a bbox (x1, y1, x2, y2), an image size (H, W) or a side length, "
                         f"got {r.numel()} values")
    if not side > 0:
        raise ValueError(f"the PCK reference must have a positive side, got {r.tolist()}")
    return side


PCK_RULES = ("dift", "sd_dino")


def pck_correct(pred: Tensor, gt: Tensor, ref: Tensor | Sequence[float] | float, alpha: float = 0.1,
                rule: str = "dift") -> Tensor:
    """Which keypoints are correct: (N,) bool.

    Args:
        pred: (N, 2) predicted (x, y) pixels; gt: (N, 2) ground truth, in the same pixels as ``ref``.
        ref: target bbox (x1, y1, x2, y2) (SPair-71k), target image size (H, W) (PF-Pascal), or
            the side itself.
        alpha: tolerance as a fraction of the reference's longer side.
        rule: ``"dift"``: ``||pred - gt|| / side <= alpha`` in float64 (eval_spair.py:121-122);
            ``"sd_dino"``: the float32 error ``< float32(alpha) * side`` (pck_spair_pascal.py:420-428).
    """
    if pred.shape != gt.shape or pred.ndim != 2 or pred.shape[1] != 2:
        raise ValueError(f"pred and gt must both be (N, 2) (x, y), got {tuple(pred.shape)} and {tuple(gt.shape)}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if rule not in PCK_RULES:
        raise ValueError(f"rule must be one of {PCK_RULES}, got {rule!r}")
    side = pck_threshold(ref)
    if rule == "sd_dino":
        err = (pred.float() - gt.float()).norm(dim=-1)  # float32, as its tensors are
        return err.double() < float(np.float32(alpha)) * side
    return (pred.double() - gt.double()).norm(dim=1) / side <= alpha


def pck(pred: Tensor, gt: Tensor, ref: Tensor | Sequence[float] | float, alpha: float = 0.1,
        rule: str = "dift") -> float:
    """Fraction of one pair's keypoints that are correct (see :func:`pck_correct`); N must be >= 1."""
    correct = pck_correct(pred, gt, ref, alpha, rule)
    if correct.numel() == 0:
        raise ValueError("pck of zero keypoints is undefined: pred and gt are empty")
    return correct.double().mean().item()


class PCKTally:
    """Accumulates PCK over pairs; reports per-keypoint, per-image and per-category averages.

    Per keypoint = correct keypoints / keypoints; per image = mean over pairs of each pair's
    PCK (DIFT eval_spair.py:127-133 prints both; pooled over pairs, so categories weigh by
    pair count). ``per_category_kpt`` = mean over categories of each category's per-keypoint
    PCK, ``per_category_kpt_weighted`` = the same weighted by the categories' pair counts
    (SD-DINO's "Average" and "Weighted" PCK, pck_spair_pascal.py:528-539; on the full SPair-71k
    test split the pair counts are its ``weights_spair``).

    Args:
        alphas: tolerances, e.g. (0.1, 0.05, 0.01).
        rule: how a keypoint is judged (:func:`pck_correct`).
    """

    def __init__(self, alphas: Sequence[float] = (0.1, 0.05, 0.01), rule: str = "dift") -> None:
        if not alphas or any(not a > 0 for a in alphas):
            raise ValueError(f"alphas must be positive numbers, got {alphas!r}")
        if rule not in PCK_RULES:
            raise ValueError(f"rule must be one of {PCK_RULES}, got {rule!r}")
        self.alphas = tuple(float(a) for a in alphas)
        self.rule = rule
        self.reset()

    def reset(self) -> None:
        self.pairs: list[tuple[str, int, tuple[int, ...]]] = []  # (category, keypoints, correct per alpha)

    def update(self, pred: Tensor, gt: Tensor, ref: Tensor | Sequence[float] | float, category: str = "all") -> dict[float, float]:
        """Add one pair; returns its PCK per alpha."""
        if len(gt) == 0:
            raise ValueError(f"a pair of category {category!r} has no keypoints")
        correct = tuple(int(pck_correct(pred, gt, ref, a, self.rule).sum()) for a in self.alphas)
        self.pairs.append((category, len(gt), correct))
        return {a: c / len(gt) for a, c in zip(self.alphas, correct, strict=True)}

    @staticmethod
    def _averages(pairs: list[tuple[str, int, tuple[int, ...]]], i: int) -> tuple[float, float]:
        per_image = sum(c[i] / n for _, n, c in pairs) / len(pairs)
        per_keypoint = sum(c[i] for _, _, c in pairs) / sum(n for _, n, _ in pairs)
        return per_image, per_keypoint

    def compute(self, per_category: bool = True) -> dict[str, float]:
        """``{"pck@0.1/per_image": ..., "pck@0.1/per_keypoint": ..., "pck@0.1/per_category_kpt": ...,
        "pck@0.1/per_category_kpt_weighted": ..., "<category>/pck@0.1/per_image": ...}`` in [0, 1]."""
        if not self.pairs:
            raise ValueError("no pairs were added")
        groups: dict[str, list] = defaultdict(list)
        for p in self.pairs:
            groups[p[0]].append(p)
        out: dict[str, float] = {}
        for prefix, pairs in [("", self.pairs)] + ([(f"{c}/", groups[c]) for c in sorted(groups)] if per_category else []):
            for i, a in enumerate(self.alphas):
                out[f"{prefix}pck@{a:g}/per_image"], out[f"{prefix}pck@{a:g}/per_keypoint"] = self._averages(pairs, i)
        for i, a in enumerate(self.alphas):
            kpt = {c: self._averages(g, i)[1] for c, g in groups.items()}
            out[f"pck@{a:g}/per_category_kpt"] = sum(kpt.values()) / len(kpt)
            out[f"pck@{a:g}/per_category_kpt_weighted"] = sum(len(groups[c]) * v for c, v in kpt.items()) / len(self.pairs)
        return out

    def table(self) -> str:
        """A plain-text table: one row per category and one for all, PCK in percent per alpha and average;
        then SD-DINO's category averages of the per-keypoint PCK (plain mean, and weighted by pairs)."""
        res, cats = self.compute(), sorted({p[0] for p in self.pairs})
        cols = [f"@{a:g} {kind}" for a in self.alphas for kind in ("img", "kpt")]
        lines = [f"{'category':<14}{'pairs':>7}" + "".join(f"{c:>11}" for c in cols)]
        counts = defaultdict(int)
        for c, _, _ in self.pairs:
            counts[c] += 1
        for name, prefix, n in [(c, f"{c}/", counts[c]) for c in cats] + [("all", "", len(self.pairs))]:
            vals = [res[f"{prefix}pck@{a:g}/per_{k}"] * 100 for a in self.alphas for k in ("image", "keypoint")]
            lines.append(f"{name:<14}{n:>7}" + "".join(f"{v:>11.2f}" for v in vals))
        for name, key in (("cat. mean", "per_category_kpt"), ("cat. weighted", "per_category_kpt_weighted")):
            vals = [res[f"pck@{a:g}/{key}"] * 100 for a in self.alphas]
            lines.append(f"{name:<14}{len(cats):>7}" + "".join(f"{'':>11}{v:>11.2f}" for v in vals))
        return "\n".join(lines)
