"""Retrieval metrics of origin identification: Acc@1 and mAP, as the ID² evaluator reports them.

ID² (Wang et al., "Origin Identification for Text-Guided Image-to-Image Diffusion Models",
ICML 2025) ranks the whole gallery for each query and reports the mean over queries of
scikit-learn's ``average_precision_score`` (WangWenhao0716/ID2 dg/evaluation_metrics/ranking.py,
``mean_ap``) and the CMC top-1 accuracy (Acc@1). With one origin per query and no ties, a
query's AP is 1 / (rank of its origin).

Exact score ties are handled as scikit-learn does, so the result never depends on the gallery
order: tied items form one threshold, and every positive in a tie group gets the precision at
the end of the group (AP = sum over thresholds of (R_n - R_{n-1}) P_n). Acc@1 under a tie at the
top is the expected value over random orders of the tie: the share of positives among the items
tied for first (the released ``cmc`` takes whichever comes first in its sort).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["average_precision", "retrieval_metrics"]


def average_precision(scores: Tensor, positives: Tensor) -> tuple[Tensor, Tensor]:
    """Tie-aware average precision and top-1 accuracy of each row: higher score = ranked first.

    Args:
        scores: (Q, G) float scores (e.g. cosine similarities); ``-inf`` excludes an item (it
            must not be a positive).
        positives: (Q, G) bool, True where the gallery item is a right answer for the query.

    Returns:
        ap (Q,) equal to ``sklearn.metrics.average_precision_score(positives[q], scores[q])``
        for rows with a positive (NaN for rows without), and acc1 (Q,): the share of positives
        among the items tied at the top score.
    """
    if scores.shape != positives.shape or scores.ndim != 2:
        raise ValueError(f"scores and positives must both be (Q, G), got {tuple(scores.shape)} and "
                         f"{tuple(positives.shape)}")
    s, order = scores.float().sort(dim=1, descending=True)
    hits = positives.gather(1, order).float()  # (Q, G) 1 where the ranked item is a positive
    start = torch.ones_like(s, dtype=torch.bool)
    start[:, 1:] = s[:, 1:] != s[:, :-1]
    group = start.long().cumsum(1) - 1  # (Q, G) index of each position's tie group
    ranks = torch.arange(1, s.shape[1] + 1, dtype=torch.float32, device=s.device).expand_as(s)
    # cumulative hits and rank at the last position of each tie group (both non-decreasing, so amax)
    end_hits = torch.zeros_like(s).scatter_reduce(1, group, hits.cumsum(1), "amax").gather(1, group)
    end_rank = torch.zeros_like(s).scatter_reduce(1, group, ranks, "amax").gather(1, group)
    ap = (hits * end_hits / end_rank).sum(1) / hits.sum(1)  # NaN where a row has no positive
    top = group == 0
    acc1 = (hits * top).sum(1) / top.sum(1)
    return ap, acc1


def retrieval_metrics(query: Tensor, query_labels: Tensor, gallery: Tensor | None = None,
                      gallery_labels: Tensor | None = None, chunk: int = 1024) -> dict[str, float]:
    """Acc@1 and mAP of ranking ``gallery`` by cosine similarity to each query.

    Args:
        query: (Q, D) embeddings (normalised here).
        query_labels: (Q,) int identity (origin) of each query.
        gallery: (G, D) embeddings; None = leave-one-out within the queries (each query
            searches all the others).
        gallery_labels: (G,) identities of the gallery.
        chunk: queries per similarity block (memory is chunk x G).

    Returns:
        {"acc1", "mAP"} in [0, 1] over queries that have at least one positive in the gallery
        (ties resolved as :func:`average_precision` says), and {"queries"}: how many such queries there were.
    """
    leave_one_out = gallery is None
    if leave_one_out:
        gallery, gallery_labels = query, query_labels
    if query.shape[0] != query_labels.shape[0] or gallery.shape[0] != gallery_labels.shape[0]:
        raise ValueError(f"embeddings and labels disagree: query {tuple(query.shape)} vs {tuple(query_labels.shape)}, "
                         f"gallery {tuple(gallery.shape)} vs {tuple(gallery_labels.shape)}")
    q = torch.nn.functional.normalize(query.float(), dim=1)
    g = torch.nn.functional.normalize(gallery.float(), dim=1)
    acc, ap, counted = 0.0, 0.0, 0
    for start in range(0, len(q), chunk):
        sim = q[start : start + chunk] @ g.T  # (c, G)
        pos = query_labels[start : start + chunk, None] == gallery_labels[None, :]  # (c, G)
        if leave_one_out:
            rows = torch.arange(sim.shape[0])
            sim[rows, rows + start] = -float("inf")
            pos[rows, rows + start] = False
        valid = pos.any(1)
        row_ap, row_acc = average_precision(sim[valid], pos[valid])
        ap += row_ap.sum().item()
        acc += row_acc.sum().item()
        counted += int(valid.sum())
    if counted == 0:
        raise ValueError("no query has a positive (same origin) in the gallery: check the labels")
    return {"acc1": acc / counted, "mAP": ap / counted, "queries": counted}
