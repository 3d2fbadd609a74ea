"""Mixed-adapter decoding vs a single-adapter batch (one LoRA adapter per role, ``multi_lora``).

Workload: SmolLM2-135M with LoRA adapters ``default``, ``writer`` and ``checker`` (rank 16 on
every projection), 32 chat prompts, 64 new tokens each, temperature 1, stop tokens ignored so
every row decodes exactly 64 tokens in both methods (same work, so tok/s compares the forward
alone). Single: all 32 rows on ``default`` (the forward as before multi-adapter support).
One: all 32 rows on ``writer`` (the per-row path with one adapter, no gather). Mixed: rows
alternate ``writer`` / ``checker``: each LoRA linear runs the base matmul once for the batch
and each adapter's delta on its own 16 rows. Methods are interleaved; medians of
``--repeats`` runs. Goal: mixed/single >= 0.8x.

    OMP_NUM_THREADS=1 python benchmarks/multi_adapter.py [--repeats 3] [--prompts 32]
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import lightning_lab as ll
from lightning_lab.inference.engine import Request
from lightning_lab.inference.sampling import SamplingParams

from common import banner, interleaved, median, parse_args

QUESTIONS = [
    "What is the capital of France?", "Name three primary colors.", "Why is the sky blue?",
    "How many legs does a spider have?", "What is photosynthesis?", "Who wrote Hamlet?",
    "What is 12 times 12?", "Define a prime number.", "What does a CPU do?",
    "How do birds fly?", "What is the boiling point of water?", "Explain gravity briefly.",
]


@dataclass
class Args:
    """Benchmark knobs."""

    model: str = "smollm2-135m"
    """Model to load (``tiny`` for a quick smoke run)."""
    prompts: int = 32
    """Rows in the batch."""
    max_new_tokens: int = 64
    """Tokens decoded per row (stop tokens ignored)."""
    repeats: int = 3
    """Runs of each method, interleaved; the median counts (the machine may be shared)."""


def run(policy: ll.Policy, prompts: list[list[int]], adapters: list[str], tokens: int) -> float:
    """Decode every prompt with its adapter in one engine batch; returns tokens per second."""
    params = SamplingParams(temperature=1.0, max_new_tokens=tokens, seed=0)
    requests = [Request(prompt_ids=p, params=replace(params, seed=i), adapter=a)
                for i, (p, a) in enumerate(zip(prompts, adapters))]
    start = time.perf_counter()
    samples = policy.engine.generate(requests)
    elapsed = time.perf_counter() - start
    return sum(len(s[0].response_ids) for s in samples) / elapsed


def main() -> None:
    args = parse_args(Args, __doc__.splitlines()[0])
    policy = ll.models.load(args.model, lora=True, adapters=["writer", "checker"])
    policy.engine.config.prefix_cache = False  # both methods prefill every prompt
    policy.engine.prefix_cache = None
    policy.engine.stop_token_ids = set()  # every row decodes max_new_tokens: equal work
    prompts = [policy.tokenizer(policy.prompt_text([{"role": "user", "content": q}]),
                                add_special_tokens=False)["input_ids"]
               for q in (QUESTIONS * args.prompts)[:args.prompts]]
    single = ["default"] * args.prompts
    one = ["writer"] * args.prompts
    mixed = [("writer", "checker")[i % 2] for i in range(args.prompts)]
    print(banner())
    print(f"{args.model}: {args.prompts} rows x {args.max_new_tokens} new tokens, "
          f"adapters {policy.adapters}")
    run(policy, prompts[:4], single[:4], 4)  # warm-up: thread pools, rotary tables
    results = interleaved({
        "single": lambda: run(policy, prompts, single, args.max_new_tokens),
        "one": lambda: run(policy, prompts, one, args.max_new_tokens),
        "mixed": lambda: run(policy, prompts, mixed, args.max_new_tokens),
    }, args.repeats)
    for name, values in results.items():
        print(f"{name:>6}: {median(values):8.1f} tok/s  (runs: "
              f"{', '.join(f'{v:.1f}' for v in values)})")
    print(f"mixed/one tok/s ratio {median(results['mixed']) / median(results['one']):.2f}x")
    print(f"mixed/single tok/s ratio {median(results['mixed']) / median(results['single']):.2f}x")
    policy.close()


if __name__ == "__main__":
    main()
