"""Result tables of the commands as JSON (a list of objects) or CSV (one row each), written atomically."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._io import write_text_atomic

__all__ = ["write_rows"]


def write_rows(rows: Sequence[dict[str, Any]], path: str | os.PathLike, what: str = "--out") -> Path:
    """``rows`` to ``path``: ``.json`` -> a JSON list; ``.csv`` -> a header + one line per row (nested values
    as JSON strings). Returns the path.

    Raises:
        ValueError: another suffix.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        return write_text_atomic(path, json.dumps(list(rows), indent=2) + "\n")
    if suffix != ".csv":
        raise ValueError(f"{what} {str(path)!r}: results are written as .json or .csv, got {suffix or 'no suffix'!r}")
    fields = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in row.items()})
    return write_text_atomic(path, buf.getvalue())
