"""Mask2Former mask generator and its set criterion, without detectron2.

Mask2Former: Cheng et al., "Masked-attention Mask Transformer for Universal Image Segmentation",
CVPR 2022 (arXiv 2112.01527; repo facebookresearch/Mask2Former, MIT). The pixel decoder
(multi-scale deformable-attention encoder on the three coarsest levels + an FPN level) and the
masked-attention transformer decoder are transformers' ``Mask2FormerPixelDecoder`` and
``Mask2FormerTransformerModule``, built from a ``Mask2FormerConfig`` and initialised as
``Mask2FormerPreTrainedModel._init_weights`` does (the pixel decoder's ``level_embed`` is created
uninitialised there). The class predictor is left to the caller (here: a text classifier).

The criterion is written here (``mask2former/modeling/criterion.py`` and ``matcher.py`` of the
authors' repo, facts only):
- Hungarian matching per image with scipy's ``linear_sum_assignment`` on
  ``C = 2 * (-p_class) + 5 * BCE + 5 * Dice``, the mask costs on the same 12544 uniformly random
  points of prediction and target;
- class loss: cross-entropy over K + 1 classes, the no-object class weighted 0.1;
- mask losses on 12544 points per matched mask chosen by importance sampling: 3x oversampled uniform
  points, the 75 % most uncertain (smallest |logit|) kept, the rest uniform; sigmoid BCE (mean over
  points) and Dice, summed over masks and divided by the number of target masks in the batch;
- deep supervision: the same losses on every intermediate decoder layer, each with its own matching.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Mask2FormerDecoder", "SetCriterion", "dice_cost", "hungarian_match", "importance_points",
           "match_cost", "point_sample", "sigmoid_bce_cost"]


# ---------------------------------------------------------------------------- decoder
class Mask2FormerDecoder(nn.Module):
    """Pixel decoder + masked-attention transformer decoder (transformers' modules).

    Args:
        in_channels: channels of the pyramid levels, finest first (at least 3 levels).
        strides: image size / map size of each level, finest first (e.g. 8, 16, 32, 64).
        hidden_dim: width of both decoders (Mask2Former: 256; GroupNorm(32) needs a multiple of 32).
        mask_dim: channels of the per-pixel mask embeddings.
        num_queries: object queries (Mask2Former instance: 100).
        decoder_layers: masked-attention layers + 1 (transformers counts the initial prediction;
            Mask2Former's 9 layers = 10).
        encoder_layers: deformable-attention encoder layers of the pixel decoder (6).
        num_heads: attention heads (8).
        dim_feedforward: decoder FFN width (2048); encoder_feedforward_dim: encoder FFN width (1024).
    """

    def __init__(
        self, in_channels: Sequence[int], strides: Sequence[int], hidden_dim: int = 256, mask_dim: int = 256,
        num_queries: int = 100, decoder_layers: int = 10, encoder_layers: int = 6, num_heads: int = 8,
        dim_feedforward: int = 2048, encoder_feedforward_dim: int = 1024,
    ) -> None:
        super().__init__()
        from transformers import Mask2FormerConfig
        from transformers.models.mask2former import modeling_mask2former as m2f

        if len(in_channels) != len(strides) or len(in_channels) < 3:
            raise ValueError(f"Mask2FormerDecoder needs >= 3 levels with one stride each, got channels "
                             f"{list(in_channels)} and strides {list(strides)}")
        if list(strides) != sorted(strides) or len(set(strides)) != len(strides):
            raise ValueError(f"strides must increase (finest level first), got {list(strides)}")
        if hidden_dim % 32 or mask_dim < 1 or hidden_dim % num_heads:
            raise ValueError(f"hidden_dim must be a multiple of 32 (GroupNorm) and of num_heads, got {hidden_dim}, "
                             f"{num_heads} heads")
        if decoder_layers < 1 or num_queries < 1:
            raise ValueError(f"decoder_layers and num_queries must be >= 1, got {decoder_layers}, {num_queries}")
        self.config = Mask2FormerConfig(
            feature_size=hidden_dim, mask_feature_size=mask_dim, hidden_dim=hidden_dim, num_queries=num_queries,
            decoder_layers=decoder_layers, encoder_layers=encoder_layers, num_attention_heads=num_heads,
            dim_feedforward=dim_feedforward, encoder_feedforward_dim=encoder_feedforward_dim, dropout=0.0,
            common_stride=int(strides[0]), feature_strides=[int(s) for s in strides], use_pretrained_backbone=False,
        )
        self.pixel_decoder = m2f.Mask2FormerPixelDecoder(self.config, feature_channels=list(in_channels))
        self.transformer = m2f.Mask2FormerTransformerModule(in_features=hidden_dim, config=self.config)
        self.hidden_dim, self.mask_dim, self.num_queries = hidden_dim, mask_dim, num_queries
        self._init_weights(m2f)

    @torch.no_grad()
    def _init_weights(self, m2f) -> None:
        """``Mask2FormerPreTrainedModel._init_weights`` for the parts used here."""
        for module in self.modules():
            if isinstance(module, m2f.Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention):
                nn.init.zeros_(module.sampling_offsets.weight)
                thetas = torch.arange(module.n_heads, dtype=torch.float32) * (2.0 * math.pi / module.n_heads)
                grid = torch.stack([thetas.cos(), thetas.sin()], -1)
                grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(module.n_heads, 1, 1, 2)
                grid = grid.repeat(1, module.n_levels, module.n_points, 1)
                grid *= torch.arange(1, module.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
                module.sampling_offsets.bias.copy_(grid.flatten())
                nn.init.zeros_(module.attention_weights.weight)
                nn.init.zeros_(module.attention_weights.bias)
                for lin in (module.value_proj, module.output_proj):
                    nn.init.xavier_uniform_(lin.weight)
                    nn.init.zeros_(lin.bias)
            elif isinstance(module, m2f.Mask2FormerMaskedAttentionDecoderLayer):
                for p in module.parameters():
                    if p.dim() > 1:
                        nn.init.xavier_uniform_(p)
                nn.init.zeros_(module.cross_attn.in_proj_bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight)
        nn.init.normal_(self.pixel_decoder.level_embed)
        for proj in self.transformer.input_projections:
            if isinstance(proj, nn.Conv2d):
                nn.init.xavier_uniform_(proj.weight)
                nn.init.zeros_(proj.bias)

    def pixel_features(self, pyramid: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """Pyramid (finest first) -> mask features (B, mask_dim, H/s0, W/s0) and the 3 coarsest encoded maps."""
        out = self.pixel_decoder(list(pyramid), return_dict=True)
        return out.mask_features, list(out.multi_scale_features)

    def queries(self, mask_features: Tensor, multi_scale: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Masked-attention decoding.

        Returns:
            (query embeddings, mask logits): one (B, Q, hidden_dim) and one (B, Q, H/s0, W/s0) per
            prediction (``decoder_layers`` of them; the last is the final prediction).
        """
        out = self.transformer(list(multi_scale), mask_features)
        embeds = [h.transpose(0, 1) for h in out.intermediate_hidden_states]  # (Q, B, C) -> (B, Q, C)
        return embeds, list(out.masks_queries_logits)


# ---------------------------------------------------------------------------- points
def point_sample(maps: Tensor, points: Tensor) -> Tensor:
    """Bilinear values of (N, H, W) maps at (N, P, 2) points in [0, 1] (x, y) -> (N, P) (align_corners False)."""
    grid = 2.0 * points[:, :, None, :] - 1.0  # (N, P, 1, 2)
    return F.grid_sample(maps[:, None], grid, mode="bilinear", align_corners=False)[:, 0, :, 0]


def importance_points(logits: Tensor, num_points: int, oversample: float = 3.0, importance: float = 0.75,
                      generator: torch.Generator | None = None) -> Tensor:
    """PointRend's uncertainty sampling: (N, H, W) mask logits -> (N, num_points, 2) points in [0, 1].

    ``oversample * num_points`` uniform points; the ``importance * num_points`` with the smallest
    |logit| are kept, the rest of the points are drawn uniformly again.
    """
    if num_points < 1 or oversample < 1 or not 0 <= importance <= 1:
        raise ValueError(f"need num_points >= 1, oversample >= 1, importance in [0, 1]; got {num_points}, "
                         f"{oversample}, {importance}")
    n = logits.shape[0]
    dev = logits.device
    cand = torch.rand(n, int(num_points * oversample), 2, device=dev, generator=generator)
    uncertainty = -point_sample(logits.detach().float(), cand).abs()  # (N, P')
    k = int(importance * num_points)
    idx = uncertainty.topk(k, dim=1).indices  # (N, k)
    chosen = torch.gather(cand, 1, idx[..., None].expand(-1, -1, 2))
    rest = torch.rand(n, num_points - k, 2, device=dev, generator=generator)
    return torch.cat([chosen, rest], 1)


# ---------------------------------------------------------------------------- costs and matching
def sigmoid_bce_cost(logits: Tensor, targets: Tensor) -> Tensor:
    """Pairwise mean BCE: (Q, P) logits, (T, P) {0, 1} targets -> (Q, T)."""
    p = logits.shape[1]
    pos = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
    neg = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    return (pos @ targets.T + neg @ (1 - targets).T) / p


def dice_cost(logits: Tensor, targets: Tensor) -> Tensor:
    """Pairwise Dice loss 1 - (2|p t| + 1) / (|p| + |t| + 1): (Q, P), (T, P) -> (Q, T)."""
    prob = logits.sigmoid()
    inter = prob @ targets.T
    return 1 - (2 * inter + 1) / (prob.sum(-1)[:, None] + targets.sum(-1)[None, :] + 1)


def match_cost(class_logits: Tensor, mask_logits: Tensor, labels: Tensor, masks: Tensor, points: Tensor | None,
               weights: tuple[float, float, float] = (2.0, 5.0, 5.0)) -> Tensor:
    """Mask2Former's matching cost of one image.

    Args:
        class_logits: (Q, K + 1) (last = no object); mask_logits: (Q, h, w).
        labels: (T,) int64 in [0, K); masks: (T, H, W) {0, 1}.
        points: (P, 2) points in [0, 1] shared by predictions and targets, or None: every pixel
            (predictions resized to the targets' size), exact but only for small maps.
        weights: (class, BCE, Dice).

    Returns:
        (Q, T) cost.
    """
    masks = masks.to(mask_logits.dtype)
    if points is None:
        pred = F.interpolate(mask_logits[None], size=masks.shape[-2:], mode="bilinear", align_corners=False)[0]
        pred, tgt = pred.flatten(1), masks.flatten(1)
    else:
        pred = point_sample(mask_logits, points[None].expand(len(mask_logits), -1, -1))
        tgt = point_sample(masks, points[None].expand(len(masks), -1, -1))
    cost_class = -class_logits.softmax(-1)[:, labels]
    pred, tgt = pred.float(), tgt.float()
    return weights[0] * cost_class + weights[1] * sigmoid_bce_cost(pred, tgt) + weights[2] * dice_cost(pred, tgt)


def hungarian_match(cost: Tensor) -> tuple[Tensor, Tensor]:
    """Minimum-cost assignment of a (Q, T) cost (Q >= T): (query indices, target indices), int64."""
    from scipy.optimize import linear_sum_assignment

    c = cost.detach().float().cpu().numpy()
    if not np.isfinite(c).all():
        raise ValueError("matching cost has NaN/Inf entries (check the mask logits)")
    rows, cols = linear_sum_assignment(c)
    return torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)


# ---------------------------------------------------------------------------- criterion
class SetCriterion(nn.Module):
    """Hungarian-matched class + point-sampled BCE/Dice mask losses with deep supervision.

    Args:
        class_weight, mask_weight, dice_weight: loss (and matching cost) weights (2, 5, 5).
        no_object_weight: CE weight of the no-object class (0.1).
        num_points: points per mask (12544 = 112^2); None = every pixel of the target (tests, tiny maps).
        oversample, importance: importance sampling (3.0, 0.75).
    """

    def __init__(self, class_weight: float = 2.0, mask_weight: float = 5.0, dice_weight: float = 5.0,
                 no_object_weight: float = 0.1, num_points: int | None = 12544, oversample: float = 3.0,
                 importance: float = 0.75) -> None:
        super().__init__()
        self.weights = (class_weight, mask_weight, dice_weight)
        self.no_object_weight, self.num_points = no_object_weight, num_points
        self.oversample, self.importance = oversample, importance

    def match(self, class_logits: Tensor, mask_logits: Tensor, targets: Sequence[dict[str, Tensor]]
              ) -> list[tuple[Tensor, Tensor]]:
        """Per image: (query indices, target indices) of the minimum-cost assignment."""
        out = []
        for cl, ml, t in zip(class_logits, mask_logits, targets, strict=True):
            if len(t["labels"]) == 0:
                out.append((torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)))
                continue
            pts = None if self.num_points is None else torch.rand(self.num_points, 2, device=ml.device)
            with torch.no_grad():
                out.append(hungarian_match(match_cost(cl, ml, t["labels"], t["masks"], pts, self.weights)))
        return out

    def class_loss(self, class_logits: Tensor, targets: Sequence[dict[str, Tensor]],
                   indices: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
        """CE over K + 1 classes; unmatched queries are no-object (weight ``no_object_weight``)."""
        b, q, k1 = class_logits.shape
        target = torch.full((b, q), k1 - 1, dtype=torch.long, device=class_logits.device)
        for i, (src, tgt) in enumerate(indices):
            target[i, src.to(target.device)] = targets[i]["labels"][tgt.to(target.device)]
        weight = torch.ones(k1, device=class_logits.device, dtype=class_logits.dtype)
        weight[-1] = self.no_object_weight
        return F.cross_entropy(class_logits.transpose(1, 2), target, weight)

    def mask_losses(self, mask_logits: Tensor, targets: Sequence[dict[str, Tensor]],
                    indices: Sequence[tuple[Tensor, Tensor]], num_masks: float) -> tuple[Tensor, Tensor]:
        """(BCE, Dice) of the matched masks, each summed over masks / ``num_masks``."""
        preds = [ml[src] for ml, (src, _) in zip(mask_logits, indices, strict=True)]
        tgts = [t["masks"][tgt.to(t["masks"].device)] for t, (_, tgt) in zip(targets, indices, strict=True)]
        if sum(len(p) for p in preds) == 0:
            zero = mask_logits.sum() * 0.0
            return zero, zero
        if self.num_points is None:
            size = tgts[0].shape[-2:]
            pred = torch.cat([F.interpolate(p[None], size=size, mode="bilinear", align_corners=False)[0]
                              for p in preds]).flatten(1)
            tgt = torch.cat(tgts).to(pred.dtype).flatten(1)
        else:
            pred_maps = torch.cat(preds)  # (N, h, w)
            pts = importance_points(pred_maps, self.num_points, self.oversample, self.importance)
            pred = point_sample(pred_maps, pts)
            tgt = torch.cat([point_sample(t.to(pred_maps.dtype), p)
                             for t, p in zip(tgts, pts.split([len(t) for t in tgts]), strict=True)])
        bce = F.binary_cross_entropy_with_logits(pred, tgt, reduction="none").mean(1).sum() / num_masks
        prob = pred.sigmoid()
        dice = (1 - (2 * (prob * tgt).sum(1) + 1) / (prob.sum(1) + tgt.sum(1) + 1)).sum() / num_masks
        return bce, dice

    def layer_losses(self, class_logits: Tensor, mask_logits: Tensor, targets: Sequence[dict[str, Tensor]],
                     num_masks: float) -> dict[str, Tensor]:
        indices = self.match(class_logits, mask_logits, targets)
        bce, dice = self.mask_losses(mask_logits, targets, indices, num_masks)
        return {"ce": self.class_loss(class_logits, targets, indices), "bce": bce, "dice": dice}

    def forward(self, outputs: dict[str, list[Tensor]], targets: Sequence[dict[str, Tensor]]
                ) -> tuple[Tensor, dict[str, Tensor]]:
        """Total weighted loss and its parts (``ce``/``bce``/``dice`` of the final layer, ``aux`` = the rest).

        Args:
            outputs: ``class_logits`` list of (B, Q, K + 1) and ``mask_logits`` list of (B, Q, h, w), one
                per decoder layer, the final prediction last.
            targets: per image ``labels`` (T,) int64 and ``masks`` (T, H, W) {0, 1}.
        """
        num_masks = max(float(sum(len(t["labels"]) for t in targets)), 1.0)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            n = torch.tensor([num_masks], device=outputs["mask_logits"][-1].device)
            torch.distributed.all_reduce(n)
            num_masks = max(n.item() / torch.distributed.get_world_size(), 1.0)
        parts: dict[str, Tensor] = {}
        total = outputs["mask_logits"][-1].new_zeros(())
        layers = list(zip(outputs["class_logits"], outputs["mask_logits"], strict=True))
        for i, (cl, ml) in enumerate(layers):
            losses = self.layer_losses(cl, ml, targets, num_masks)
            layer_total = sum(w * losses[k] for w, k in zip(self.weights, ("ce", "bce", "dice"), strict=True))
            total = total + layer_total
            if i == len(layers) - 1:
                parts.update({k: v.detach() for k, v in losses.items()})
            else:
                parts["aux"] = parts.get("aux", total.new_zeros(())) + layer_total.detach()
        return total, parts
