"""Small facts about PEFT-wrapped models, in one place (loading, sampling, scoring, training)."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["base_model", "decoder_layers", "has_adapter", "lora_flag", "set_weights"]

_LORA_FLAGS = {"auto": None, "on": True, "off": False}


def base_model(model: Any) -> Any:
    """The transformers model under a PEFT wrapper (the model itself when unwrapped)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(module: Any) -> list[torch.nn.Module]:
    """The transformer blocks inside ``module`` (transformers' ``GradientCheckpointingLayer``s:
    a Llama's ``LlamaDecoderLayer``s), in order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in module.modules() if isinstance(m, GradientCheckpointingLayer)]


def has_adapter(model: Any) -> bool:
    """True when the model carries a PEFT adapter that can be switched off (the reference)."""
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def set_weights(model: Any, weights: dict[str, torch.Tensor]) -> None:
    """Copy ``weights`` (parameter name -> tensor, e.g. an adapter's) into ``model`` in place."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, w in weights.items():
            params[name].copy_(w)


def lora_flag(value: str) -> bool | None:
    """The CLI's ``--lora auto|on|off`` as ``models.load(lora=...)``: None lets the model decide."""
    if value not in _LORA_FLAGS:
        raise ValueError(f"--lora must be one of {', '.join(_LORA_FLAGS)}, got {value!r}")
    return _LORA_FLAGS[value]
