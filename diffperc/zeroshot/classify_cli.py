"""Moved: the ``classify`` command is ``diffperc/cli/classify.py``, the work ``diffperc/zeroshot/classify_images.py``."""

from ..cli.classify import add_parser, parse_range, parse_schedule, run  # noqa: F401
from .classify_images import classify_files, classify_image  # noqa: F401
