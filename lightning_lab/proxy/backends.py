"""Where completions come from: the in-process policy's batching engine, or a remote server.

Both give the same thing back, token ids plus behaviour logprobs per sample, which is all the
trainer needs; so rollouts can move to a GPU box running vLLM while the trainer stays unchanged.

Weight sync with a remote backend: ``train.sync.AdapterSync`` writes the trainer's adapter as a
PEFT folder (``train.export.save_adapter``) and POSTs ``{"lora_name", "lora_path"}`` to
``/v1/load_lora_adapter`` (vLLM's runtime-LoRA endpoint, enabled with
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` and ``--enable-lora``) under a versioned name, then sets
``RemoteBackend.name`` to it, so later requests name that adapter as ``model``; the ``model`` each
response reports is recorded as the transition's ``adapter_version``. For the logprobs to be the
sampling distribution's (what PPO's ratio needs), start vLLM with ``--logprobs-mode
processed_logprobs``; the path must be readable by the remote server. lightning-lab's own
server implements the load endpoint too (trainer checkpoints, only from its ``adapter_dirs``
and behind an ``api_key``; it never unpickles).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Protocol, Sequence

from .protocol import ChatRequest, ProtocolError

__all__ = ["Backend", "Prepared", "LocalBackend", "RemoteBackend", "Completion"]


@dataclass
class Completion:
    """One sampled choice, in the engine's ``Sample`` shape (stop token included in the ids)."""

    response_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    """OpenAI's: ``"tool_calls"`` when the reply parsed into calls."""
    text: str
    """The generated text as sampled (what ``response_ids`` decode to)."""
    message: dict[str, Any] | None = None
    """The assistant message (``content`` and ``tool_calls``); None means ``{"content": text}``."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Transition meta from parsing (``constrained``, ``tool_calls``, ``tool_parse_error``, ...)."""
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    """Per token, the most likely (token id, logprob) pairs when the request asked."""


@dataclass
class Prepared:
    """A request ready to sample: the prompt as text and ids (a remote backend fills ids later)."""

    messages: list[dict[str, Any]]
    prompt_text: str = ""
    prompt_ids: list[int] = field(default_factory=list)
    handle: Any = None
    """Backend-private state used to abort the request (the engine ``Request``)."""
    plan: Any = None
    """The local backend's ``inference.chat.ChatPlan`` (tools, constraint, parser)."""


class Backend(Protocol):
    name: str
    context_limit: int

    def prepare(self, request: ChatRequest) -> Prepared: ...

    async def generate(self, prepared: Prepared, request: ChatRequest, temperature: float,
                       max_tokens: int) -> list[Completion]: ...

    def token_texts(self, ids: list[int]) -> list[str]: ...

    async def model_name(self) -> str: ...

    async def load_adapter(self, name: str, path: str) -> None: ...


class LocalBackend:
    """The in-process ``Policy``: every request goes to ``policy.engine``, which batches them."""

    def __init__(self, policy: Any, name: str | None = None):
        self.policy = policy
        self.name = name or policy.name or "lightning-lab"
        self.context_limit = int(policy.engine.max_positions)
        self.aborted = 0
        """Requests abandoned by their client (their engine rows were freed)."""

    def prepare(self, request: ChatRequest) -> Prepared:
        # The same text -> ids path as Policy.generate, so the trainer re-tokenises nothing.
        from lightning_lab.inference.tools import ToolError

        try:
            plan = self.policy.plan(request.messages, **request.tool_options)
        except ToolError as exc:
            param = "guided_grammar" if exc.param == "grammar" else exc.param  # the wire name
            raise ProtocolError(exc.message, param=param, code=exc.code) from exc
        text = plan.prompt_text
        ids = self.policy.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= self.context_limit:
            raise ProtocolError(
                f"This model's maximum context length is {self.context_limit} tokens; the messages "
                f"take {len(ids)} tokens, leaving no room to generate.", param="messages",
                code="context_length_exceeded")
        return Prepared(messages=request.messages, prompt_text=text, prompt_ids=ids, plan=plan)

    def prepare_text(self, prompt: str | list[int], param: str = "prompt") -> Prepared:
        """A raw prompt (``/v1/completions``): text tokenised as is, or token ids taken as given."""
        if isinstance(prompt, str):
            ids = self.policy.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            text = prompt
        else:
            vocab = int(self.policy.engine.vocab_size)
            if any(not 0 <= t < vocab for t in prompt):
                raise ProtocolError(f"token ids must be in [0, {vocab})", param=param,
                                    code="invalid_value")
            ids, text = list(prompt), self.policy.tokenizer.decode(prompt)
        if not ids:
            raise ProtocolError("the prompt is empty", param=param, code="invalid_value")
        if len(ids) >= self.context_limit:
            raise ProtocolError(
                f"This model's maximum context length is {self.context_limit} tokens; the prompt "
                f"takes {len(ids)} tokens, leaving no room to generate.", param=param,
                code="context_length_exceeded")
        return Prepared(messages=[], prompt_text=text, prompt_ids=ids)

    def _request(self, prepared: Prepared, request: ChatRequest, temperature: float,
                 max_tokens: int, on_token: Any = None) -> Any:
        from lightning_lab.inference.engine import Request
        from lightning_lab.inference.sampling import SamplingParams

        params = SamplingParams(temperature=temperature, top_p=request.top_p,
                                max_new_tokens=max_tokens, stop=request.stop, seed=request.seed,
                                grammar=prepared.plan.grammar if prepared.plan else None,
                                top_logprobs=request.top_logprobs if request.logprobs else 0)
        engine_request = Request(prompt_ids=prepared.prompt_ids, params=params, n=request.n,
                                 on_token=on_token, adapter=self.adapter_for(request.model))
        prepared.handle = engine_request
        return engine_request

    def adapter_for(self, model: str) -> str:
        """The LoRA adapter a request's ``model`` names (vLLM's multi-LoRA serving:
        ``ChatOpenAI(model="checker")``); the served name or an alias: ``"default"``."""
        return model if model in getattr(self.policy, "adapters", ()) else "default"

    @property
    def adapters(self) -> list[str]:
        """The policy's adapters, served as models when there are several (``/v1/models``)."""
        names = list(getattr(self.policy, "adapters", ()))
        return names if len(names) > 1 else []

    def _abort(self, engine_request: Any, future: Any) -> None:
        """Free the request's batch slots (client gone, rollout cancelled)."""
        engine_request.aborted = True
        future.cancel()
        self.aborted += 1

    async def generate(self, prepared: Prepared, request: ChatRequest, temperature: float,
                       max_tokens: int) -> list[Completion]:
        engine_request = self._request(prepared, request, temperature, max_tokens)
        future = self.policy.engine.submit(engine_request)
        try:
            samples = await asyncio.wrap_future(future)
        except asyncio.CancelledError:  # client went away: free the batch slots
            self._abort(engine_request, future)
            raise
        except ValueError as exc:  # the engine's own request validation
            raise ProtocolError(str(exc), code="invalid_value") from exc
        return self._completions(prepared, samples)

    async def stream(self, prepared: Prepared, request: ChatRequest, temperature: float,
                     max_tokens: int) -> AsyncIterator[tuple | list[Completion]]:
        """Yield ``(choice, token_id, logprob, top)`` as the engine samples (``top``: the
        token's most likely alternatives, or None), then the completions.

        The engine thread hands each token to this event loop (``call_soon_threadsafe``); the
        request's future, resolved after its last token, closes the stream.
        """
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue = asyncio.Queue()

        def put(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(tokens.put_nowait, item)
            except RuntimeError:  # the loop closed (server stopping): nobody is listening
                pass

        engine_request = self._request(
            prepared, request, temperature, max_tokens,
            on_token=lambda row: put((row.index, row.response_ids[-1], row.logprobs[-1],
                                      row.top_logprobs[-1] if row.top_logprobs else None)))
        future = self.policy.engine.submit(engine_request)
        future.add_done_callback(lambda _: put(None))
        try:
            while (item := await tokens.get()) is not None:
                yield item
            samples = future.result()
        except (asyncio.CancelledError, GeneratorExit):
            self._abort(engine_request, future)
            raise
        except ValueError as exc:
            raise ProtocolError(str(exc), code="invalid_value") from exc
        yield self._completions(prepared, samples)

    @staticmethod
    def _completions(prepared: Prepared, samples: list[Any]) -> list[Completion]:
        """Samples as completions; chat prompts get their reply parsed (tool calls, JSON)."""
        if prepared.plan is None:  # a raw /v1/completions prompt
            return [Completion(s.response_ids, s.logprobs, s.finish_reason, s.text,
                               top_logprobs=s.top_logprobs, meta=dict(s.meta)) for s in samples]
        out = []
        for s in samples:
            parsed, finish_reason, meta = prepared.plan.reply(s.text, s.finish_reason,
                                                              s.constrained, s.constraint_error)
            out.append(Completion(s.response_ids, s.logprobs, finish_reason, s.text,
                                  parsed.message(), {**s.meta, **meta}, s.top_logprobs))
        return out

    async def model_name(self) -> str:
        return self.name

    def token_texts(self, ids: list[int]) -> list[str]:
        decode = self.policy.tokenizer.decode
        return [decode([i]) for i in ids]

    async def load_adapter(self, name: str, path: str) -> None:
        """Load a trainer checkpoint's trained weights (LoRA or full) into the served policy."""
        from lightning_lab.inference.checkpoints import load_policy_weights

        def load() -> None:
            with self.policy.engine.lock:  # never mid-forward
                load_policy_weights(self.policy, Path(path))

        await asyncio.to_thread(load)
        self.name = name or self.name


class RemoteBackend:
    """OpenAI-compatible servers that return token ids (vLLM's ``return_token_ids``) + logprobs.

    ``prepare`` cannot tokenise (the remote server owns the tokenizer), so prompt ids come back
    with the response; ``context_limit`` is only used for the error message of a local check.
    Several URLs: each request goes to the server with the fewest outstanding
    (``inference/servers.py``; ``allow_degraded`` decides what a server that stops answering does).
    """

    def __init__(self, base_url: str | Sequence[str], model: str | None = None,
                 api_key: str | None = None, timeout_s: float = 600.0, max_connections: int = 256,
                 allow_degraded: bool = False):
        import httpx

        from ..inference.servers import ServerPool, server_urls

        self.pool = ServerPool(server_urls(base_url), allow_degraded)
        self.name = model or ""
        self.context_limit = 1 << 30
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.headers = headers
        """Sent with every request (the management calls of ``AdapterSync`` reuse them)."""
        limits = httpx.Limits(max_connections=max_connections,
                              max_keepalive_connections=max_connections)
        self._client = httpx.AsyncClient(headers=headers, timeout=timeout_s, limits=limits)
        self._tokens: dict[int, str] = {}

    async def model_name(self) -> str:
        if not self.name:
            response = await self._client.get(self.pool.live[0] + "/models")
            response.raise_for_status()
            self.name = response.json()["data"][0]["id"]
        return self.name

    async def _post(self, route: str, payload: dict[str, Any]) -> tuple[str, Any]:
        """POST to the least busy live server; one that gives no answer is reported to the
        pool and the request goes to another only if the pool allows it (a 502 otherwise)."""
        import httpx

        from ..inference.servers import RolloutServerError

        while True:
            try:
                with self.pool.lease() as url:
                    try:
                        return url, await self._client.post(url + route, json=payload)
                    except httpx.TransportError as exc:  # no answer: a failed server
                        error = f"{type(exc).__name__}: {exc}"
                        if not self.pool.fail(url, error):
                            raise ProtocolError(f"remote backend {url} unreachable: {error}",
                                                status=502, type="backend_error") from exc
            except RolloutServerError as exc:  # none left
                raise ProtocolError(str(exc), status=502, type="backend_error") from exc

    def prepare(self, request: ChatRequest) -> Prepared:
        return Prepared(messages=request.messages)

    async def generate(self, prepared: Prepared, request: ChatRequest, temperature: float,
                       max_tokens: int) -> list[Completion]:
        payload: dict[str, Any] = {
            "model": await self.model_name(), "messages": prepared.messages,
            "temperature": temperature, "top_p": request.top_p, "max_tokens": max_tokens,
            "n": request.n, "logprobs": True, "return_token_ids": True,
        }
        if request.stop:
            payload["stop"] = list(request.stop)
        if request.seed is not None:
            payload["seed"] = request.seed
        for key, value in request.tool_options.items():  # the remote server parses calls itself
            if value is not None and (key != "parallel_tool_calls" or request.tools):
                payload["guided_grammar" if key == "grammar" else key] = value
        url, response = await self._post("/chat/completions", payload)
        if response.status_code >= 400:
            try:
                error = response.json()["error"]
            except Exception:  # noqa: BLE001 - a non-OpenAI error page
                error = {"message": response.text[:500]}
            raise ProtocolError(f"remote backend: {error.get('message')}", param=error.get("param"),
                                code=error.get("code"), status=response.status_code
                                if response.status_code < 500 else 502, type="backend_error")
        body = response.json()
        if "prompt_token_ids" not in body:
            raise ProtocolError("remote backend returned no token ids (needs return_token_ids)",
                                status=502, type="backend_error")
        prepared.prompt_ids = list(body["prompt_token_ids"])
        prepared.prompt_text = ""
        out = []
        for choice in sorted(body["choices"], key=lambda c: c["index"]):
            content = (choice.get("logprobs") or {}).get("content") or []
            ids = list(choice["token_ids"])
            for i, entry in zip(ids, content):
                self._tokens.setdefault(i, entry["token"])
            message = choice["message"]
            out.append(Completion(ids, [float(e["logprob"]) for e in content],
                                  choice.get("finish_reason") or "stop",
                                  message.get("content") or "",
                                  {"role": "assistant", "content": message.get("content"),
                                   **({"tool_calls": message["tool_calls"]}
                                      if message.get("tool_calls") else {})},
                                  # which weights sampled it: the adapter version after a sync
                                  {"adapter_version": str(body.get("model") or payload["model"]),
                                   "server": url}))
        return out

    def token_texts(self, ids: list[int]) -> list[str]:
        return [self._tokens.get(i, "") for i in ids]

    async def load_adapter(self, name: str, path: str) -> None:
        """Load into every live server, then name it in requests."""
        for url in self.pool.live:
            response = await self._client.post(url + "/load_lora_adapter",
                                               json={"lora_name": name, "lora_path": str(path)})
            response.raise_for_status()
        self.name = name

    def load_lora_adapter(self, name: str, path: str | Path) -> None:
        """Blocking form for the training loop (works inside Jupyter's running event loop too)."""
        import httpx

        for url in self.pool.live:
            response = httpx.post(f"{url}/load_lora_adapter", headers=self._client.headers,
                                  json={"lora_name": name, "lora_path": str(path)}, timeout=600)
            response.raise_for_status()
        self.name = name

    async def aclose(self) -> None:
        await self._client.aclose()
