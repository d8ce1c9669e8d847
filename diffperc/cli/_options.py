"""Options shared by the plain commands. Importing this module imports nothing heavy (no torch)."""

from __future__ import annotations

import argparse

__all__ = ["DTYPES", "ModelArg", "add_device_options", "add_model_option", "device_kwargs", "fail"]

DTYPES = ("float32", "float16", "bfloat16")  # = diffperc.devices.DTYPES, repeated here so parsers stay light


def add_device_options(parser: argparse.ArgumentParser, dtype_help: str = "") -> None:
    """``--device`` (default: cuda when available, else cpu) and ``--dtype`` (compute precision)."""
    parser.add_argument("--device", default=None, metavar="DEVICE",
                        help="where the model runs: cpu, cuda, cuda:N, mps (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="compute precision of the model weights (default: float32)" + dtype_help)


class ModelArg(str):
    """The ``--model`` value with ``--model-config`` / ``--unet-weights`` attached.

    It is the model's name (a ``str``: commands print and record it as before);
    :func:`diffperc.backbones.registry.load_backbone` passes :attr:`load_kwargs` on as the loader's
    ``config=`` and ``unet_weights=``, so every command that loads ``--model`` honours them.
    """

    load_kwargs: dict[str, str]

    def __new__(cls, value: str, config: str | None = None, unet_weights: str | None = None) -> ModelArg:
        obj = super().__new__(cls, value)
        obj.load_kwargs = {k: v for k, v in (("config", config), ("unet_weights", unet_weights)) if v is not None}
        return obj


class _ModelPart(argparse.Action):
    """Stores ``--model`` / ``--model-config`` / ``--unet-weights`` and re-binds them into one :class:`ModelArg`
    (whatever their order on the command line)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values)
        model = getattr(namespace, "model", None)
        if model is not None:
            namespace.model = ModelArg(str(model), getattr(namespace, "model_config", None),
                                       getattr(namespace, "unet_weights", None))


def add_model_option(parser: argparse.ArgumentParser, default: str | None = "digits", extra: str = "") -> None:
    """``--model`` (preset, folder, single file, hub id), ``--model-config`` and ``--unet-weights``."""
    parser.add_argument("--model", default=default, action=_ModelPart,
                        help="preset name, diffusers folder, single file or hub id"
                        + (f" (default: {default}{extra})" if default is not None else ""))
    parser.add_argument("--model-config", default=None, action=_ModelPart, metavar="FOLDER_OR_ID",
                        help="with a single-file --model (.safetensors/.ckpt): the diffusers config to convert it "
                        "into, a local diffusers folder or a cached hub id (e.g. stable-diffusion-v1-5/"
                        "stable-diffusion-v1-5); needed offline")
    parser.add_argument("--unet-weights", default=None, action=_ModelPart, metavar="PATH_OR_ID",
                        help="UNet weights loaded over the model's UNet (strict key check): a .safetensors state "
                        "dict, a UNet or pipeline folder, a hub repo or org/name/file.safetensors (CleanDIFT: "
                        "CompVis/cleandift/cleandift_sd21_unet.safetensors)")


def device_kwargs(args: argparse.Namespace) -> dict[str, object]:
    """``{"device": ..., "torch_dtype": ...}`` of parsed options, resolved (errors name the option)."""
    from ..devices import resolve_device, resolve_dtype

    return {"device": resolve_device(args.device), "torch_dtype": resolve_dtype(args.dtype)}


def fail(command: str, err: BaseException) -> int:
    """Print ``diffperc COMMAND: error: ...`` on stderr; returns exit code 1."""
    import sys

    print(f"diffperc {command}: error: {err}", file=sys.stderr)
    return 1
