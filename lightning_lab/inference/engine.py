"""Thread-safe request batcher in front of a continuously batched decode loop.

Agents run in many threads and each calls the policy one request at a time; alone, each request
would decode at batch size 1. The engine queues requests from all threads and one daemon worker
decodes them together: an idle worker waits a few ms for more arrivals, and a busy worker splices
newly arrived requests into the running batch between decode steps (continuous batching).
The API is ``submit(Request) -> Future[list[Sample]]`` so the HTTP proxy can sit on it too.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch

from lightning_lab.inference.decoding import DecodeBatch, PrefillStats, Row
from lightning_lab.inference.kvcache import PrefixCache
from lightning_lab.inference.multi_lora import DEFAULT, check_adapter
from lightning_lab.inference.precision import resolve_dtype
from lightning_lab.inference.sampling import SamplingParams


@dataclass
class Request:
    """One prompt (already tokenised) to sample ``n`` completions for."""

    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    n: int = 1
    aborted: bool = False
    """Set (from any thread) to stop generating: the rows leave the batch at the next step."""
    on_token: Callable[[Row], None] | None = None
    """Token streaming: called on the engine thread with each row after each sampled token
    (``row.index``, ``row.response_ids[-1]``, ``row.logprobs[-1]``, ``row.top_logprobs``);
    must return at once."""
    adapter: str = DEFAULT
    """The LoRA adapter to sample with (``multi_lora``); rows of any adapters share a batch."""


@dataclass
class Sample:
    """One completion. ``response_ids`` includes a stop token if one ended it; ``text`` never does."""

    response_ids: list[int]
    logprobs: list[float]
    """``log_softmax(logits / T)`` of each response token (T=1 for greedy)."""
    finish_reason: str
    """``"stop"`` (stop token or stop string), ``"length"`` (max_new_tokens or context full) or
    ``"error"`` (the grammar failed mid-way: ``constraint_error`` says why)."""
    text: str
    constrained: bool = False
    """Chosen under a grammar mask (logprobs are still the unmasked policy's)."""
    constraint_error: str = ""
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    """Per response token, the most likely (token, logprob) pairs when the request asked
    (``SamplingParams.top_logprobs``)."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Facts about the sampler copied into the transition's meta: the LoRA ``adapter`` that
    sampled it (the trainer trains that one), a vLLM server's ``adapter_version``."""


@dataclass
class EngineConfig:
    """Batching knobs; the defaults suit a 135M model on 2 CPU cores."""

    max_batch_rows: int = 64
    """Rows (samples) decoded together; more requests wait in the queue."""
    max_wait_s: float = 0.005
    """An idle worker keeps collecting while requests arrive at most this far apart..."""
    max_gather_s: float = 0.05
    """...but starts decoding after this long regardless."""
    fast_path: bool = True
    """Use the lean Llama forward (``fast_llama``) when the model supports it; else HF's forward."""
    decode_dtype: str = "float32"
    """Dtype of the lean forward's matmuls: ``"float32"``, ``"bfloat16"``, or ``"auto"`` (bf16 on
    a CPU with native bf16, see ``precision``). Recorded logprobs are those of this forward; the
    trainer's fp32 forward differs from bf16 ones by ~1e-2 (``behaviour_logprob_err``)."""
    num_threads: int | None = None
    """Intra-op threads of the decode worker; None = torch's setting. torch's thread count is
    per Python thread, so this sets the sampling phase's threads and leaves the update's alone
    (decode matmuls of a small model are too small to split well across cores)."""
    rows_per_thread: int | None = None
    """Grow the decode worker's threads with its batch: one thread per this many rows, at least
    ``num_threads`` and at most the threads of the process that built the engine. None (the
    default) keeps ``num_threads`` for every batch. Why: a train step's ~8-row batches decode
    fastest on one thread, while a 32-row decode can split over two cores; but on a machine whose
    other core is busy a 2-thread decode stalls on its OpenMP peer, so this stays opt-in."""
    prefix_cache: bool = True
    """Keep prompt KV across batches (``kvcache.PrefixCache``): a prompt starting with cached
    blocks prefills only the rest. False still shares a prompt among its n rows, identical
    prompts and the prefix of prompts admitted together, but nothing across batches."""
    prefix_block_tokens: int = 16
    """Tokens per cached block: a hit covers whole blocks, so up to this many - 1 shared tokens
    are recomputed; smaller blocks cost more lookups and copies."""
    prefix_cache_tokens: int = 4096
    """Memory bound of the prefix cache in prompt tokens, least recently used blocks evicted
    first. A token costs ``2 x layers x kv_heads x head_dim x 4`` bytes (fp32 KV): 46 KB for
    SmolLM2-135M, so the default holds ~190 MB (six ~600-token schemas, or so)."""


class _Pending:
    """The rows of one request, resolved as a whole when the last of them finishes."""

    def __init__(self, request: Request, future: Future):
        self.request, self.future = request, future
        self.samples: list[Sample | None] = [None] * request.n
        self.remaining = request.n

    def rows(self, constraint: Any = None) -> list[Row]:
        """The request's rows; ``constraint()`` makes each row's grammar state when it has one."""
        seed = self.request.params.seed
        grammar = self.request.params.grammar
        return [
            Row(
                prompt_ids=self.request.prompt_ids,
                params=self.request.params,
                owner=self,
                index=j,
                generator=None if seed is None else torch.Generator().manual_seed(seed + 7919 * j),
                constraint=constraint(grammar) if grammar and constraint else None,
                listener=self.request.on_token,
                adapter=self.request.adapter,
            )
            for j in range(self.request.n)
        ]

    def finish(self, row: Row) -> None:
        self.samples[row.index] = Sample(
            row.response_ids, row.logprobs, row.finish_reason or "length", row.text,
            constrained=row.constraint is not None, constraint_error=row.constraint_error,
            top_logprobs=row.top_logprobs, meta={"adapter": self.request.adapter},
        )
        self.remaining -= 1
        if self.remaining == 0 and not self.future.done():
            self.future.set_result(self.samples)


class Engine:
    """Owns the decode worker for one model. ``lock`` is held during every forward pass."""

    def __init__(self, model: Any, tokenizer: Any, config: EngineConfig | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.config = config or EngineConfig()
        self.lock = threading.RLock()
        self.stop_token_ids = _stop_token_ids(model, tokenizer)
        self.vocab_size = model.get_input_embeddings().weight.shape[0]
        device = next(model.parameters()).device.type
        self.decode_dtype = resolve_dtype(self.config.decode_dtype, device)
        self.max_positions = getattr(model.config, "max_position_embeddings", None) or 1 << 30
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self.max_threads = torch.get_num_threads()
        """Ceiling for ``rows_per_thread`` (torch's threads in the thread that built the engine)."""
        self._worker: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.active_rows = 0
        """Rows in the running batch after the worker's last iteration (0 when idle)."""
        self.aborted_rows = 0
        """Rows that left the batch early because their request was aborted (client gone, timeout)."""
        self.snapshot: Any = None
        """A ``WeightSnapshot`` the worker decodes instead of the live model (None: the live one)."""
        self.prefix_cache = (
            PrefixCache(self.config.prefix_block_tokens, self.config.prefix_cache_tokens)
            if self.config.prefix_cache else None)
        self.prefill_stats = PrefillStats()
        """Prompt tokens admitted vs computed, since the engine was built."""
        self._stats_seen = PrefillStats()
        self.adapter_caches: dict[str, PrefixCache] = {}
        """Prefix caches of the adapters other than ``"default"`` (whose is ``prefix_cache``):
        an adapter's prompt KV is its own. Each has the same token bound."""

    def submit(self, request: Request) -> Future:
        """Queue a request; the future resolves to its n Samples or to the request's own error."""
        future: Future = Future()
        try:
            self._check(request)
        except Exception as error:  # a bad request fails alone, before it reaches the batch
            future.set_exception(error)
            return future
        self._ensure_worker()
        self._queue.put(_Pending(request, future))
        return future

    def generate(self, requests: list[Request]) -> list[list[Sample]]:
        """Submit all, wait for all; raises the first request error."""
        futures = [self.submit(r) for r in requests]
        return [f.result() for f in futures]

    def snapshot_weights(self, version: int) -> None:
        """Decode from a private copy of the trainable weights as they are now (``version``'s),
        until the next call: asynchronous rollouts then never read weights the optimizer is
        writing (``inference/snapshot.py``). Call it at a version boundary, between updates."""
        from lightning_lab.inference.snapshot import WeightSnapshot

        with self.lock:  # held by every forward: no decode step sees a half-copied snapshot
            if self.snapshot is None:
                self.snapshot = WeightSnapshot(self.model)
            self.snapshot.refresh(version)

    def take_prefix_hit_rate(self) -> float:
        """Share of prompt tokens not recomputed since the last call (a train step's rollouts)."""
        rate = self.prefill_stats.hit_rate(since=self._stats_seen)
        self._stats_seen = replace(self.prefill_stats)
        return rate

    def close(self, timeout: float | None = 5.0) -> None:
        """Stop the worker after the requests it already holds; later submits restart it."""
        with self._start_lock:
            worker, self._worker = self._worker, None
            if worker is not None:
                self._queue.put(None)
        if worker is not None:
            worker.join(timeout)

    def _check(self, request: Request) -> None:
        request.params.validate()
        check_adapter(self.model, request.adapter)
        if request.n < 1:
            raise ValueError(f"n must be >= 1, got {request.n}")
        if not request.prompt_ids:
            raise ValueError("empty prompt")
        bad = [t for t in request.prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token ids outside the vocabulary (size {self.vocab_size}): {bad[:5]}")
        room = self.max_positions - len(request.prompt_ids)
        if room < 1:
            raise ValueError(f"prompt of {len(request.prompt_ids)} tokens fills the context")
        if request.params.max_new_tokens > room:  # "length" then means the context is full
            request.params = replace(request.params, max_new_tokens=room)

    def _ensure_worker(self) -> None:
        with self._start_lock:
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._run, name="ll-engine", daemon=True)
                self._worker.start()

    # ---- worker thread -------------------------------------------------------------------

    def _run(self) -> None:
        if self.config.num_threads:
            torch.set_num_threads(self.config.num_threads)  # this thread only
        with torch.inference_mode():
            self._loop()

    def threads_for(self, rows: int) -> int | None:
        """Decode threads for a batch of ``rows`` (None: leave torch's setting alone)."""
        per = self.config.rows_per_thread
        if not per:
            return self.config.num_threads
        return min(self.max_threads, max(self.config.num_threads or 1, rows // per))

    def _loop(self) -> None:
        batch = self._new_batch()
        waiting: list[_Pending] = []
        stopping = False
        while not (stopping and not waiting and not len(batch)):
            self.active_rows = len(batch)
            stopping |= self._collect(waiting, block=not len(batch) and not waiting)
            try:
                self.aborted_rows += self._drop_aborted(batch)
                batch = self._current(batch)
                if batch.model is self._decoder():  # else: rows of the old model finish first
                    self._admit(batch, waiting)
                if len(batch):
                    threads = self.threads_for(len(batch))
                    if threads and threads != torch.get_num_threads():  # this thread only
                        torch.set_num_threads(threads)
                    with self.lock:
                        self._resolve(batch.step())
            except Exception as error:  # never die: fail what was in flight, keep serving
                for row in batch.rows:
                    _fail(row.owner.future, error)
                batch = self._new_batch()
        self.active_rows = 0

    def _decoder(self) -> Any:
        return self.model if self.snapshot is None else self.snapshot.model

    def _current(self, batch: DecodeBatch) -> DecodeBatch:
        """A fresh batch on the model to decode once ``batch`` (on another one) has drained."""
        return self._new_batch() if batch.model is not self._decoder() and not len(batch) else batch

    def _new_batch(self) -> DecodeBatch:
        return DecodeBatch(self._decoder(), self._decode, self.stop_token_ids, self.config.fast_path,
                           self.decode_dtype, self.prefix_cache, self.prefill_stats,
                           self._adapter_cache if self.prefix_cache is not None else None)

    def _adapter_cache(self, adapter: str) -> PrefixCache:
        """The prefix cache of ``adapter`` (not ``"default"``), made on first use."""
        if adapter not in self.adapter_caches:
            self.adapter_caches[adapter] = PrefixCache(self.config.prefix_block_tokens,
                                                       self.config.prefix_cache_tokens)
        return self.adapter_caches[adapter]

    def _collect(self, waiting: list[_Pending], block: bool) -> bool:
        """Move queued requests to ``waiting``; an idle worker gathers a burst first.

        Returns True once the shutdown sentinel was seen.
        """
        if block:
            item = self._queue.get()
            if item is None:
                return True
            waiting.append(item)
            deadline = time.monotonic() + self.config.max_gather_s
            while len(waiting) < self.config.max_batch_rows and time.monotonic() < deadline:
                try:
                    item = self._queue.get(timeout=self.config.max_wait_s)
                except queue.Empty:
                    break
                if item is None:
                    return True
                waiting.append(item)
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return False
            if item is None:
                return True
            waiting.append(item)

    def _admit(self, batch: DecodeBatch, waiting: list[_Pending]) -> None:
        """Prefill as many waiting requests as fit; a failing prefill is retried one by one."""
        chosen: list[_Pending] = []
        rows = len(batch)
        while waiting and (rows + waiting[0].request.n <= self.config.max_batch_rows or not rows):
            pending = waiting.pop(0)
            if pending.request.aborted:
                pending.future.cancel()
                self.aborted_rows += pending.request.n
                continue
            if not pending.future.set_running_or_notify_cancel():  # cancelled while queued
                continue
            chosen.append(pending)
            rows += pending.request.n
        if not chosen:
            return
        try:
            with self.lock:
                self._resolve(batch.admit([p.rows(self._constraint) for p in chosen]))
        except Exception as error:
            if len(chosen) == 1:
                _fail(chosen[0].future, error)
                return
            for pending in chosen:
                try:
                    with self.lock:
                        self._resolve(batch.admit([pending.rows(self._constraint)]))
                except Exception as own_error:
                    _fail(pending.future, own_error)

    @staticmethod
    def _drop_aborted(batch: DecodeBatch) -> int:
        """Free the rows of aborted requests (a client hung up, a rollout timed out)."""
        dropped = batch.drop(lambda row: row.owner.request.aborted)
        for row in dropped:
            _fail(row.owner.future, CancelledError("request aborted"))
        return len(dropped)

    @staticmethod
    def _resolve(finished: list[Row]) -> None:
        for row in finished:
            row.owner.finish(row)

    def _constraint(self, grammar: str) -> Any:
        from lightning_lab.inference.constraints import Constraint

        return Constraint(grammar, self.tokenizer, self.vocab_size, self.stop_token_ids)

    def compile_grammar(self, grammar: str) -> str:
        """Check a Lark grammar against this model's tokenizer; the result goes in SamplingParams."""
        from lightning_lab.inference.constraints import compile_grammar

        return compile_grammar(grammar, self.tokenizer, self.vocab_size, self.stop_token_ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)


def _fail(future: Future, error: BaseException) -> None:
    """Fail a future unless it is already settled (e.g. cancelled by its caller)."""
    if not future.done():
        future.set_exception(error)


def _stop_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """EOS ids from tokenizer and generation config, plus the chat end-of-turn token."""
    ids: set[int] = set()
    candidates = [tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)]
    for token in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
        if token in tokenizer.get_vocab():
            candidates.append(tokenizer.convert_tokens_to_ids(token))
    for c in candidates:
        if isinstance(c, int):
            ids.add(c)
        elif isinstance(c, (list, tuple)):
            ids.update(int(x) for x in c)
    return ids


def prefix_hit_rate(policy: Any) -> float:
    """``Engine.take_prefix_hit_rate`` of a policy's engine; 0.0 for a policy without one."""
    engine = getattr(policy, "engine", None)
    return engine.take_prefix_hit_rate() if isinstance(engine, Engine) else 0.0
