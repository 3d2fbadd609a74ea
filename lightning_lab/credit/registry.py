"""The strategy registry: ``ll.credit.get(name, **params)`` and ``@ll.credit.register(name)``."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, TypeVar

from ..records import Batch

__all__ = ["CreditStrategy", "register", "get", "names", "param_names"]


class CreditStrategy:
    """Base class: subclasses are dataclasses whose fields are the strategy's parameters."""

    name: str = ""
    needs_values: bool = False
    """True when ``assign`` reads ``Transition.value`` (the trainer's critic fills it)."""

    def assign(self, batch: Batch) -> Batch:  # pragma: no cover - interface
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        return dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}

    def describe(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{self.name}({args})"


_REGISTRY: dict[str, type[CreditStrategy]] = {}
S = TypeVar("S", bound=type)


def register(name: str) -> Callable[[S], S]:
    """Class decorator adding a strategy under ``name`` (re-registering a name replaces it)."""

    def deco(cls: S) -> S:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def names() -> list[str]:
    return sorted(_REGISTRY)


def param_names(name: str) -> list[str]:
    """The parameters a registered strategy takes (its dataclass fields)."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown credit strategy {name!r}; registered: {', '.join(names())}")
    cls = _REGISTRY[name]
    return [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []


def get(name: str | CreditStrategy, **params: Any) -> CreditStrategy:
    """Build a registered strategy; unknown names and parameters fail with the valid choices."""
    if isinstance(name, CreditStrategy):
        return dataclasses.replace(name, **params) if params else name
    if name not in _REGISTRY:
        raise KeyError(f"unknown credit strategy {name!r}; registered: {', '.join(names())}")
    valid = set(param_names(name))
    bad = set(params) - valid
    if bad:
        raise TypeError(f"credit strategy {name!r} has no parameter(s) {sorted(bad)}; "
                        f"valid: {sorted(valid)}")
    if params.get("baseline") == "none":  # the CLI's and the widgets' spelling of None
        params["baseline"] = None
    return _REGISTRY[name](**params)
