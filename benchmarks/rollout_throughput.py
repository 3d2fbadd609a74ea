"""Rollout throughput on CPU: HF ``generate`` (per request, batched) vs the lightning-lab engine.

Workload: SmolLM2-135M (fp32 weights), 32 chat prompts (~36 tokens with the chat template),
temperature 1, at most 64 new tokens, stop at end-of-turn. Counted tokens are the useful ones: up
to and including the stop token (a batched HF call keeps computing finished rows, but those
tokens are not counted). The engine runs with fp32 matmuls and with bf16 ones (``decode_dtype``;
the default ``"auto"`` picks bf16 only on a CPU with native bf16), and HF ``generate`` runs on
an fp32 and on a bf16 copy of the model, so each lever is measured alone and the bf16 engine is
also compared with a bf16 HF; (c'') adds a decode thread per 16 rows (``rows_per_thread``, off by
default). Methods are interleaved; medians of ``--repeats`` runs.

    python benchmarks/rollout_throughput.py [--repeats 3] [--prompts 32] [--max-new-tokens 64]
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

import lightning_lab as ll
from lightning_lab.inference.engine import EngineConfig
from lightning_lab.inference.policy import Policy

from common import banner, median, parse_args

QUESTIONS = [
    "What is the capital of France?", "Name three primary colors.", "Why is the sky blue?",
    "How many legs does a spider have?", "What is photosynthesis?", "Who wrote Hamlet?",
    "What is 12 times 12?", "Define a prime number.", "What does a CPU do?",
    "How do birds fly?", "What is the boiling point of water?", "Explain gravity briefly.",
    "What is a noun?", "Name a mammal that lives in the sea.", "What causes rain?",
    "What is the largest planet?", "How many days are in a leap year?", "What is DNA?",
    "Give a synonym for happy.", "What language is spoken in Brazil?", "What is an atom?",
    "Why do we need sleep?", "What is the speed of light?", "Name a famous painter.",
    "What is a triangle?", "How does a rainbow form?", "What is the freezing point of water?",
    "What is a verb?", "Who invented the telephone?", "What is the moon made of?",
    "What is a volcano?", "How many continents are there?",
]


@dataclass
class Args:
    """Benchmark knobs."""

    prompts: int = 32
    """Number of chat prompts in the workload."""
    max_new_tokens: int = 64
    """Generation budget per prompt."""
    loop_subset: int = 4
    """Prompts used for the slow per-request HF loop (tok/s is extrapolated)."""
    seed: int = 0
    """Global torch seed, for comparable sampling across methods."""
    repeats: int = 3
    """Runs of every method but (a), interleaved; the median counts (the machine may be shared)."""


def useful_tokens(rows: torch.Tensor, stop_ids: set[int]) -> int:
    """Generated tokens up to and including the first stop token of each row."""
    total = 0
    for row in rows.tolist():
        n = len(row)
        for i, t in enumerate(row):
            if t in stop_ids:
                n = i + 1
                break
        total += n
    return total


def hf_generate(policy, texts: list[str], max_new_tokens: int, stop_ids: set[int],
                model=None) -> int:
    tok = policy.tokenizer
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        out = (model or policy.model).generate(
            **enc, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
            max_new_tokens=max_new_tokens, eos_token_id=sorted(stop_ids),
            pad_token_id=tok.pad_token_id,
        )
    return useful_tokens(out[:, enc["input_ids"].shape[1]:], stop_ids)


def timed(fn) -> tuple[float, float, int]:
    """(wall seconds, process CPU seconds, tokens). CPU time is the fairer number on a busy box."""
    wall, cpu = time.perf_counter(), time.process_time()
    tokens = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, tokens


def main(args: Args) -> None:
    torch.manual_seed(args.seed)
    print(banner())
    policy = ll.models.load("smollm2-135m", lora=False, decode_dtype="float32")
    bf16 = Policy(policy.model, policy.tokenizer, name="smollm2-135m",
                  engine_config=EngineConfig(decode_dtype="bfloat16", num_threads=1))  # as load()
    bf16_wide = Policy(policy.model, policy.tokenizer, name="smollm2-135m",  # rows_per_thread
                       engine_config=EngineConfig(decode_dtype="bfloat16", num_threads=1,
                                                  rows_per_thread=16))
    hf_bf16_model = ll.models.load("smollm2-135m", lora=False, dtype=torch.bfloat16).model
    messages = [[{"role": "user", "content": q}] for q in (QUESTIONS * 4)[: args.prompts]]
    texts = [policy.prompt_text(m) for m in messages]
    lengths = [len(policy.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    stop_ids = policy.engine.stop_token_ids
    print(f"{len(texts)} prompts, {sum(lengths) / len(lengths):.1f} tokens avg, "
          f"max_new_tokens={args.max_new_tokens}, threads={torch.get_num_threads()}")

    for p in (policy, bf16, bf16_wide):
        p.generate(messages[:2], max_new_tokens=4)  # warm up allocator, kernels, bf16 copies

    def hf_loop() -> int:
        return sum(hf_generate(policy, [t], args.max_new_tokens, stop_ids)
                   for t in texts[: args.loop_subset])

    def hf_batched() -> int:
        return hf_generate(policy, texts, args.max_new_tokens, stop_ids)

    def hf_batched_bf16() -> int:
        return hf_generate(policy, texts, args.max_new_tokens, stop_ids, model=hf_bf16_model)

    def engine_batch(p: Policy) -> int:
        gens = p.generate(messages, temperature=1.0, max_new_tokens=args.max_new_tokens)
        assert all(len(g.logprobs) == len(g.response_ids) for g in gens)
        return sum(len(g.response_ids) for g in gens)

    def engine_threads(p: Policy) -> int:
        def one(m):
            with ll.rollout(task_id="bench") as traj:
                p.chat(m, max_new_tokens=args.max_new_tokens, temperature=1.0)
            return len(traj.transitions[0].response_ids)

        with ThreadPoolExecutor(max_workers=len(messages)) as pool:
            return sum(pool.map(one, messages))

    n = len(messages)
    methods = {
        f"(a) HF generate, one at a time ({args.loop_subset} prompts)": (hf_loop, 1),
        "(b) HF generate, one batched call": (hf_batched, args.repeats),
        "(b') HF generate, batched, bf16 model": (hf_batched_bf16, args.repeats),
        "(c) Policy.generate, fp32": (lambda: engine_batch(policy), args.repeats),
        "(c') Policy.generate, bf16 matmuls": (lambda: engine_batch(bf16), args.repeats),
        "(c'') Policy.generate, bf16, a decode thread per 16 rows": (
            lambda: engine_batch(bf16_wide), args.repeats),
        f"(d) {n} threads of policy.chat, fp32": (lambda: engine_threads(policy), args.repeats),
        f"(d') {n} threads of policy.chat, bf16": (lambda: engine_threads(bf16), args.repeats),
    }
    rates: dict[str, list[tuple[float, float]]] = {name: [] for name in methods}  # (wall, cpu) tok/s
    for round_ in range(args.repeats):
        for name, (fn, runs) in methods.items():
            if round_ >= runs:
                continue
            wall, cpu, toks = timed(fn)
            print(f"  {name}: {toks} tokens, {wall:.1f}s wall, {cpu:.1f}s cpu")
            rates[name].append((toks / wall, toks / cpu))

    best = {name: (median([w for w, _ in r]), median([c for _, c in r])) for name, r in rates.items()}
    names = list(methods)
    base_a, base_b = best[names[0]], best[names[1]]
    print(f"\nmedians of {args.repeats} runs ((a): 1 run)")
    print(f"{'method':<44} {'tok/s':>7} {'vs (a)':>7} {'vs (b)':>7} | {'tok/cpu-s':>9} {'vs (b)':>7}")
    for name, (wall, cpu) in best.items():
        print(f"{name:<44} {wall:7.1f} {wall / base_a[0]:6.2f}x {wall / base_b[0]:6.2f}x | "
              f"{cpu:9.1f} {cpu / base_b[1]:6.2f}x")
    print("target: engine >= 1.5x (b), the batched HF generate of the same (fp32) model")
    for p in (policy, bf16, bf16_wide):
        p.close()


if __name__ == "__main__":
    main(parse_args(Args, __doc__.splitlines()[0]))
