"""Atomic files and folders (diffperc/_io.py): all or nothing, no temporary files left behind."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from diffperc._io import atomic_dir, atomic_file, list_images, write_bytes_atomic, write_text_atomic


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("durable", [False, True])
def test_atomic_file_writes_and_replaces(tmp_path: Path, durable: bool) -> None:
    path = tmp_path / "sub" / "a.bin"  # the folder is created
    assert write_bytes_atomic(path, b"one", durable=durable) == path
    assert path.read_bytes() == b"one" and _mode(path) == 0o644
    write_bytes_atomic(path, b"two", durable=durable)
    assert path.read_bytes() == b"two"
    assert write_text_atomic(tmp_path / "t.txt", "h\u00e9\n").read_text(encoding="utf-8") == "h\u00e9\n"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.bin", "sub", "t.txt"]


def test_atomic_file_failure_keeps_the_old_file(tmp_path: Path) -> None:
    path = write_text_atomic(tmp_path / "a.json", "old")
    with pytest.raises(RuntimeError, match="half way"), atomic_file(path) as tmp:
        tmp.write_text("half of the new")
        assert path.read_text() == "old"  # nothing is visible before the block returns
        raise RuntimeError("half way")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_atomic_dir_replaces_all_or_nothing(tmp_path: Path) -> None:
    out = tmp_path / "index"
    with atomic_dir(out) as tmp:
        (tmp / "x").write_text("1")
        assert not out.exists()
    assert (out / "x").read_text() == "1" and _mode(out) == 0o755
    with pytest.raises(KeyboardInterrupt), atomic_dir(out) as tmp:
        (tmp / "y").write_text("2")
        raise KeyboardInterrupt  # even an interrupt leaves the old folder whole
    assert [p.name for p in out.iterdir()] == ["x"] and [p.name for p in tmp_path.iterdir()] == ["index"]
    with atomic_dir(out) as tmp:
        (tmp / "z").write_text("3")
    assert [p.name for p in out.iterdir()] == ["z"]
    with pytest.raises(FileExistsError, match="appeared"), atomic_dir(tmp_path / "new", overwrite=False) as tmp:
        (tmp_path / "new").mkdir()
    assert [p.name for p in (tmp_path / "new").iterdir()] == [] and len(list(tmp_path.iterdir())) == 2


def test_list_images(tmp_path: Path) -> None:
    for name in ("b.PNG", "a.jpg", "notes.txt", ".hidden.png"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub.png").mkdir()  # a folder is not an image
    images, others = list_images(tmp_path)
    assert [p.name for p in images] == ["a.jpg", "b.PNG"] and others == ["notes.txt"]
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"a.jpg and a.png share the stem 'a', which names the ids: rename one"):
        list_images(tmp_path, stem_names="the ids")
    with pytest.raises(NotADirectoryError, match=r"--images '.*notes.txt' is not a folder"):
        list_images(tmp_path / "notes.txt", what="--images")
