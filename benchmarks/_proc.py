"""Process memory readings shared by the benchmarks (Linux ``/proc``)."""

from __future__ import annotations


def vm_mb(field: str) -> float:
    """A /proc/self/status field (e.g. ``"VmRSS"``, ``"VmHWM"``) in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")
