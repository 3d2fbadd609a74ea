"""Proxy throughput on CPU: 32 OpenAI-SDK agents over HTTP vs HF ``generate`` (per request, batched),
and time to first token of the same 32 agents streaming (token-by-token SSE).

Workload (the same as ``rollout_throughput.py``, whose prompts and HF helpers are reused):
SmolLM2-135M fp32, 32 chat prompts, temperature 1, at most 64 new tokens, stop at end-of-turn.
The HTTP agents each call a *traced* rollout URL, so the number includes building and appending
the Transition. Counted tokens are the useful ones (up to and including the stop token).

    python benchmarks/proxy_throughput.py [--prompts 32] [--max-new-tokens 64] [--loop-subset 4]
        [--decode-dtype bfloat16]
"""

from __future__ import annotations

import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import openai
import torch

import lightning_lab as ll

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import banner, parse_args  # noqa: E402
from rollout_throughput import QUESTIONS, hf_generate  # noqa: E402


@dataclass
class Args:
    """Benchmark knobs."""

    prompts: int = 32
    """Concurrent agents (one chat prompt each)."""
    max_new_tokens: int = 64
    """Generation budget per request."""
    loop_subset: int = 4
    """Prompts used for the slow one-at-a-time HF loop (tok/s is extrapolated)."""
    rounds: int = 2
    """Timed repetitions of the HTTP workload (the best round is reported, like the HF runs once)."""
    trace_samples: int = 20000
    """Calls of the isolated tracing micro-benchmark."""
    seed: int = 0
    decode_dtype: str = "float32"
    """The proxied engine's sampling matmuls (``models.load(decode_dtype=)``): float32, bfloat16
    or auto; HF ``generate`` stays fp32 either way, as in ``rollout_throughput.py``."""


def http_round(server, messages: list, max_new_tokens: int) -> tuple[float, int, list[float]]:
    """Every agent opens a traced rollout and makes one call; returns (seconds, tokens, latencies)."""

    def agent(m) -> tuple[int, float]:
        with server.rollout(task_id="bench") as r:
            client = openai.OpenAI(base_url=r.base_url, api_key="-", max_retries=0, timeout=600)
            t0 = time.perf_counter()
            reply = client.chat.completions.create(model=server.backend.name, messages=m,
                                                   temperature=1.0, max_tokens=max_new_tokens)
            latency = time.perf_counter() - t0
        assert len(r.trajectory.transitions) == 1
        return reply.usage.completion_tokens, latency

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(messages)) as pool:
        results = list(pool.map(agent, messages))
    return time.perf_counter() - start, sum(t for t, _ in results), [lat for _, lat in results]


def streaming_round(server, messages: list, max_new_tokens: int) -> list[tuple[float, float, int]]:
    """Every agent streams one traced call: (time to first content token, total, content deltas)."""

    def agent(m) -> tuple[float, float, int]:
        with server.rollout(task_id="bench-stream") as r:
            client = openai.OpenAI(base_url=r.base_url, api_key="-", max_retries=0, timeout=600)
            t0 = time.perf_counter()
            first, deltas = None, 0
            for chunk in client.chat.completions.create(model=server.backend.name, messages=m,
                                                        temperature=1.0, stream=True,
                                                        max_tokens=max_new_tokens):
                if chunk.choices and chunk.choices[0].delta.content:
                    deltas += 1
                    first = first or time.perf_counter() - t0
            total = time.perf_counter() - t0
        assert len(r.trajectory.transitions) == 1
        return first or total, total, deltas

    with ThreadPoolExecutor(max_workers=len(messages)) as pool:
        return list(pool.map(agent, messages))


def tracing_microbenchmark(n: int) -> float:
    """Mean ms to build and append one HTTP call's Transition (64 response tokens), uncontended."""
    from lightning_lab.proxy.registry import RolloutRegistry

    registry = RolloutRegistry()
    prompt, response, logprobs = list(range(40)), list(range(64)), [-1.0] * 64
    entry = registry.open(ll.Trajectory(task_id="micro"))
    for i in range(n):
        if i % 100 == 0:  # keep the trajectory short, as real ones are
            entry.trajectory.transitions.clear()
        registry.record(entry, prompt_ids=list(prompt), prompt_text="p", response_ids=list(response),
                        logprobs=list(logprobs), text="r", temperature=1.0, finish_reason="stop",
                        role="writer", meta={"request_id": "x", "choice": 0, "via": "http"})
    return registry.stats.mean_ms


def main(args: Args) -> None:
    torch.manual_seed(args.seed)
    policy = ll.models.load("smollm2-135m", lora=False, decode_dtype=args.decode_dtype)
    messages = [[{"role": "user", "content": q}] for q in (QUESTIONS * 4)[: args.prompts]]
    texts = [policy.prompt_text(m) for m in messages]
    stop_ids = policy.engine.stop_token_ids
    print(banner())
    print(f"{len(texts)} prompts, max_new_tokens={args.max_new_tokens}, "
          f"threads={torch.get_num_threads()}, engine decode dtype {policy.engine.decode_dtype}")
    results: dict[str, float] = {}

    hf_generate(policy, texts[:2], 4, stop_ids)  # warm up
    start = time.perf_counter()
    toks = sum(hf_generate(policy, [t], args.max_new_tokens, stop_ids)
               for t in texts[: args.loop_subset])
    secs = time.perf_counter() - start
    results["(a) HF generate, one request at a time"] = toks / secs
    print(f"(a) {toks} tokens / {secs:.1f}s on {args.loop_subset} prompts")

    start = time.perf_counter()
    toks = hf_generate(policy, texts, args.max_new_tokens, stop_ids)
    secs = time.perf_counter() - start
    results["(b) HF generate, one batched call"] = toks / secs
    print(f"(b) {toks} tokens / {secs:.1f}s")

    with ll.serve(policy) as server:
        http_round(server, messages[:4], 4)  # warm up the server, engine and HTTP pools
        server.registry.stats.__init__()
        best = None
        for i in range(args.rounds):
            secs, toks, latencies = http_round(server, messages, args.max_new_tokens)
            print(f"(c) round {i}: {toks} tokens / {secs:.1f}s")
            if best is None or toks / secs > best[1] / best[0]:
                best = (secs, toks, latencies)
        stats = server.trace_stats
        streams = streaming_round(server, messages, args.max_new_tokens)
    secs, toks, latencies = best
    results[f"(c) {len(messages)} OpenAI-SDK agents over HTTP"] = toks / secs

    base_a = results["(a) HF generate, one request at a time"]
    base_b = results["(b) HF generate, one batched call"]
    print(f"\n{'method':<44} {'tok/s':>8} {'vs (a)':>8} {'vs (b)':>8}")
    for name, rate in results.items():
        print(f"{name:<44} {rate:8.1f} {rate / base_a:7.2f}x {rate / base_b:7.2f}x")
    latencies.sort()
    p95 = latencies[min(len(latencies) - 1, int(round(0.95 * (len(latencies) - 1))))]
    print(f"\nHTTP latency per call: p50 {statistics.median(latencies):.2f}s  p95 {p95:.2f}s")
    print(f"tracing overhead per HTTP call, in the server under load: mean {stats.mean_ms:.3f} ms, "
          f"max {1e3 * stats.max_s:.3f} ms over {stats.calls} calls")
    ttft = statistics.median(s[0] for s in streams)
    total = statistics.median(s[1] for s in streams)
    print(f"streaming ({len(streams)} agents at once): time to first token p50 {ttft:.2f}s, "
          f"whole reply p50 {total:.2f}s (TTFT = {ttft / total:.2f} of total), "
          f"content deltas per reply p50 {statistics.median(s[2] for s in streams):.0f}")
    print(f"tracing overhead per call, isolated ({args.trace_samples} calls): "
          f"{tracing_microbenchmark(args.trace_samples):.4f} ms")
    policy.close()


if __name__ == "__main__":
    main(parse_args(Args, __doc__.splitlines()[0]))
