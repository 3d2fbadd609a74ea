"""What a trainer tells its observers (widgets, W&B, your code), as one typed interface.

A callback is either a plain function ``fn(state)`` (called after every step) or an object with
the four methods of ``Callback``; subclass ``CallbackBase`` to override only what you need.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Iterator, Protocol, Sequence, runtime_checkable

__all__ = ["Callback", "CallbackBase", "CallbackList", "as_callback"]


@runtime_checkable
class Callback(Protocol):
    def attach(self, trainer: Any) -> None:
        """Called once when a run is built around ``trainer`` (config, checkpoints, model name)."""

    def on_step(self, state: Any) -> None:
        """Called after every ``trainer.step()`` with its ``StepState``."""

    def on_eval(self, metrics: dict[str, float], step: int) -> None:
        """Called after each greedy dev evaluation of a run."""

    def on_finish(self) -> None:
        """Called once when a run ends (normally or not)."""


class CallbackBase:
    """No-op implementation of ``Callback``."""

    def attach(self, trainer: Any) -> None:
        pass

    def on_step(self, state: Any) -> None:
        pass

    def on_eval(self, metrics: dict[str, float], step: int) -> None:
        pass

    def on_finish(self) -> None:
        pass


class _StepFunction(CallbackBase):
    def __init__(self, fn: Callable[[Any], Any]):
        self.fn = fn

    def on_step(self, state: Any) -> None:
        self.fn(state)

    def __repr__(self) -> str:
        return f"<step callback {getattr(self.fn, '__qualname__', self.fn)!r}>"


def as_callback(obj: Any) -> Callback:
    """``obj`` as a ``Callback``: objects implementing it as they are, functions wrapped."""
    if isinstance(obj, Callback):
        return obj
    if callable(obj):
        return _StepFunction(obj)
    raise TypeError(f"a callback is a function fn(state) or implements "
                    f"attach/on_step/on_eval/on_finish (subclass CallbackBase); got {obj!r}")


class CallbackList:
    """A trainer's callbacks, each registered once; one that raises is warned about and skipped,
    since a broken logger must not stop training."""

    def __init__(self, callbacks: Sequence[Any] = ()):
        self._items: list[Callback] = []
        for cb in callbacks:
            self.add(cb)

    def add(self, callback: Any) -> Callback:
        """Register ``callback`` (a ``Callback`` or a function ``fn(state)``), once."""
        if any(cb is callback or getattr(cb, "fn", None) is callback for cb in self._items):
            return callback
        cb = as_callback(callback)
        self._items.append(cb)
        return cb

    def __iter__(self) -> Iterator[Callback]:
        return iter(self._items)

    def on_step(self, state: Any) -> None:
        for cb in self._items:
            try:
                cb.on_step(state)
            except Exception as exc:  # noqa: BLE001 - a broken logger must not stop training
                warnings.warn(f"callback {cb!r} failed ({type(exc).__name__}: {exc}); training "
                              "goes on", stacklevel=3)
