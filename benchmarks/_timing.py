"""Timing helpers shared by the backbone benchmarks (bench_backbone.py, bench_dit.py)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def sync(device: str) -> None:
    """Wait for queued CUDA work (a no-op on a CPU), so a timer reads finished work."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def time_configs(run: dict[str, Callable[[], object]], reps: int, device: str) -> dict[str, float]:
    """Median seconds per call of each zero-argument callable: one warm-up call each, then ``reps``
    rounds that call them round-robin, so machine noise hits all configs alike."""
    times: dict[str, list[float]] = {k: [] for k in run}
    for fn in run.values():  # warm-up
        fn()
    for _ in range(reps):
        for name, fn in run.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}
