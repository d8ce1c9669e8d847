"""Shared helpers of the tests/test_retrieval_*.py files (not a test module)."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def png_bytes(seed: int, size: int = 40) -> bytes:
    """A random RGB PNG, encoded."""
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(seed).random((size, size, 3)) * 255).astype("uint8")).save(buf, "PNG")
    return buf.getvalue()


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A tiny PNG whose header declares ``width`` x ``height`` pixels (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def write_images(folder: Path, n: int, size: int = 40, seed: int = 0) -> list[Path]:
    """``n`` random PNGs ``ref00.png``, ``ref01.png``, ... in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"ref{i:02d}.png"
        Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")).save(path)
        paths.append(path)
    return paths
