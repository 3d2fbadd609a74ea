"""Update cost per trajectory vs its number of turns: one forward over the last turn vs one per turn.

A multi-turn agent's turn k+1 prompt is turn k's prompt + response + a new message, so scoring
each transition alone re-runs the history: a 4-turn trajectory costs ~2.5x a 1-turn one of the
same final length. ``score`` lets earlier turns ride on the last turn's forward. Here each
trajectory is built with the real SmolLM2 chat template (a text-to-SQL style writer -> checker ->
rewriter -> finaliser exchange, fixed texts so runs are comparable), and one LoRA update pass
(forward + backward of the response-token logprobs) is timed for:

* 4-turn trajectory, ``score`` over all its turns at once (prefix sharing),
* the same 4 turns scored one at a time (what an update without sharing pays),
* a 1-turn trajectory whose prompt + response has the same final length (the target's baseline).

    python benchmarks/multi_turn_update.py [--repeats 5] [--turns 4]

Target: the 4-turn trajectory costs <= 1.5x the 1-turn one.
"""

from __future__ import annotations

import argparse
import time


import lightning_lab as ll
from lightning_lab.records import Transition
from lightning_lab.train.scoring import hosts, score

from common import banner, interleaved, median

SYSTEM = ("You write SQLite queries. Schema: singer(singer_id, name, country, age, song_name); "
          "concert(concert_id, concert_name, theme, stadium_id, year); "
          "stadium(stadium_id, location, name, capacity, highest, lowest, average).")
USER = ["How many singers are from France, and what is their average age?",
        "Check the query: does it run, and does it answer the question?",
        "Rewrite the query so that it also returns the oldest singer's name.",
        "Give the final query only."]
ASSISTANT = ["SELECT COUNT(*), AVG(age) FROM singer WHERE country = 'France';",
             "It runs and answers the question: it counts French singers and averages their age.",
             "SELECT COUNT(*), AVG(age), (SELECT name FROM singer WHERE country = 'France' "
             "ORDER BY age DESC LIMIT 1) FROM singer WHERE country = 'France';",
             "SELECT COUNT(*), AVG(age), (SELECT name FROM singer WHERE country = 'France' "
             "ORDER BY age DESC LIMIT 1) FROM singer WHERE country = 'France';"]


def trajectory(tokenizer, turns: int) -> list[Transition]:
    """One transition per assistant turn, with the ids the policy would have recorded."""
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    messages = [{"role": "system", "content": SYSTEM}]
    rows = []
    for k in range(turns):
        messages.append({"role": "user", "content": USER[k]})
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(ASSISTANT[k], add_special_tokens=False)["input_ids"] + [end]
        rows.append(Transition(prompt_ids=prompt_ids, response_ids=response_ids,
                               logprobs=[0.0] * len(response_ids)))
        messages.append({"role": "assistant", "content": ASSISTANT[k]})
    return rows


def single_turn_like(rows: list[Transition]) -> list[Transition]:
    """One transition with the same final length: a longer prompt, the last turn's response."""
    last = rows[-1]
    return [Transition(prompt_ids=last.prompt_ids, response_ids=last.response_ids,
                       logprobs=list(last.logprobs))]


def update_seconds(model, parts: list[list[Transition]]) -> float:
    """CPU seconds of one update pass over ``parts`` (each a separate ``score`` call)."""
    start = time.process_time()
    model.zero_grad(set_to_none=True)
    for part in parts:
        score(model, part, grad=True).logprobs.sum().backward()
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--turns", type=int, default=4)
    args = parser.parse_args()
    print(banner())
    policy = ll.models.load("smollm2-135m")
    model = policy.model
    rows = trajectory(policy.tokenizer, args.turns)
    assert all(b.prompt_ids[:len(a.prompt_ids) + len(a.response_ids)] == a.prompt_ids + a.response_ids
               for a, b in zip(rows, rows[1:])), "the chat template does not extend earlier turns"
    assert hosts(rows) == [len(rows) - 1] * len(rows)
    one = single_turn_like(rows)
    print(f"{args.turns}-turn trajectory: prompts {[len(r.prompt_ids) for r in rows]} tokens, "
          f"responses {[len(r.response_ids) for r in rows]}; final length "
          f"{len(rows[-1].prompt_ids) + len(rows[-1].response_ids)} (the 1-turn one: the same)")
    methods = {
        "1-turn trajectory": lambda: update_seconds(model, [one]),
        f"{args.turns}-turn, turns share one forward": lambda: update_seconds(model, [rows]),
        f"{args.turns}-turn, scored turn by turn": lambda: update_seconds(model, [[r] for r in rows]),
    }
    update_seconds(model, [rows])  # warm-up
    runs = interleaved(methods, args.repeats)
    base = median(runs["1-turn trajectory"])
    print(f"CPU seconds per trajectory update (forward + backward), median of {args.repeats}:")
    for name, values in runs.items():
        print(f"  {name:36s} {median(values):6.3f} s   {median(values) / base:5.2f}x the 1-turn")
    shared = median(runs[f"{args.turns}-turn, turns share one forward"]) / base
    print(f"target: {args.turns}-turn <= 1.5x 1-turn: {shared:.2f}x "
          f"({'met' if shared <= 1.5 else 'missed'})")


if __name__ == "__main__":
    main()
