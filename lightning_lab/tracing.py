"""Tracing: which trajectory and which role an LLM call belongs to.

State lives in ``contextvars`` so that agents running in threads (one per rollout, as the trainer
runs them) or in asyncio tasks never see each other's rollout. The policy calls
``record_generation`` after each call; everything else here is the user-facing API.

The temperature contract (one rule for ``Policy.chat``/``achat``/``generate``/``agenerate`` and
the proxy's endpoints, applied by ``sampling_temperature``): a call's ``temperature=None`` means
the open rollout's temperature, else ``DEFAULT_TEMPERATURE``; an explicit value wins. So
``evaluate()`` (a rollout at 0) is greedy whatever entry point the agent samples through, and the
trainer's rollouts use ``PPOConfig.temperature``. A transition records the temperature it was
sampled at, 0 for greedy; greedy logprobs are those of the T=1 distribution (``scoring`` reads
0 as 1).
"""

from __future__ import annotations

import functools
import numbers
import threading
from contextvars import ContextVar
from typing import Any, Callable

from .records import MAX_ABS_REWARD, Trajectory, Transition, new_traj_id, reward_problem

__all__ = ["rollout", "role", "step", "reward", "current", "active_trajectory", "traced",
           "record_generation", "current_temperature", "sampling_temperature",
           "DEFAULT_TEMPERATURE", "current_control", "call_seed", "derive_seed", "current_role",
           "RolloutControl", "RolloutCancelled", "TracingError"]


DEFAULT_ROLE = "main"
"""Role of a call made outside any ``ll.role`` (and of HTTP calls naming none): never empty, so
``trainable_roles`` and per-role tables can always select it."""


DEFAULT_TEMPERATURE = 1.0
"""Temperature of a call that sets none, inside no rollout that sets one (the module docstring
has the whole contract); ``PPOConfig.temperature`` defaults to it."""


def sampling_temperature(requested: float | None, rollout_default: float | None) -> float:
    """The temperature a call samples at: its own, else its rollout's, else the default."""
    if requested is not None:
        return requested
    return DEFAULT_TEMPERATURE if rollout_default is None else rollout_default


class TracingError(RuntimeError):
    """Raised when the tracing API is used outside the context it needs."""


class RolloutCancelled(TracingError):
    """The rollout was cancelled by its runner (e.g. it timed out); raised into its LLM calls."""


class RolloutControl:
    """Cancellation of one rollout, shared by the runner (which cancels) and the LLM calls inside.

    A thread cannot be killed, so cancelling a rollout means: every LLM request it has in flight is
    aborted (its rows leave the engine's batch), later calls and rewards raise ``RolloutCancelled``,
    and whatever else registered ``on_cancel`` (the proxy's rollout URL, a child process) is closed.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._callbacks: dict[int, Callable[[], None]] = {}
        self._next = 0
        self.reason = ""
        self.trajectory: Trajectory | None = None
        """The trajectory of the ``ll.rollout`` this control was handed to (set on entry)."""

    @property
    def cancelled(self) -> bool:
        return bool(self.reason)

    def on_cancel(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Call ``fn`` on cancellation (at once if already cancelled); returns an unregister."""
        with self._lock:
            if not self.reason:
                key, self._next = self._next, self._next + 1
                self._callbacks[key] = fn
                return lambda: self._callbacks.pop(key, None)
        fn()
        return lambda: None

    def cancel(self, reason: str) -> None:
        """Cancel once (later calls are no-ops); runs the registered callbacks in this thread."""
        with self._lock:
            if self.reason:
                return
            self.reason = reason
            callbacks, self._callbacks = list(self._callbacks.values()), {}
        for fn in callbacks:
            fn()

    def check(self) -> None:
        if self.reason:
            raise RolloutCancelled(f"rollout cancelled: {self.reason}")


_Open = tuple[Trajectory, "float | None", "RolloutControl | None"]
_open: ContextVar[_Open | None] = ContextVar("ll_rollout", default=None)
"""(trajectory, default temperature, control) of the open rollout: one variable, so a traced call
pays one lookup for all three."""
_role: ContextVar[str] = ContextVar("ll_role", default="")


class rollout:
    """Open a trajectory; LLM calls made inside it are appended as transitions.

    ``with ll.rollout(task_id) as traj:`` yields the ``Trajectory``. ``temperature`` is the
    default sampling temperature for calls inside (evaluation passes 0).
    ``seed`` (kept as ``meta["sampling_seed"]``) makes the rollout's samples independent of what
    else shares the engine's batch: its k-th LLM call that sends no seed of its own samples with
    ``derive_seed(seed, k)``, so concurrent rollouts draw the same numbers in any thread order.
    With ``catch=True`` anything the body raises marks the trajectory ``failed`` with the error
    text and is swallowed, so a batch of rollouts survives one bad agent: ``Exception`` and also
    ``SystemExit`` (an agent calling ``sys.exit()``) or any other ``BaseException``, except the
    caller's own control flow: ``KeyboardInterrupt`` on the main thread (the user's Ctrl-C must
    stop the run), ``GeneratorExit`` and ``asyncio.CancelledError`` (cancellation, e.g. a
    timeout) are recorded and re-raised. Without ``catch`` everything propagates (after marking
    the trajectory). ``control`` lets a runner cancel the rollout (timeouts); a cancelled
    rollout is not finalised here, its runner already reported it.

    A class, not ``@contextmanager``: a generator-based context manager costs a few microseconds
    per use, a large share of the tracing budget of a short rollout.
    """

    __slots__ = ("trajectory", "_catch", "_control", "_state", "_tokens")

    def __init__(self, task_id: str = "", *, group_id: str = "", temperature: float | None = None,
                 catch: bool = False, meta: dict[str, Any] | None = None,
                 seed: int | None = None, control: RolloutControl | None = None):
        # Positional, in field order: keyword arguments make a dataclass call ~2x slower.
        traj = self.trajectory = Trajectory(
            task_id if type(task_id) is str else str(task_id), [], "ok", "", group_id,
            new_traj_id(), dict(meta) if meta else {})
        if seed is not None:
            traj.meta["sampling_seed"] = int(seed)
        if control is not None:
            control.trajectory = traj
        self._catch = catch
        self._control = control
        self._state = (traj, temperature, control)

    def __enter__(self) -> Trajectory:
        self._tokens = (_open.set(self._state), _role.set(""))
        return self.trajectory

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> bool:
        traj, control = self.trajectory, self._control
        if exc_type is not None:  # recorded on the trajectory, see the docstring
            traj.status = "failed"
            traj.error = f"{exc_type.__name__}: {exc}"
            traj.meta.setdefault("reason", "exception")
        try:
            if control is None or not control.cancelled:
                _finalize(traj)
        finally:
            open_token, role_token = self._tokens
            _role.reset(role_token)
            _open.reset(open_token)
        return exc_type is not None and self._catch and not _is_interruption(
            exc if exc is not None else exc_type())


def _is_interruption(exc: BaseException) -> bool:
    """Exceptions that are the caller's control flow, never an agent's fault to contain."""
    import asyncio
    import threading

    if isinstance(exc, KeyboardInterrupt):
        return threading.current_thread() is threading.main_thread()
    return isinstance(exc, (GeneratorExit, asyncio.CancelledError))


class role:
    """Name the role (who makes the call: "writer", "critic") of the LLM calls inside this block;
    it becomes their ``Transition.role``.

    A class rather than ``@contextmanager``: it runs around every LLM call, and a generator-based
    context manager costs several times more per use.
    """

    __slots__ = ("name", "_token")

    def __init__(self, name: str):
        self.name = str(name)

    def __enter__(self) -> None:
        self._token = _role.set(self.name)

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> None:
        _role.reset(self._token)


class step(role):
    """Deprecated name of ``role`` (``step`` now only means a trainer's ``step()``)."""

    __slots__ = ()

    def __init__(self, name: str):
        import warnings

        warnings.warn("ll.step(name) is deprecated: use ll.role(name)", DeprecationWarning,
                      stacklevel=2)
        super().__init__(name)


_NO_ROLLOUT = "no rollout is open: wrap the agent call in `with ll.rollout(task_id=...)`"


def current() -> Trajectory:
    """The open trajectory (to put evaluation facts into ``current().meta``)."""
    state = _open.get()
    if state is None:
        raise TracingError(_NO_ROLLOUT)
    return state[0]


def active_trajectory() -> Trajectory | None:
    """The open trajectory, or None outside any rollout (for code that joins one if present)."""
    state = _open.get()
    return None if state is None else state[0]


def current_temperature() -> float | None:
    """The open rollout's default sampling temperature (None: none set, or no rollout)."""
    state = _open.get()
    return None if state is None else state[1]


def current_role() -> str:
    """Role of a call made now (the open ``ll.role``'s name, else ``DEFAULT_ROLE``): the policy
    picks the role's LoRA adapter with it before the call is recorded."""
    return _role.get() or DEFAULT_ROLE


def current_control() -> RolloutControl | None:
    """The open rollout's cancellation handle (None outside a runner-managed rollout)."""
    state = _open.get()
    return None if state is None else state[2]


def derive_seed(*parts: int | str) -> int:
    """A 62-bit seed from ``parts`` (stable across processes and Python versions)."""
    import hashlib

    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (1 << 62)


_seed_lock = threading.Lock()


def call_seed(trajectory: Trajectory | None = None) -> int | None:
    """The seed of an LLM call starting now in ``trajectory`` (default: the open one), or None
    when it was opened without ``seed``.

    The k-th call to *start* gets ``derive_seed(seed, k)``; k is a counter taken under a lock
    (``meta["sampling_calls"]``), not the number of recorded transitions, because calls sent
    concurrently (a fan-out agent, ``asyncio.gather``) all start before any is recorded and
    would otherwise share one seed and return identical samples. A sequential agent's k-th call
    is still its k-th transition, so its samples are reproducible.
    """
    traj = trajectory if trajectory is not None else active_trajectory()
    if traj is None or traj.meta.get("sampling_seed") is None:
        return None
    with _seed_lock:
        k = traj.meta.get("sampling_calls", 0)
        traj.meta["sampling_calls"] = k + 1
    return derive_seed(traj.meta["sampling_seed"], k)


def reward(value: float, *, final: bool = False, trajectory: Trajectory | None = None) -> None:
    """Add ``value`` to the latest transition's reward (``final=True``: to the last one at the end).

    A final reward is kept on the trajectory until it ends, because more LLM calls may follow
    the ``ll.reward(..., final=True)`` call in the agent's code. ``trajectory`` targets a given
    trajectory instead of the open one (the HTTP proxy, whose handlers run outside the agent's
    context).
    """
    if not (type(value) is float and -MAX_ABS_REWARD <= value <= MAX_ABS_REWARD):
        # anything but a plain in-range float (the per-call fast path; NaN fails the comparison)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"reward must be a real number, got {type(value).__name__}: {value!r}")
        if not isinstance(value, (int, float)):  # numpy scalars, Fraction, ...
            try:
                value = float(value)
            except OverflowError:
                raise ValueError(f"reward must be finite, got {value!r}") from None
        problem = reward_problem(value)
        if problem:
            raise ValueError(problem)
        value = float(value)
    if trajectory is None:
        state = _open.get()
        if state is None:
            raise TracingError(_NO_ROLLOUT)
        traj, _, control = state
        if control is not None and control.reason:
            control.check()
    else:
        traj = trajectory
    if final:
        traj.meta["final_reward"] = traj.meta.get("final_reward", 0.0) + value
        return
    if not traj.transitions:
        traj.meta["pending_reward"] = traj.meta.get("pending_reward", 0.0) + value
        return
    traj.transitions[-1].reward += value


def _finalize(traj: Trajectory) -> None:
    """Move final/pending rewards onto the last transition; flag rollouts with no LLM call.

    Each reward was checked on its own; their sums are checked here, so a trajectory whose
    rewards add up past ``MAX_ABS_REWARD`` fails with the reason instead of reaching the trainer.
    """
    meta, transitions = traj.meta, traj.transitions
    extra = meta.pop("final_reward", 0.0) + meta.pop("pending_reward", 0.0)
    if transitions:
        transitions[-1].reward += extra
    elif traj.status == "ok":
        meta["no_llm_calls"] = True
        meta["unassigned_reward"] = extra
    rewards = [tr.reward for tr in transitions] or [0.0]
    total = float(sum(rewards))
    # The common case in C calls only: a NaN or inf reward makes the total NaN or inf, which
    # fails its comparison (min/max alone would skip a NaN).
    if (-MAX_ABS_REWARD <= total <= MAX_ABS_REWARD and -MAX_ABS_REWARD <= extra <= MAX_ABS_REWARD
            and -MAX_ABS_REWARD <= min(rewards) and max(rewards) <= MAX_ABS_REWARD):
        return
    problem = next(filter(None, map(reward_problem, [*rewards, total, extra])), None)
    if problem and traj.status == "ok":
        traj.status = "failed"
        traj.error = f"RewardError: rewards summed out of range: {problem}"


def record_generation(gen: Any, *, trajectory: Trajectory | None = None,
                      role: str | None = None) -> Transition | None:
    """Append a policy output to the open trajectory (no-op outside a rollout).

    ``trajectory``/``role`` override the context's (the HTTP proxy knows them from the URL and
    headers, not from contextvars). The transition takes ownership of the generation's token
    lists (no copies): each generation is fresh from the engine and recorded once.
    """
    if trajectory is None:
        state = _open.get()
        if state is None:
            return None
        traj, _, control = state
        if control is not None and control.reason:  # a timed-out agent's late call: its
            control.check()                          # trajectory is already reported
    else:
        traj = trajectory
    transitions = traj.transitions
    # Positional, in Transition's field order (prompt_ids, response_ids, logprobs, prompt,
    # response, role, turn, reward, temperature, finish_reason, meta): keyword arguments make
    # this call, the bulk of the per-transition tracing cost, about twice as slow.
    tr = Transition(gen.prompt_ids, gen.response_ids, gen.logprobs, gen.prompt_text, gen.text,
                    (_role.get() if role is None else role) or DEFAULT_ROLE, len(transitions),
                    0.0, float(gen.temperature), gen.finish_reason,
                    dict(gen.meta) if getattr(gen, "meta", None) else {})
    if not transitions and "pending_reward" in traj.meta:
        tr.reward += traj.meta.pop("pending_reward")
    transitions.append(tr)
    return tr


def traced(fn: Callable[..., Any] | None = None, *, task_id: Callable[..., str] | str | None = None):
    """Decorator form: each call of the agent function runs inside its own rollout.

    The decorated function returns ``(result, trajectory)``. ``task_id`` is a string or a function
    of the call's arguments; by default the first argument's ``task_id`` attribute is used.
    """

    def wrap(func: Callable[..., Any]) -> Callable[..., tuple[Any, Trajectory]]:
        @functools.wraps(func)
        def inner(*args: Any, **kwargs: Any) -> tuple[Any, Trajectory]:
            if callable(task_id):
                tid = task_id(*args, **kwargs)
            elif task_id is not None:
                tid = task_id
            else:
                tid = getattr(args[0], "task_id", "") if args else ""
            with rollout(task_id=tid) as traj:
                result = func(*args, **kwargs)
            return result, traj

        return inner

    return wrap(fn) if fn is not None else wrap
