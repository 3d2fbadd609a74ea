"""KV storage: a batch cache that grows in chunks, and a prompt-prefix cache across batches.

transformers' ``DynamicLayer`` appends with ``torch.cat``, which copies every layer's cache on
every decode step (for a 32-row batch of SmolLM2 that is ~150 MB per token). ``GrowingLayer``
keeps spare capacity and writes new keys/values in place; ``keys``/``values`` stay plain
attributes from the outside (views of the used part), so cache surgery written against
``DynamicLayer`` (select rows, pad, concatenate batches) keeps working unchanged.

``PrefixCache`` keeps the KV of prompt blocks after their batch is gone, so a later request
whose prompt starts with them (the next sample of a group, another question on the same
schema) prefills only the rest.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from typing import NamedTuple

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


Past = tuple[int, list[torch.Tensor], list[torch.Tensor]]
"""A prompt prefix's KV: (tokens, per-layer keys, per-layer values), each (Hkv, tokens, D)."""


def empty_past() -> Past:
    return 0, [], []


def truncate(past: Past, length: int) -> Past:
    """The first ``length`` tokens of ``past`` (views, no copy)."""
    n, keys, values = past
    if length >= n:
        return past
    return length, [k[:, :length] for k in keys], [v[:, :length] for v in values]


class _Block(NamedTuple):
    id: int
    keys: list[torch.Tensor]  # per layer (Hkv, block_size, D)
    values: list[torch.Tensor]


class PrefixCache:
    """Prompt KV kept across batches in fixed-size token blocks, evicted least recently used.

    vLLM's automatic prefix caching on this engine's cache. A block holds every layer's
    keys/values for ``block_size`` prompt tokens and is keyed by (its parent block's id, its own
    tokens): exact (no hash can collide) and O(block) to look up. Ids are never reused, so the
    children of an evicted block become unreachable and leave by LRU in turn. Keys carry rotary
    at absolute positions, which is right for any prompt because every prompt starts at position
    0. Lookups and stores touch a prompt's blocks deepest first, so the roots many prompts share
    are evicted last. ``validate`` guards against stale KV: a changed weight (optimizer step,
    adapter load) empties the cache.
    """

    def __init__(self, block_size: int, max_tokens: int):
        if block_size < 1 or max_tokens < 0:
            raise ValueError(f"prefix cache needs block_size >= 1 and max_tokens >= 0, "
                             f"got {block_size} and {max_tokens}")
        self.block_size, self.max_tokens = block_size, max_tokens
        self.blocks: OrderedDict[tuple[int, tuple[int, ...]], _Block] = OrderedDict()
        self._ids = itertools.count(1)  # 0 is the root: the parent of every first block
        self.version: object = None
        self.evicted = 0
        """Blocks dropped to stay within ``max_tokens`` (not counting a weight-change reset)."""

    @property
    def tokens(self) -> int:
        return len(self.blocks) * self.block_size

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for b in self.blocks.values()
                   for t in b.keys + b.values)

    def validate(self, version: object) -> None:
        """Empty the cache when the weights it was computed with changed."""
        if version != self.version:
            self.clear()
            self.version = version

    def clear(self) -> None:
        self.blocks.clear()

    def _chain(self, prompt: list[int], limit: int) -> list[tuple[int, tuple[int, ...]]]:
        """Keys of the cached blocks that ``prompt[:limit]`` starts with, root first."""
        parent, chain = 0, []
        for end in range(self.block_size, limit + 1, self.block_size):
            key = (parent, tuple(prompt[end - self.block_size : end]))
            block = self.blocks.get(key)
            if block is None:
                break
            chain.append(key)
            parent = block.id
        return chain

    def _touch(self, chain: list[tuple[int, tuple[int, ...]]]) -> None:
        for key in reversed(chain):  # deepest first: the root ends up most recently used
            self.blocks.move_to_end(key)

    def lookup(self, prompt: list[int]) -> Past:
        """The longest cached block prefix of ``prompt`` that leaves at least one token to compute
        (the prefill must produce the last token's logits)."""
        chain = self._chain(prompt, len(prompt) - 1)
        if not chain:
            return empty_past()
        self._touch(chain)
        found = [self.blocks[key] for key in chain]
        layers = range(len(found[0].keys))
        keys = [torch.cat([b.keys[i] for b in found], dim=1) for i in layers]
        values = [torch.cat([b.values[i] for b in found], dim=1) for i in layers]
        return len(found) * self.block_size, keys, values

    def missing_from(self, prompt: list[int]) -> int:
        """Start of the first full block of ``prompt`` that is not cached."""
        return len(self._chain(prompt, len(prompt))) * self.block_size

    def store(self, prompt: list[int], start: int, keys: list[torch.Tensor],
              values: list[torch.Tensor]) -> None:
        """Add the full blocks of ``prompt`` from ``start`` (a block boundary, all blocks before
        it cached); ``keys``/``values`` are per layer (Hkv, len(prompt) - start, D). Then evict
        down to ``max_tokens``."""
        size = self.block_size
        chain = self._chain(prompt, start)
        if self.max_tokens < size or len(chain) * size != start:
            return
        parent = self.blocks[chain[-1]].id if chain else 0
        for end in range(start + size, len(prompt) + 1, size):
            key = (parent, tuple(prompt[end - size : end]))
            block = self.blocks.get(key)
            if block is None:
                a, b = end - size - start, end - start
                block = _Block(next(self._ids), [k[:, a:b].clone() for k in keys],
                               [v[:, a:b].clone() for v in values])
                self.blocks[key] = block
            chain.append(key)
            parent = block.id
        self._touch(chain)
        self._evict()

    def _evict(self) -> None:
        while self.tokens > self.max_tokens:
            self.blocks.popitem(last=False)
            self.evicted += 1
