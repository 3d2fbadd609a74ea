"""The policy: a causal LM plus tokenizer that agents call, and that records what it sampled.

``chat`` and ``generate`` may be called from many threads at once; the shared ``Engine`` batches
the calls. Every generation made inside an open rollout is recorded, from the calling thread, so
tracing's contextvars attribute it to the right trajectory and step.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Union

from lightning_lab.inference.adapters import has_adapter
from lightning_lab.inference.engine import Engine, EngineConfig, Request
from lightning_lab.inference.sampling import SamplingParams

Message = dict[str, str]
Prompt = Union[str, list[Message]]


def render_prompt(tokenizer: Any, prompt: Prompt, prefill: str = "") -> str:
    """The text a call conditions on: the chat template (with the generation prompt) applied to
    messages, a string as it is; then ``prefill``. Shared with SFT, which must build the very
    prompt the agent's call would have seen."""
    if isinstance(prompt, str):
        return prompt + prefill
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) + prefill


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
        return render_prompt(self.tokenizer, prompt, prefill)

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
        else shares the batch (up to float rounding of batched matmuls); inside a rollout opened
        with ``seed`` it defaults to that rollout's per-call seed.
        """
        from lightning_lab import tracing  # lazy: tracing imports records, keep policy import light

        if seed is None:  # inside a seeded rollout: its per-call seed
            seed = tracing.call_seed()
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
        futures = [self.engine.submit(r) for r in requests]
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
            for text, request, future in zip(texts, requests, futures)
            for s in future.result()
        ]
        for generation in generations:
            tracing.record_generation(generation)
        return generations

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
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if temperature is None:
            from lightning_lab import tracing

            temperature = tracing.current_temperature()
        generation = self.generate(
            [messages],
            temperature=1.0 if temperature is None else temperature,
            top_p=1.0 if top_p is None else top_p,
            max_new_tokens=max_new_tokens,
            stop=stop,
            prefill=prefill,
        )[0]
        return prefill + generation.text

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
