"""A vLLM server as the policy's rollout engine: the same ``submit(Request) -> Future[list[Sample]]``
as the in-process ``Engine``, so ``Policy.chat``/``generate`` (every built-in environment) and the
proxy's ``LocalBackend`` (HTTP agents) sample from vLLM with no other change.

Token-in, token-out: the policy tokenises the prompt exactly as it would for its own engine and
sends the ids as ``/v1/completions``' ``prompt``; vLLM returns the sampled ``token_ids``
(``return_token_ids``) and each token's logprob, so the trainer scores the very ids the sampler
conditioned on and produced, never a re-tokenisation of text. The logprobs are the sampling
distribution's (``log_softmax(logits / T)``) only when the server runs with ``--logprobs-mode
processed_logprobs``; ``vllm_server`` starts it so, an attached server is the user's to start so.

The object also has ``pool`` (the servers, ``servers.ServerPool``), ``headers`` and ``name``,
which is what ``train.sync.AdapterSync`` needs to load a new adapter version into every server and
switch requests to it (``name`` is the ``model`` field of every request); each sample's
``meta["adapter_version"]`` is the ``model`` vLLM says served it, ``meta["server"]`` its URL.
Constrained decoding (``grammar=``, forced tool calls, ``response_format``): the Lark grammar goes
as ``structured_outputs`` (servers started with the ``guidance`` backend, as ``vllm_server``
does). vLLM applies the grammar's mask to the logits before its sampler, so such a sample's
logprobs are the masked distribution's, not the policy's that the local engine records; the
sample says so (``meta["masked_logprobs"]``) and the update takes its behaviour logprobs from
its own recompute (``train/update.py``).
With one LoRA adapter per role the sync loads one module per adapter and fills
``adapter_models``: a request names the module of its ``Request.adapter`` (the role's, as the
local engine picks it), and the sample records that adapter as ``meta["adapter"]``.
Several servers: each request goes to the one with the fewest requests outstanding
(``servers.py`` for what a failed one does).
"""

from __future__ import annotations

import threading
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from typing import Any, Sequence

from lightning_lab.errors import ConfigError
from lightning_lab.inference.engine import Request, Sample
from lightning_lab.inference.multi_lora import DEFAULT
from lightning_lab.inference.servers import ServerPool, server_urls

__all__ = ["VLLMEngine", "VLLMError", "check_base_model"]


class VLLMError(RuntimeError):
    """The vLLM server refused a request, was unreachable, or serves another model."""


class VLLMEngine:
    """HTTP client for vLLM servers (one or several), standing in for ``Engine`` behind a
    ``Policy``."""

    def __init__(self, base_url: str | Sequence[str], tokenizer: Any, *,
                 stop_token_ids: set[int], vocab_size: int, max_positions: int,
                 model: str | None = None, api_key: str | None = None, timeout_s: float = 600.0,
                 max_concurrency: int = 64, allow_degraded: bool = False):
        import httpx

        self.pool = ServerPool(server_urls(base_url, "/v1"), allow_degraded)
        self.tokenizer = tokenizer
        self.stop_token_ids, self.vocab_size = set(stop_token_ids), vocab_size
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.lock = threading.RLock()
        """Held by ``Policy.reference``; the server's weights never change under it, so no
        request needs to wait for it."""
        self._client = httpx.Client(headers=self.headers, timeout=timeout_s,
                                    limits=httpx.Limits(max_connections=max_concurrency))
        self._pool = ThreadPoolExecutor(max_concurrency, thread_name_prefix="ll-vllm")
        bases = {url: self.served_models(url)[0] for url in self.pool.urls}
        names = {base["id"] for base in bases.values()}
        if model is None and len(names) > 1:
            raise ConfigError("the vLLM servers serve differently named models: " + ", ".join(
                f"{url}: {base['id']!r}" for url, base in bases.items()))
        self.name = model or names.pop()
        """The ``model`` requests name: the base model, then the newest adapter version (of the
        default adapter, with several)."""
        self.adapter_models: dict[str, str] = {}
        """Adapter -> the LoRA module its requests name (``AdapterSync`` keeps it current)."""
        self.max_positions = min([max_positions] + [int(b["max_model_len"])
                                                    for b in bases.values()
                                                    if b.get("max_model_len")])

    @property
    def base_url(self) -> str:
        """The servers' URLs, for messages."""
        return ", ".join(self.pool.urls)

    @classmethod
    def for_policy(cls, base_url: str | Sequence[str], policy: Any,
                   **kwargs: Any) -> "VLLMEngine":
        """An engine with the stop tokens, vocabulary and context of ``policy``'s own engine."""
        local = policy.engine
        return cls(base_url, policy.tokenizer, stop_token_ids=local.stop_token_ids,
                   vocab_size=local.vocab_size, max_positions=local.max_positions, **kwargs)

    def served_models(self, url: str) -> list[dict[str, Any]]:
        """``GET /v1/models`` of ``url``: the base model first, then loaded adapters."""
        return self._call("GET", "/models", None, url)["data"]

    def submit(self, request: Request) -> Future:
        """Sample ``request.n`` completions; the future resolves to ``Sample``s or the error."""
        return self._gather([self._pool.submit(self._complete, request, seed)
                             for seed in self._seeds(request)])

    def generate(self, requests: list[Request]) -> list[list[Sample]]:
        return [f.result() for f in [self.submit(r) for r in requests]]

    def compile_grammar(self, grammar: str) -> str:
        """Check a Lark grammar here, as the local engine does (a bad one is a ``GrammarError``
        before any request); the Lark text itself is what goes to vLLM's ``structured_outputs``
        (its ``guidance`` backend runs the same llguidance)."""
        from lightning_lab.inference.constraints import compile_grammar

        compile_grammar(grammar, self.tokenizer, self.vocab_size, self.stop_token_ids)
        return grammar

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()

    @staticmethod
    def _seeds(request: Request) -> list[int | None]:
        """One ``/v1/completions`` call per sample, so a seeded request gives each sample its
        own seed (``seed + 7919 * j``, as the local engine's rows), whatever vLLM does with n."""
        seed = request.params.seed
        return [None if seed is None else seed + 7919 * j for j in range(request.n)]

    @staticmethod
    def _gather(parts: list[Future]) -> Future:
        """One future for the request's samples, failing with the first sample's error."""
        whole: Future = Future()
        whole.set_running_or_notify_cancel()

        def done(_: Future) -> None:
            if whole.done() or not all(p.done() for p in parts):
                return
            try:
                whole.set_result([p.result() for p in parts])
            except BaseException as error:  # noqa: BLE001 - handed to the waiting caller
                if not whole.done():
                    whole.set_exception(error)

        for part in parts:
            part.add_done_callback(done)
        return whole

    def _complete(self, request: Request, seed: int | None) -> Sample:
        if request.aborted:  # a timed-out rollout: what the local engine raises too
            raise CancelledError("request aborted")
        params = request.params
        room = self.max_positions - len(request.prompt_ids)
        if room < 1:
            raise ValueError(f"prompt of {len(request.prompt_ids)} tokens fills the server's "
                             f"context ({self.max_positions})")
        body = {"model": self.model_for(request.adapter), "prompt": list(request.prompt_ids),
                "max_tokens": min(params.max_new_tokens, room), "temperature": params.temperature,
                "top_p": params.top_p, "logprobs": 0, "return_token_ids": True,
                "stop": list(params.stop), "stop_token_ids": sorted(self.stop_token_ids),
                "skip_special_tokens": False}
        if seed is not None:
            body["seed"] = seed
        constrained = params.grammar is not None
        if constrained:
            body["structured_outputs"] = {"grammar": params.grammar}
        url, response = self._send("/completions", body)
        choice = response["choices"][0]
        if choice.get("prompt_token_ids") != body["prompt"]:  # e.g. a BOS vLLM put in front
            raise VLLMError(f"{url} conditioned on other prompt ids than sent: "
                            f"{choice.get('prompt_token_ids')!r:.200} for {body['prompt']!r:.200}")
        ids = list(choice["token_ids"])
        logprobs = [float(x) for x in choice["logprobs"]["token_logprobs"]]
        if len(logprobs) != len(ids):
            raise VLLMError(f"{url}: {len(ids)} token ids but {len(logprobs)} logprobs")
        version = str(response.get("model") or body["model"])
        meta = {"adapter": request.adapter, "adapter_version": version, "server": url}
        if constrained:
            meta["masked_logprobs"] = True  # vLLM masks the logits before computing logprobs
        return Sample(ids, logprobs, "stop" if choice["finish_reason"] == "stop" else "length",
                      choice["text"], constrained=constrained, meta=meta)

    def model_for(self, adapter: str) -> str:
        """The served model a request sampling with ``adapter`` names: its synced module; the
        default adapter falls back to ``name`` (the base model before the first sync)."""
        if adapter in self.adapter_models:
            return self.adapter_models[adapter]
        if adapter == DEFAULT:
            return self.name
        raise VLLMError(f"adapter {adapter!r} has no LoRA module on the vLLM servers "
                        f"{self.base_url} (synced: {', '.join(self.adapter_models) or 'none'}); "
                        f"sync the policy (train.sync.AdapterSync) after adding it")

    def prompt_logprobs(self, prompt_ids: list[int], url: str,
                        model: str | None = None) -> list[float]:
        """``url``'s logprob of each prompt token after the first (one forward) under ``model``
        (a served name; default ``name``)."""
        body = {"model": model or self.name, "prompt": list(prompt_ids), "max_tokens": 1,
                "temperature": 0, "prompt_logprobs": 0, "return_token_ids": True}
        entries = self._call("POST", "/completions", body, url)["choices"][0]["prompt_logprobs"]
        return [float(entry[str(t)]["logprob"]) for entry, t in zip(entries[1:], prompt_ids[1:])]

    def _send(self, route: str, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """POST to the least busy live server; one that gives no answer is reported to the
        pool, and the request goes to another only if the pool allows it."""
        while True:
            with self.pool.lease() as url:
                try:
                    return url, self._call("POST", route, body, url)
                except _Unanswered as exc:
                    if not self.pool.fail(url, exc.error):
                        raise VLLMError(f"vLLM server {url} failed: {exc.error}") from exc.__cause__

    def _call(self, method: str, route: str, body: dict[str, Any] | None,
              url: str) -> dict[str, Any]:
        import httpx

        try:
            response = self._client.request(method, url + route, json=body)
        except httpx.TransportError as exc:
            raise _Unanswered(url, f"{type(exc).__name__}: {exc}") from exc
        if response.status_code >= 400:
            raise VLLMError(f"vLLM server {url}{route} refused with HTTP "
                            f"{response.status_code}: {response.text[:500]}")
        return response.json()


class _Unanswered(VLLMError):
    """No HTTP answer from a server (refused, reset, timed out): a failed server."""

    def __init__(self, url: str, error: str):
        super().__init__(f"vLLM server {url} unreachable: {error}")
        self.error = error


def check_base_model(engine: VLLMEngine, policy: Any, tolerance: float = 0.25) -> float:
    """Refuse servers that serve another base model than the trainer's (each one is checked).

    The fingerprint is behavioural: the served model's logprobs of a fixed chat prompt against the
    trainer's adapter-off model. bf16 serving differs from the fp32 trainer by ~1e-2 nats per
    token; another model (or another checkpoint of the same one) by a nat or more. Returns the
    largest server's mean absolute difference; raises ``ConfigError`` (a usage error) naming the
    server above ``tolerance``.
    """
    import torch

    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Name three colours of the rainbow, then stop."}]
    text = policy.tokenizer.apply_chat_template(messages, tokenize=False,
                                                add_generation_prompt=True)
    ids = policy.tokenizer(text, add_special_tokens=False)["input_ids"]
    with policy.reference() as model, torch.no_grad():
        logits = model(torch.tensor([ids], device=policy.device)).logits[0, :-1].float()
    own = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:], device=policy.device)
                                               [:, None])[:, 0].cpu()
    gaps = []
    for url in engine.pool.urls:
        gap = float((torch.tensor(engine.prompt_logprobs(ids, url)) - own).abs().mean())
        if gap > tolerance:
            raise ConfigError(f"vLLM server {url} serves {engine.name!r}, which is not the "
                              f"trainer's base model {policy.name!r}: its logprobs of a fixed "
                              f"prompt differ by {gap:.2f} nats/token on average (same model: "
                              f"< {tolerance}); start the server on the trainer's model")
        gaps.append(gap)
    return max(gaps)
