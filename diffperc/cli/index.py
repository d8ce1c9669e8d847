"""``diffperc index build|add|query|stats`` and ``diffperc serve``: origin identification (ID²).

The parsers and the functions they call live beside the feature, in ``diffperc/retrieval/cli.py``
(``build_index``, ``add_images``, ``query_index``, ``index_stats``; ``retrieval/service.py``'s
``serve``); this module only registers them. ``python -m diffperc.retrieval.cli`` works alone.
"""

from __future__ import annotations

import argparse

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from ..retrieval.cli import add_parser as add  # light: the retrieval parsers import no torch or faiss

    add(subparsers)


def run(args: argparse.Namespace) -> int:
    from ..retrieval.cli import run as run_retrieval

    return run_retrieval(args)
