"""Files: atomic writes (beside the target, then rename: a crash never leaves half a file) and image listings.

Every writer of the library (PNG pictures, safetensors features and caches, JSON results, index
snapshots, model and index folders) goes through these helpers.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["IMAGE_SUFFIXES", "atomic_dir", "atomic_file", "fsync_dir", "list_images", "write_bytes_atomic",
           "write_text_atomic"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")  # what PIL reads


def fsync_dir(folder: str | os.PathLike) -> None:
    """fsync a folder, so a rename inside it survives a power cut."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str | os.PathLike, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on success it is renamed to ``path``.

    The file is made readable by everyone (0o644) as an ordinary file; on any error it is removed
    and ``path`` is untouched. ``durable=True`` also fsyncs the file and then its folder, so the
    new content survives a power cut once the ``with`` block has returned.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        tmp.chmod(0o644)
        os.replace(tmp, path)
        if durable:
            fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes, durable: bool = False) -> Path:
    """Write ``data`` to ``path`` through :func:`atomic_file`; returns the path."""
    with atomic_file(path, durable=durable) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_file`; returns the path."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


@contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside ``path`` to fill; on success it replaces ``path``.

    On any error the temporary folder is removed and ``path`` is untouched. With ``overwrite``
    an existing ``path`` is removed just before the rename (the only moment neither exists).
    """
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        yield tmp
        if path.exists():
            if not overwrite:
                raise FileExistsError(f"{path} appeared while it was being written; nothing was replaced")
            shutil.rmtree(path)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def list_images(folder: Path, what: str = "IMAGES_DIR", stem_names: str = "their features") -> tuple[
        list[Path], list[str]]:
    """The image files of ``folder`` (sorted, hidden files skipped) and the names of its other files.

    Two images with the same stem raise: the stem names what is made of them (``stem_names``).
    """
    if not folder.is_dir():
        raise NotADirectoryError(f"{what} {str(folder)!r} is not a folder of images")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    stems: dict[str, str] = {}
    for p in images:
        if p.stem in stems:
            raise ValueError(f"{stems[p.stem]} and {p.name} share the stem {p.stem!r}, which names {stem_names}: "
                             "rename one")
        stems[p.stem] = p.name
    return images, [p.name for p in files if p not in images]
