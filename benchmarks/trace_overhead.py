"""Microseconds per recorded transition: tracing + record keeping, with the model call excluded.

The stand-in "model call" returns a prebuilt ``Generation`` (the policy's own type, so attribute
reads cost what they cost in a real call), so what is timed is exactly what an agent pays per LLM
call on top of the model: the contextvar lookups of ``ll.role``, building the
Transition and appending it, plus the ``ll.reward`` that usually follows. Compared in the same run
against the bare loop (the floor), a plain dict append per call (the least any in-process
recorder can do) and serialising each transition to JSON (the least an out-of-process tracer
pays). CPU time, not wall time. Each is timed ``--repeats`` times, interleaved; medians are reported.

    python benchmarks/trace_overhead.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import time

import lightning_lab as ll
from lightning_lab.inference.policy import Generation
from lightning_lab.tracing import record_generation

from common import banner, interleaved, median

N_ROLLOUTS, CALLS = 2000, 8
TARGET_US = 1.5
GEN = Generation(prompt_ids=list(range(60)), response_ids=list(range(40)), logprobs=[-0.5] * 40,
                 prompt_text="p" * 200, text="r" * 120, temperature=1.0, finish_reason="stop")


def traced() -> None:
    for i in range(N_ROLLOUTS):
        with ll.rollout(task_id=str(i)):
            for k in range(CALLS):
                with ll.role("writer" if k % 2 else "checker"):
                    record_generation(GEN)
                ll.reward(0.5)


def bare() -> None:
    for _ in range(N_ROLLOUTS):
        for _ in range(CALLS):
            GEN.text  # noqa: B018 - the loop floor


def dict_append() -> None:
    for i in range(N_ROLLOUTS):
        events: list[dict] = []
        for k in range(CALLS):
            events.append({"prompt_ids": GEN.prompt_ids, "response_ids": GEN.response_ids,
                           "logprobs": GEN.logprobs, "role": "writer", "reward": 0.5})


def json_event() -> None:
    for i in range(N_ROLLOUTS):
        for k in range(CALLS):
            json.dumps({"rollout": i, "step": k, "prompt_ids": GEN.prompt_ids,
                        "response_ids": GEN.response_ids, "logprobs": GEN.logprobs})


def per_call_us(fn) -> float:
    """CPU time of this process per call: unlike wall time it does not count the time other
    processes held the core, so it holds on a busy machine."""
    start = time.process_time()
    fn()
    return (time.process_time() - start) / (N_ROLLOUTS * CALLS) * 1e6


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(banner())
    runs = interleaved({name: (lambda f=f: per_call_us(f)) for name, f in
                        (("bare", bare), ("traced", traced), ("dict", dict_append),
                         ("json", json_event))}, args.repeats)
    floor = median(runs["bare"])
    cost, plain, event = (median(runs[k]) - floor for k in ("traced", "dict", "json"))
    print(f"medians of {args.repeats} interleaved repeats, loop floor ({floor:.2f} us) subtracted:")
    print(f"  ll tracing (role + record + reward, rollout amortised) {cost:7.2f} us/transition")
    print(f"  plain dict append per call                             {plain:7.2f} us/call "
          f"(tracing costs {cost / max(plain, 1e-9):.2f}x)")
    print(f"  json-encoding one event                                {event:7.2f} us/call "
          f"(tracing is {event / max(cost, 1e-9):.1f}x cheaper)")
    print(f"target: <= {TARGET_US} us/transition on a quiet machine "
          f"({'met' if cost <= TARGET_US else 'missed'} here)")
