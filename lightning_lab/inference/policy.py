"""The policy: a causal LM plus tokenizer that agents call, and that records what it sampled.

``chat`` and ``generate`` may be called from many threads at once, and ``achat``/``agenerate``
from many asyncio tasks; the shared ``Engine`` batches all of them together. Every generation made
inside an open rollout is recorded from the calling thread or task, so tracing's contextvars
attribute it to the right trajectory and step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterator, Union

import torch

from lightning_lab.inference.adapters import has_adapter, set_weights
from lightning_lab.inference.chat import ChatPlan, plan_chat
from lightning_lab.inference.engine import Engine, EngineConfig, Request
from lightning_lab.inference.multi_lora import (DEFAULT, add_adapter, adapter_names, check_adapter,
                                                check_role_adapters, keeping_trainable)
from lightning_lab.inference.sampling import SamplingParams

Message = dict[str, Any]
Prompt = Union[str, list[Message]]

log = logging.getLogger("lightning_lab.policy")


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
    """``"stop"``, ``"length"`` (``max_new_tokens``), ``"tool_calls"`` (chat with calls), or
    ``"error"``: llguidance gave up on the grammar mid-way (reason in ``meta["constraint_error"]``;
    the text is cut where it failed and need not match the grammar)."""
    prompt_text: str
    temperature: float
    message: dict[str, Any] | None = None
    """The OpenAI assistant message (``content``, ``tool_calls``) for chat prompts."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Facts copied into the transition's meta: ``constrained``, ``tool_calls``,
    ``tool_parse_error``, ``json_valid``, ``tool_format``, ``adapter`` (the LoRA adapter that
    sampled it)."""


@dataclass(frozen=True)
class GenerateOptions:
    """The keyword arguments of ``Policy.generate`` and ``agenerate``, defaults included: one
    list for both, as ``ChatOptions`` is for ``chat``/``achat``."""

    n: int = 1
    """Completions per prompt, prompt-major in the result."""
    temperature: float | None = None
    """0 is greedy; None is the rollout's, else ``tracing.DEFAULT_TEMPERATURE`` (the contract
    in ``tracing``: greedy in ``evaluate()``)."""
    top_p: float = 1.0
    max_new_tokens: int = 64
    stop: list[str] | str | None = None
    prefill: str = ""
    """Text the completion starts with (after the chat template for chat prompts)."""
    seed: int | None = None
    """Makes each prompt's samples reproducible whatever else shares the batch (up to float
    rounding of batched matmuls); inside a rollout opened with ``seed``, that rollout's per-call
    seed."""
    adapter: str | None = None
    """The LoRA adapter to sample with; None: the call's role's (``Policy.adapter_for``)."""
    tools: list[dict[str, Any]] | None = None
    """OpenAI's ``tools``, ``tool_choice``, ``parallel_tool_calls`` and ``response_format`` (chat
    prompts only; each generation then carries its parsed ``message``)."""
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    response_format: dict[str, Any] | None = None
    grammar: str | None = None
    """A Lark grammar of the generated text, for string prompts too."""

    def tool_options(self) -> dict[str, Any]:
        """What ``plan_chat`` takes: the tool and format options."""
        return {"tools": self.tools, "tool_choice": self.tool_choice,
                "parallel_tool_calls": self.parallel_tool_calls,
                "response_format": self.response_format, "grammar": self.grammar}


@dataclass(frozen=True)
class ChatOptions:
    """The keyword arguments of ``Policy.chat`` and ``achat``, defaults included: one list for
    both, so the sync and async turns cannot drift apart."""

    max_new_tokens: int = 128
    temperature: float | None = None
    """None: the rollout's, else ``tracing.DEFAULT_TEMPERATURE`` (the contract in ``tracing``)."""
    top_p: float = 1.0
    stop: list[str] | str | None = None
    prefill: str = ""
    """Text the assistant turn starts with; the reply starts with it too."""
    tools: list[dict[str, Any]] | None = None
    """OpenAI tool specs; the reply is then the assistant message, not a string."""
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    response_format: dict[str, Any] | None = None
    grammar: str | None = None
    adapter: str | None = None
    """The LoRA adapter to sample with; None: the call's role's (``Policy.adapter_for``)."""

    def generate_kwargs(self) -> dict[str, Any]:
        """The options as ``Policy.generate`` keywords (``tools`` not copied)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def reply(self, generation: Generation) -> Any:
        """What ``chat`` returns: the assistant message with ``tools``, else prefill + text."""
        return generation.message if self.tools is not None else self.prefill + generation.text


class Policy:
    """A model (HF or peft-wrapped) with its tokenizer and a batching engine."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        device: str = "cpu",
        name: str = "",
        engine_config: EngineConfig | None = None,
        tool_format: str = "auto",
    ):
        self.model, self.tokenizer, self.device, self.name = model, tokenizer, device, name
        self.engine = Engine(model, tokenizer, engine_config)
        self.tool_format = tool_format
        """How tools are rendered and parsed (``inference.tool_formats.format_names()``)."""
        self.role_adapters: dict[str, str] = {}
        """Role -> the adapter its calls sample with (``map_roles``); see ``adapter_for``."""

    @property
    def adapters(self) -> list[str]:
        """The model's LoRA adapters (``"default"`` first); ``[]`` without LoRA."""
        return adapter_names(self.model)

    def add_adapter(self, name: str, **overrides: Any) -> None:
        """Add a LoRA adapter ``name`` on the shared base: the default adapter's ``LoraConfig``
        with ``overrides`` (``r``, ``target_modules``, ``init_lora_weights``...). Calls made
        inside ``ll.role(name)`` then sample with it; the trainer trains it on them."""
        with self.engine.lock:  # no forward sees a half-built adapter
            add_adapter(self.model, name, overrides)

    def map_roles(self, role_adapters: dict[str, str]) -> None:
        """Let roles share an adapter (``{"rewriter": "writer"}``); unknown adapters refused."""
        self.role_adapters.update(check_role_adapters(self.model, role_adapters))

    def adapter_for(self, role: str) -> str:
        """The adapter a call of ``role`` samples with: ``role_adapters[role]``, else the adapter
        named like the role, else ``"default"`` (single-adapter code never names one)."""
        if role in self.role_adapters:
            return self.role_adapters[role]
        return role if role in adapter_names(self.model) else DEFAULT

    def __repr__(self) -> str:
        return f"Policy({self.name!r}, device={self.device!r})"

    def plan(self, messages: list[Message], prefill: str = "", **tool_options: Any) -> ChatPlan:
        """Prompt text and constraint of one chat turn (``tools``, ``tool_choice``,
        ``parallel_tool_calls``, ``response_format`` as in OpenAI's API); ValueError on bad input."""
        return plan_chat(self.tokenizer, messages, tool_format=self.tool_format, prefill=prefill,
                         compile_grammar=self.engine.compile_grammar, **tool_options)

    def prompt_text(self, prompt: Prompt, prefill: str = "", **tool_options: Any) -> str:
        """Chat messages get the chat template with the generation prompt; strings stay as they are."""
        if isinstance(prompt, str):
            return prompt + prefill
        return plan_chat(self.tokenizer, prompt, tool_format=self.tool_format, prefill=prefill,
                         **tool_options).prompt_text

    def _requests(self, prompts: list[Prompt], o: GenerateOptions
                  ) -> tuple[list[str], list[Request], list[ChatPlan | None]]:
        from lightning_lab import tracing

        adapter = (self.adapter_for(tracing.current_role()) if o.adapter is None
                   else check_adapter(self.model, o.adapter))
        temperature = tracing.sampling_temperature(o.temperature, tracing.current_temperature())
        seed = tracing.call_seed() if o.seed is None else o.seed  # a seeded rollout's per-call seed
        stops = (o.stop,) if isinstance(o.stop, str) else tuple(o.stop or ())
        prefill = o.prefill
        plans = [None if isinstance(p, str) else self.plan(p, prefill, **o.tool_options())
                 for p in prompts]
        grammar = o.grammar
        plain_grammar = (self.engine.compile_grammar(grammar)
                         if grammar is not None and None in plans else None)
        texts = [p + prefill if plan is None else plan.prompt_text
                 for p, plan in zip(prompts, plans)]
        requests = [
            Request(
                prompt_ids=self.tokenizer(text, add_special_tokens=False)["input_ids"],
                params=SamplingParams(
                    temperature=temperature,
                    top_p=o.top_p,
                    max_new_tokens=o.max_new_tokens,
                    stop=stops,
                    seed=None if seed is None else (seed * 1_000_003 + i) % 2**62,
                    grammar=plain_grammar if plan is None else plan.grammar,
                ),
                n=o.n,
                adapter=adapter,
            )
            for i, (text, plan) in enumerate(zip(texts, plans))
        ]
        return texts, requests, plans

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

    @staticmethod
    def _record(texts: list[str], requests: list[Request], plans: list[ChatPlan | None],
                results: list[list[Any]]) -> list[Generation]:
        generations = [
            _generation(s, text, request, plan)
            for text, request, plan, samples in zip(texts, requests, plans, results)
            for s in samples
        ]
        from lightning_lab import tracing  # lazy: tracing imports records, keep policy import light

        for generation in generations:
            tracing.record_generation(generation)
        return generations

    def generate(self, prompts: list[Prompt], **options: Any) -> list[Generation]:
        """Sample ``n`` completions per prompt, prompt-major (``len(prompts) * n`` results).

        ``options`` are ``GenerateOptions``' fields (``n``, ``temperature``, ``max_new_tokens``,
        ``seed``, ``tools``, ``grammar``, ...); an unknown one is a ``TypeError``.
        """
        texts, requests, plans = self._requests(prompts, GenerateOptions(**options))
        futures, _, unregister = self._submit(requests)
        try:
            results = [future.result() for future in futures]
        except CancelledError:
            _raise_if_rollout_cancelled()
            raise
        finally:
            unregister()
        return self._record(texts, requests, plans, results)

    async def agenerate(self, prompts: list[Prompt], **options: Any) -> list[Generation]:
        """``generate`` for ``async def`` agents: awaits the engine without blocking the loop.

        Requests from coroutines, threads and HTTP handlers meet in the same engine batch. If the
        awaiting task is cancelled (a timeout), the requests are aborted and leave the batch.
        """
        texts, requests, plans = self._requests(prompts, GenerateOptions(**options))
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
        return self._record(texts, requests, plans, list(results))

    def chat(self, messages: Prompt, **options: Any) -> Any:
        """One assistant turn; returns ``prefill + generated text``, or with ``tools`` the
        OpenAI assistant message ``{"role", "content", "tool_calls"?}`` (append it to
        ``messages``, then the ``{"role": "tool", "tool_call_id", "content"}`` results).

        A string becomes one user message. ``options`` are ``ChatOptions``' fields:
        ``temperature=None`` is the rollout's (evaluation sets 0), else
        ``tracing.DEFAULT_TEMPERATURE``. ``tool_choice="required"``/a named function and
        ``response_format`` constrain decoding to a valid call / JSON (see ``inference.chat``).
        """
        call = ChatOptions(**options)
        return call.reply(self.generate([_as_messages(messages)], **call.generate_kwargs())[0])

    async def achat(self, messages: Prompt, **options: Any) -> Any:
        """``chat`` for ``async def`` agents (same options, same reply, same tracing)."""
        call = ChatOptions(**options)
        generations = await self.agenerate([_as_messages(messages)], **call.generate_kwargs())
        return call.reply(generations[0])

    @contextlib.contextmanager
    def reference(self, weights: dict[str, torch.Tensor] | None = None) -> Iterator[Any]:
        """Yield the model acting as the PPO reference: the adapter-off base model, or the model
        with ``weights`` (trainable parameters by name, e.g. a warm start's adapter) in place.

        With a peft adapter this disables it in place, so no second copy sits in memory; given
        ``weights``, the current values are set aside and put back on exit (only the trainable
        ones, a few MB for LoRA). Without either the reference *is* the policy model, so KL to it
        is 0 unless the trainer keeps its own frozen copy. Sampling is paused meanwhile (the
        engine lock), so no rollout is ever sampled from the reference by accident; do not call
        ``chat``/``generate`` inside this block.
        """
        with self.engine.lock:
            if weights is not None:
                params = dict(self.model.named_parameters())
                current = {n: params[n].detach().clone() for n in weights}
                try:
                    set_weights(self.model, weights)
                    yield self.model
                finally:
                    set_weights(self.model, current)
            elif has_adapter(self.model):
                with keeping_trainable(self.model), self.model.disable_adapter():
                    yield self.model
            else:
                yield self.model

    def close(self) -> None:
        """Stop the engine's worker thread (it is a daemon, so this is only for tidiness)."""
        self.engine.close()


def _generation(sample: Any, text: str, request: Request, plan: ChatPlan | None) -> Generation:
    gen = Generation(text=sample.text, prompt_ids=list(request.prompt_ids),
                     response_ids=sample.response_ids, logprobs=sample.logprobs,
                     finish_reason=sample.finish_reason, prompt_text=text,
                     temperature=request.params.temperature, meta=dict(sample.meta))
    if plan is not None:
        parsed, gen.finish_reason, gen.meta = plan.reply(
            sample.text, sample.finish_reason, sample.constrained, sample.constraint_error)
        gen.message = parsed.message()
        gen.meta = {**sample.meta, **gen.meta}
    elif sample.constraint_error:
        gen.meta["constraint_error"] = sample.constraint_error
    if sample.constraint_error:
        log.warning("the grammar failed mid-way (%s); the generation ends with finish_reason "
                    "'error'", sample.constraint_error)
    return gen


def _as_messages(prompt: Prompt) -> list[Message]:
    """``chat``'s prompt: a string is one user message."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def _raise_if_rollout_cancelled() -> None:
    """An engine cancellation caused by the rollout's runner becomes ``RolloutCancelled``."""
    from lightning_lab import tracing

    control = tracing.current_control()
    if control is not None:
        control.check()
