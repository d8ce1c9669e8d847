"""Taps: module outputs or inputs read by persistent hooks, with early stop.

A tap is a module path of the denoiser (``"up_blocks.1"``, ``"...attn2.to_q"``) whose output is
the feature, or the same path with ``":input"`` for the tensor the module receives (its first
argument): ``"up_blocks.1.resnets.0:input"`` is the decoder's skip-concatenated input, as ODISE
taps it. ``":output"`` may be written out too.

The hooks are registered once, when the backbone is built, and do nothing unless a run is
active, so ``torch.compile`` traces them like any other module code (no hook registration
inside the compiled forward). During a run the hook of the last tap that runs raises a private
:class:`StopForward` that the backbone catches: the rest of the network does not run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

from torch import Tensor, nn

__all__ = ["StopForward", "TapRecorder", "Taps", "first_tensor", "run_tapped", "split_tap"]

_KINDS = ("output", "input")


class StopForward(Exception):
    """Raised by the hook of the last requested tap to end the forward early."""


def first_tensor(value: Any) -> Tensor:
    """A module's feature: the tensor itself, or the first element of a tuple / output class."""
    while not isinstance(value, Tensor):
        if isinstance(value, Mapping):
            value = next(iter(value.values()))
        else:
            value = value[0]
    return value


def split_tap(name: str, kinds: tuple[str, ...] = _KINDS) -> tuple[str, str]:
    """``"a.b:input"`` -> ("a.b", "input"); ``"a.b"`` -> ("a.b", "output"); ``kinds``: the valid suffixes."""
    path, _, kind = name.partition(":")
    kind = kind or "output"
    if kind not in kinds:
        raise ValueError(f"tap {name!r}: the part after ':' must be one of {list(kinds)}, got {kind!r}")
    return path, kind


class TapRecorder:
    """What every kind of tap hooks shares: the recording state, :meth:`start` / :meth:`stop`, early
    stop after ``stop_after`` and :meth:`remove`. Subclasses register the hooks (into ``handles``)
    and hand each tensor they read to :meth:`_keep`."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self.active = False
        self.stop_after: str | None = None
        self.feats: dict[str, Tensor] = {}
        self.order: list[str] = []
        self.handles = []

    def _keep(self, name: str, x: Tensor) -> None:
        if name not in self.feats:
            self.order.append(name)
        self.feats[name] = x
        if name == self.stop_after:
            raise StopForward

    def start(self, stop_after: str | None) -> None:
        """Record from now on; ``stop_after`` is the tap whose hook ends the forward (None: run it all)."""
        self.active, self.stop_after, self.feats, self.order = True, stop_after, {}, []

    def stop(self) -> dict[str, Tensor]:
        """Stop recording and return {tap: tensor}."""
        self.active = False
        feats, self.feats = self.feats, {}
        return feats

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


class Taps(TapRecorder):
    """Persistent hooks on ``root`` for the tap ``names``; inactive until :meth:`start`."""

    def __init__(self, root: nn.Module, names: list[str]) -> None:
        super().__init__(names)
        for name in self.names:
            path, kind = split_tap(name)
            module = root.get_submodule(path)
            if kind == "input":
                self.handles.append(module.register_forward_pre_hook(partial(self._pre, name), with_kwargs=True))
            else:
                self.handles.append(module.register_forward_hook(partial(self._post, name)))

    def _pre(self, name: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.active:
            self._keep(name, first_tensor(args if args else kwargs))

    def _post(self, name: str, module: nn.Module, args: tuple, output: Any) -> None:
        if self.active:
            self._keep(name, first_tensor(output))


def run_tapped(taps: TapRecorder, store: Any, attention: bool, call: Callable[[], Any]
               ) -> tuple[dict[str, Tensor], dict[int, Tensor]]:
    """Run ``call()`` (the denoiser forward, after ``taps.start``; the last tap's :class:`StopForward`
    ends it early), then end the attention ``store`` and the taps' recording.
    Returns ({tap: tensor}, the store's attention maps when ``attention``, else {})."""
    try:
        call()
    except StopForward:
        pass
    finally:
        store.end()
        feats = taps.stop()
    return feats, (store.maps() if attention else {})
