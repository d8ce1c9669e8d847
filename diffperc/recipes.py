"""The shipped recipes: one YAML per experiment, package data in ``diffperc/configs/<task>/<name>.yaml``.

A recipe's name is its path under ``configs/`` without ``.yaml`` (``depth/nyu_vpd_sd15``); the
file name alone (``nyu_vpd_sd15``) works where it is unique. ``diffperc fit --config NAME``
resolves a name to the packaged file, so recipes work from any folder after ``pip install``.

    diffperc recipes list
    diffperc recipes show depth/nyu_vpd_sd15 > my.yaml
    diffperc fit --config depth/nyu_vpd_sd15
"""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path

__all__ = ["config_dir", "list_recipes", "recipe_path", "recipe_summary", "resolve_config"]


def config_dir() -> Path:
    """The folder of the packaged recipes (``diffperc/configs``)."""
    return Path(str(resources.files("diffperc"))) / "configs"


def list_recipes(pattern: str = "*") -> list[str]:
    """Sorted recipe names (``"depth/nyu_vpd_sd15"``, ...) matching a glob on the name."""
    import fnmatch

    root = config_dir()
    names = [p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml")]
    return sorted(n for n in names if fnmatch.fnmatch(n, pattern) or fnmatch.fnmatch(n.split("/")[-1], pattern))


def recipe_path(name: str) -> Path:
    """The packaged YAML of a recipe name (``depth/nyu_vpd_sd15``, ``nyu_vpd_sd15``, with or without .yaml).

    Raises:
        ValueError: unknown or ambiguous name; the message lists the close matches.
    """
    key = name.removesuffix(".yaml").removeprefix("configs/")
    names = list_recipes()
    if key in names:
        return config_dir() / f"{key}.yaml"
    by_stem = [n for n in names if n.split("/")[-1] == key]
    if len(by_stem) == 1:
        return config_dir() / f"{by_stem[0]}.yaml"
    if by_stem:
        raise ValueError(f"recipe {name!r} is ambiguous: {', '.join(by_stem)}; give the full name")
    close = difflib.get_close_matches(key, names + [n.split("/")[-1] for n in names], n=5, cutoff=0.5)
    hint = f"Did you mean: {', '.join(close)}? " if close else ""
    raise ValueError(f"unknown recipe {name!r}. {hint}`diffperc recipes list` shows all {len(names)}; "
                     "a path to your own YAML works too")


def recipe_summary(name: str) -> str:
    """The first line of a recipe's header comment (what it trains, on what), without the ``#``."""
    for line in recipe_path(name).read_text(encoding="utf-8").splitlines():
        if line.startswith("#") and line.strip("# "):
            return line.lstrip("# ").strip()
    return ""


def resolve_config(value: str) -> str:
    """A ``--config`` value: an existing file stays as given, anything else must be a recipe name."""
    if Path(value).expanduser().is_file() or "\n" in value or value.lstrip().startswith(("{", "[")):
        return value  # a file, or an inline YAML/JSON string (jsonargparse accepts those)
    if value.endswith((".yaml", ".yml")) and ("/" in value or "\\" in value) and not value.startswith("configs/"):
        raise FileNotFoundError(f"--config {value!r} does not exist (nor is it a packaged recipe name; "
                                "`diffperc recipes list` shows those)")
    return str(recipe_path(value))
