"""Pure table/HTML builders behind the widgets: testable without a browser or a kernel.

Everything takes the trainer's own ``Batch``/``StepState`` objects and only reads them.
"""

from __future__ import annotations

import html
import math
import time
from dataclasses import dataclass
from typing import Any

from ...records import Batch, Trajectory

__all__ = ["last_user_message", "advantage_table", "filter_trajectories", "trajectory_label",
           "trajectory_html", "CreditComparison", "compare_credit", "strategy_params",
           "transitions_frame"]


def last_user_message(prompt: str) -> str:
    """The last user turn of a chat-templated prompt (ChatML), else the prompt itself.

    Tables show this instead of the full prompt, whose system preamble repeats on every row.
    """
    marker = "<|im_start|>user\n"
    if marker not in prompt:
        return prompt
    return prompt.rsplit(marker, 1)[1].split("<|im_end|>", 1)[0].strip()


def _fmt(x: float | None, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.{digits}f}"


def transitions_frame(batch: Batch):
    """``Batch.to_pandas`` plus the short question column the widgets and notebooks show, and
    each transition's ``lag``: trainer steps between the weights that sampled it and those its
    update started from (``meta["lag"]``; 1 with ``max_staleness`` 1 after the first step)."""
    frame = batch.to_pandas()
    frame["question"] = frame["prompt"].fillna("").map(last_user_message)
    frame["lag"] = [lag for traj in batch.trajectories  # to_pandas: one row per empty trajectory
                    for lag in ([tr.meta.get("lag") for tr in traj.transitions] or [None])]
    return frame


def advantage_table(old: Batch, new: Batch):
    """One row per transition: reward, old/new return and advantage, the change, and the
    transition's lag (``meta["lag"]``, None when the trainer recorded none).

    ``old`` and ``new`` are the same rollouts under two strategies (``state.recompute`` keeps
    trajectory ids and order), so rows pair up by position.
    """
    import pandas as pd

    rows = []
    for (traj, a), (_, b) in zip(old.transitions(), new.transitions()):
        delta = (None if a.advantage is None or b.advantage is None else b.advantage - a.advantage)
        rows.append({"traj_id": traj.traj_id, "task_id": traj.task_id, "turn": a.turn,
                     "role": a.role, "reward": a.reward, "old_return": a.ret,
                     "old_advantage": a.advantage, "new_return": b.ret,
                     "new_advantage": b.advantage, "delta": delta, "lag": a.meta.get("lag")})
    return pd.DataFrame(rows)


def filter_trajectories(batch: Batch, *, task: str | None = None, min_reward: float | None = None,
                        max_reward: float | None = None, status: str | None = None
                        ) -> list[Trajectory]:
    """Trajectories matching every given filter (``status``: "ok" | "failed" | None = any)."""
    out = []
    for traj in batch.trajectories:
        if task and traj.task_id != task:
            continue
        if min_reward is not None and traj.total_reward < min_reward - 1e-12:
            continue
        if max_reward is not None and traj.total_reward > max_reward + 1e-12:
            continue
        if status and traj.status != status:
            continue
        out.append(traj)
    return out


def trajectory_label(traj: Trajectory) -> str:
    flag = "" if traj.status == "ok" else " FAILED"
    return f"{traj.task_id} · R={traj.total_reward:.2f} · {len(traj.transitions)} calls{flag} · {traj.traj_id}"


def trajectory_html(traj: Trajectory, max_chars: int = 4000) -> str:
    """Each transition as a card: role, reward/return/advantage, tokens, the response, and the
    prompt in a collapsed ``<details>`` (prompts are long and mostly repeat)."""
    esc = html.escape
    parts = [f"<div><b>{esc(traj.task_id)}</b> · status <b>{esc(traj.status)}</b> · "
             f"total reward {traj.total_reward:.3f} · group {esc(traj.group_id)}</div>"]
    if traj.error:
        parts.append(f"<div style='color:#b00'>error: {esc(traj.error)}</div>")
    meta = {k: v for k, v in traj.meta.items() if not isinstance(v, (dict, list))}
    if meta:
        parts.append("<div style='font-size:90%;color:#555'>meta: "
                     + esc(", ".join(f"{k}={str(v)[:80]}" for k, v in meta.items())) + "</div>")
    for tr in traj.transitions:
        parts.append(
            "<div style='border:1px solid #ddd;border-radius:4px;margin:4px 0;padding:4px'>"
            f"<b>#{tr.turn} {esc(tr.role or '(no role)')}</b> · reward {tr.reward:.3f} · "
            f"return {_fmt(tr.ret)} · advantage {_fmt(tr.advantage)} · "
            f"tokens {len(tr.prompt_ids)}→{len(tr.response_ids)} ({esc(tr.finish_reason)})"
            + (f" · lag {tr.meta['lag']}" if "lag" in tr.meta else "") +
            f"<details><summary>prompt</summary><pre style='white-space:pre-wrap'>"
            f"{esc(tr.prompt[-max_chars:])}</pre></details>"
            f"<pre style='white-space:pre-wrap;background:#f6f6f6'>{esc(tr.response[:max_chars])}</pre>"
            "</div>")
    if not traj.transitions:
        parts.append("<i>no LLM calls</i>")
    return "\n".join(parts)


def strategy_params(name: str) -> dict[str, Any]:
    """A registered strategy's parameters and defaults (what the credit panel lets you edit)."""
    from ... import credit as credit_lib

    return credit_lib.get(name).params()


@dataclass
class CreditComparison:
    """The same rollouts under the state's strategy (``old``) and another one (``new``)."""

    old: Any
    new: Any
    seconds: float

    def table(self):
        return advantage_table(self.old.batch, self.new.batch)


def compare_credit(state: Any, strategy: str, valued: Any = None, **params: Any) -> CreditComparison:
    """``state.recompute(strategy, **params)`` timed; ``valued`` (a state whose transitions already
    carry critic values) avoids a critic forward on every slider move for the value strategy."""
    t0 = time.perf_counter()
    base = valued if valued is not None else state
    new = base.recompute(strategy, **params)
    return CreditComparison(old=state, new=new, seconds=time.perf_counter() - t0)
