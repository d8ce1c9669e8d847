"""The wheel ships every recipe: build it (no network, no isolation) and compare its YAMLs with configs/."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_every_recipe_and_the_bundled_model(tmp_path):
    # built from a copy: an in-tree build would leave build/ in the repository (and reuse stale files from it)
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", ".venv",
                                                                             "__pycache__", "lightning_logs*"))
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                          "-q", "-w", str(tmp_path), str(src)], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    (wheel,) = tmp_path.glob("diffperc-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    yamls = {"diffperc/configs/" + p.relative_to(ROOT / "configs").as_posix() for p in (ROOT / "configs").rglob("*.yaml")}
    assert yamls and yamls <= names, sorted(yamls - names)
    assert "diffperc/checkpoints/digits/model_index.json" in names and "diffperc/cli/__init__.py" in names
    with zipfile.ZipFile(wheel) as z:  # the packaged text is the repository's
        for name in sorted(yamls)[:3]:
            assert z.read(name).decode() == (ROOT / name).read_text()
    # installed (unpacked) outside the repository, run from another folder: recipe names resolve to package data
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = "import sys; from diffperc.cli import main; sys.exit(main(['recipes', 'show', 'depth/nyu_vpd_sd15', '--path']))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(site / "diffperc" / "configs" / "depth" / "nyu_vpd_sd15.yaml")
