"""Process memory readings shared by the benchmarks (Linux ``/proc``)."""

from __future__ import annotations


def vm_mb(field: str) -> float:
    """A /proc/self/status field (e.g. ``"VmRSS"``, ``"VmHWM"``) in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_settings_in_children(script: str, settings: list[str], args) -> dict:
    """Run ``script --child NAME`` (with the same options) once per setting in a fresh process, so each
    setting's peak memory is its own; returns {name: the JSON dict its last stdout line holds}. A setting
    whose process fails is reported on stderr and left out."""
    import json
    import subprocess
    import sys

    results = {}
    for name in settings:
        cmd = [sys.executable, script, "--child", name] + [
            f"--{k}={v}" for k, v in vars(args).items() if k not in ("child", "settings")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            print(f"{name}: failed with exit code {proc.returncode}: {tail}", file=sys.stderr)
            continue
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    return results
