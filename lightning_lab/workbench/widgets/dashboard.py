"""ipywidgets views: training dashboard, credit panel, trajectory inspector.

Thin layers: every figure and table comes from ``figures.py`` / ``tables.py``. The views hold the
trainer's own ``StepState``/``Batch`` objects (no copies), and the dashboard listens as a trainer
callback, so steps run from code (``trainer.step()``) show up too.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from ...train.callbacks import CallbackBase
from . import figures, tables

__all__ = ["Dashboard", "CreditPanel", "TrajectoryInspector", "widgets_available"]

_BASELINES = ["none", "group", "rloo", "batch"]


def widgets_available() -> tuple[bool, str]:
    """(ok, reason): widgets need ipywidgets and a running Jupyter kernel to draw in."""
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False, "ipywidgets is not installed (pip install 'lightning-lab[notebooks]')"
    try:
        from IPython import get_ipython
    except ImportError:
        return False, "IPython is not installed"
    shell = get_ipython()
    if shell is None or not hasattr(shell, "kernel"):
        return False, "no Jupyter kernel is running (widgets draw only inside Jupyter)"
    return True, ""


class _View:
    """Shared behaviour: build the UI only when it can be shown, else explain once."""

    available: bool = False
    reason: str = ""
    widget: Any = None

    def _check(self) -> bool:
        self.available, self.reason = widgets_available()
        if not self.available:
            import warnings

            warnings.warn(f"{type(self).__name__}: {self.reason}; the view is off but its methods "
                          "still work", RuntimeWarning, stacklevel=3)
        return self.available

    def _ipython_display_(self) -> None:
        from IPython.display import display

        if self.widget is not None:
            display(self.widget)
        else:
            print(f"{type(self).__name__} unavailable: {self.reason}")

    def __repr__(self) -> str:
        return f"<{type(self).__name__}{'' if self.available else ' (no UI: ' + self.reason + ')'}>"


def _image(png: bytes | None = None):
    import ipywidgets as w

    return w.Image(value=png or b"", format="png", layout=w.Layout(max_width="100%"))


class CreditPanel(_View):
    """Swap the credit strategy on a step's batch and see old vs new advantages.

    ``CreditPanel(state, trainer=None)``; "apply to next step" sets ``trainer.credit``.
    """

    def __init__(self, state: Any = None, trainer: Any = None, max_rows: int = 40):
        from ... import credit as credit_lib

        self.state = state
        self.trainer = trainer
        self.max_rows = max_rows
        self.comparison: tables.CreditComparison | None = None
        self._valued: Any = None  # state copy with critic values, reused across slider moves
        if not self._check():
            return
        import ipywidgets as w

        current = state.credit if state is not None else getattr(trainer, "credit", None)
        self.strategy = w.Dropdown(options=credit_lib.names(),
                                   value=getattr(current, "name", None) or credit_lib.names()[0],
                                   description="strategy")
        self.gamma = w.FloatSlider(value=0.9, min=0.0, max=1.0, step=0.05, description="gamma")
        self.lam = w.FloatSlider(value=0.95, min=0.0, max=1.0, step=0.05, description="lam")
        self.baseline = w.Dropdown(options=_BASELINES, value="group", description="baseline")
        self.apply_button = w.Button(description="apply to next step", icon="check",
                                     disabled=trainer is None, layout=w.Layout(width="190px"))
        self.status = w.HTML()
        self.heatmap = _image()
        self.table = w.HTML()
        for control in (self.strategy, self.gamma, self.lam, self.baseline):
            control.observe(lambda _change: self.refresh(), names="value")
        self.apply_button.on_click(lambda _b: self.apply())
        self.widget = w.VBox([
            w.HBox([self.strategy, self.baseline]), w.HBox([self.gamma, self.lam]),
            w.HBox([self.apply_button, self.status]), self.heatmap, self.table])
        self.refresh()

    def params(self) -> dict[str, Any]:
        """The panel's values for the parameters the chosen strategy has."""
        accepted = tables.strategy_params(self.strategy.value)
        values = {"gamma": self.gamma.value, "lam": self.lam.value,
                  "baseline": self.baseline.value}  # credit.get reads "none" as None
        for name, control in (("gamma", self.gamma), ("lam", self.lam), ("baseline", self.baseline)):
            control.disabled = name not in accepted
        return {k: v for k, v in values.items() if k in accepted}

    def set_state(self, state: Any) -> None:
        self.state, self._valued = state, None
        if self.available:
            self.refresh()

    def recompute(self, strategy: str, **params: Any) -> tables.CreditComparison:
        """What a UI change does, callable from code: recompute and keep the comparison."""
        from ... import credit as credit_lib

        needs_values = credit_lib.get(strategy).needs_values
        if needs_values and self._valued is None:
            self._valued = self.state.recompute(strategy, **params)
        self.comparison = tables.compare_credit(self.state, strategy,
                                                valued=self._valued if needs_values else None,
                                                **params)
        return self.comparison

    def refresh(self) -> None:
        if self.state is None:
            self.status.value = "<i>no step yet: run one, then swap strategies here</i>"
            return
        try:
            cmp = self.recompute(self.strategy.value, **self.params())
        except Exception as exc:  # noqa: BLE001 - show the reason instead of a traceback
            self.status.value = f"<span style='color:#b00'>{type(exc).__name__}: {exc}</span>"
            return
        old, new = cmp.old.credit.describe(), cmp.new.credit.describe()
        self.status.value = f"recomputed in {cmp.seconds * 1000:.1f} ms"
        self.heatmap.value = figures.figure_png(figures.advantage_heatmaps(
            cmp.old.batch, cmp.new.batch, old_title=f"now: {old}", new_title=f"new: {new}"))
        frame = cmp.table()
        self.table.value = frame.head(self.max_rows).to_html(
            index=False, float_format=lambda x: f"{x:+.3f}", na_rep="–")

    def apply(self) -> None:
        """Use the panel's strategy for the trainer's next steps."""
        if self.trainer is None or self.comparison is None:
            return
        self.trainer.credit = self.comparison.new.credit
        if self.available:
            self.status.value = f"next steps use <b>{self.trainer.credit.describe()}</b>"


class TrajectoryInspector(_View):
    """Browse a batch: filter by task, reward and status; read each transition of a trajectory."""

    def __init__(self, batch_or_state: Any = None):
        self.batch = getattr(batch_or_state, "batch", batch_or_state)
        if not self._check():
            return
        import ipywidgets as w

        self.task = w.Dropdown(description="task")
        self.reward = w.FloatRangeSlider(description="reward", step=0.01, readout_format=".2f")
        self.status = w.Dropdown(options=[("any", None), ("ok", "ok"), ("failed", "failed")],
                                 description="status")
        self.pick = w.Select(description="trajectory", rows=8, layout=w.Layout(width="95%"))
        self.detail = w.HTML()
        for control in (self.task, self.reward, self.status):
            control.observe(lambda _c: self._filter(), names="value")
        self.pick.observe(lambda _c: self._show(), names="value")
        self.widget = w.VBox([w.HBox([self.task, self.status]), self.reward, self.pick, self.detail])
        self.set_batch(self.batch)

    def set_batch(self, batch_or_state: Any) -> None:
        self.batch = getattr(batch_or_state, "batch", batch_or_state)
        if not self.available or self.batch is None:
            return
        rewards = [t.total_reward for t in self.batch.trajectories] or [0.0]
        lo, hi = min(rewards), max(rewards)
        hi = hi if hi > lo else lo + 1.0
        self.reward.min, self.reward.max = -1e9, 1e9  # widen first so new bounds never clash
        self.reward.min, self.reward.max = lo, hi
        self.reward.value = (lo, hi)
        self.task.options = [("all", None)] + [(t, t) for t in sorted({t.task_id for t in self.batch})]
        self._filter()

    def filtered(self) -> list[Any]:
        lo, hi = self.reward.value
        return tables.filter_trajectories(self.batch, task=self.task.value, min_reward=lo,
                                          max_reward=hi, status=self.status.value)

    def _filter(self) -> None:
        if self.batch is None:
            return
        shown = self.filtered()
        self.pick.options = [(tables.trajectory_label(t), i) for i, t in enumerate(shown)]
        self._shown = shown
        self.pick.value = 0 if shown else None
        self._show()

    def _show(self) -> None:
        idx = self.pick.value
        shown = getattr(self, "_shown", [])
        self.detail.value = (tables.trajectory_html(shown[idx]) if idx is not None and shown
                             else "<i>no trajectory matches the filters</i>")


def _staleness(metrics: dict[str, float]) -> str:
    """The step's lag, when its rollouts were sampled by older weights (``max_staleness``)."""
    if not metrics.get("staleness_max"):
        return ""
    return (f" · staleness mean {metrics['staleness_mean']:.2f} max "
            f"{metrics['staleness_max']:.0f}")


class Dashboard(_View, CallbackBase):
    """Step / Run N / Pause a ``PPOTrainer``, live curves, credit panel and trajectory inspector.

    ``dash = ll.widgets.Dashboard(trainer); dash`` in a cell. ``dash.run(n)`` from code runs
    synchronously (so executed notebooks are deterministic); the Run button trains in a background
    thread so Pause, checked between steps, can be clicked.
    """

    def __init__(self, trainer: Any, run_steps: int = 5):
        self.trainer = trainer
        self.state: Any = None
        self._pause = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        """The exception of the last failed step (shown in the status line), None after a success."""
        trainer.add_callback(self)  # steps run from code update the views too
        if not self._check():
            return
        import ipywidgets as w

        self.step_button = w.Button(description="Step", icon="step-forward")
        self.run_button = w.Button(description="Run N", icon="play")
        self.pause_button = w.Button(description="Pause", icon="pause", disabled=True)
        self.n_steps = w.BoundedIntText(value=run_steps, min=1, max=10_000, description="N",
                                        layout=w.Layout(width="140px"))
        self.progress = w.IntProgress(value=0, min=0, max=1, description="idle")
        self.status = w.HTML("ready")
        self.curves = _image(figures.figure_png(figures.curves_figure(trainer.history)))
        self.credit_panel = CreditPanel(None, trainer, max_rows=16)
        self.inspector = TrajectoryInspector(None)
        self.step_button.on_click(lambda _b: self.run(1, block=False))
        self.run_button.on_click(lambda _b: self.run(self.n_steps.value, block=False))
        self.pause_button.on_click(lambda _b: self.pause())
        tabs = w.Tab(children=[w.VBox([self.curves]), self.credit_panel.widget, self.inspector.widget])
        for i, title in enumerate(("Curves", "Credit", "Trajectories")):
            tabs.set_title(i, title)
        controls = w.HBox([self.step_button, self.run_button, self.n_steps, self.pause_button,
                           self.progress])
        self.widget = w.VBox([controls, self.status, tabs])
        self.widget.add_class("ll-dashboard")

    # ------------------------------------------------------------------ control
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def run(self, n: int = 1, block: bool = True) -> list[Any]:
        """Run ``n`` steps one at a time, stopping early if paused. ``block=False``: in a thread.

        A failed step stops the run and shows its error in the status line; a blocking run also
        raises it (so an executed notebook fails), a background run keeps it in ``self.error``.
        """
        if self.running:
            return []
        self._pause.clear()
        if not block:
            self._thread = threading.Thread(target=self._loop, args=(n, False), daemon=True,
                                            name="ll-dashboard")
            self._thread.start()
            return []
        return self._loop(n, True)

    def pause(self) -> None:
        """Stop after the step in progress (steps are never interrupted half-way)."""
        self._pause.set()
        self._set_status("pausing after this step…")

    def wait(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self, n: int, raise_errors: bool) -> list[Any]:
        states = []
        self.error = None
        self._busy(True, n)
        try:
            for i in range(n):
                if self._pause.is_set():
                    self._set_status(f"paused after {i} of {n} steps")
                    break
                self._set_status(f"step {self.trainer.iteration + 1} running ({i + 1}/{n})…")
                t0 = time.perf_counter()
                state = self.trainer.step()  # on_step below refreshes the views
                states.append(state)
                m = state.metrics
                self._set_status(f"step {state.iteration} done in {time.perf_counter() - t0:.1f}s · "
                                 f"reward {m['reward_mean']:.3f} · kl {m['kl']:.4f}"
                                 + _staleness(m))
                if self.available:
                    self.progress.value = i + 1
        except Exception as exc:  # noqa: BLE001 - in a thread nobody would see it otherwise
            self.error = exc
            self._set_status(f"<span style='color:#b00'>step failed: {type(exc).__name__}: {exc}</span>")
            if raise_errors:
                raise
        finally:
            self._busy(False, n)
        return states

    def _busy(self, busy: bool, n: int) -> None:
        if not self.available:
            return
        self.step_button.disabled = self.run_button.disabled = busy
        self.pause_button.disabled = not busy
        if busy:
            self.progress.max, self.progress.value, self.progress.description = n, 0, "steps"
        else:
            self.progress.description = "idle"

    def _set_status(self, text: str) -> None:
        if self.available:
            self.status.value = text

    # ------------------------------------------------------------------ trainer callback
    def on_step(self, state: Any) -> None:
        self.state = state
        if not self.available:
            return
        self.curves.value = figures.figure_png(figures.curves_figure(self.trainer.history))
        self.credit_panel.set_state(state)
        self.inspector.set_batch(state)
