"""A vLLM server as the policy's rollout engine: the same ``submit(Request) -> Future[list[Sample]]``
as the in-process ``Engine``, so ``Policy.chat``/``generate`` (every built-in environment) and the
proxy's ``LocalBackend`` (HTTP agents) sample from vLLM with no other change.

Token-in, token-out: the policy tokenises the prompt exactly as it would for its own engine and
sends the ids as ``/v1/completions``' ``prompt``; vLLM returns the sampled ``token_ids``
(``return_token_ids``) and each token's logprob, so the trainer scores the very ids the sampler
conditioned on and produced, never a re-tokenisation of text. The logprobs are the sampling
distribution's (``log_softmax(logits / T)``) only when the server runs with ``--logprobs-mode
processed_logprobs``; ``vllm_server`` starts it so, an attached server is the user's to start so.

The object also has ``base_url``, ``headers`` and ``name``, which is what ``train.sync.AdapterSync``
needs to load a new adapter version and switch requests to it (``name`` is the ``model`` field of
every request); each sample's ``meta["adapter_version"]`` is the ``model`` vLLM says served it.
"""

from __future__ import annotations

import threading
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from typing import Any

from lightning_lab.errors import ConfigError
from lightning_lab.inference.engine import Request, Sample

__all__ = ["VLLMEngine", "VLLMError", "check_base_model"]


class VLLMError(RuntimeError):
    """The vLLM server refused a request, was unreachable, or serves another model."""


class VLLMEngine:
    """HTTP client for one vLLM server, standing in for ``Engine`` behind a ``Policy``."""

    def __init__(self, base_url: str, tokenizer: Any, *, stop_token_ids: set[int],
                 vocab_size: int, max_positions: int, model: str | None = None,
                 api_key: str | None = None, timeout_s: float = 600.0, max_concurrency: int = 64):
        import httpx

        self.base_url = base_url.rstrip("/")
        if not self.base_url.endswith("/v1"):
            self.base_url += "/v1"
        self.tokenizer = tokenizer
        self.stop_token_ids, self.vocab_size = set(stop_token_ids), vocab_size
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.lock = threading.RLock()
        """Held by ``Policy.reference``; the server's weights never change under it, so no
        request needs to wait for it."""
        self._client = httpx.Client(base_url=self.base_url, headers=self.headers,
                                    timeout=timeout_s,
                                    limits=httpx.Limits(max_connections=max_concurrency))
        self._pool = ThreadPoolExecutor(max_concurrency, thread_name_prefix="ll-vllm")
        base = self.served_models()[0]
        self.name = model or base["id"]
        """The ``model`` every request names: the base model, then the newest adapter version."""
        self.max_positions = min(max_positions, int(base.get("max_model_len") or max_positions))

    @classmethod
    def for_policy(cls, base_url: str, policy: Any, **kwargs: Any) -> "VLLMEngine":
        """An engine with the stop tokens, vocabulary and context of ``policy``'s own engine."""
        local = policy.engine
        return cls(base_url, policy.tokenizer, stop_token_ids=local.stop_token_ids,
                   vocab_size=local.vocab_size, max_positions=local.max_positions, **kwargs)

    def served_models(self) -> list[dict[str, Any]]:
        """``GET /v1/models``: the base model first, then loaded adapters (vLLM's order)."""
        return self._call("GET", "/models", None)["data"]

    def submit(self, request: Request) -> Future:
        """Sample ``request.n`` completions; the future resolves to ``Sample``s or the error."""
        if request.params.grammar is not None:
            future: Future = Future()
            future.set_exception(ValueError(
                "constrained decoding (tool_choice='required', response_format, grammar) is not "
                "supported by the vLLM rollout engine yet; use --rollout-engine local"))
            return future
        return self._gather([self._pool.submit(self._complete, request, seed)
                             for seed in self._seeds(request)])

    def generate(self, requests: list[Request]) -> list[list[Sample]]:
        return [f.result() for f in [self.submit(r) for r in requests]]

    def compile_grammar(self, grammar: str) -> str:
        raise ValueError("grammars are not supported by the vLLM rollout engine yet; use "
                         "--rollout-engine local")

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
        body = {"model": self.name, "prompt": list(request.prompt_ids),
                "max_tokens": min(params.max_new_tokens, room), "temperature": params.temperature,
                "top_p": params.top_p, "logprobs": 0, "return_token_ids": True,
                "stop": list(params.stop), "stop_token_ids": sorted(self.stop_token_ids),
                "skip_special_tokens": False}
        if seed is not None:
            body["seed"] = seed
        response = self._call("POST", "/completions", body)
        choice = response["choices"][0]
        if choice.get("prompt_token_ids") != body["prompt"]:  # e.g. a BOS vLLM put in front
            raise VLLMError(f"{self.base_url} conditioned on other prompt ids than sent: "
                            f"{choice.get('prompt_token_ids')!r:.200} for {body['prompt']!r:.200}")
        ids = list(choice["token_ids"])
        logprobs = [float(x) for x in choice["logprobs"]["token_logprobs"]]
        if len(logprobs) != len(ids):
            raise VLLMError(f"{self.base_url}: {len(ids)} token ids but {len(logprobs)} logprobs")
        return Sample(ids, logprobs, "stop" if choice["finish_reason"] == "stop" else "length",
                      choice["text"], meta={"adapter_version": str(response.get("model") or self.name)})

    def prompt_logprobs(self, prompt_ids: list[int]) -> list[float]:
        """The served model's logprob of each prompt token after the first (one forward)."""
        body = {"model": self.name, "prompt": list(prompt_ids), "max_tokens": 1,
                "temperature": 0, "prompt_logprobs": 0, "return_token_ids": True}
        entries = self._call("POST", "/completions", body)["choices"][0]["prompt_logprobs"]
        return [float(entry[str(t)]["logprob"]) for entry, t in zip(entries[1:], prompt_ids[1:])]

    def _call(self, method: str, route: str, body: dict[str, Any] | None) -> dict[str, Any]:
        import httpx

        try:
            response = self._client.request(method, route, json=body)
        except httpx.HTTPError as exc:
            raise VLLMError(f"vLLM server {self.base_url} unreachable: "
                            f"{type(exc).__name__}: {exc}") from exc
        if response.status_code >= 400:
            raise VLLMError(f"vLLM server {self.base_url}{route} refused with HTTP "
                            f"{response.status_code}: {response.text[:500]}")
        return response.json()


def check_base_model(engine: VLLMEngine, policy: Any, tolerance: float = 0.25) -> float:
    """Refuse a server that serves another base model than the trainer's.

    The fingerprint is behavioural: the served model's logprobs of a fixed chat prompt against the
    trainer's adapter-off model. bf16 serving differs from the fp32 trainer by ~1e-2 nats per
    token; another model (or another checkpoint of the same one) by a nat or more. Returns the
    mean absolute difference; raises ``ConfigError`` (a usage error) above ``tolerance``.
    """
    import torch

    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Name three colours of the rainbow, then stop."}]
    text = policy.tokenizer.apply_chat_template(messages, tokenize=False,
                                                add_generation_prompt=True)
    ids = policy.tokenizer(text, add_special_tokens=False)["input_ids"]
    served = torch.tensor(engine.prompt_logprobs(ids))
    with policy.reference() as model, torch.no_grad():
        logits = model(torch.tensor([ids], device=policy.device)).logits[0, :-1].float()
    own = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:], device=policy.device)
                                               [:, None])[:, 0].cpu()
    gap = float((served - own).abs().mean())
    if gap > tolerance:
        raise ConfigError(f"vLLM server {engine.base_url} serves {engine.name!r}, which is not the "
                        f"trainer's base model {policy.name!r}: its logprobs of a fixed prompt "
                        f"differ by {gap:.2f} nats/token on average (same model: < {tolerance}); "
                        "start the server on the trainer's model")
    return gap
