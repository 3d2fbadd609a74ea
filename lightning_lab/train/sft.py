"""Supervised fine-tuning on stored transitions: token-level NLL of the response tokens only.

Why a separate trainer and not a PPO mode: SFT needs no rollouts, no advantages, no reference
model and no behaviour logprobs, so a stored ``Batch`` (JSONL/Parquet, OpenTelemetry, Agent
Lightning spans, or demonstrations built from a dataset) is enough. It reuses the PPO update's
forward (``scoring.score``: response-token logprobs, shared prompts and, with
``SFTConfig.share_prefixes``, shared prompt prefixes such as a schema run once), so the prompt
tokens are context and never targets, exactly as in the RL loss that usually follows.

A demonstration goes through the agent's own prompt: ``Demonstration(prompt=writer_messages(...),
prefill="SELECT", target=" name FROM t;")`` is tokenised the way the policy tokenises a call
(chat template + prefill as prompt ids, the target as response ids), so what SFT teaches is the
same conditional the agent samples from later.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from ..inference.prompts import dedupe_prompts
from ..records import Batch, TraceFormatError, Trajectory, Transition
from .callbacks import CallbackList
from .config import SFTConfig
from .multi_adapter import score_as, warm_start_parameters
from .scoring import chunk_rows, common_length

__all__ = ["Demonstration", "SFTConfig", "SFTTrainer", "SFTStepState", "demonstrations_to_batch",
           "load_traces", "prefix_clusters", "sft_loss", "sft_rows", "sft_state_dict"]


@dataclass(frozen=True)
class Demonstration:
    """One target response for one prompt, as the agent would have made the call."""

    prompt: str | list[dict[str, str]]
    """Chat messages (the chat template is applied with the generation prompt) or a raw string."""
    target: str
    """What the model should generate after ``prefill``; include the stop string the agent uses."""
    prefill: str = ""
    """Start of the assistant turn (part of the prompt, never a target)."""
    role: str = ""
    """Role the transition gets (the ``ll.role`` name of the agent's call)."""
    task_id: str = ""
    end_of_turn: bool = False
    """Append the tokenizer's end-of-turn token: the call ended by the model stopping, not by a
    stop string the engine cut at."""


def demonstrations_to_batch(tokenizer: Any, demos: Iterable[Demonstration], *,
                            max_context: int | None = None) -> tuple[Batch, Counter]:
    """A ``Batch`` of one-transition trajectories, and a count of what was skipped and why.

    Skipped, never raised: empty targets (``empty_target``) and prompt + target longer than
    ``max_context`` tokens (``over_context``). A dataset of thousands should not die on one row.
    """
    from ..inference.policy import render_prompt

    skipped: Counter = Counter()
    batch = Batch()
    eos = _end_of_turn_id(tokenizer)
    for i, demo in enumerate(demos):
        if not demo.target.strip():
            skipped["empty_target"] += 1
            continue
        prompt_text = render_prompt(tokenizer, demo.prompt, demo.prefill)
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(demo.target, add_special_tokens=False)["input_ids"]
        if demo.end_of_turn and eos is not None:
            response_ids = response_ids + [eos]
        if max_context is not None and len(prompt_ids) + len(response_ids) > max_context:
            skipped["over_context"] += 1
            continue
        tr = Transition(prompt_ids=prompt_ids, response_ids=response_ids, prompt=prompt_text,
                        response=demo.target, role=demo.role, temperature=1.0,
                        meta={"source": "demonstration"})
        batch.trajectories.append(Trajectory(task_id=demo.task_id or str(i), transitions=[tr],
                                             meta={"source": "demonstration"}))
    return batch, skipped


def _end_of_turn_id(tokenizer: Any) -> int | None:
    for token in ("<|im_end|>", "<|eot_id|>"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            return tid
    return tokenizer.eos_token_id


def sft_rows(batch: Batch, *, roles: Sequence[str] | None = None,
             max_context: int | None = None) -> tuple[list[Transition], Counter]:
    """The transitions SFT trains on: finished trajectories' calls with a response, optionally of
    some roles only; over-long ones are skipped and counted (``over_context``)."""
    rows: list[Transition] = []
    skipped: Counter = Counter()
    for traj, tr in batch.transitions():
        if traj.status != "ok":
            skipped["failed_trajectory"] += 1
        elif not tr.response_ids:
            skipped["empty_target"] += 1
        elif roles is not None and tr.role not in roles:
            skipped["other_role"] += 1
        elif max_context is not None and len(tr.prompt_ids) + len(tr.response_ids) > max_context:
            skipped["over_context"] += 1
        else:
            rows.append(tr)
    return rows, skipped


def sft_loss(logprobs: torch.Tensor) -> torch.Tensor:
    """Token-mean negative log-likelihood over flat (N,) response-token logprobs.

    Token-mean (as the PPO loss): every target token weighs the same, whatever its row's length.
    """
    return -logprobs.mean()


@dataclass
class SFTStepState:
    """One optimizer step of SFT; carries ``metrics`` and ``batch`` like ``StepState`` so the
    W&B callback and the dashboard's curves take it as they are."""

    iteration: int
    batch: Batch
    metrics: dict[str, float]
    skipped: Counter = field(default_factory=Counter)

    def to_pandas(self):
        return self.batch.to_pandas()


class SFTTrainer:
    """Fine-tune ``policy`` on the response tokens of a stored batch.

    ``step()`` is one optimizer step on the next ``batch_size`` rows (shuffled passes, groups
    sharing a prompt kept together); ``fit()`` runs ``config.epochs`` passes. Pass an existing
    ``optimizer`` to continue one (rejection sampling rounds do).
    """

    def __init__(self, policy: Any, batch: Batch, config: SFTConfig | None = None, *,
                 callbacks: Sequence[Any] | CallbackList = (), optimizer: torch.optim.Optimizer | None = None):
        self.policy = policy
        self.config = config or SFTConfig()
        self.callbacks = callbacks if isinstance(callbacks, CallbackList) else CallbackList(callbacks)
        model = policy.model
        max_context = self.config.max_context or getattr(model.config, "max_position_embeddings", None)
        self.rows, self.skipped = sft_rows(batch, roles=self.config.roles, max_context=max_context)
        self.batch = batch
        if not self.rows:
            raise ValueError(f"no transitions to train on ({dict(self.skipped) or 'empty batch'})")
        params = warm_start_parameters(model, self.config.adapter)
        if not params:
            raise ValueError("the policy has no trainable parameters (frozen model without LoRA?)")
        self.params = params
        self.optimizer = optimizer or torch.optim.AdamW(
            params, lr=self.config.lr, weight_decay=self.config.weight_decay)
        self._rng = random.Random(self.config.seed)
        self._queue: list[int] = []
        self.iteration = 0
        self.history: list[dict[str, float]] = []

    @property
    def steps_per_epoch(self) -> int:
        return -(-len(self.rows) // self.config.batch_size)

    def step(self) -> SFTStepState:
        cfg = self.config
        t0 = time.perf_counter()
        idx = self._next_rows()
        # Prompts sorted by tokens (sharing prefixes: rows of one schema adjacent, so a chunk
        # runs it once) or by length (chunks then pad to similar lengths; a stable sort keeps
        # the rows of a shared prompt adjacent): on schema-sized prompts either saves work.
        rows = sorted((self.rows[i] for i in idx), key=lambda tr: (
            tr.prompt_ids if cfg.share_prefixes else len(tr.prompt_ids)))
        n_tokens = sum(len(tr.response_ids) for tr in rows)
        lr = cfg.lr * min(1.0, (self.iteration + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        nll_sum, correct = 0.0, 0.0
        for chunk in chunk_rows(rows, cfg.max_tokens_per_forward, share_prefixes=cfg.share_prefixes):
            part = [rows[i] for i in chunk]
            fwd = score_as(self.policy.model, part, cfg.adapter, device=self.policy.device,
                           grad=True, share_prefixes=cfg.share_prefixes)
            weight = len(fwd.logprobs) / n_tokens  # micro-batches sum to the minibatch token-mean
            (sft_loss(fwd.logprobs) * weight).backward()
            nll_sum += float(-fwd.logprobs.detach().sum())
            correct += float((fwd.logprobs.detach() > -0.6931).sum())  # p > 1/2: the argmax
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        self.optimizer.step()
        self.iteration += 1
        metrics = {"step": float(self.iteration), "loss": nll_sum / n_tokens,
                   "token_acc": correct / n_tokens, "grad_norm": float(grad_norm), "lr": lr,
                   "n_rows": float(len(rows)), "response_tokens": float(n_tokens),
                   "update_s": time.perf_counter() - t0, "epoch": self.iteration / self.steps_per_epoch,
                   # the dashboard's and W&B's reward curve: mean target-token probability
                   "reward_mean": float(torch.tensor(-nll_sum / n_tokens).exp())}
        self.history.append(metrics)
        sub = Batch([Trajectory(task_id="sft", transitions=list(rows))])
        state = SFTStepState(iteration=self.iteration, batch=sub, metrics=metrics, skipped=self.skipped)
        self.callbacks.on_step(state)
        return state

    def fit(self, epochs: float | None = None, *, max_minutes: float | None = None,
            progress: bool = True, on_step: Callable[[SFTStepState], None] | None = None
            ) -> list[SFTStepState]:
        """``epochs`` passes (default ``config.epochs``), stopping early past ``max_minutes``."""
        from tqdm.auto import tqdm

        n = max(1, round((epochs or self.config.epochs) * self.steps_per_epoch))
        deadline = time.monotonic() + 60 * max_minutes if max_minutes else float("inf")
        states = []
        bar = tqdm(range(n), desc="sft", disable=not progress)
        for _ in bar:
            state = self.step()
            states.append(state)
            if on_step is not None:
                on_step(state)
            bar.set_postfix(loss=f"{state.metrics['loss']:.3f}")
            if time.monotonic() > deadline:
                break
        return states

    def state_dict(self) -> dict[str, Any]:
        import dataclasses

        return sft_state_dict(self.policy, config=dataclasses.asdict(self.config),
                              step=self.iteration, optimizer=self.optimizer, history=self.history)

    def _next_rows(self) -> list[int]:
        """Shuffled passes; rows sharing a prompt stay adjacent so their prompt runs once."""
        out: list[int] = []
        while len(out) < min(self.config.batch_size, len(self.rows)):
            if not self._queue:
                self._queue = self._pass_order()[::-1]
            out.append(self._queue.pop())
        return out

    def _pass_order(self) -> list[int]:
        """One pass over the rows: identical prompts adjacent; with ``group_by_prefix`` the rows
        of one prefix cluster too, cut into batches whose order is shuffled."""
        _, of_row = dedupe_prompts([tr.prompt_ids for tr in self.rows])
        same_prompt: dict[int, list[int]] = {}
        for i, p in enumerate(of_row):
            same_prompt.setdefault(p, []).append(i)
        groups = list(same_prompt.values())
        if not self.config.group_by_prefix:
            self._rng.shuffle(groups)
            return [i for g in groups for i in g]
        clusters = prefix_clusters([self.rows[g[0]].prompt_ids for g in groups])
        self._rng.shuffle(clusters)
        order = []
        for cluster in clusters:
            self._rng.shuffle(cluster)
            order += [i for c in cluster for i in groups[c]]
        size = self.config.batch_size
        batches = [order[k:k + size] for k in range(0, len(order), size)]
        self._rng.shuffle(batches)
        return [i for b in batches for i in b]


def prefix_clusters(prompts: Sequence[Sequence[int]], min_share: float = 0.5) -> list[list[int]]:
    """Indices of ``prompts`` grouped by a common prefix: neighbours in sorted order join one
    cluster when they share at least ``min_share`` of the longer prompt (a schema shared by a
    database's questions does; a system prompt shared by every database does not)."""
    order = sorted(range(len(prompts)), key=lambda i: list(prompts[i]))
    clusters: list[list[int]] = []
    for prev, i in zip([None, *order], order):
        a, b = prompts[i], prompts[prev] if prev is not None else ()
        shared = common_length(a, b)
        if clusters and shared >= min_share * max(len(a), len(b)):
            clusters[-1].append(i)
        else:
            clusters.append([i])
    return clusters


def sft_state_dict(policy: Any, *, config: dict[str, Any], step: int,
                   optimizer: torch.optim.Optimizer | None, history: list[dict[str, float]]
                   ) -> dict[str, Any]:
    """Fine-tuned weights plus what produced them, as tensors and plain data (a checkpoint that
    ``load_policy_weights`` and ``train --init-from`` read)."""
    params = {n: p.detach().cpu() for n, p in policy.model.named_parameters() if p.requires_grad}
    return {"kind": "sft", "step": step, "config": config, "credit": {}, "params": params,
            "optimizer": optimizer.state_dict() if optimizer is not None else {},
            "history": list(history)}


def load_traces(path: str | Path, fmt: str = "auto", tokenizer: Any = None) -> Batch:
    """A ``Batch`` from stored traces in any supported format; bad records are reported in
    ``Batch.load_errors`` (the loaders skip them and name file and record)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no trace file at {path}")
    if fmt == "auto":
        fmt = _guess_format(path)
    if fmt == "batch":
        batch = Batch.load_parquet(path) if path.suffix == ".parquet" else Batch.load_jsonl(path)
    elif fmt == "otlp":
        from ..traces.otel import load_otlp_json

        batch = load_otlp_json(path)
    elif fmt == "agentlightning":
        from ..traces.agentlightning import load_agentlightning

        batch = load_agentlightning(path, tokenizer)
    else:
        raise ValueError(f"unknown traces format {fmt!r}; expected auto, batch, otlp or agentlightning")
    if not batch.trajectories:  # refused here, before a model is evaluated for nothing
        raise TraceFormatError(f"{path}: no trajectories to train on")
    return batch


def _guess_format(path: Path) -> str:
    if path.suffix == ".parquet":
        return "batch"
    with open(path, encoding="utf-8") as f:
        head = f.read(4096)
    if '"resourceSpans"' in head:
        return "otlp"
    if '"rollout_id"' in head and '"span_id"' in head:
        return "agentlightning"
    return "batch"
