"""``diffperc recipes list|show NAME``: the YAML recipes shipped in the package."""

from __future__ import annotations

import argparse
import sys

from ._options import fail

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("recipes", help="list the shipped YAML recipes or print one",
                              description="The YAML recipes shipped in the package. A recipe name works as "
                              "`diffperc fit --config NAME`; `show NAME > my.yaml` gives a copy to edit.")
    sub = p.add_subparsers(dest="recipes_command", metavar="ACTION", required=True)
    ls = sub.add_parser("list", help="recipe names with the first line of their header")
    ls.add_argument("pattern", nargs="?", default="*", help="glob on the name, e.g. 'depth/*' (default: all)")
    show = sub.add_parser("show", help="print a recipe's YAML (or its path with --path)")
    show.add_argument("name", help="recipe name, e.g. depth/nyu_vpd_sd15 or nyu_vpd_sd15")
    show.add_argument("--path", action="store_true", help="print the file's path instead of its text")


def run(args: argparse.Namespace) -> int:
    from .. import recipes

    try:
        if args.recipes_command == "list":
            names = recipes.list_recipes(args.pattern)
            if not names:
                raise ValueError(f"no recipe matches {args.pattern!r}; `diffperc recipes list` shows all")
            width = max(len(n) for n in names)
            for name in names:
                print(f"{name:<{width}}  {recipes.recipe_summary(name)}")
            return 0
        path = recipes.recipe_path(args.name)
        sys.stdout.write(f"{path}\n" if args.path else path.read_text(encoding="utf-8"))
        return 0
    except (ValueError, FileNotFoundError) as err:
        return fail(f"recipes {args.recipes_command}", err)
