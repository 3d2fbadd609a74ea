"""Widgets: the pure figure/table functions, the credit panel against hand-computed advantages,
the inspector's filters, and the dashboard driving a real (tiny) trainer with and without a kernel."""

from __future__ import annotations

import warnings

import pytest

import lightning_lab as ll
from shared_agents import parity_agent as shared_parity_agent
from lightning_lab import credit
from lightning_lab.train.trainer import StepState
from lightning_lab.workbench.widgets import dashboard as dash_mod
from lightning_lab.workbench.widgets import figures, tables


def traj(task, rewards, group="g", status="ok"):
    trs = [ll.Transition(prompt_ids=[1, 2], response_ids=[3, 4, 5], logprobs=[-1.0] * 3,
                         prompt=f"<|im_start|>user\nQ {task}<|im_end|>\n<|im_start|>assistant\n",
                         response=f"r{i}", role="writer" if i == 0 else "checker", reward=r)
           for i, r in enumerate(rewards)]
    return ll.Trajectory(task_id=task, transitions=trs, group_id=group, status=status,
                         error="" if status == "ok" else "ValueError: boom")


def hand_state() -> StepState:
    batch = ll.Batch([traj("a", [0.0, 1.0]), traj("a", [0.0, 0.0]),
                      traj("b", [1.0], group="h"), traj("b", [0.0], group="h", status="failed")])
    strategy = credit.get("uniform")
    strategy.assign(batch)
    return StepState(iteration=1, batch=batch, metrics={}, credit=strategy)


@pytest.fixture
def with_kernel(monkeypatch):
    """Pretend a kernel is running so the ipywidgets UI is built (widgets work without a frontend)."""
    pytest.importorskip("ipywidgets")
    monkeypatch.setattr(dash_mod, "widgets_available", lambda: (True, ""))


# ---------------------------------------------------------------------- pure functions
def test_last_user_message():
    prompt = ("<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\nfirst<|im_end|>\n"
              "<|im_start|>assistant\nok<|im_end|>\n<|im_start|>user\nsecond q<|im_end|>\n"
              "<|im_start|>assistant\n")
    assert tables.last_user_message(prompt) == "second q"
    assert tables.last_user_message("plain") == "plain"


def test_advantage_table_matches_hand_values():
    state = hand_state()
    cmp = tables.compare_credit(state, "discounted", gamma=0.5)
    t = cmp.table()
    # group g: uniform returns [1,1] and [0,0], mean score .5 -> +.5/-.5
    assert list(t["old_advantage"][:4]) == pytest.approx([0.5, 0.5, -0.5, -0.5])
    # discounted(.5): returns [.5, 1] and [0, 0]; scores .5 and 0 -> baseline .25
    assert list(t["new_return"][:4]) == pytest.approx([0.5, 1.0, 0.0, 0.0])
    assert list(t["new_advantage"][:4]) == pytest.approx([0.25, 0.75, -0.25, -0.25])
    assert list(t["delta"][:4]) == pytest.approx([-0.25, 0.25, 0.25, 0.25])
    # group h: the only usable trajectory is its own baseline; the failed one gets no advantage
    assert t["new_advantage"][4] == pytest.approx(0.0) and t["new_advantage"].isna()[5]
    assert state.batch[0].transitions[0].advantage == pytest.approx(0.5)  # the state is untouched


def test_advantage_matrix_and_figures():
    state = hand_state()
    mat, labels = figures.advantage_matrix(state.batch)
    assert mat.shape == (4, 2) and len(labels) == 4
    assert mat[0].tolist() == pytest.approx([0.5, 0.5])
    assert mat[2, 1] != mat[2, 1]  # NaN where trajectory b has no second step
    new = state.recompute("discounted", gamma=0.5)
    png = figures.figure_png(figures.advantage_heatmaps(state.batch, new.batch))
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    history = [{"step": 1, "reward_mean": 0.1, "reward_std": 0.05, "kl": 0.0, "clip_frac": 0.0,
                "policy_loss": 0.1, "tokens_per_s": 100.0},
               {"step": 2, "reward_mean": 0.3, "reward_std": 0.05, "kl": 0.01, "clip_frac": 0.1,
                "policy_loss": -0.1, "value_loss": 0.2, "tokens_per_s": 120.0}]
    fig = figures.curves_figure(history)
    assert [ax.get_title() for ax in fig.axes] == [t for t, _ in figures.CURVES]
    reward_line = fig.axes[0].lines[0]
    assert list(reward_line.get_ydata()) == [0.1, 0.3]
    assert figures.figure_png(figures.curves_figure([]))[:4] == b"\x89PNG"


def test_curves_draw_one_dashed_line_per_adapter_in_its_familys_panel():
    history = [{"step": 1, "reward_mean": 0.2, "reward/writer": 0.1, "kl": 0.0, "kl/writer": 0.0},
               {"step": 2, "reward_mean": 0.4, "reward/writer": 0.3, "reward/checker": 0.5,
                "kl": 0.01, "kl/writer": 0.02, "kl/checker": 0.0, "loss/checker": -0.1}]
    assert figures.adapter_keys(history, "reward") == ["reward/writer", "reward/checker"]
    panels = {ax.get_title(): ax for ax in figures.curves_figure(history).axes}
    lines = {line.get_label(): line for line in panels["reward"].lines}
    assert list(lines) == ["reward_mean", "reward/writer", "reward/checker"]
    assert list(lines["reward/writer"].get_ydata()) == [0.1, 0.3]
    checker = list(lines["reward/checker"].get_ydata())
    assert checker[1] == 0.5 and checker[0] != checker[0]  # NaN before the checker's first step
    assert lines["reward/writer"].get_linestyle() == "--"
    assert lines["reward_mean"].get_linestyle() == "-"
    assert [line.get_label() for line in panels["KL to reference"].lines] == ["kl", "kl/writer",
                                                                              "kl/checker"]
    assert [line.get_label() for line in panels["losses"].lines] == ["loss/checker"]
    assert panels["reward"].get_legend() is not None


def test_filters_and_trajectory_html():
    batch = hand_state().batch
    assert [t.task_id for t in tables.filter_trajectories(batch, task="b")] == ["b", "b"]
    assert len(tables.filter_trajectories(batch, min_reward=0.5)) == 2
    assert len(tables.filter_trajectories(batch, max_reward=0.0)) == 2
    [failed] = tables.filter_trajectories(batch, status="failed")
    html = tables.trajectory_html(failed)
    assert "FAILED" in tables.trajectory_label(failed) and "boom" in html
    html = tables.trajectory_html(batch[0])
    assert "<details><summary>prompt</summary>" in html and "checker" in html
    assert "advantage +0.500" in html and "tokens 2→3" in html


def test_tables_and_curves_show_each_transitions_lag():
    state = hand_state()
    for i, traj in enumerate(state.batch.trajectories):
        for tr in traj.transitions:
            tr.meta["lag"] = i % 2  # trajectories 1 and 3 sampled one version back
    assert tables.transitions_frame(state.batch)["lag"].tolist() == [0, 0, 1, 1, 0, 1]
    assert tables.compare_credit(state, "discounted").table()["lag"].tolist() == [0, 0, 1, 1, 0, 1]
    assert "lag 1" in tables.trajectory_html(state.batch[1])
    assert "lag" not in tables.trajectory_html(hand_state().batch[1])  # none recorded
    history = [{"step": 1, "staleness_mean": 0.0, "staleness_max": 0.0},
               {"step": 2, "staleness_mean": 0.75, "staleness_max": 1.0}]
    panel = figures.curves_figure(history).axes[-1]
    assert panel.get_title() == "staleness (steps)"
    assert [list(line.get_ydata()) for line in panel.lines] == [[0.0, 0.75], [0.0, 1.0]]


def test_unknown_credit_lists_registered():
    with pytest.raises(KeyError, match="registered: discounted, uniform, value"):
        tables.compare_credit(hand_state(), "nope")


# ---------------------------------------------------------------------- ipywidgets views
def test_credit_panel_recompute_and_apply(with_kernel):
    state = hand_state()

    class FakeTrainer:
        credit = state.credit
        callbacks: list = []

    trainer = FakeTrainer()
    panel = dash_mod.CreditPanel(state, trainer)
    assert panel.available and panel.strategy.value == "uniform"
    assert panel.gamma.disabled and not panel.baseline.disabled  # uniform has no gamma
    panel.gamma.value = 0.5
    panel.strategy.value = "discounted"  # the change triggers a recompute
    assert not panel.gamma.disabled
    new = [tr.advantage for _, tr in panel.comparison.new.batch.transitions()][:4]
    assert new == pytest.approx([0.25, 0.75, -0.25, -0.25])
    assert panel.heatmap.value[:4] == b"\x89PNG" and "new_advantage" in panel.table.value
    panel.baseline.value = "none"
    assert panel.comparison.new.credit.baseline is None
    assert [tr.advantage for _, tr in panel.comparison.new.batch.transitions()][:2] == pytest.approx(
        [0.5, 1.0])
    panel.apply_button.click()
    assert trainer.credit.describe() == "discounted(gamma=0.5, baseline=None, scale_std=False)"
    panel.strategy.value = "value"  # this batch has no critic: a message, not an exception
    assert "no critic values" in panel.status.value


def test_credit_panel_recomputes_a_64_trajectory_batch(with_kernel):
    batch = ll.Batch([traj(f"t{i // 4}", [0.1 * (i % 4), 0.0, 1.0 * (i % 2)], group=f"g{i // 4}")
                      for i in range(64)])
    strategy = credit.get("uniform")
    strategy.assign(batch)
    state = StepState(iteration=1, batch=batch, metrics={}, credit=strategy)
    panel = dash_mod.CreditPanel(state)
    panel.strategy.value = "discounted"  # recompute + heatmap PNG + table HTML
    # timing is shown to the user ("recomputed in ... ms"), not asserted: tests share the CPU
    assert panel.comparison.new.credit.name == "discounted" and panel.comparison.seconds > 0
    assert panel.comparison.new.batch is not state.batch and state.credit.name == "uniform"
    assert len(panel.comparison.new.batch) == 64


def test_inspector_filters(with_kernel):
    state = hand_state()
    insp = dash_mod.TrajectoryInspector(state)
    assert insp.batch is state.batch  # the state's own batch, not a copy
    assert len(insp.pick.options) == 4 and "total reward 1.000" in insp.detail.value
    insp.task.value = "b"
    assert len(insp.pick.options) == 2
    insp.status.value = "failed"
    assert len(insp.pick.options) == 1 and "boom" in insp.detail.value
    insp.task.value = "a"
    assert insp.pick.options == () and "no trajectory matches" in insp.detail.value
    insp.status.value, insp.task.value = None, None
    insp.reward.value = (0.5, 1.0)
    assert len(insp.pick.options) == 2


def parity_agent(policy):
    return shared_parity_agent(policy, roles=("writer", "checker"), max_new_tokens=4)


@pytest.fixture(scope="module")
def trainer_factory():
    policy = ll.models.load("tiny")
    tasks = [{"task_id": f"t{i}", "q": f"Question {i}"} for i in range(4)]

    def make(**options):
        cfg = ll.PPOConfig(tasks_per_step=2, group_size=2, minibatch_size=8, rollout_workers=4,
                           **options)
        return ll.PPOTrainer(policy, parity_agent(policy), tasks, credit="uniform", config=cfg)

    return make


def test_dashboard_steps_pause_and_panels(with_kernel, trainer_factory):
    trainer = trainer_factory()
    dash = dash_mod.Dashboard(trainer)
    before = dash.curves.value
    states = dash.run(2)
    assert len(states) == 2 and trainer.iteration == 2 and dash.state is states[-1]
    assert dash.curves.value != before and dash.curves.value[:4] == b"\x89PNG"
    assert dash.progress.value == 2 and "step 2 done" in dash.status.value
    assert dash.credit_panel.state is states[-1] and dash.inspector.batch is states[-1].batch
    trainer.step()  # steps run from code reach the dashboard through the callback
    assert dash.state.iteration == 3
    # Run N in the background thread; Pause stops it between steps
    dash.run_button.click()
    dash.pause()
    dash.wait(60)
    assert not dash.running and trainer.iteration <= 4 and "paus" in dash.status.value
    # credit panel on a real step, including the critic-backed strategy
    dash.credit_panel.strategy.value = "value"
    assert all(tr.value is not None for _, tr in dash.credit_panel.comparison.new.batch.transitions())
    dash.credit_panel.apply()
    assert trainer.credit.name == "value"


def test_dashboard_shows_the_lag_of_asynchronous_rollouts(with_kernel, trainer_factory):
    dash = dash_mod.Dashboard(trainer_factory(max_staleness=1))
    first, second = dash.run(2)
    assert dash_mod._staleness(first.metrics) == ""  # step 1 samples the weights it updates
    assert "staleness mean 1.00 max 1" in dash.status.value
    assert "lag 1" in dash.inspector.detail.value


def test_dashboard_without_kernel_warns_and_still_trains(trainer_factory):
    trainer = trainer_factory()
    with pytest.warns(RuntimeWarning, match="no Jupyter kernel"):
        dash = ll.widgets.Dashboard(trainer)
    assert not dash.available and "no UI" in repr(dash)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dash._ipython_display_()  # prints the reason, no exception
    assert len(dash.run(1)) == 1 and dash.state.iteration == 1


def test_no_ipywidgets_gives_a_clear_reason(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_ipywidgets(name, *a, **k):
        if name == "ipywidgets":
            raise ImportError("No module named 'ipywidgets'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_ipywidgets)
    ok, reason = dash_mod.widgets_available()
    assert not ok and "pip install" in reason and "ipywidgets" in reason
    with pytest.warns(RuntimeWarning, match="ipywidgets is not installed"):
        panel = dash_mod.CreditPanel(hand_state())
    assert panel.widget is None
    cmp = panel.recompute("discounted", gamma=0.5)  # the logic works without the UI
    assert [tr.advantage for _, tr in cmp.new.batch.transitions()][:2] == pytest.approx([0.25, 0.75])
