"""diffperc extract --sharded: a Lightning predict loop, one shard per rank, every image once, resumable.

The 2-process run is `python -m diffperc.cli extract ... --trainer.strategy=ddp --trainer.devices=2
--trainer.accelerator=cpu` (gloo), launched as in tests/test_ddp.py, once, then again after a shard was
deleted; the reference is the one-process `extract_features` in this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from diffperc.cli import main
from diffperc.extract import extract_features, load_features
from diffperc.extract_sharded import extract_features_sharded, rank_split

ROOT = Path(__file__).resolve().parents[1]
OPTS = {"model": "test_sd", "layers": "up_blocks.1", "size": 32, "recursive": True, "batch_size": 2}
CLI = ["--model", "test_sd", "--layers", "up_blocks.1", "--size", "32", "--recursive", "--batch-size", "2"]
RELS = ["a.png", "b.png", "c.jpg", "sub/d.png", "sub/e.png"]  # sorted: rank 0 gets a, b; rank 1 c, sub/d, sub/e


def _images(root: Path) -> Path:
    for i, rel in enumerate(RELS):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (24 + 4 * i, 40, 3), dtype=np.uint8)).save(root / rel)
    return root


def _shard_files(path: Path) -> list[str]:
    with safe_open(path, "pt") as f:
        return json.loads(f.metadata()["files"])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rank_split_covers_every_item_once() -> None:
    items = [str(i) for i in range(11)]
    for world in (1, 2, 3, 8, 16):
        blocks = [rank_split(items, r, world) for r in range(world)]
        assert [x for b in blocks for x in b] == items  # no padding, no repeats, order kept
        assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


def test_parser_takes_trainer_flags_without_importing_torch() -> None:
    code = ("import sys\nfrom diffperc.cli import build_parser\n"
            "a = build_parser().parse_args(['extract', 'imgs', '--out', 'o', '--sharded', '--trainer.devices', '8',"
            " '--trainer.num_nodes', '2', '--trainer.accelerator', 'gpu', '--trainer.strategy', 'ddp'])\n"
            "print(a.sharded, a.trainer_devices, a.trainer_num_nodes, a.trainer_accelerator, a.trainer_strategy)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'lightning', 'diffusers')))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["True 8 2 gpu ddp", "[]"]


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with the gloo backend")
def test_two_processes_write_every_image_once_then_resume(tmp_path: Path) -> None:
    imgs, out = _images(tmp_path / "imgs"), tmp_path / "feats"
    log = _two_processes(imgs, out, tmp_path)
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in log, log[-4000:]

    # every image exactly once, each rank its contiguous block, the index naming the shard that holds it
    shards = sorted(p.name for p in out.iterdir() if p.suffix == ".safetensors")
    assert shards == ["shard-00000-of-00002.safetensors", "shard-00001-of-00002.safetensors"]
    assert _shard_files(out / shards[0]) == RELS[:2] and _shard_files(out / shards[1]) == RELS[2:]
    index = json.loads((out / "index.json").read_text())
    assert {rel: e["shard"] for rel, e in index["images"].items()} == {r: shards[r not in RELS[:2]] for r in RELS}
    assert index["images"]["sub/d.png"]["keys"] == ["sub/d/up_blocks.1"]

    # per-image features equal the one-process extract's (same per-image seed, same code)
    extract_features(imgs, tmp_path / "ref.safetensors", device="cpu", **OPTS)
    ref, got = load_features(tmp_path / "ref.safetensors"), load_features(out)
    assert list(got) == list(ref) == ["a", "b", "c", "sub/d", "sub/e"]
    for name in ref:
        torch.testing.assert_close(got[name]["up_blocks.1"], ref[name]["up_blocks.1"], atol=1e-5, rtol=1e-4)

    # resume: shard 1 lost (and a half-written temp of it left behind); the same command recomputes only its
    # images (rank 0 has nothing to do) and leaves shard 0 alone
    kept = (out / shards[0]).stat()
    (out / shards[1]).unlink()
    (out / f".{shards[1]}-x1y2.data").write_bytes(b"half a shard")
    with pytest.raises(FileNotFoundError, match="shard-00001-of-00002.safetensors named in index.json are missing"):
        load_features(out)
    log = _two_processes(imgs, out, tmp_path)
    assert "2 of 5 images are already in" in log and "(rank 1): wrote the features of 3 images" in log, log[-4000:]
    assert "(rank 0): wrote" not in log
    assert (out / shards[0]).stat().st_mtime_ns == kept.st_mtime_ns and (out / shards[0]).stat().st_ino == kept.st_ino
    assert sorted(p.name for p in out.iterdir()) == ["index.json", *shards]  # the temp is gone
    assert _shard_files(out / shards[1]) == RELS[2:]
    got = load_features(out)
    for name in ref:
        torch.testing.assert_close(got[name]["up_blocks.1"], ref[name]["up_blocks.1"], atol=1e-5, rtol=1e-4)

    # everything there: a rerun (here one process) computes nothing; other settings are refused
    summary = extract_features_sharded(imgs, out, accelerator="cpu", devices=1, **OPTS)
    assert summary.written == [] and summary.total == 5
    with pytest.raises(ValueError, match=r"other settings \(seed"):
        extract_features_sharded(imgs, out, accelerator="cpu", devices=1, seed=1, **OPTS)


def _two_processes(imgs: Path, out: Path, cwd: Path) -> str:
    cmd = [sys.executable, "-m", "diffperc.cli", "extract", str(imgs), *CLI, "--out", str(out), "--sharded",
           "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    run = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    return log


def test_sharded_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    imgs = _images(tmp_path / "imgs")
    cases = [(["--out", str(tmp_path / "x.safetensors"), "--sharded"], "must be a folder, not a file"),
             (["--out", str(tmp_path / "o"), "--sharded", "--device", "cpu"], "use --trainer.accelerator"),
             (["--out", str(tmp_path / "o"), "--trainer.devices", "2"], "--trainer.devices only apply with --sharded"),
             (["--out", str(tmp_path / "o"), "--sharded", "--trainer.num_nodes", "two"], "must be an integer")]
    for extra, message in cases:
        assert main(["extract", str(imgs), *CLI, *extra]) == 1
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_shard_size_bounds_what_a_crash_loses(tmp_path: Path) -> None:
    imgs, out = _images(tmp_path / "imgs"), tmp_path / "feats"
    summary = extract_features_sharded(imgs, out, accelerator="cpu", devices=1, shard_size=2, **OPTS)
    names = ["shard-00000-of-00001.safetensors", "shard-00000-of-00001-1.safetensors",
             "shard-00000-of-00001-2.safetensors"]
    assert [p.name for p in summary.outputs] == names
    assert [_shard_files(out / n) for n in names] == [RELS[:2], RELS[2:4], RELS[4:]]
    first = load_features(out)
    (out / names[1]).unlink()  # as if the run had died while writing its second shard
    again = extract_features_sharded(imgs, out, accelerator="cpu", devices=1, shard_size=2, **OPTS)
    assert again.written == RELS[2:4] and [p.name for p in again.outputs] == [names[1]] and again.total == 5
    got = load_features(out)
    assert list(got) == list(first)
    for name in first:
        torch.testing.assert_close(got[name]["up_blocks.1"], first[name]["up_blocks.1"])
