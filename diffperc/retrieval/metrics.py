"""Retrieval metrics of origin identification: Acc@1 and mAP, as the ID² evaluator reports them.

ID² (Wang et al., "Origin Identification for Text-Guided Image-to-Image Diffusion Models",
ICML 2025) ranks the whole gallery by cosine similarity for each query and reports the mean
average precision over queries and the CMC top-1 accuracy (Acc@1). With one origin per
query, a query's AP is 1 / (rank of its origin).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["retrieval_metrics"]


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
        {"acc1", "mAP"} in [0, 1] over queries that have at least one positive in the gallery,
        and {"queries"}: how many such queries there were.
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
        order = sim.argsort(dim=1, descending=True)
        hits = pos.gather(1, order).float()  # (c, G) 1 where the ranked item is a positive
        n_pos = hits.sum(1)
        valid = n_pos > 0
        ranks = torch.arange(1, hits.shape[1] + 1, dtype=torch.float32)
        precision_at_hits = hits.cumsum(1) / ranks * hits
        ap += (precision_at_hits.sum(1)[valid] / n_pos[valid]).sum().item()
        acc += hits[valid, 0].sum().item()
        counted += int(valid.sum())
    if counted == 0:
        raise ValueError("no query has a positive (same origin) in the gallery: check the labels")
    return {"acc1": acc / counted, "mAP": ap / counted, "queries": counted}
