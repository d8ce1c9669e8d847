"""Peak memory of ``diffperc extract`` in the number of images: streamed (now) vs kept in memory (before).

Each row runs in a fresh process (peak RSS only grows), on N small random PNGs with ``test_sd``
(vpd taps, 128 px: ~0.2 MB of float32 features per image). "streamed" is
:func:`diffperc.extract.extract_features` to one safetensors file; "in memory" is the previous
approach (every feature kept in a dict, ``save_file`` at the end), in the same run as the baseline.

    OMP_NUM_THREADS=1 python benchmarks/bench_extract.py [--n 50 500] [--size 128] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, sys, time
sys.path[:0] = [{root!r}, {bench!r}]
import torch
from _proc import vm_mb
mode, folder, out, size, device = {mode!r}, {folder!r}, {out!r}, {size}, {device!r}
t = time.perf_counter()
if mode == "streamed":
    from diffperc.extract import extract_features
    import io
    extract_features(folder, out, model="test_sd", layers="vpd", size=size, batch_size=8, device=device, err=io.StringIO())
else:  # the previous extract: a dict of every feature, written at the end
    from pathlib import Path
    from safetensors.torch import save_file
    from diffperc.devices import load_backbone
    from diffperc.images import fit, open_image, to_tensor
    bb = load_backbone("test_sd", device=device, layers="vpd")
    store, paths = {{}}, sorted(Path(folder).iterdir())
    gen = torch.Generator().manual_seed(0)
    for s in range(0, len(paths), 8):
        x = torch.stack([to_tensor(fit(open_image(p), size)) for p in paths[s : s + 8]]).to(bb.device)
        with torch.no_grad():
            feats = bb(x, generator=gen).features
        for i, p in enumerate(paths[s : s + 8]):
            store.update({{f"{{p.stem}}/{{n}}": f[i].cpu().clone() for n, f in zip(bb.layers, feats)}})
    save_file(store, out)
print(json.dumps({{"peak_mb": vm_mb("VmHWM"), "seconds": time.perf_counter() - t}}))
"""


def _run(mode: str, folder: Path, out: Path, size: int, device: str) -> dict[str, float]:
    code = _CHILD.format(root=str(ROOT), bench=str(ROOT / "benchmarks"), mode=mode, folder=str(folder), out=str(out),
                         size=size, device=device)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[50, 500])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    import numpy as np
    from PIL import Image

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.n:
            folder = Path(tmp) / f"imgs{n}"
            folder.mkdir()
            rng = np.random.default_rng(0)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
            for mode in ("streamed", "in memory"):
                out = Path(tmp) / f"{mode.replace(' ', '_')}{n}.safetensors"
                rows[(mode, n)] = {**_run(mode, folder, out, args.size, args.device), "file_mb": out.stat().st_size / 2**20}
    lo, hi = min(args.n), max(args.n)
    print(f"device {args.device}, test_sd vpd taps at {args.size} px, batch 8")
    print(f"{'mode':<10} {'images':>6} {'features MB':>11} {'peak RSS MB':>11} {'seconds':>8}")
    for (mode, n), r in rows.items():
        print(f"{mode:<10} {n:>6} {r['file_mb']:>11.1f} {r['peak_mb']:>11.0f} {r['seconds']:>8.1f}")
    for mode in ("streamed", "in memory"):
        grow = rows[(mode, hi)]["peak_mb"] - rows[(mode, lo)]["peak_mb"]
        print(f"{mode}: peak RSS {hi} vs {lo} images: x{rows[(mode, hi)]['peak_mb'] / rows[(mode, lo)]['peak_mb']:.2f} "
              f"(+{grow:.0f} MB for {rows[(mode, hi)]['file_mb'] - rows[(mode, lo)]['file_mb']:.0f} MB more features)")


if __name__ == "__main__":
    main()
