"""Moved: the ``correspond`` command is ``diffperc/cli/correspond.py``, the work ``zeroshot/correspond_images.py``."""

from ..cli.correspond import add_parser, run  # noqa: F401
from .correspond_images import correspond, correspond_many, draw_matches, foreground_grid, parse_points  # noqa: F401
