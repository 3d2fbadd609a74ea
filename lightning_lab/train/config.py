"""Run configuration: ``PPOConfig`` and ``SFTConfig`` (an algorithm's section) inside
``RunConfig`` (a whole run: PPO, SFT or rejection sampling, chosen by ``algorithm``).

``RunConfig`` is the single source of a run, in the style of cleanrl's ``Args``: the CLI's
``train`` flags are generated from its fields (each field's docstring is the flag's help), it
loads from and saves to YAML, sweeps override its fields by (dotted) name, and
``lightning_lab.train.run.run(config)`` executes it. Every run writes its resolved config next to
its checkpoints, so a run is reproducible from its folder.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import json
import math
import operator
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from .. import credit as credit_lib
from ..errors import ConfigError
from ..tracing import DEFAULT_TEMPERATURE

__all__ = ["PPOConfig", "SFTConfig", "RunConfig", "ALGORITHMS", "REJECTION_TEMPERATURE", "ConfigError", "FieldError", "bounded", "check_ranges",
           "field_docs", "override", "flatten", "parse_options", "load_config", "load_yaml",
           "save_config", "FROZEN_ON_RESUME", "CREDIT_FIELDS", "credit_fields_not_taken"]

SEED_MAX = 2**32 - 1
"""Largest seed: what every RNG a run seeds (torch, numpy in task loaders) accepts."""


class FieldError(ConfigError):
    """A config field's value is invalid; ``field`` is its dotted name (``ppo.lr``), so the CLI
    can name the flag and the loader the file."""

    def __init__(self, field_name: str, problem: str) -> None:
        super().__init__(f"{field_name} {problem}")
        self.field, self.problem = field_name, problem

    def within(self, parent: str) -> "FieldError":
        """The same error for the field as ``parent.<field>`` (a PPO field inside a run)."""
        return FieldError(f"{parent}.{self.field}", self.problem)


def bounded(default: Any, *, ge: float | None = None, gt: float | None = None,
            le: float | None = None) -> Any:
    """A numeric dataclass field with its valid range, checked by ``check_ranges`` (floats must
    also be finite). Declared once here, so YAML, flags, sweeps and notebooks get one check."""
    return field(default=default, metadata={"ge": ge, "gt": gt, "le": le})


_BOUNDS = (("ge", operator.ge, ">="), ("gt", operator.gt, ">"), ("le", operator.le, "<="))


def check_ranges(config: Any) -> None:
    """Raise ``FieldError`` for the first numeric field of ``config`` that is not finite or
    outside the range its ``bounded`` metadata declares (None values mean "unset" and pass)."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise FieldError(f.name, f"must be a finite number, got {value}")
        for key, ok, sign in _BOUNDS:
            limit = f.metadata.get(key)
            if limit is not None and not ok(value, limit):
                raise FieldError(f.name, f"must be {sign} {limit}, got {value}")


def check_out(out: str) -> None:
    """An empty run folder would put the run's files into the current directory."""
    if not out.strip():
        raise FieldError("out", "must name a folder, got an empty string")


@dataclass
class PPOConfig:
    tasks_per_step: int = bounded(8, ge=1)
    """Distinct tasks sampled per step."""
    group_size: int = bounded(4, ge=1)
    """Rollouts per task per step (the group for GRPO-style baselines)."""
    temperature: float = bounded(DEFAULT_TEMPERATURE, ge=0)
    """Sampling temperature of the training rollouts (their calls' default; the logprobs and
    the loss use the same value; 0 = greedy, scored at T=1). Evaluation is greedy whatever this is."""
    ppo_epochs: int = bounded(1, ge=1)
    """Passes over the batch per step; >1 reuses samples off-policy (the clip then matters)."""
    minibatch_size: int = bounded(16, ge=1)
    """Transitions per optimizer step."""
    lr: float = bounded(2e-4, ge=0)
    """AdamW learning rate of the policy parameters (LoRA adapter or full model)."""
    weight_decay: float = bounded(0.0, ge=0)
    """AdamW weight decay of the policy parameters."""
    clip_eps: float = bounded(0.2, gt=0)
    """PPO clip range for the ratio pi/pi_behaviour."""
    clip_eps_high: float | None = bounded(None, gt=0)
    """Upper clip range if different (DAPO's clip-higher); None = clip_eps."""
    kl_coef: float = bounded(0.02, ge=0)
    """Weight of the KL penalty to the reference (adapter-off) policy."""
    kl_gap_cap: float | None = bounded(5.0, gt=0)
    """Nats by which a token may fall below the reference before its k3 KL term turns linear
    (``ppo.kl_k3``): one far-off token cannot swamp the step; None = plain k3."""
    max_grad_norm: float = bounded(1.0, gt=0)
    """Gradient-norm clip of the policy parameters (of each LoRA adapter on its own)."""
    max_tokens_per_forward: int = bounded(2048, ge=1)
    """Padded tokens per forward pass (a shared prompt counts once); minibatches are split
    (gradient accumulation) to fit."""
    value_lr: float = bounded(1e-3, ge=0)
    """Learning rate of the critic head (used by the ``value`` credit strategy)."""
    value_coef: float = bounded(0.5, ge=0)
    """Weight of the critic's regression loss."""
    trainable_roles: tuple[str, ...] | None = None
    """Only transitions of these roles (``ll.role`` names) enter the loss; None = all."""
    role_adapters: dict[str, str] | None = None
    """Role -> the LoRA adapter its calls sample with and train (``rewriter=writer,...``); a
    role named like an adapter uses it, any other ``default`` (``inference/multi_lora.py``)."""
    trainable_adapters: tuple[str, ...] | None = None
    """Only these LoRA adapters train (the others stay bit-identical, their transitions out of
    the loss); None = every adapter of the policy."""
    adapter_lr: dict[str, float] | None = None
    """Per-adapter learning rate (``checker=1e-4``); adapters not named use ``lr``."""
    skip_zero_advantage: bool = True
    """Leave transitions with zero advantage out of the update (they carry no policy gradient)."""
    recompute_logprobs: bool = False
    """Recompute the rollouts' logprobs with the trainer's model before the update and use them
    as PPO's old policy, with truncated importance weights for the sampler/trainer mismatch (for
    rollouts from vLLM, bf16 sampling or a lagging adapter version; see ``offpolicy.py``)."""
    tis_cap: float = bounded(2.0, ge=1)
    """Truncation C of the importance weight min(pi_trainer / pi_behaviour, C)."""
    max_staleness: int = bounded(0, ge=0)
    """Asynchronous rollouts: >0 samples the next step's rollouts while this step's update runs,
    from a snapshot of the weights (the local engine) or the last synced adapter (vLLM) at most
    this many versions old, and turns ``recompute_logprobs`` on. 0 = sample, then update."""
    update_dtype: str = field(default="float32", metadata={"choices": ("float32", "auto", "bfloat16")})
    """Matmul dtype of the update's forward and backward (autocast; weights, adapter, optimizer
    and logits stay fp32): float32 | auto (bf16 on a CPU with native bf16 and on CUDA) |
    bfloat16. Not float32 turns ``recompute_logprobs`` on: the old policy then comes from the
    same bf16 forward, so PPO's ratio stays exact and the sampler gap is importance-weighted."""
    gradient_checkpointing: bool = False
    """Recompute decoder layers in the backward instead of storing activations (for models whose
    update does not fit in memory; each row is then scored without prompt sharing)."""
    share_prefixes: bool = True
    """Rows of a forward whose prompts start alike (one schema, other questions) run their
    common leading tokens once (exact: same logprobs and gradients); False shares identical
    prompts only."""
    group_tasks_by: str | None = None
    """A task field (``db_id``): each step draws its tasks from one value of it where it can, so
    their prompts share that value's prefix (a database's schema) and the prefix cache and
    ``share_prefixes`` compute it once per step. Every pass still sees each task once; a step's
    gradient then leans on one database: off by default (the SFT's ``group_by_prefix``)."""
    rollout_workers: int = bounded(32, ge=1)
    """Agents run concurrently; their LLM calls are batched by the policy's engine."""
    rollout_timeout_s: float | None = bounded(None, gt=0)
    """A rollout running longer fails with reason timeout (its LLM requests are aborted, a
    process agent is killed) and the step goes on without it; None = no limit."""
    seed: int = bounded(0, ge=0, le=SEED_MAX)
    """Seeds the task order, the minibatch order and torch's sampling RNG."""

    def __post_init__(self) -> None:
        self.trainable_roles = _names(self.trainable_roles)
        self.trainable_adapters = _names(self.trainable_adapters)
        self.role_adapters = _mapping(self.role_adapters, str, "role_adapters")
        self.adapter_lr = _mapping(self.adapter_lr, float, "adapter_lr")
        check_ranges(self)


REJECTION_TEMPERATURE = 0.8
"""Rejection sampling's default temperature, below ``tracing.DEFAULT_TEMPERATURE`` on purpose:
only the successes are kept, and a cooler policy succeeds more often while still varying."""


@dataclass
class SFTConfig:
    """Supervised fine-tuning (``algorithm: sft``) and rejection sampling (``algorithm:
    rejection``): the data, the fine-tuning's hyper-parameters and the sampling rounds."""

    traces: str | None = None
    """Stored traces to fine-tune on; None = the environment's demonstrations (sft) or fresh
    samples (rejection)."""
    traces_format: str = field(default="auto", metadata={
        "choices": ("auto", "batch", "otlp", "agentlightning")})
    """auto (by file name/content) | batch (.jsonl/.parquet) | otlp (OTLP-JSON) | agentlightning."""
    epochs: float = bounded(1.0, gt=0)
    """Passes over the rows (fractions allowed: 0.5 = half the rows); per round for rejection."""
    batch_size: int = bounded(16, ge=1)
    """Transitions per optimizer step."""
    lr: float = bounded(2e-4, ge=0)
    """AdamW learning rate of the trainable parameters (the LoRA adapter, usually)."""
    weight_decay: float = bounded(0.0, ge=0)
    """AdamW weight decay of the trainable parameters."""
    warmup_steps: int = bounded(0, ge=0)
    """Linear learning-rate warm-up over this many optimizer steps."""
    max_grad_norm: float = bounded(1.0, gt=0)
    """Gradient-norm clip of the trainable parameters."""
    max_tokens_per_forward: int = bounded(2048, ge=1)
    """Padded tokens per forward (a shared prompt counts once); larger batches accumulate."""
    share_prefixes: bool = True
    """Rows of a forward whose prompts start alike (one schema, other questions) run their
    common leading tokens once, and each batch is ordered by prompt so they meet (exact: same
    logprobs and gradients); False shares identical prompts only."""
    group_by_prefix: bool = False
    """Draw each batch from rows whose prompts share a long prefix (one database's schema) where
    possible, so ``share_prefixes`` runs it once per batch, not once per database. Every pass
    still sees each row once (groups, rows and the cut batches are shuffled), but a step's
    gradient then leans on fewer databases, as ``group_by_length`` leans on one length: off by
    default."""
    max_context: int | None = bounded(None, ge=1)
    """Rows longer than this (prompt + response tokens) are skipped and counted; None = the
    model's ``max_position_embeddings``."""
    roles: tuple[str, ...] | None = None
    """Train only on transitions of these roles (``ll.role`` names); None = all."""
    adapter: str | None = None
    """Warm-start this LoRA adapter (one role's) on every row, the others untouched; None: each
    row trains the adapter that sampled it (``meta["adapter"]``; demonstrations: ``default``)."""
    n: int = bounded(8, ge=1)
    """Rejection sampling: samples per task per round."""
    threshold: float = bounded(0.5)
    """Rejection sampling: keep trajectories whose total reward is strictly above this."""
    rounds: int = bounded(2, ge=1)
    """Rejection sampling: sample -> keep -> fine-tune cycles (the run's steps)."""
    tasks_per_round: int | None = bounded(None, ge=1)
    """Rejection sampling: tasks per round (None: all train tasks)."""
    temperature: float = bounded(REJECTION_TEMPERATURE, gt=0)
    """Rejection sampling: sampling temperature."""
    seed: int = bounded(0, ge=0, le=SEED_MAX)
    """Seeds the row order (a run copies its seed here)."""

    def __post_init__(self) -> None:
        self.roles = _names(self.roles)
        check_ranges(self)


def _names(value: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """A role-name list as a tuple (``"a,b"`` from a flag, a list from YAML)."""
    if isinstance(value, str):
        return tuple(a for a in value.split(",") if a)
    return None if value is None else tuple(value)


def _mapping(value: str | Mapping[str, Any] | None, cast: Any, name: str) -> dict | None:
    """A name -> value mapping (``"a=b,c=d"`` from a flag, a mapping from YAML)."""
    if value is None or isinstance(value, Mapping):
        return None if value is None else {str(k): cast(v) for k, v in value.items()}
    try:
        return {k: cast(v) for k, v in (pair.split("=", 1) for pair in value.split(",") if pair)}
    except ValueError:
        raise FieldError(name, f"must be NAME=VALUE pairs separated by commas, got {value!r}"
                         ) from None


ALGORITHMS = ("ppo", "sft", "rejection")
VLLM_DTYPES = ("auto", "bfloat16", "float32")
"""``--vllm-dtype`` values: what vLLM-CPU serves LoRA adapters in."""
SECTIONS = {"ppo": PPOConfig, "sft": SFTConfig}
"""``RunConfig``'s nested sections: the fields of one algorithm, as ``ppo.lr`` / ``sft.lr``."""


@dataclass
class RunConfig:
    """One training run: model, environment, algorithm (PPO with its credit, SFT or rejection
    sampling), evaluation, budget, checkpoints."""

    algorithm: str = field(default="ppo", metadata={"choices": ALGORITHMS})
    """ppo (RL, the ppo.* fields) | sft (fine-tune on traces or demonstrations, sft.*) |
    rejection (sample sft.n per task, fine-tune on those above sft.threshold, sft.rounds times)."""
    model: str = "smollm2-135m"
    """tiny | smollm2-135m | a local Hugging Face model directory."""
    lora: str = field(default="auto", metadata={"choices": ("auto", "on", "off")})
    """LoRA adapter: auto (on for real models, off for tiny) | on | off."""
    adapters: tuple[str, ...] | None = None
    """One LoRA adapter per role beside ``default`` (``writer,checker``): a role's calls sample
    with and train the adapter of its name (``ppo.role_adapters`` maps others); turns LoRA on."""
    device: str = "cpu"
    """Torch device of the policy."""
    decode_dtype: str = field(default="float32", metadata={"choices": ("float32", "auto", "bfloat16")})
    """Sampling matmuls: float32 | auto (bf16 on a CPU with native bf16) | bfloat16. bf16 makes
    PPO's old policy the trainer's own forward and importance-weights the ~1e-2 sampler gap
    (``behaviour_logprob_err``); the README's quick start uses auto."""
    decode_threads: int | None = bounded(1, ge=1)
    """CPU intra-op threads of the sampling worker (the update keeps every core); None = all."""
    threads: int | None = bounded(None, ge=1)
    """CPU threads of the update, also capping decode_threads; None: LIGHTNING_LAB_THREADS or
    OMP_NUM_THREADS if set, else the cores other processes leave idle (1 on a busy machine),
    re-checked before each step."""
    seed: int = bounded(0, ge=0, le=SEED_MAX)
    """Seeds the model's init (tiny), the task loaders and the trainer (copied into ppo.seed)."""
    rollout_engine: str = field(default="local", metadata={"choices": ("local", "vllm")})
    """Where rollouts are sampled: local (the in-process engine) | vllm (a vLLM server: give
    --vllm-url or --vllm-python); the trainer keeps its own model for the update, the adapter is
    synced into the server before every step and ppo.recompute_logprobs is on."""
    vllm_url: tuple[str, ...] | None = None
    """Attach to these running vLLM servers (repeatable; started with --enable-lora,
    --max-lora-rank >= the adapter's rank, --logprobs-mode processed_logprobs,
    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True); requests go to the least busy, every adapter version
    is loaded into all of them before any rollout uses it."""
    vllm_python: str | None = None
    """Start a vLLM server with this Python (a venv with vllm-cpu or vllm) on a free loopback
    port for the run, log to <out>/vllm.log, stop it at the end."""
    vllm_servers: int = bounded(1, ge=1)
    """With --vllm-python: how many servers to start (logs <out>/vllm-<i>.log beyond the first)."""
    vllm_dtype: str = field(default="auto", metadata={"choices": VLLM_DTYPES})
    """With --vllm-python: the started servers' --dtype. auto: the trainer's (float32 on CPU),
    so sampler and update compute the same logprobs (~1e-5 apart, LoRA included); bfloat16 is
    faster (~1.4x on CPU) but drifts ~0.05-0.13 nats/token (max ~1) from an fp32 trainer once the
    adapter has trained, which truncated IS corrects but learning felt (wordplay one_word 0.6 vs 0.9)."""
    vllm_allow_degraded: bool = False
    """Go on with the other vLLM servers when one stops answering (it is dropped, with a
    warning naming it); off: the step fails with the server's URL and error, the run stops after
    a checkpoint, and --resume continues."""
    adapter_dir: str | None = None
    """Where adapter versions are written for the vLLM server to load (it must read this path);
    None: <out>/adapters."""
    vllm_start_timeout_s: float = bounded(900.0, gt=0)
    """How long a started vLLM server may take to answer /health (minutes on a busy CPU)."""
    env: str = "wordplay"
    """Environment name (a folder under environments/); unused with --agent / --agent-cmd."""
    agent: str | None = None
    """Your own agent instead of an environment's, as module:function (with --tasks)."""
    agent_cmd: str | None = None
    """A process agent instead: a command started per rollout with OPENAI_BASE_URL etc. (with --tasks)."""
    tasks: str | None = None
    """JSONL task file for --agent / --agent-cmd: one JSON object per line, optional task_id."""
    max_tokens_cap: int | None = bounded(None, ge=1)
    """Clamp max_tokens of the proxy calls of --agent-cmd / base_url agents (None: no cap)."""
    data: str | None = None
    """Dataset path in the benchmark's own format (default: generated tasks)."""
    limit: int | None = bounded(None, ge=1)
    """Use at most this many training tasks."""
    agent_options: dict[str, Any] = field(default_factory=dict)
    """Options for the environment's agent, e.g. {max_turns: 2} (CLI: --agent-option KEY=VALUE)."""
    task_options: dict[str, Any] = field(default_factory=dict)
    """Options for the task loader, train and dev, e.g. {levels: hard,extra} (CLI: --task-option)."""
    credit: str = "uniform"
    """Credit strategy (lightning-lab credit lists them)."""
    gamma: float | None = bounded(None, ge=0, le=1)
    """Discount of the credit strategy (None: the strategy's default)."""
    lam: float | None = bounded(None, ge=0, le=1)
    """GAE lambda of the value strategy (None: the strategy's default)."""
    baseline: str | None = None
    """none | group | rloo | batch (None: the strategy's default)."""
    steps: int = bounded(20, ge=0)
    """ppo: train until the trainer has done this many steps (resumed steps count); sft and
    rejection run sft.epochs / sft.rounds instead."""
    ppo: PPOConfig = field(default_factory=PPOConfig)
    """The update's hyper-parameters (CLI flags without prefix, e.g. --lr, --group-size)."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    """Fine-tuning and rejection sampling (lightning-lab sft's --epochs, --batch-size, --n, ...)."""
    eval_every: int = bounded(0, ge=0)
    """Greedy dev evaluation every N steps (0: before and after training only)."""
    eval_limit: int | None = bounded(None, ge=0)
    """Evaluate on at most this many dev tasks (0: no evaluation)."""
    max_minutes: float | None = bounded(None, gt=0)
    """Stop after the step that passes this wall-clock budget (evaluations excluded)."""
    save_every: int = bounded(5, ge=0)
    """Checkpoint every N steps (and always at the end)."""
    keep_checkpoints: int = bounded(3, ge=0)
    """Keep the newest K checkpoints, delete older ones (0: keep all)."""
    resume: bool = False
    """Continue from <out>/checkpoints, with <out>/config.yaml as the base config."""
    init_from: str | None = None
    """Start from the weights of this checkpoint (a warm start, e.g. lightning-lab sft's
    <out>/checkpoints), which is then also the KL reference; a resumed run continues from its
    own checkpoint instead (the reference stays the warm start)."""
    wandb: bool = False
    """Log to Weights & Biases (offline unless logged in)."""
    out: str = "runs/demo"
    """Run folder: config.yaml, metrics.jsonl, trajectories.jsonl, evals, checkpoints/, summary.json."""

    def __post_init__(self) -> None:
        for name, cls in SECTIONS.items():
            section = getattr(self, name)
            if isinstance(section, Mapping):
                try:
                    section = cls(**section)
                except FieldError as exc:
                    raise exc.within(name) from None
            section.seed = self.seed  # one seed per run; the sections' seed is for library users
            setattr(self, name, section)
        self.adapters = _names(self.adapters)
        if self.algorithm not in ALGORITHMS:
            raise FieldError("algorithm", f"must be one of {', '.join(ALGORITHMS)}, "
                             f"got {self.algorithm!r}")
        self._check_algorithm_fields()
        if self.rollout_engine not in ("local", "vllm"):
            raise FieldError("rollout_engine", f"must be local or vllm, got {self.rollout_engine!r}")
        self.vllm_url = _names(self.vllm_url)
        if self.vllm_dtype not in VLLM_DTYPES:
            raise FieldError("vllm_dtype", f"must be one of {', '.join(VLLM_DTYPES)}, "
                             f"got {self.vllm_dtype!r}")
        if self.rollout_engine == "vllm":
            if self.vllm_servers > 1 and self.vllm_python is None:
                raise FieldError("vllm_servers", "starting servers needs vllm_python; list the "
                                 "servers you started with vllm_url instead")
            if (self.vllm_url is None) == (self.vllm_python is None):
                raise FieldError("rollout_engine", "vllm needs exactly one of vllm_url (attach to "
                                 "a running server) or vllm_python (start one)")
            self.ppo.recompute_logprobs = True  # a server (bf16, or a version behind): weight its gap
        if self.lora not in ("auto", "on", "off"):
            raise FieldError("lora", f"must be auto, on or off, got {self.lora!r}")
        check_ranges(self)
        check_out(self.out)

    def _check_algorithm_fields(self) -> None:
        """What only PPO runs do: continue from a checkpoint, sample through vLLM."""
        if self.algorithm == "ppo":
            return
        if self.resume:
            raise FieldError("resume", f"continues ppo runs only; start the {self.algorithm} "
                             "run again (or warm-start it with init_from)")
        if self.rollout_engine != "local":
            raise FieldError("rollout_engine", f"{self.algorithm} samples with the local engine; "
                             "vllm is for ppo runs")

    def credit_params(self) -> dict[str, Any]:
        """Parameters given for the credit strategy (unset ones keep the strategy's defaults)."""
        return {k: getattr(self, k) for k in CREDIT_FIELDS if getattr(self, k) is not None}


CREDIT_FIELDS = ("gamma", "lam", "baseline")
"""``RunConfig`` fields that are credit-strategy parameters, named as the strategies name them."""


def credit_fields_not_taken(credit: str) -> list[str]:
    """The credit fields strategy ``credit`` has no parameter for (uniform takes no gamma): a
    resumed run or a sweep that switches strategy drops them instead of failing."""
    takes = credit_lib.param_names(credit)
    return [k for k in CREDIT_FIELDS if k not in takes]


FROZEN_ON_RESUME = ("model", "lora", "env", "data", "limit", "task_options", "seed", "tasks",
                    "init_from")
"""Fields a resumed run cannot change: they decide the weights' shapes, the KL reference
(``init_from``) or the task list that the saved task order indexes."""


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (cleanrl-style; becomes the flag's help)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def flatten(config: RunConfig) -> dict[str, Any]:
    """Dotted name -> value (``ppo.lr``), the form sweeps, diffs and W&B configs use."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            out.update({f"{f.name}.{k}": v for k, v in dataclasses.asdict(value).items()})
        else:
            out[f.name] = value
    return out


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """``value`` as the field's type (YAML and sweeps give ints for floats, lists for tuples)."""
    args = typing.get_args(hint)
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{name} cannot be null")
    if type(None) in args:
        hint = next(a for a in args if a is not type(None))
    origin = typing.get_origin(hint) or hint
    if origin is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if origin is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if origin is str and isinstance(value, str):
        return value
    if origin is tuple and isinstance(value, (list, tuple, str)):
        return tuple(value.split(",")) if isinstance(value, str) else tuple(value)
    if origin is dict and isinstance(value, Mapping):
        return dict(value)
    if origin is dict and isinstance(value, str):  # a flag's NAME=VALUE,... (parsed by the field)
        return value
    raise ConfigError(f"{name} must be {getattr(origin, '__name__', origin)}, got {value!r}")


def override(config: RunConfig, values: Mapping[str, Any]) -> RunConfig:
    """A copy of ``config`` with fields replaced by dotted name (``ppo.lr``, ``sft.epochs``).
    A section's field may be named alone (``lr``): the run's algorithm's section first (``ppo``
    for ppo, ``sft`` for sft and rejection), else the one that has it. Unknown names fail with
    the valid ones; values are type-checked. ``mode`` (old SFT configs) is read as ``algorithm``."""
    values = _renamed(values)
    top = dataclasses.asdict(config)
    algorithm = values.get("algorithm", config.algorithm)
    run_hints = _hints(RunConfig)
    for key, value in upgrade_field_names(_dotted(values)).items():
        section, name = _place(key, run_hints, algorithm)
        if section is None:
            top[name] = _coerce(name, value, run_hints[name])
        else:
            top[section][name] = _coerce(f"{section}.{name}", value,
                                         _hints(SECTIONS[section])[name])
    return RunConfig(**top)


def _renamed(values: Mapping[str, Any]) -> Mapping[str, Any]:
    """Old ``lightning-lab sft`` configs said ``mode: sft | rejection``; it is ``algorithm`` now.
    Their other top-level fields (``traces``, ``n``, ``threshold`` ...) still load as the bare
    names of ``sft.*`` fields."""
    if "mode" not in values:
        return values
    if "algorithm" in values:
        raise ConfigError("mode is the old name of algorithm; give only algorithm")
    warnings.warn(f"config field 'mode' is deprecated; write 'algorithm: {values['mode']}' "
                  "instead", FutureWarning, stacklevel=3)
    return {("algorithm" if k == "mode" else k): v for k, v in values.items()}


FIELD_RENAMES = {"trainable_agents": "trainable_roles", "agents": "roles"}
"""Config fields renamed when "role" became the one word for who made a call: old -> new."""


def upgrade_field_names(values: Mapping[str, Any], what: str = "config") -> dict[str, Any]:
    """``values`` with the old names of ``FIELD_RENAMES`` (alone or as a dotted key's last part)
    under their new names, each with a FutureWarning (shown by default: users write configs), so
    older YAML files, sweeps and checkpoints still load; an old and a new name together are
    refused."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        head, dot, name = key.rpartition(".")
        if name in FIELD_RENAMES:
            new = f"{head}{dot}{FIELD_RENAMES[name]}"
            if new in values:
                raise ConfigError(f"{what}: {key!r} is the old name of {new!r}; give only {new!r}")
            warnings.warn(f"{what}: field {key!r} is deprecated; write {new!r}",
                          FutureWarning, stacklevel=3)
            key = new
        out[key] = value
    return out


def _dotted(values: Mapping[str, Any]) -> dict[str, Any]:
    """``{ppo: {lr: 1}}`` as ``{"ppo.lr": 1}``; other keys as they are."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if key in SECTIONS:
            flat.update({f"{key}.{k}": v for k, v in nested_mapping(key, value).items()})
        else:
            flat[key] = value
    return flat


def _place(key: str, run_hints: Mapping[str, Any], algorithm: Any) -> tuple[str | None, str]:
    """(section or None for a run field, field name) of a config key."""
    section, dot, name = key.partition(".")
    if not dot and key in run_hints and key not in SECTIONS:
        return None, key
    if dot:
        if section not in SECTIONS:
            raise ConfigError(f"unknown config section {section!r} in {key!r}; "
                              f"sections: {', '.join(SECTIONS)}")
        if name not in _hints(SECTIONS[section]):
            raise ConfigError(f"unknown config field {key!r}; {section} fields: "
                              f"{sorted(_hints(SECTIONS[section]))}")
    else:
        order = ("ppo", "sft") if algorithm == "ppo" else ("sft", "ppo")
        section = next((s for s in order if key in _hints(SECTIONS[s])), "")
        if not section:
            raise ConfigError(f"unknown config field {key!r}; valid: "
                              f"{sorted(k for k in run_hints if k not in SECTIONS)}, "
                              "ppo.<field> and sft.<field>")
        name = key
    if name == "seed":
        raise ConfigError(f"{section}.seed follows the run's seed; set seed instead")
    return section, name


def nested_mapping(name: str, value: Any) -> Mapping[str, Any]:
    """The value of a nested section (``ppo:``, ``sft:``), which must be a mapping of fields."""
    if not isinstance(value, Mapping):
        raise FieldError(name, f"must be a mapping of fields (e.g. {name}: {{lr: 0.0001}}), "
                               f"got {'null' if value is None else repr(value)}")
    return value


def parse_options(pairs: list[str], flag: str = "--agent-option") -> dict[str, Any]:
    """``KEY=VALUE`` strings as a dict; values are JSON when they parse, else strings."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise ConfigError(f"{flag} expects KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def load_yaml(path: str | Path, what: str = "run config") -> dict[str, Any]:
    """A YAML config file as a dict of fields; a key given twice is refused (PyYAML would
    silently keep the last one, so an edit above an old value would not take effect)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
            seen: set[Any] = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}", key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    path = Path(path)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must be a mapping of field names, "
                          f"got {type(data).__name__}")
    return data


def load_config(path: str | Path, base: RunConfig | None = None) -> RunConfig:
    """A RunConfig from YAML (nested ``ppo:`` / ``sft:`` mappings or dotted keys), over
    ``base``; every error names the file."""
    path = Path(path)
    data = load_yaml(path)
    try:
        return override(base or RunConfig(), data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def save_config(config: RunConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML (atomically: a crash never leaves half a file)."""
    import os

    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = dataclasses.asdict(config)
    for section, names in (("ppo", "trainable_roles"), ("sft", "roles")):
        del data[section]["seed"]  # follows the run's seed
        if data[section][names] is not None:
            data[section][names] = list(data[section][names])
    for section, names in (("ppo", "trainable_adapters"), (None, "adapters")):
        values = data[section] if section else data
        if values[names] is not None:  # YAML has lists, not tuples
            values[names] = list(values[names])
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    os.replace(tmp, path)
    return path
