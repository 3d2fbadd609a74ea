"""A KV cache that grows in chunks instead of re-concatenating the whole cache every token.

transformers' ``DynamicLayer`` appends with ``torch.cat``, which copies every layer's cache on
every decode step (for a 32-row batch of SmolLM2 that is ~150 MB per token). ``GrowingLayer``
keeps spare capacity and writes new keys/values in place; ``keys``/``values`` stay plain
attributes from the outside (views of the used part), so cache surgery written against
``DynamicLayer`` (select rows, pad, concatenate batches) keeps working unchanged.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

CHUNK = 64
"""Extra columns reserved on each reallocation: one copy per CHUNK decode steps instead of each."""


class GrowingLayer(DynamicLayer):
    """``DynamicLayer`` with amortised in-place appends. Tensors are (B, H, L, D)."""

    def __init__(self) -> None:
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self.length = 0
        super().__init__()

    @property
    def keys(self) -> torch.Tensor | None:
        return None if self._k is None else self._k[:, :, : self.length]

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        self._k = value
        self.length = 0 if value is None or value.dim() < 3 else value.shape[2]

    @property
    def values(self) -> torch.Tensor | None:
        return None if self._v is None else self._v[:, :, : self.length]

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        self._v = value  # set together with keys, which owns ``length``

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.device = key_states.device
            self.is_initialized = True
        new = key_states.shape[2]
        if self._k is None or self._k.dim() < 3 or self._k.shape[2] < self.length + new:
            self._grow(key_states, value_states, self.length + new + CHUNK)
        end = self.length + new
        self._k[:, :, self.length : end] = key_states
        self._v[:, :, self.length : end] = value_states
        self.length = end
        return self.keys, self.values

    def _grow(self, key_states: torch.Tensor, value_states: torch.Tensor, capacity: int) -> None:
        b, h, _, d = key_states.shape
        k = key_states.new_empty(b, h, capacity, d)
        v = value_states.new_empty(b, h, capacity, value_states.shape[3])
        if self.length:
            k[:, :, : self.length] = self._k[:, :, : self.length]
            v[:, :, : self.length] = self._v[:, :, : self.length]
        self._k, self._v = k, v

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0


def growing_cache() -> DynamicCache:
    """An empty DynamicCache whose layers are GrowingLayers (created lazily, one per layer)."""
    cache = DynamicCache()
    cache.layer_class_to_replicate = GrowingLayer
    return cache
