"""Several LoRA adapters on one frozen base: one per role, sampled and scored in shared batches.

Why: a writer and a checker that must learn opposite behaviour cannot share one set of weights,
yet a second model per role costs a second base in memory and a second batch. A LoRA adapter per
role costs megabytes, and rows of different adapters can share a forward: every LoRA linear
computes the base output once for the whole batch, then adds each adapter's low-rank delta only
on its own rows (rows gathered by adapter, as punica / S-LoRA do). The base matmul dominates, so
a mixed batch runs at nearly the speed of a single-adapter one.

Adapters are peft adapters on the policy's ``PeftModel``; ``"default"`` is the one
``models.load(lora=...)`` makes, so single-adapter code never names one. Which adapter a call
samples with is ``Policy.adapter_for(role)`` (``role_adapters``, else the adapter of the role's
own name, else ``"default"``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import torch

from lightning_lab.inference.adapters import has_adapter

__all__ = ["DEFAULT", "RowAdapters", "add_adapter", "add_adapters", "adapter_names", "add_deltas", "check_adapter",
           "check_role_adapters", "keeping_trainable", "routed", "split_by_adapter", "use_adapter"]

DEFAULT = "default"
"""The adapter of ``models.load(lora=...)`` and of every role nothing maps elsewhere."""


def adapter_names(model: Any) -> list[str]:
    """The model's LoRA adapters in creation order (``[]`` for a model without peft)."""
    return list(model.peft_config) if has_adapter(model) else []


def check_adapter(model: Any, name: str) -> str:
    """``name`` if the model has that adapter (``"default"`` always passes); else a ValueError
    naming it and listing the known ones."""
    if name == DEFAULT or name in adapter_names(model):
        return name
    known = ", ".join(adapter_names(model)) or "none (the model has no LoRA adapter)"
    raise ValueError(f"unknown adapter {name!r}; this policy's adapters: {known}")


def check_role_adapters(model: Any, mapping: Mapping[str, str] | None) -> dict[str, str]:
    """A ``role_adapters`` mapping with every adapter it names checked (ValueError otherwise)."""
    out = {}
    for role, name in (mapping or {}).items():
        try:
            out[str(role)] = check_adapter(model, name)
        except ValueError as error:
            raise ValueError(f"role_adapters[{role!r}]: {error}") from None
    return out


def add_adapter(model: Any, name: str, overrides: Mapping[str, Any] | None = None) -> None:
    """Add a trainable LoRA adapter ``name``: the default adapter's ``LoraConfig`` with
    ``overrides`` (rank, targets, init...) applied. Refuses a model without LoRA and a name in use."""
    if not has_adapter(model):
        raise ValueError(f"cannot add adapter {name!r}: the model has no LoRA adapter "
                         "(load it with lora=True)")
    if name in model.peft_config or name == "__base__":
        raise ValueError(f"adapter {name!r} already exists (adapters: {adapter_names(model)})")
    base_config = model.peft_config[adapter_names(model)[0]]
    config = dataclasses.replace(base_config, **dict(overrides or {}))
    model.add_adapter(name, config)
    for module in lora_layers(model):  # peft adds new adapters frozen; each role trains its own
        if name in module.lora_A:
            module.lora_A[name].requires_grad_(True)
            module.lora_B[name].requires_grad_(True)


def add_adapters(model: Any, adapters: Sequence[str] | Mapping[str, Mapping] | None) -> None:
    """``add_adapter`` for each name (a mapping gives each its overrides); ``"default"`` exists."""
    items = (adapters.items() if isinstance(adapters, Mapping)
             else ((name, None) for name in adapters or ()))
    for name, overrides in items:
        if name != DEFAULT:
            add_adapter(model, name, overrides)


def lora_layers(model: Any) -> list[Any]:
    """The peft LoRA layers of ``model`` (those holding ``lora_A``/``lora_B`` per adapter)."""
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def adapter_parameters(model: Any, name: str) -> dict[str, torch.nn.Parameter]:
    """Parameter name -> parameter of one adapter (peft names them ``...lora_A.<name>.weight``)."""
    marks = (f".lora_A.{name}.", f".lora_B.{name}.")
    return {n: p for n, p in model.named_parameters() if any(m in n for m in marks)}


@contextlib.contextmanager
def keeping_trainable(model: Any) -> Iterator[None]:
    """Put every parameter's ``requires_grad`` back on exit: peft's ``disable_adapter`` ends by
    re-activating the active adapter, which marks every *other* adapter frozen."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@dataclass(frozen=True)
class RowAdapters:
    """Which adapter each row of one forward uses: per distinct adapter, the row indices (None:
    every row) that the LoRA layers gather."""

    groups: tuple[tuple[str, torch.Tensor | None], ...]

    @staticmethod
    def of(names: Sequence[str], device: Any = "cpu") -> "RowAdapters | None":
        """Routing for rows using ``names``; None when every row uses ``"default"`` (the
        model's active adapter: the plain forward already applies it)."""
        if all(n == DEFAULT for n in names):
            return None
        distinct = list(dict.fromkeys(names))
        if len(distinct) == 1:
            return RowAdapters(((distinct[0], None),))
        groups = tuple((a, torch.tensor([i for i, n in enumerate(names) if n == a], device=device))
                       for a in distinct)
        return RowAdapters(groups)


def add_deltas(module: Any, h: torch.Tensor, out: torch.Tensor, rows: RowAdapters) -> torch.Tensor:
    """``out`` (the base layer's output for the whole batch) plus each adapter's LoRA delta on
    its own rows. h: (B, ..., C_in), out: (B, ..., C_out); fp32 as peft computes adapters."""
    for name, index in rows.groups:
        if name not in module.lora_A:  # "__base__" rows, or an adapter not targeting this layer
            continue
        a, b = module.lora_A[name], module.lora_B[name]
        x = module.lora_dropout[name](h if index is None else h.index_select(0, index))
        delta = b(a(x.to(a.weight.dtype))) * module.scaling[name]
        out = out + delta if index is None else out.index_add(0, index, delta.to(out.dtype))
    return out


def split_by_adapter(items: Sequence[Any], adapter_of: Any) -> dict[str, list[int]]:
    """Indices of ``items`` per adapter (``adapter_of(item)``), adapters in first-seen order."""
    parts: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        parts.setdefault(adapter_of(item), []).append(i)
    return parts


@contextlib.contextmanager
def routed(model: Any, names_for_batch: Any) -> Iterator[None]:
    """Inside, every LoRA layer of ``model`` runs peft's mixed-batch forward with
    ``adapter_names = names_for_batch(batch_size)``: how HF-forward paths (the scorer, the
    engine's fallback) pick adapters without ``set_adapter``, which would change which adapter
    is trainable. Only forwards on the calling thread are routed: the engine's worker may run
    the same modules meanwhile. peft refuses this in training mode; our models stay in eval."""
    owner = threading.get_ident()

    def hook(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if threading.get_ident() == owner:
            kwargs["adapter_names"] = names_for_batch(args[0].shape[0])
        return args, kwargs

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in lora_layers(model)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def use_adapter(model: Any, name: str) -> Any:
    """Context in which every row of every forward uses adapter ``name`` (a no-op for
    ``"default"``, the active adapter)."""
    if name == DEFAULT:
        return contextlib.nullcontext()
    check_adapter(model, name)
    return routed(model, lambda batch: [name] * batch)
