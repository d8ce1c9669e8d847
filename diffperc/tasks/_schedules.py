"""Learning-rate schedules of the VPD recipes, as per-iteration factors of each group's base lr.

- ``"poly"``: ``(1 - step / total) ** power`` down to ``min_ratio``, after an optional linear
  warm-up that multiplies it as mmcv's ``warmup="linear"`` does (from ``warmup_ratio`` to 1).
  VPD segmentation (mmseg, DenseCLIP-style schedule): power 1, 1,500 warm-up iterations,
  warm-up ratio 1e-6, min 0. VPD referring segmentation (``refer/train.py``): ``LambdaLR``
  with ``(1 - step / total) ** 0.9``, no warm-up.
- ``"vpd_depth"``: VPD depth (``depth/train.py``): from ``min_ratio`` up to 1 over the first
  ``ramp_fraction`` of training as ``x ** 0.9``, then down as ``1 - (x - 1) ** 0.9`` to
  ``min_ratio`` (reached after twice the ramp). VPD ramps for ``epochs // 2`` = 12 of 25
  epochs (0.48) with max_lr 5e-4 and min_lr 3e-5 (``min_ratio`` = 0.06).
- ``"constant"``: factor 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = ["SCHEDULES", "lr_factor", "lr_scheduler_config", "poly_factor", "vpd_depth_factor"]

SCHEDULES = ("poly", "vpd_depth", "constant")


def poly_factor(step: int, total: int, power: float = 1.0, min_ratio: float = 0.0, warmup_steps: int = 0,
                warmup_ratio: float = 1e-6) -> float:
    """Poly decay factor at iteration ``step`` (0-based) of ``total``, with mmcv-style linear warm-up."""
    progress = min(max(step, 0) / max(total, 1), 1.0)
    factor = (1 - min_ratio) * (1 - progress) ** power + min_ratio
    if step < warmup_steps:
        k = (1 - step / warmup_steps) * (1 - warmup_ratio)
        factor *= 1 - k
    return factor


def vpd_depth_factor(step: int, ramp_steps: float, min_ratio: float = 0.06, power: float = 0.9) -> float:
    """VPD depth's ramp-up-then-down factor at iteration ``step`` (0-based; VPD counts from 1)."""
    x = (step + 1) / max(ramp_steps, 1e-12)
    if x < 1:
        return (1 - min_ratio) * x**power + min_ratio
    return max(min_ratio, (min_ratio - 1) * (x - 1) ** power + 1)


def lr_factor(name: str, total_steps: int, power: float = 1.0, min_ratio: float = 0.0, warmup_steps: int = 0,
              warmup_ratio: float = 1e-6, ramp_fraction: float = 0.48) -> Callable[[int], float]:
    """The schedule ``name`` as a function step -> factor, for ``torch.optim.lr_scheduler.LambdaLR``.

    A plain function on purpose: ``LambdaLR`` does not save it in checkpoints, so a resumed run
    follows the schedule of its own (possibly longer) ``total_steps``.
    """
    if name not in SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {SCHEDULES}, got {name!r}")
    if not 0 <= min_ratio <= 1 or warmup_steps < 0 or not 0 < ramp_fraction <= 1:
        raise ValueError(f"need 0 <= min_lr_ratio <= 1, warmup_steps >= 0 and 0 < ramp_fraction <= 1; got "
                         f"{min_ratio}, {warmup_steps}, {ramp_fraction}")
    if name == "poly":
        def factor(step: int) -> float:
            return poly_factor(step, total_steps, power, min_ratio, warmup_steps, warmup_ratio)
    elif name == "vpd_depth":
        def factor(step: int) -> float:
            return vpd_depth_factor(step, ramp_fraction * total_steps, min_ratio)
    else:
        def factor(step: int) -> float:
            return 1.0
    return factor


def lr_scheduler_config(optimizer: torch.optim.Optimizer, name: str, total_steps: float,
                        **kwargs: float) -> dict[str, object]:
    """Lightning's ``{"scheduler": LambdaLR, "interval": "step"}`` for schedule ``name`` over ``total_steps``."""
    if name != "constant" and not (math.isfinite(total_steps) and total_steps >= 1):
        raise ValueError(f"lr_schedule {name!r} needs a finite training length; set trainer.max_steps or "
                         f"trainer.max_epochs (estimated stepping batches: {total_steps})")
    total = int(total_steps) if math.isfinite(total_steps) else 1
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(name, total, **kwargs))
    return {"scheduler": sched, "interval": "step", "frequency": 1}
