"""Open-vocabulary query-based instance head on frozen diffusion features (camouflaged instances).

Seeded by Vu et al., "Leveraging Open-Vocabulary Diffusion to Camouflaged Instance Segmentation"
(arXiv 2312.17505; ovcis.hkustvgd.com; no code released). The paper names the parts but not their
equations; the skeleton is ODISE's (Xu et al., CVPR 2023, NVlabs/ODISE: frozen SD features ->
Mask2Former -> a CLIP-text classifier). What is chosen here, and why:

- **Pyramid**: backbone maps grouped by reduction (maps of one reduction concatenated, as ODISE
  concatenates its taps per level), finest first; if fewer than 3 levels exist (the bundled 2-level
  digits UNet) stride-2 3x3 convs add coarser ones (RetinaNet's P6/P7), since the pixel decoder's
  deformable encoder runs on the 3 coarsest.
- **MSFF** (multi-scale feature fusion): every coarser level is upsampled to the finest map (the
  UNet's *last* decoder layer), mapped by a 1x1 conv to its channels, multiplied element-wise with
  it and added back: ``f0 <- f0 + sum_i f0 * conv_i(up(f_i))`` (the paper's "1x1 conv, element-wise
  product, residual add").
- **Mask generator**: Mask2Former's pixel decoder and masked-attention decoder
  (:class:`~diffperc.heads.mask2former.Mask2FormerDecoder`).
- **CIN** (camouflaged instance normalisation): instance normalisation of the per-pixel mask
  features (each image's own mean and variance per channel: the background's texture dominates
  those statistics of a camouflage image, so removing them leaves the deviations objects make),
  with an affine transform predicted from the class-text context (zero-initialised, so training
  starts from plain instance norm): ``IN(x) * (1 + g(t)) + b(t)``.
- **TVA** (textual-visual aggregation): the K class-name text embeddings and a "background" prompt
  embedding are **mean-normalised** (the mean of the K + 1 is subtracted: it removes what every
  prompt shares, e.g. the template, so a single class still differs from background), then each
  query's embedding q attends to them (softmax over the K + 1 of the dot products) and the
  softmax-weighted text is added to it: ``q' = q + W (softmax(q T^T / sqrt(d)) T)``; the logits are
  ``exp(s) * cos(q', T_k)`` with a learnt temperature s. The background prompt is the no-object
  class, so no class-specific weight exists anywhere: renaming or adding classes at test time only
  changes T (open vocabulary).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .mask2former import Mask2FormerDecoder

__all__ = ["CamouflagedInstanceNorm", "MultiScaleFeatureFusion", "OVCISHead", "TextVisualAggregation",
           "build_pyramid_order", "instance_inference"]


def build_pyramid_order(reductions: Sequence[int]) -> list[tuple[int, list[int]]]:
    """[(reduction, [indices of the maps at that reduction])], finest first."""
    if not reductions:
        raise ValueError("OVCISHead needs at least one feature map")
    if any(int(r) < 1 for r in reductions):
        raise ValueError(f"reductions must be positive, got {list(reductions)}")
    levels: dict[int, list[int]] = {}
    for i, r in enumerate(reductions):
        levels.setdefault(int(r), []).append(i)
    return sorted(levels.items())


class MultiScaleFeatureFusion(nn.Module):
    """``f0 + sum_i f0 * conv1x1_i(upsample(f_i))``: coarser levels fused into the finest map.

    Args:
        channels: channels of each level, finest first.
    """

    def __init__(self, channels: Sequence[int]) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(c, channels[0], 1) for c in channels[1:])

    def forward(self, levels: Sequence[Tensor]) -> list[Tensor]:
        """Levels (finest first) -> the same list with the finest map fused."""
        f0 = levels[0]
        gate = 0
        for conv, f in zip(self.convs, levels[1:], strict=True):
            gate = gate + conv(F.interpolate(f, size=f0.shape[-2:], mode="bilinear", align_corners=False))
        return [f0 + f0 * gate if len(self.convs) else f0, *levels[1:]]


class CamouflagedInstanceNorm(nn.Module):
    """``IN(x) * (1 + gamma(t)) + beta(t)``: per-image instance norm, affine from the text context.

    Args:
        channels: C of the maps; text_dim: D of the text context.
    """

    def __init__(self, channels: int, text_dim: int) -> None:
        super().__init__()
        self.affine = nn.Linear(text_dim, 2 * channels)
        nn.init.zeros_(self.affine.weight)
        nn.init.zeros_(self.affine.bias)

    def forward(self, x: Tensor, text: Tensor) -> Tensor:
        """x (B, C, H, W), text (D,) or (B, D) context -> (B, C, H, W)."""
        gamma, beta = self.affine(text.to(x.dtype)).chunk(2, dim=-1)  # (…, C) each
        if gamma.ndim == 1:
            gamma, beta = gamma[None], beta[None]
        return F.instance_norm(x) * (1 + gamma[..., None, None]) + beta[..., None, None]


class TextVisualAggregation(nn.Module):
    """Class logits of query embeddings against mean-normalised text embeddings (+ background).

    Args:
        hidden_dim: query width; text_dim: text embedding width D.
        logit_scale: initial temperature exp(s) (CLIP: 1 / 0.07).
    """

    def __init__(self, hidden_dim: int, text_dim: int, logit_scale: float = 1 / 0.07) -> None:
        super().__init__()
        self.query_proj = nn.Linear(hidden_dim, text_dim)
        self.text_proj = nn.Linear(text_dim, text_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale)).log())

    @staticmethod
    def normalise_text(class_embeds: Tensor, background: Tensor) -> Tensor:
        """(K, D) classes + (D,) background -> (K + 1, D), the mean of the K + 1 subtracted, background last."""
        table = torch.cat([class_embeds, background[None]])
        return table - table.mean(0, keepdim=True)

    def forward(self, queries: Tensor, text: Tensor) -> Tensor:
        """queries (B, Q, C), text (K + 1, D) mean-normalised (background last) -> logits (B, Q, K + 1)."""
        q = self.query_proj(queries)  # (B, Q, D)
        t = text.to(q.dtype)
        attn = (q @ t.T / q.shape[-1] ** 0.5).softmax(-1)  # (B, Q, K + 1)
        q = q + self.text_proj(attn @ t)
        scale = self.logit_scale.exp().clamp(max=100.0)
        return scale * F.normalize(q, dim=-1) @ F.normalize(t, dim=-1).T


class OVCISHead(nn.Module):
    """MSFF + Mask2Former + CIN + TVA: per-query class logits and mask logits from backbone maps.

    Args:
        in_channels: channels of each backbone map (``feature_info.channels()``).
        reductions: reduction of each map (``feature_info.reductions()``).
        text_dim: D of the class text embeddings (the CLIP text encoder's width).
        hidden_dim, mask_dim, num_queries, decoder_layers, encoder_layers, num_heads, dim_feedforward,
            encoder_feedforward_dim: Mask2Former sizes (256, 256, 100, 10, 6, 8, 2048, 1024).
        msff, cin, tva: switch the three parts off for ablations (TVA off = plain cosine classifier).
    """

    def __init__(
        self, in_channels: Sequence[int], reductions: Sequence[int], text_dim: int, hidden_dim: int = 256,
        mask_dim: int = 256, num_queries: int = 100, decoder_layers: int = 10, encoder_layers: int = 6,
        num_heads: int = 8, dim_feedforward: int = 2048, encoder_feedforward_dim: int = 1024, msff: bool = True,
        cin: bool = True, tva: bool = True,
    ) -> None:
        super().__init__()
        if len(in_channels) != len(reductions):
            raise ValueError(f"in_channels ({len(in_channels)}) and reductions ({len(reductions)}) differ in length")
        self.order = build_pyramid_order(reductions)
        chans = [sum(in_channels[i] for i in idx) for _, idx in self.order]
        strides = [r for r, _ in self.order]
        self.extra = nn.ModuleList()
        while len(chans) < 3:  # P6-style extra levels for backbones with fewer than 3 scales
            self.extra.append(nn.Conv2d(chans[-1], hidden_dim, 3, stride=2, padding=1))
            chans.append(hidden_dim)
            strides.append(strides[-1] * 2)
        self.channels, self.strides = chans, strides
        self.msff = MultiScaleFeatureFusion(chans) if msff else None
        self.decoder = Mask2FormerDecoder(chans, strides, hidden_dim, mask_dim, num_queries, decoder_layers,
                                          encoder_layers, num_heads, dim_feedforward, encoder_feedforward_dim)
        self.cin = CamouflagedInstanceNorm(mask_dim, text_dim) if cin else None
        self.tva = TextVisualAggregation(hidden_dim, text_dim)
        self.use_tva = tva
        self.text_dim = text_dim

    def pyramid(self, features: Sequence[Tensor]) -> list[Tensor]:
        """Backbone maps -> pyramid levels, finest first (MSFF applied)."""
        levels = [torch.cat([features[i] for i in idx], 1) if len(idx) > 1 else features[idx[0]]
                  for _, idx in self.order]
        for conv in self.extra:
            levels.append(conv(levels[-1]))
        return self.msff(levels) if self.msff is not None else levels

    def classify(self, queries: Tensor, text: Tensor) -> Tensor:
        if self.use_tva:
            return self.tva(queries, text)
        q = F.normalize(self.tva.query_proj(queries), dim=-1)
        return self.tva.logit_scale.exp().clamp(max=100.0) * q @ F.normalize(text.to(q.dtype), dim=-1).T

    def forward(self, features: Sequence[Tensor], class_embeds: Tensor, background: Tensor) -> dict[str, list[Tensor]]:
        """Per-layer predictions.

        Args:
            features: backbone maps (B, C_i, H/r_i, W/r_i) in ``feature_info`` order.
            class_embeds: (K, D) text embeddings of the class names (any K: open vocabulary).
            background: (D,) text embedding of the background prompt (the no-object class).

        Returns:
            ``class_logits``: list of (B, Q, K + 1) (no object last); ``mask_logits``: list of
            (B, Q, H/s0, W/s0); one entry per decoder layer, the final prediction last.
        """
        if len(features) != sum(len(idx) for _, idx in self.order):
            raise ValueError(f"OVCISHead expects {sum(len(i) for _, i in self.order)} feature maps, got {len(features)}")
        if class_embeds.ndim != 2 or class_embeds.shape[1] != self.text_dim or len(class_embeds) == 0:
            raise ValueError(f"class_embeds must be (K >= 1, {self.text_dim}), got {tuple(class_embeds.shape)}")
        text = self.tva.normalise_text(class_embeds.float(), background.float())  # (K + 1, D)
        mask_features, multi_scale = self.decoder.pixel_features(self.pyramid(features))
        if self.cin is not None:
            mask_features = self.cin(mask_features, class_embeds.float().mean(0))
        embeds, masks = self.decoder.queries(mask_features, multi_scale)
        return {"class_logits": [self.classify(e, text) for e in embeds], "mask_logits": masks}


@torch.no_grad()
def instance_inference(class_logits: Tensor, mask_logits: Tensor, size: tuple[int, int], max_instances: int = 100,
                       threshold: float = 0.0) -> list[dict[str, Tensor]]:
    """Mask2Former's instance inference: top-k (query, class) pairs, score = class prob x mask score.

    Args:
        class_logits: (B, Q, K + 1); mask_logits: (B, Q, h, w).
        size: (H, W) of the output masks (logits resized bilinearly).
        max_instances: k (Mask2Former: 100 = the number of queries).
        threshold: drop instances scoring below this.

    Returns:
        Per image ``scores`` (N,), ``labels`` (N,) int64 in [0, K), ``masks`` (N, H, W) bool.
    """
    out = []
    b, q, k1 = class_logits.shape
    for cl, ml in zip(class_logits, mask_logits, strict=True):
        probs = cl.float().softmax(-1)[:, :-1]  # (Q, K)
        top = probs.flatten().topk(min(max_instances, probs.numel()))
        query = top.indices // (k1 - 1)
        logits = F.interpolate(ml[query][None].float(), size=size, mode="bilinear", align_corners=False)[0]
        masks = logits > 0
        mask_score = (logits.sigmoid() * masks).flatten(1).sum(1) / (masks.flatten(1).sum(1) + 1e-6)
        scores = top.values * mask_score
        keep = scores >= threshold
        out.append({"scores": scores[keep], "labels": (top.indices % (k1 - 1))[keep], "masks": masks[keep]})
    return out
