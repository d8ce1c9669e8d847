"""``diffperc info [--model NAME_OR_PATH]``: every backbone family, or one model's taps and sizes.

Without a model: the families and their presets, read from the registry
(:func:`diffperc.backbones.registry.list_families`), so new families appear here unchanged.
With one: ``diffperc._commands.model_info`` (feature_info of ``--layers``, scheduler, sizes,
cross-attention layers) and the model's tap points (:meth:`DiffusionBackbone.tap_table`,
:meth:`DiffusionBackbone.layer_presets`).
"""

from __future__ import annotations

import argparse

from ._options import add_device_options, add_model_option, device_kwargs, fail

__all__ = ["add_parser", "families_text", "run", "taps_text"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "info", help="list the backbone families, or print a model's taps, layers and sizes",
        description="Without a model: every backbone family with its presets. With MODEL (or --model): its "
        "feature_info for --layers, scheduler and sizes, the layer presets and the tap points (module paths, "
        "channels, reductions) of its UNet and VAE.")
    p.add_argument("model_pos", nargs="?", default=None, metavar="MODEL",
                   help="preset name, diffusers folder, single file or hub id (same as --model)")
    add_model_option(p, default=None)
    p.add_argument("--layers", default=None,
                   help="layers to describe (default: vpd on UNet models, the backbone's default on SD3/FLUX)")
    add_device_options(p)


def families_text() -> str:
    """The table of backbone families (``diffperc info`` without a model)."""
    from ..backbones.registry import list_families

    lines = ["backbone families (diffperc info --model NAME for a model's taps):", ""]
    for fam in list_families():
        head = f"{fam['family']}: {fam['class'] or '(no backbone class yet)'}"
        lines.append(head + (f"  [model_index.json: {fam['pipeline']}]" if fam["pipeline"] else ""))
        lines.append(f"  {fam['description']}")
        lines.append(f"  presets: {', '.join(fam['presets']) or '-'}")
    return "\n".join(lines)


def taps_text(bb: object) -> str:
    """Layer presets and tap points of a loaded backbone (empty where it has no tap table)."""
    if not hasattr(bb, "tap_table"):
        return ""
    lines = ["", "layer presets:"]
    for name, taps in bb.layer_presets().items():
        lines.append(f"  {name:<10} {taps if isinstance(taps, str) else ', '.join(taps)}")
    lines += ["", "tap points (any module path works; ':input' = the tensor entering it):",
              f"  {'tap':<44} {'channels':>8} {'reduction':>9}"]
    lines += [f"  {f.name:<44} {f.channels:>8} {f.reduction:>9}" for f in bb.tap_table()]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        if args.model_pos is not None and args.model is not None and str(args.model) != args.model_pos:
            raise ValueError(f"give the model once: MODEL {args.model_pos!r} or --model {str(args.model)!r}")
        model = args.model if args.model is not None else args.model_pos
        if model is None:
            if args.model_config or args.unet_weights:
                raise ValueError("--model-config / --unet-weights need a model: diffperc info --model NAME_OR_PATH")
            print(families_text())
            return 0
        if args.model is None and (args.model_config or args.unet_weights):  # MODEL given positionally
            from ._options import ModelArg

            model = ModelArg(model, args.model_config, args.unet_weights)
        from .._commands import model_info, parse_layers
        from ..devices import load_backbone

        label = args.layers or "vpd"
        try:
            bb = load_backbone(model, layers=parse_layers(label), **device_kwargs(args))
        except ValueError:
            if args.layers is not None:
                raise
            label = "default"  # SD3 / FLUX have no vpd preset: their own default tap
            bb = load_backbone(model, **device_kwargs(args))
        print(model_info(model, layers=label, backbone=bb))
        print(taps_text(bb))
        return 0
    except (ValueError, FileNotFoundError, NotADirectoryError) as err:
        return fail("info", err)
