"""Prefix sharing levers (issue 27), one ``<lever> speed-up N.NNx`` line each.

``sft``: target tokens/s of SFT steps with ``SFTConfig.share_prefixes`` on vs off. Workload:
``--sft-databases`` schema prompts (~600 tokens of CREATE TABLE statements, each database its
own tables) with ``--sft-questions`` questions each (the question follows the schema) and a
~40-token SQL target; batches of 16 rows drawn as ``SFTTrainer`` draws them (shuffled, so a
batch holds a few questions of each database). Learning rate 0, so both trainers see the same
weights and, with one seed, the same batches; their steps are interleaved, medians reported.
A third trainer adds ``SFTConfig.group_by_prefix`` (batches drawn one database at a time where
possible); the ``sft speed-up`` line is that against sharing off, and the ungrouped ratio is
printed beside it.

``sampling``: the engine's prefix cache on vs off. Workload: 8 samples of one schema prompt (a system line, ~600 tokens of CREATE TABLE
statements, a question; chat template applied), temperature 1, at most 32 new tokens. The 8
requests arrive one after another as agent threads' calls do while the engine is busy: request
k+1 is submitted when request k has sampled its first token, so each is admitted into the
running batch on its own. Without the cache each admission prefills the whole prompt; with it
the first one does and the other 7 reuse its blocks; the cache is emptied before every run,
so no run reuses an earlier one's prompt. (One request with n=8 shares one prefill without
the cache too: that case is printed as well, as a check that the cache costs nothing there.) Both engines share one model and the same seeds, so they sample
the same tokens; methods are interleaved and medians of ``--repeats`` runs reported.

``ppo``: completion tokens/s of whole PPO steps (8 samples of each of ``--ppo-questions``
questions, drawn from ``--sft-databases`` x ``--sft-questions`` schema prompts; sampling with
agent threads, then the update), with the engine's prefix cache and ``PPOConfig.share_prefixes``
both on vs both off, and on with ``PPOConfig.group_tasks_by`` (a step's questions from one
database: the ``ppo speed-up`` line; the ungrouped ratio is printed beside it). Learning rate 0,
so every side samples from the same weights; steps interleaved, medians reported.

    python benchmarks/prefix_sharing.py [--model tiny|smollm2-135m] [--repeats 3] [--levers sft,sampling,ppo]
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
from lightning_lab.train.sft import demonstrations_to_batch

from common import banner, interleaved, median

SAMPLES = 8
COLUMNS = ("id INTEGER PRIMARY KEY", "name TEXT", "city TEXT", "founded INTEGER",
           "budget REAL", "owner_id INTEGER REFERENCES people(id)")
TABLES = ("people", "stadium", "concert", "singer", "orchestra", "museum", "visit", "airport",
          "flight", "employee", "shop", "hiring", "course", "teacher", "student", "pets")


QUESTION = "How many concerts were held in each stadium in 2014?"


def schema_messages(policy, tokens: int, database: int = 0, question: str = QUESTION
                    ) -> list[dict[str, str]]:
    """A text-to-SQL style chat with CREATE TABLE statements until ~``tokens`` long; each
    ``database`` starts from another table, so two databases share only the system line."""
    tables: list[str] = []
    messages: list[dict[str, str]] = []
    names = TABLES[database % len(TABLES):] + TABLES[:database % len(TABLES)]
    for table in names * 4:
        tables.append(f"CREATE TABLE {table}{len(tables)} (\n  " + ",\n  ".join(COLUMNS) + "\n);")
        messages = [{"role": "system", "content": "Answer with one SQLite query."},
                    {"role": "user", "content": "Schema:\n" + "\n".join(tables)
                     + f"\nQuestion: {question}"}]
        ids = policy.tokenizer(policy.prompt_text(messages), add_special_tokens=False)["input_ids"]
        if len(ids) >= tokens:
            break
    return messages


def schema_prompt(policy, tokens: int) -> list[int]:
    """Token ids of ``schema_messages``."""
    text = policy.prompt_text(schema_messages(policy, tokens))
    return policy.tokenizer(text, add_special_tokens=False)["input_ids"]


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


def sft_demonstrations(policy, args) -> list[ll.Demonstration]:
    """``--sft-databases`` x ``--sft-questions`` schema prompts with ~40-token SQL targets."""
    demos = []
    for db in range(args.sft_databases):
        for q in range(args.sft_questions):
            table = TABLES[(db + q) % len(TABLES)]
            question = f"Which {table} names have a budget above {1000 * (q + 1)}, by city?"
            target = (f" T1.name, T1.city FROM {table}{q} AS T1 JOIN people0 AS T2 ON "
                      f"T1.owner_id = T2.id WHERE T1.budget > {1000 * (q + 1)};")
            demos.append(ll.Demonstration(schema_messages(policy, args.prompt_tokens, db, question),
                                          target, prefill="SELECT", task_id=f"db{db}-q{q}"))
    return demos


def sft_lever(args) -> None:
    """SFT target tokens/s with shared prefixes on vs off (same batches, same weights)."""
    policy = ll.models.load(args.model, lora=True)
    batch, _ = demonstrations_to_batch(policy.tokenizer, sft_demonstrations(policy, args))
    rows = [tr for _, tr in batch.transitions()]
    print(f"sft: model {args.model} | {len(rows)} rows ({args.sft_databases} databases) | prompt "
          f"{min(len(tr.prompt_ids) for tr in rows)}-{max(len(tr.prompt_ids) for tr in rows)} tokens "
          f"| target {sum(len(tr.response_ids) for tr in rows) / len(rows):.0f} tokens | batch 16")
    arms = {"sharing on, grouped": dict(share_prefixes=True, group_by_prefix=True),
            "sharing on": dict(share_prefixes=True), "sharing off": dict(share_prefixes=False)}
    trainers = {name: ll.SFTTrainer(policy, batch, ll.SFTConfig(lr=0.0, batch_size=16, **arm))
                for name, arm in arms.items()}

    def speed(trainer) -> float:
        metrics = trainer.step().metrics
        return metrics["response_tokens"] / metrics["update_s"]

    methods = {name: (lambda t=t: speed(t)) for name, t in trainers.items()}
    interleaved(methods, 1)  # warm-up
    speeds = {name: median(v) for name, v in interleaved(methods, args.repeats).items()}
    for name, tokens_per_s in speeds.items():
        print(f"{name:>20}: {tokens_per_s:.1f} target tokens/s")
    off = speeds["sharing off"]
    print(f"sft speed-up {speeds['sharing on, grouped'] / off:.2f}x "
          f"(ungrouped: {speeds['sharing on'] / off:.2f}x)")
    policy.close()


def sampling_lever(args) -> None:
    """Sampling time of 8 staggered requests of one schema prompt, prefix cache on vs off."""
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


def ppo_lever(args) -> None:
    """Completion tokens/s of whole PPO steps on schema prompts, every prefix lever on vs off."""
    policy = ll.models.load(args.model, lora=True)
    engines = {on: Engine(policy.model, policy.tokenizer,
                          replace(policy.engine.config, prefix_cache=on)) for on in (True, False)}
    tasks = [{"task_id": f"db{db}-q{q}", "db": db,
              "question": f"Which {TABLES[(db + q) % len(TABLES)]} rows have a budget above {q}?"}
             for db in range(args.sft_databases) for q in range(args.sft_questions)]

    def agent(task):
        text = policy.chat(schema_messages(policy, args.prompt_tokens, task["db"], task["question"]),
                           max_new_tokens=args.max_new_tokens)
        ll.reward(1.0 / (1.0 + len(text.split())))  # varied rewards: the update has work to do

    arms = {"levers off": (False, None), "levers on": (True, None), "levers on, grouped": (True, "db")}
    trainers = {name: ll.PPOTrainer(policy, agent, tasks, config=ll.PPOConfig(
                    lr=0.0, tasks_per_step=args.ppo_questions, group_size=SAMPLES,
                    minibatch_size=16, ppo_epochs=1, kl_coef=0.0, share_prefixes=on,
                    group_tasks_by=by))
                for name, (on, by) in arms.items()}

    def speed(name: str) -> float:
        policy.engine = engines[arms[name][0]]  # the trainer samples through policy.chat
        start = time.perf_counter()
        metrics = trainers[name].step().metrics
        return metrics["response_tokens"] / (time.perf_counter() - start)

    print(f"ppo: model {args.model} | {args.ppo_questions} questions x {SAMPLES} samples a step "
          f"from {args.sft_databases} databases | prompt ~{args.prompt_tokens} tokens | "
          f"<= {args.max_new_tokens} new tokens | lr 0 (same weights on every side) | grouped: "
          f"a step's questions from one database (PPOConfig.group_tasks_by)")
    methods = {name: (lambda name=name: speed(name)) for name in arms}
    interleaved(methods, 1)  # warm-up
    speeds = {name: median(v) for name, v in interleaved(methods, args.repeats).items()}
    for name, tokens_per_s in speeds.items():
        print(f"{name:>20}: {tokens_per_s:.1f} completion tokens/s (sampling + update)")
    print(f"ppo speed-up {speeds['levers on, grouped'] / speeds['levers off']:.2f}x "
          f"(ungrouped: {speeds['levers on'] / speeds['levers off']:.2f}x)")
    for engine in engines.values():
        engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny | smollm2-135m | a directory")
    parser.add_argument("--prompt-tokens", type=int, default=600)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--levers", default="sft,sampling,ppo", help="comma-separated: sft, sampling, ppo")
    parser.add_argument("--sft-databases", type=int, default=4)
    parser.add_argument("--sft-questions", type=int, default=8)
    parser.add_argument("--ppo-questions", type=int, default=2, help="questions per PPO step")
    args = parser.parse_args()
    levers = {"sft": sft_lever, "sampling": sampling_lever, "ppo": ppo_lever}
    unknown = set(args.levers.split(",")) - set(levers)
    if unknown:
        parser.error(f"--levers: unknown {sorted(unknown)}; choose from {sorted(levers)}")

    print(banner())
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    for name in args.levers.split(","):
        levers[name](args)


if __name__ == "__main__":
    main()
