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


def register(name: str, *, replace: bool = False) -> Callable[[S], S]:
    """Class decorator adding a strategy under ``name``.

    A name taken by another class is refused unless ``replace=True``: silently replacing
    ``"discounted"`` would change every run that asks for it by name. The same definition run
    again (same module and qualified name: a notebook cell re-executed) replaces its old self.
    """

    def deco(cls: S) -> S:
        old = _REGISTRY.get(name)
        same_definition = old is not None and (old.__module__, old.__qualname__) == (
            cls.__module__, cls.__qualname__)
        if old is not None and not (replace or same_definition):
            raise ValueError(f"credit strategy {name!r} is already registered by "
                             f"{old.__module__}.{old.__qualname__}; pass replace=True to override it")
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
