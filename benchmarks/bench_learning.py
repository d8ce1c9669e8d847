"""Learning check of the VPD depth pipeline through the real ``diffperc`` command (issue 3, item 5).

Runs ``diffperc validate`` (the untrained model, same seed as the fit) and ``diffperc fit`` with
``configs/depth/synthetic_vpd_digits.yaml`` (bundled digits backbone, frozen; synthetic scenes),
reads the validation metrics the fit logged (CSVLogger), and prints them from the first
validation to the last, with the last / first ratio.

    python benchmarks/bench_learning.py                 # 300 steps, validation every 50
    python benchmarks/bench_learning.py --model DIR     # another digits model as the backbone

Measured on the bundled model v2, the batch-64 retrain (2-core CPU shared with one other job, one
torch thread, seed 0; 300 steps of batch 16, 64 validation scenes with flip TTA; 55 s wall in all):

    validation           abs_rel      rmse  rmse_log        d1
    init (validate)       0.2684    0.8549    0.3171    0.4530
    step 50               0.2138    0.6167    0.2428    0.6673
    step 100              0.1432    0.4048    0.1809    0.8501
    step 200              0.1008    0.3447    0.1420    0.9000
    step 300              0.0810    0.2796    0.1206    0.9259
    last / init            0.302     0.327     0.380     2.044
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "depth" / "synthetic_vpd_digits.yaml"
KEYS = ("abs_rel", "rmse", "rmse_log", "d1")


def _run(argv: list[str]) -> object:
    from diffperc.cli import cli_main

    sys.argv = ["diffperc"]  # LightningCLI warns when sys.argv also holds arguments
    return cli_main(argv)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps (default 300, as the config)")
    parser.add_argument("--val-every", type=int, default=50, help="validate every this many steps (default 50)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: tiny models run fastest on one, and 2 spin on a busy 2-core box)")
    parser.add_argument("--out", default=None, help="folder for logs and checkpoints (default: a temp folder)")
    parser.add_argument("--model", default=None,
                        help="another digits model folder as the backbone (default: the config's, the bundled digits)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_learning_"))
    common = ["--config", str(CONFIG), f"--trainer.default_root_dir={out}", "--trainer.enable_progress_bar=false",
              "--trainer.enable_model_summary=false",
              f"--trainer.logger.init_args.save_dir={out}"]
    if args.model:
        common.append(f"--model.backbone={args.model}")
    t0 = time.perf_counter()
    init = _run(["validate", *common])
    rows = [("init (validate)", {k: float(init.trainer.callback_metrics[f"val/{k}"]) for k in KEYS})]
    t_val = time.perf_counter() - t0
    fit = _run(["fit", *common, f"--trainer.max_steps={args.steps}", f"--trainer.val_check_interval={args.val_every}"])
    t_fit = time.perf_counter() - t0 - t_val
    metrics_csv = Path(fit.trainer.logger.log_dir) / "metrics.csv"
    with open(metrics_csv) as f:
        for r in csv.DictReader(f):
            if r.get("val/abs_rel"):
                rows.append((f"step {int(r['step']) + 1}", {k: float(r[f"val/{k}"]) for k in KEYS}))
    print(f"\nVPD depth learning check: {CONFIG.relative_to(ROOT)}, {args.steps} steps "
          f"(validate {t_val:.0f} s, fit {t_fit:.0f} s; logs in {out})\n")
    print(f"{'validation':<18}" + "".join(f"{k:>10}" for k in KEYS))
    for name, m in rows:
        print(f"{name:<18}" + "".join(f"{m[k]:>10.4f}" for k in KEYS))
    first, second, last = rows[0][1], rows[1][1], rows[-1][1]
    print(f"{'last / init':<18}" + "".join(f"{last[k] / first[k]:>10.3f}" for k in KEYS))
    print(f"{'last / 1st in fit':<18}" + "".join(f"{last[k] / second[k]:>10.3f}" for k in KEYS))
    ok = last["abs_rel"] < 0.5 * first["abs_rel"] and last["d1"] > first["d1"] and all(
        math.isfinite(v) for v in last.values())
    print("\nclear improvement" if ok else "\nNO clear improvement")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
