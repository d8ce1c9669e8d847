"""Shared set-up of the SD3 and FLUX backbone tests: prompts, images, and the transformer run by
hand with hooks on the taps (both families' blocks return (encoder_hidden_states, hidden_states))."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

PROMPTS = ["a photo of a cat", "two dogs"]
L_T5 = 16


def images(b: int = 2, h: int = 16, w: int = 24) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(1))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def clean_latents(vae, imgs: torch.Tensor) -> torch.Tensor:
    """The pipelines' x0: (posterior mean - shift_factor) * scaling_factor of images in [0, 1]."""
    return (vae.encode(imgs * 2 - 1).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor


def run_with_taps(tr: torch.nn.Module, taps: Sequence[str], call: Callable[[], object]) -> dict[str, torch.Tensor]:
    """``call()`` (the transformer forward) with hooks on ``taps``: "path" (a block's image stream),
    "path:context" (its text stream) or "path:input" (the image tokens entering it), as captured tokens."""
    got, hooks = {}, []
    for name in taps:
        path, _, kind = name.partition(":")
        m = tr.get_submodule(path)
        if kind == "input":
            hooks.append(m.register_forward_pre_hook(lambda m, a, k, n=name: got.__setitem__(n, k["hidden_states"]),
                                                     with_kwargs=True))
        else:  # the blocks return (encoder_hidden_states, hidden_states)
            hooks.append(m.register_forward_hook(lambda m, a, o, n=name, c=kind == "context": got.__setitem__(
                n, o[0] if c else o[1])))
    try:
        call()
    finally:
        for h in hooks:
            h.remove()
    return got
