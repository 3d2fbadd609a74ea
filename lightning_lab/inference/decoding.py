"""A running batch of generations sharing one KV cache: prefill, admit, step, retire.

Why not ``model.generate``: it keeps finished rows in the batch until the slowest one ends, cannot
take new prompts mid-flight, and recomputes a prompt for each of its n samples. Here a prompt is
prefilled once and its cache row repeated n times; a prefix shared by all prompts admitted together
(system prompt, few-shot examples) is prefilled once for all of them; finished rows leave the batch
at once; new prompts are prefilled separately and spliced into the running cache (continuous
batching).

With a ``PrefixCache`` the prompt KV also outlives its batch: a later prompt starting with
cached blocks (the next sample of a group that arrived late, another question on the same
schema, a longer prompt extending this one) prefills only its own tokens.

Rows are padded on the left (or between a shared prefix and their own suffix). Every forward gets
explicit position ids that count real tokens only (``cumsum(mask) - 1``), so a row's logits do not
depend on its padding, which is what lets the trainer recompute the same logprobs from the
unpadded sequence.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from lightning_lab.inference.fast_llama import FastLlama, supports
from lightning_lab.inference.kvcache import Past, PrefixCache, empty_past, growing_cache, truncate
from lightning_lab.inference.multi_lora import DEFAULT, RowAdapters, routed, split_by_adapter
from lightning_lab.inference.sampling import SamplingParams, choose_tokens, top_logprobs
from lightning_lab.inference.prompts import dedupe_prompts


@dataclass
class Row:
    """One sample being generated; ``owner`` is whatever the caller uses to collect results."""

    prompt_ids: list[int]
    params: SamplingParams
    owner: Any
    index: int
    """Which of the owner's n samples this is."""
    generator: torch.Generator | None = None
    response_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    constraint: Any = None
    """A ``constraints.Constraint`` when the request has a grammar: it masks every choice."""
    constraint_error: str = ""
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    """Per response token, the ``params.top_logprobs`` most likely (token, logprob), best
    first; empty when not asked for."""
    listener: Callable[["Row"], None] | None = None
    """Called on the decode thread after each sampled token (token streaming); must not block."""
    adapter: str = DEFAULT
    """The LoRA adapter this row samples with (``multi_lora``)."""


MIN_SHARED_PREFIX = 8
"""Shortest common prompt prefix worth a separate prefill (below it, the extra call costs more)."""


def _shared_prefix(prompts: list[list[int]]) -> int:
    """Length of the common prefix of all prompts, leaving each at least one token of its own."""
    if len(prompts) < 2:
        return 0
    first, n = prompts[0], min(len(p) for p in prompts) - 1
    for i in range(n):
        token = first[i]
        if any(p[i] != token for p in prompts):
            n = i
            break
    return n if n >= MIN_SHARED_PREFIX else 0


class DecodeBatch:
    """Rows decoding together. ``admit`` adds prompts, ``step`` decodes one token for every row.

    Both return the rows that finished; they are removed from the batch.
    """

    def __init__(
        self,
        model: Any,
        decode: Callable[[list[int]], str],
        stop_token_ids: set[int],
        fast: bool = True,
        dtype: torch.dtype = torch.float32,
        prefix_cache: PrefixCache | None = None,
        stats: "PrefillStats | None" = None,
        adapter_caches: Callable[[str], PrefixCache | None] | None = None,
    ):
        self.model = model
        self.adapter_caches = adapter_caches
        """An adapter's own prefix cache (its KV differs from another adapter's); None: none."""
        self._prefill_adapter: str | None = None  # set while one adapter's prompts prefill
        self.prefix_cache = prefix_cache
        """Prompt KV kept across batches (owned by the engine, outlives this batch)."""
        self.stats = stats if stats is not None else PrefillStats()
        self.fast = FastLlama(model, dtype) if fast and supports(model) else None
        self.decode = decode
        self.stop_token_ids = stop_token_ids
        self.device = next(model.parameters()).device
        self.rows: list[Row] = []
        self.cache: DynamicCache | None = None
        # On the model's device: a decode step then never waits on a host copy. The per-row
        # sampling knobs stay on the host, where choose_tokens reads its "any greedy/top-p" flags.
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)  # (B, L) cache columns
        self.next_token = torch.zeros(0, dtype=torch.long, device=self.device)  # (B,) not yet cached
        self.temperature = torch.zeros(0)  # (B,) host
        self.top_p = torch.zeros(0)  # (B,) host

    def __len__(self) -> int:
        return len(self.rows)

    def _forward(self, input_ids, mask, positions, cache) -> torch.Tensor:
        """Last-position logits (B, V) in float32 on the model's device, via the lean Llama path
        when available (sampling happens there too: no (B, V) copy to the host per token)."""
        names = ([self._prefill_adapter] * len(input_ids) if self._prefill_adapter is not None
                 else [r.adapter for r in self.rows])
        adapters = RowAdapters.of(names, self.device)
        if self.fast is not None:
            return self.fast.forward(
                input_ids.to(self.device), positions.to(self.device), mask.to(self.device), cache,
                adapters,
            )
        with routed(self.model, lambda _: list(names)) if adapters else contextlib.nullcontext():
            return self._hf_forward(input_ids, mask, positions, cache)

    def _hf_forward(self, input_ids, mask, positions, cache) -> torch.Tensor:
        out = self.model(
            input_ids=input_ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device),
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1, :].float()  # (B, V)

    def admit(self, groups: list[list[Row]]) -> list[Row]:
        """Prefill each group's (shared) prompt once, sample the first tokens, join the batch.

        A group is the n rows of one prompt. Raises if the forward fails (e.g. a bad token id);
        the caller then retries groups one at a time to isolate the culprit. Groups of different
        adapters prefill separately (their prompt KV differs) and then decode together.
        """
        parts = split_by_adapter(groups, lambda g: g[0].adapter)
        if len(parts) > 1:
            return [row for idx in parts.values() for row in self.admit([groups[i] for i in idx])]
        adapter, shared = groups[0][0].adapter, self.prefix_cache
        if adapter != DEFAULT:  # its own prompt KV: its own prefix cache, or none
            self.prefix_cache = self.adapter_caches(adapter) if self.adapter_caches else None
        self._prefill_adapter = adapter
        try:
            return self._admit(groups)
        finally:
            self.prefix_cache, self._prefill_adapter = shared, None

    def _admit(self, groups: list[list[Row]]) -> list[Row]:
        """``admit`` for groups of one adapter."""
        # Requests with the same prompt (a GRPO group sampled by separate agent threads arrives as
        # separate requests) are prefilled once and their KV copied, like the n rows of one request.
        unique, of_group = dedupe_prompts([g[0].prompt_ids for g in groups])
        prompts = [list(p) for p in unique]
        with torch.inference_mode():
            if self.prefix_cache is not None:
                self.prefix_cache.validate(weights_version(self.model))
            cache, mask, logits = self._prefill(prompts, self._pasts(prompts))
            self._remember(prompts, cache, mask)
            expand = torch.tensor([of_group[i] for i, g in enumerate(groups) for _ in g])  # (R,)
            if not torch.equal(expand, torch.arange(len(prompts))):
                expand = expand.to(self.device)
                cache.batch_select_indices(expand)
                logits, mask = logits[expand], mask[expand]
        rows = [r for g in groups for r in g]
        self.stats.prompt_tokens += sum(len(r.prompt_ids) for r in rows)
        self._merge(rows, cache, mask)
        return self._sample(logits, first=len(self.rows) - len(rows))

    def _pasts(self, prompts: list[list[int]]) -> list[Past]:
        """Each prompt's KV that need not be computed: its longest prefix in the prefix cache, or
        the prefix all prompts share (e.g. a system prompt or schema), computed here once."""
        cached = self.prefix_cache
        hits = [cached.lookup(p) if cached is not None else empty_past() for p in prompts]
        shared = _shared_prefix(prompts)
        best = max(hits, key=lambda h: h[0])
        base = min(best[0], shared)  # the part of the shared prefix some prompt already holds
        needy = sum(h[0] < shared for h in hits)
        if shared - base < MIN_SHARED_PREFIX or needy < 2:
            return hits
        common = self._extend(prompts[0][:shared], truncate(best, base))
        if cached is not None:
            cached.store(prompts[0][:shared], 0, common[1], common[2])
        return [h if h[0] >= shared else common for h in hits]

    def _extend(self, tokens: list[int], past: Past) -> Past:
        """The KV of ``tokens`` (one prompt prefix), computing only what ``past`` lacks."""
        cache, _, _ = self._prefill([tokens], [past])
        return len(tokens), [layer.keys[0] for layer in cache.layers], [
            layer.values[0] for layer in cache.layers]

    def _prefill(self, prompts: list[list[int]], pasts: list[Past]
                 ) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
        """Run each prompt's tokens after its past: (cache, mask (U, L), last logits (U, V)).

        Pasts are right-aligned in the first columns and suffixes left-padded after them, so
        padding sits between a row's past and its own tokens; the mask hides it, positions skip it.
        """
        held = [past[0] for past in pasts]
        cache = growing_cache()
        if max(held):
            _load_pasts(cache, pasts, max(held))
        suffixes = [p[n:] for p, n in zip(prompts, held)]
        self.stats.computed_tokens += sum(len(p) for p in suffixes)
        width = max(len(p) for p in suffixes)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in suffixes])  # (U, W)
        new = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in suffixes])  # (U, W)
        old = torch.tensor([[0] * (max(held) - n) + [1] * n for n in held], dtype=torch.long)
        positions = torch.tensor(held)[:, None] + (new.cumsum(-1) - 1).clamp(min=0)  # (U, W)
        mask = torch.cat([old, new], dim=1).to(self.device)
        return cache, mask, self._forward(ids, mask, positions, cache)

    def _remember(self, prompts: list[list[int]], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Copy the prompts' newly computed full blocks into the prefix cache."""
        if self.prefix_cache is None:
            return
        for row, prompt in enumerate(prompts):
            start = self.prefix_cache.missing_from(prompt)
            if start + self.prefix_cache.block_size > len(prompt):
                continue
            columns = mask[row].nonzero()[start:, 0]  # the prompt's real tokens from ``start``
            keys = [layer.keys[row][:, columns] for layer in cache.layers]
            values = [layer.values[row][:, columns] for layer in cache.layers]
            self.prefix_cache.store(prompt, start, keys, values)

    def step(self) -> list[Row]:
        """Feed every row its pending token and sample the next one."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        positions = self.mask.sum(-1, keepdim=True) - 1  # (B, 1)
        with torch.inference_mode():
            logits = self._forward(self.next_token[:, None], self.mask, positions, self.cache)
        return self._sample(logits, first=0)

    def drop(self, predicate: Callable[[Row], bool]) -> list[Row]:
        """Remove (and return) rows matching ``predicate``, e.g. those of abandoned requests."""
        return self._retire([i for i, row in enumerate(self.rows) if predicate(row)])

    def _sample(self, logits: torch.Tensor, first: int) -> list[Row]:
        """Choose tokens for rows ``first:`` from their logits (R, V), then retire finished rows."""
        rows = self.rows[first:]
        with torch.inference_mode():
            tokens, logprobs = choose_tokens(
                logits, self.temperature[first:], self.top_p[first:], [r.generator for r in rows],
                self._allowed(rows, logits.shape[1]),
            )
        self.next_token[first:] = tokens
        # The one device->host copy of a step: (2, R) numbers the stop checks need (float64 holds
        # every token id exactly).
        host = torch.stack([tokens.double(), logprobs.double()]).cpu()
        token_list, logprob_list = host[0].long().tolist(), host[1].tolist()
        tops = self._top_logprobs(rows, logits, first)
        done = []
        for i, (row, token, logprob) in enumerate(zip(rows, token_list, logprob_list)):
            row.response_ids.append(token)
            row.logprobs.append(logprob)
            if row.params.top_logprobs:
                row.top_logprobs.append(tops[i][:row.params.top_logprobs])
            if row.constraint is not None and not row.constraint.advance(token):
                # llguidance gave up mid-way (a sound mask never offers a rejected token): end
                # the row rather than go off-grammar, and say so instead of a quiet "stop"
                row.constraint_error = row.constraint.error or "token rejected by the grammar"
                row.text, row.finish_reason = self.decode(row.response_ids), "error"
                finished = True
            else:
                finished = self._finished(row, token)
            if row.listener is not None:
                try:
                    row.listener(row)
                except Exception:  # noqa: BLE001 - a broken listener must not fail the batch
                    row.listener = None
            if finished:
                done.append(first + i)
        return self._retire(done)

    def _top_logprobs(self, rows: list[Row], logits: torch.Tensor, first: int
                      ) -> list[list[tuple[int, float]]]:
        """Each row's most likely (token, logprob) pairs, as many as the batch's largest ask;
        nothing (no extra work) when no row asks."""
        k = max(r.params.top_logprobs for r in rows)
        if not k:
            return []
        with torch.inference_mode():
            values, ids = top_logprobs(logits, self.temperature[first:], k)
        return [list(zip(i, v)) for i, v in zip(ids.cpu().tolist(), values.cpu().tolist())]

    def _allowed(self, rows: list[Row], vocab: int) -> torch.Tensor | None:
        """(R, V) grammar masks, or None when no row is constrained (the common case)."""
        if all(r.constraint is None for r in rows):
            return None
        allowed = torch.ones(len(rows), vocab, dtype=torch.bool)
        for i, row in enumerate(rows):
            if row.constraint is not None:
                mask = row.constraint.allowed()[:vocab]
                if bool(mask.any()):  # an empty mask (dead grammar) would make NaNs: leave free
                    allowed[i, : len(mask)] = mask
                    allowed[i, len(mask):] = False
        return allowed

    def _finished(self, row: Row, token: int) -> bool:
        """Update the row's text and finish reason; True if it is done."""
        if token in self.stop_token_ids:
            row.text, row.finish_reason = self.decode(row.response_ids[:-1]), "stop"
            return True
        if row.params.stop:
            text = self.decode(row.response_ids)
            hits = [i for i in (text.find(s) for s in row.params.stop) if i >= 0]
            if hits:  # checked every token, so this is the shortest prefix containing a stop string
                row.text, row.finish_reason = text[: min(hits)], "stop"
                return True
        if len(row.response_ids) >= row.params.max_new_tokens:
            row.text, row.finish_reason = self.decode(row.response_ids), "length"
            return True
        return False

    def _merge(self, rows: list[Row], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Append rows with their own cache; left-pad whichever cache is shorter."""
        self.rows.extend(rows)
        extra = {
            "temperature": torch.tensor([r.params.temperature for r in rows], dtype=torch.float),
            "top_p": torch.tensor([r.params.top_p for r in rows], dtype=torch.float),
            "next_token": torch.zeros(len(rows), dtype=torch.long, device=self.device),
        }
        for name, value in extra.items():
            setattr(self, name, torch.cat([getattr(self, name), value]))
        if self.cache is None:
            self.cache, self.mask = cache, mask
            return
        old_len, new_len = self.mask.shape[1], mask.shape[1]
        width = max(old_len, new_len)
        self.mask = torch.cat(
            [F.pad(self.mask, (width - old_len, 0)), F.pad(mask, (width - new_len, 0))]
        )
        for old, new in zip(self.cache.layers, cache.layers):
            merged = [
                torch.cat([F.pad(a, (0, 0, width - old_len, 0)), F.pad(b, (0, 0, width - new_len, 0))])
                for a, b in ((old.keys, new.keys), (old.values, new.values))  # (B, H, L, D) each
            ]
            old.keys, old.values = merged

    def _retire(self, done: list[int]) -> list[Row]:
        """Drop finished rows so they stop costing compute; trim columns that are padding for all."""
        if not done:
            return []
        finished = [self.rows[i] for i in done]
        gone = set(done)
        keep = [i for i in range(len(self.rows)) if i not in gone]
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = None
            self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)
            self.next_token = torch.zeros(0, dtype=torch.long, device=self.device)
            self.temperature, self.top_p = torch.zeros(0), torch.zeros(0)
            return finished
        index = torch.tensor(keep)
        on_device = index.to(self.device)
        self.mask, self.next_token = self.mask[on_device], self.next_token[on_device]
        self.temperature, self.top_p = self.temperature[index], self.top_p[index]
        self.cache.batch_select_indices(on_device)
        start = int(self.mask.any(0).long().argmax())  # first column some row still attends to
        if start > 0:
            self.mask = self.mask[:, start:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]
        return finished


def _load_pasts(cache: DynamicCache, pasts: list[Past], width: int) -> None:
    """Fill an empty cache with each row's past, right-aligned in ``width`` columns."""
    layers = next(len(keys) for n, keys, _ in pasts if n)
    for i in range(layers):
        like = next(keys[i] for n, keys, _ in pasts if n)  # (Hkv, n, D)
        k = like.new_zeros(len(pasts), like.shape[0], width, like.shape[2])
        v = torch.zeros_like(k)
        for row, (n, keys, values) in enumerate(pasts):
            if n:
                k[row, :, width - n :] = keys[i]
                v[row, :, width - n :] = values[i]
        cache.update(k, v, i)


def weights_version(model: Any) -> tuple[tuple[int, int], ...]:
    """Changes whenever a parameter is replaced or changed in place (optimizer step, loaded
    adapter): cached KV computed before then is stale."""
    return tuple((id(p), p._version) for p in model.parameters())


@dataclass
class PrefillStats:
    """Prompt tokens of admitted rows vs those run through a forward (the rest were reused: the
    n rows of a prompt, identical prompts, a shared prefix, prefix-cache hits)."""

    prompt_tokens: int = 0
    computed_tokens: int = 0

    def hit_rate(self, since: "PrefillStats | None" = None) -> float:
        """Share of prompt tokens not recomputed (since the ``since`` snapshot); 0 with none."""
        total = self.prompt_tokens - (since.prompt_tokens if since else 0)
        computed = self.computed_tokens - (since.computed_tokens if since else 0)
        return (total - computed) / total if total else 0.0
