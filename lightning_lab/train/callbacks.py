"""What a trainer tells its observers (widgets, W&B, your code), as one typed interface.

A callback is either a plain function ``fn(state)`` (called after every step) or an object with
the four methods of ``Callback``; subclass ``CallbackBase`` to override only what you need.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

__all__ = ["Callback", "CallbackBase", "as_callback"]


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
