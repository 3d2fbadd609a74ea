"""The policy: a causal LM plus tokenizer that agents call, and that records what it sampled.

``chat`` and ``generate`` may be called from many threads at once, and ``achat``/``agenerate``
from many asyncio tasks; the shared ``Engine`` batches all of them together. Every generation made
inside an open rollout is recorded from the calling thread or task, so tracing's contextvars
attribute it to the right trajectory and step.
"""

from __future__ import annotations

import asyncio
import contextlib
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Union

from lightning_lab.inference.adapters import has_adapter
from lightning_lab.inference.engine import Engine, EngineConfig, Request
from lightning_lab.inference.sampling import SamplingParams

Message = dict[str, str]
Prompt = Union[str, list[Message]]


@dataclass
class Generation:
    """One sampled completion with everything PPO needs to score it again."""

    text: str
    """Generated text, without the stop token or stop string (and without ``prefill``)."""
    prompt_ids: list[int]
    """Tokens the model was conditioned on, including the chat template and ``prefill``."""
    response_ids: list[int]
    """Sampled tokens; includes the stop token that ended the turn, so PPO learns to stop."""
    logprobs: list[float]
    """``log_softmax(logits / T)`` of each response token (T=1 when greedy)."""
    finish_reason: str
    """``"stop"`` or ``"length"``."""
    prompt_text: str
    temperature: float


class Policy:
    """A model (HF or peft-wrapped) with its tokenizer and a batching engine."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        device: str = "cpu",
        name: str = "",
        engine_config: EngineConfig | None = None,
    ):
        self.model, self.tokenizer, self.device, self.name = model, tokenizer, device, name
        self.engine = Engine(model, tokenizer, engine_config)

    def __repr__(self) -> str:
        return f"Policy({self.name!r}, device={self.device!r})"

    def prompt_text(self, prompt: Prompt, prefill: str = "") -> str:
        """Chat messages get the chat template with the generation prompt; strings stay as they are."""
        if isinstance(prompt, str):
            return prompt + prefill
        text = self.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        return text + prefill

    def _requests(self, prompts: list[Prompt], n: int, temperature: float, top_p: float,
                  max_new_tokens: int, stop: list[str] | str | None, prefill: str,
                  seed: int | None) -> tuple[list[str], list[Request]]:
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        texts = [self.prompt_text(p, prefill) for p in prompts]
        requests = [
            Request(
                prompt_ids=self.tokenizer(text, add_special_tokens=False)["input_ids"],
                params=SamplingParams(
                    temperature=temperature,
                    top_p=top_p,
                    max_new_tokens=max_new_tokens,
                    stop=stops,
                    seed=None if seed is None else (seed * 1_000_003 + i) % 2**62,
                ),
                n=n,
            )
            for i, text in enumerate(texts)
        ]
        return texts, requests

    def _submit(self, requests: list[Request]
                ) -> tuple[list[Future], Callable[[], None], Callable[[], None]]:
        """Queue the requests; the returned ``abort`` frees their batch rows, whatever their state.

        Inside a runner-managed rollout the abort is also registered with its control, so a
        timed-out rollout's requests leave the batch even while its thread is stuck elsewhere.
        """
        from lightning_lab import tracing

        control = tracing.current_control()
        if control is not None:
            control.check()
        futures = [self.engine.submit(r) for r in requests]

        def abort() -> None:
            for request, future in zip(requests, futures):
                request.aborted = True
                future.cancel()

        unregister = control.on_cancel(abort) if control is not None else (lambda: None)
        return futures, abort, unregister

    def _record(self, texts: list[str], requests: list[Request],
                results: list[list[Any]]) -> list[Generation]:
        generations = [
            Generation(
                text=s.text,
                prompt_ids=list(request.prompt_ids),
                response_ids=s.response_ids,
                logprobs=s.logprobs,
                finish_reason=s.finish_reason,
                prompt_text=text,
                temperature=request.params.temperature,
            )
            for text, request, samples in zip(texts, requests, results)
            for s in samples
        ]
        from lightning_lab import tracing  # lazy: tracing imports records, keep policy import light

        for generation in generations:
            tracing.record_generation(generation)
        return generations

    def generate(
        self,
        prompts: list[Prompt],
        *,
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 64,
        stop: list[str] | str | None = None,
        prefill: str = "",
        seed: int | None = None,
    ) -> list[Generation]:
        """Sample ``n`` completions per prompt, prompt-major (``len(prompts) * n`` results).

        ``temperature=0`` is greedy. ``seed`` makes each prompt's samples reproducible whatever
        else shares the batch (up to float rounding of batched matmuls).
        """
        texts, requests = self._requests(prompts, n, temperature, top_p, max_new_tokens, stop,
                                         prefill, seed)
        futures, _, unregister = self._submit(requests)
        try:
            results = [future.result() for future in futures]
        except CancelledError:
            _raise_if_rollout_cancelled()
            raise
        finally:
            unregister()
        return self._record(texts, requests, results)

    async def agenerate(
        self,
        prompts: list[Prompt],
        *,
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 64,
        stop: list[str] | str | None = None,
        prefill: str = "",
        seed: int | None = None,
    ) -> list[Generation]:
        """``generate`` for ``async def`` agents: awaits the engine without blocking the loop.

        Requests from coroutines, threads and HTTP handlers meet in the same engine batch. If the
        awaiting task is cancelled (a timeout), the requests are aborted and leave the batch.
        """
        texts, requests = self._requests(prompts, n, temperature, top_p, max_new_tokens, stop,
                                         prefill, seed)
        futures, abort, unregister = self._submit(requests)
        try:
            results = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        except asyncio.CancelledError:
            abort()
            raise
        except CancelledError:
            _raise_if_rollout_cancelled()
            raise
        finally:
            unregister()
        return self._record(texts, requests, list(results))

    def chat(
        self,
        messages: Prompt,
        *,
        max_new_tokens: int = 128,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: list[str] | str | None = None,
        prefill: str = "",
    ) -> str:
        """One assistant turn; returns ``prefill + generated text``.

        A string becomes one user message. ``temperature=None`` uses the open rollout's default
        (evaluation sets 0), else 1.0.
        """
        prompt, options = _chat_call(messages, max_new_tokens, temperature, top_p, stop, prefill)
        return prefill + self.generate([prompt], **options)[0].text

    async def achat(
        self,
        messages: Prompt,
        *,
        max_new_tokens: int = 128,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: list[str] | str | None = None,
        prefill: str = "",
    ) -> str:
        """``chat`` for ``async def`` agents (same arguments, same tracing)."""
        prompt, options = _chat_call(messages, max_new_tokens, temperature, top_p, stop, prefill)
        return prefill + (await self.agenerate([prompt], **options))[0].text

    @contextlib.contextmanager
    def reference(self) -> Iterator[Any]:
        """Yield the model acting as the PPO reference (the adapter-off base model).

        With a peft adapter this disables it in place, so no second copy sits in memory. Without
        one the reference *is* the policy model, so KL to it is 0 unless the trainer keeps its own
        frozen copy. Sampling is paused meanwhile (the engine lock), so no rollout is ever sampled
        from the reference by accident; do not call ``chat``/``generate`` inside this block.
        """
        with self.engine.lock:
            if has_adapter(self.model):
                with self.model.disable_adapter():
                    yield self.model
            else:
                yield self.model

    def close(self) -> None:
        """Stop the engine's worker thread (it is a daemon, so this is only for tidiness)."""
        self.engine.close()


def _chat_call(messages: Prompt, max_new_tokens: int, temperature: float | None,
               top_p: float | None, stop: list[str] | str | None,
               prefill: str) -> tuple[Prompt, dict[str, Any]]:
    """``chat``'s defaults: a string is one user message; no temperature = the rollout's, else 1."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if temperature is None:
        from lightning_lab import tracing

        temperature = tracing.current_temperature()
    return messages, dict(temperature=1.0 if temperature is None else temperature,
                          top_p=1.0 if top_p is None else top_p, max_new_tokens=max_new_tokens,
                          stop=stop, prefill=prefill)


def _raise_if_rollout_cancelled() -> None:
    """An engine cancellation caused by the rollout's runner becomes ``RolloutCancelled``."""
    from lightning_lab import tracing

    control = tracing.current_control()
    if control is not None:
        control.check()
