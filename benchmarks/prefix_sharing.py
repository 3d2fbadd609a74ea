"""Prefix sharing levers (issue 27): here ``sampling``, the engine's prefix cache on vs off.

Workload: 8 samples of one schema prompt (a system line, ~600 tokens of CREATE TABLE
statements, a question; chat template applied), temperature 1, at most 32 new tokens. The 8
requests arrive one after another as agent threads' calls do while the engine is busy: request
k+1 is submitted when request k has sampled its first token, so each is admitted into the
running batch on its own. Without the cache each admission prefills the whole prompt; with it
the first one does and the other 7 reuse its blocks; the cache is emptied before every run,
so no run reuses an earlier one's prompt. (One request with n=8 shares one prefill without
the cache too: that case is printed as well, as a check that the cache costs nothing there.) Both engines share one model and the same seeds, so they sample
the same tokens; methods are interleaved and medians of ``--repeats`` runs reported.

    python benchmarks/prefix_sharing.py [--model tiny|smollm2-135m] [--repeats 3]
"""

from __future__ import annotations

import argparse
import subprocess
import threading
import time
from dataclasses import replace

import lightning_lab as ll
from lightning_lab.inference.engine import Engine, Request
from lightning_lab.inference.sampling import SamplingParams

from common import banner, interleaved, median

SAMPLES = 8
COLUMNS = ("id INTEGER PRIMARY KEY", "name TEXT", "city TEXT", "founded INTEGER",
           "budget REAL", "owner_id INTEGER REFERENCES people(id)")
TABLES = ("people", "stadium", "concert", "singer", "orchestra", "museum", "visit", "airport",
          "flight", "employee", "shop", "hiring", "course", "teacher", "student", "pets")


def schema_prompt(policy, tokens: int) -> list[int]:
    """A text-to-SQL style chat prompt with CREATE TABLE statements until ~``tokens`` long."""
    tables: list[str] = []
    ids: list[int] = []
    for table in TABLES * 4:
        tables.append(f"CREATE TABLE {table}{len(tables)} (\n  " + ",\n  ".join(COLUMNS) + "\n);")
        messages = [{"role": "system", "content": "Answer with one SQLite query."},
                    {"role": "user", "content": "Schema:\n" + "\n".join(tables)
                     + "\nQuestion: How many concerts were held in each stadium in 2014?"}]
        ids = policy.tokenizer(policy.prompt_text(messages), add_special_tokens=False)["input_ids"]
        if len(ids) >= tokens:
            break
    return ids


def staggered(engine: Engine, prompt: list[int], max_new_tokens: int) -> float:
    """Seconds for SAMPLES requests, each submitted at its predecessor's first token."""
    futures = []
    all_sent = threading.Event()

    def request(k: int) -> Request:
        params = SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens, seed=k)
        return Request(prompt, params, on_token=lambda row: next_on_first(row, k))

    def next_on_first(row, k: int) -> None:
        if len(row.response_ids) == 1 and k + 1 < SAMPLES:
            futures.append(engine.submit(request(k + 1)))
        elif len(row.response_ids) == 1:
            all_sent.set()

    start = time.perf_counter()
    futures.append(engine.submit(request(0)))
    all_sent.wait()
    for future in list(futures):
        future.result()
    return time.perf_counter() - start


def together(engine: Engine, prompt: list[int], max_new_tokens: int) -> float:
    """Seconds for one request of SAMPLES rows (one admission: one prefill with or without cache)."""
    start = time.perf_counter()
    params = SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens, seed=0)
    engine.generate([Request(prompt, params, n=SAMPLES)])
    return time.perf_counter() - start


def cold(engine: Engine) -> None:
    """Empty the prefix cache: each run starts from the first sample (no earlier run's prompt)."""
    if engine.prefix_cache is not None:
        engine.prefix_cache.clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny | smollm2-135m | a directory")
    parser.add_argument("--prompt-tokens", type=int, default=600)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    print(banner())
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    policy = ll.models.load(args.model)
    prompt = schema_prompt(policy, args.prompt_tokens)
    engines = {cache: Engine(policy.model, policy.tokenizer,
                             replace(policy.engine.config, prefix_cache=cache))
               for cache in (True, False)}
    print(f"model {args.model} | prompt {len(prompt)} tokens | {SAMPLES} samples | "
          f"<= {args.max_new_tokens} new tokens | decode {policy.engine.config.decode_dtype}")
    methods = {f"{kind} cache {'on' if cache else 'off'}":
               (lambda e=engine, f=fn: cold(e) or f(e, prompt, args.max_new_tokens))
               for kind, fn in (("staggered", staggered), ("together", together))
               for cache, engine in engines.items()}
    interleaved(methods, 1)  # warm-up: rotary tables, allocator, bf16 weight copies
    for engine in engines.values():
        engine.take_prefix_hit_rate()
    times = {name: median(ts) for name, ts in interleaved(methods, args.repeats).items()}
    for name, seconds in times.items():
        print(f"{name:>20}: {seconds:.3f} s")
    print(f"prompt tokens reused with the cache on: {engines[True].take_prefix_hit_rate():.3f} "
          f"(off: {engines[False].take_prefix_hit_rate():.3f})")
    print(f"together (one request, n={SAMPLES}: shared without the cache too): "
          f"{times['together cache off'] / times['together cache on']:.2f}x")
    print(f"sampling speed-up {times['staggered cache off'] / times['staggered cache on']:.2f}x")
    for engine in engines.values():
        engine.close()
    policy.close()


if __name__ == "__main__":
    main()
