"""Microseconds per recorded transition: tracing + record keeping, with the model call excluded.

The stand-in "model call" returns a prebuilt generation, so what is timed is exactly what an agent
pays per LLM call on top of the model: the contextvar lookups of ``ll.step``, building the
Transition and appending it, plus the ``ll.reward`` that usually follows. Compared in the same run
against the bare loop (the floor) and against serialising each transition to JSON, the cheapest
out-of-process event a tracer that posts events would pay.

    python benchmarks/trace_overhead.py
"""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import lightning_lab as ll
from lightning_lab.tracing import record_generation

N_ROLLOUTS, CALLS = 2000, 8
GEN = SimpleNamespace(prompt_ids=list(range(60)), response_ids=list(range(40)),
                      logprobs=[-0.5] * 40, prompt_text="p" * 200, text="r" * 120,
                      temperature=1.0, finish_reason="stop")


def traced() -> None:
    for i in range(N_ROLLOUTS):
        with ll.rollout(task_id=str(i)):
            for k in range(CALLS):
                with ll.step("writer" if k % 2 else "checker"):
                    record_generation(GEN)
                ll.reward(0.5)


def bare() -> None:
    for _ in range(N_ROLLOUTS):
        for _ in range(CALLS):
            GEN.text  # noqa: B018 - the loop floor


def json_event() -> None:
    for i in range(N_ROLLOUTS):
        for k in range(CALLS):
            json.dumps({"rollout": i, "step": k, "prompt_ids": GEN.prompt_ids,
                        "response_ids": GEN.response_ids, "logprobs": GEN.logprobs})


def per_call_us(fn) -> float:
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best / (N_ROLLOUTS * CALLS) * 1e6


if __name__ == "__main__":
    floor, cost, event = per_call_us(bare), per_call_us(traced), per_call_us(json_event)
    print(f"bare loop              {floor:7.2f} us/call")
    print(f"ll tracing (step+record+reward, rollout amortised) {cost - floor:7.2f} us/transition")
    print(f"json-encoding one event  {event - floor:7.2f} us/call "
          f"(tracing is {((event - floor) / max(cost - floor, 1e-9)):.1f}x cheaper than serialising)")
    print("target: <= 3 us/transition (Agent Lightning 1.0.2 in-process event recording ~9 us here)")
