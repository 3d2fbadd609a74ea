"""W&B tracking, offline: what the callback logs, read back from the run's own .wandb log; sweeps."""

from __future__ import annotations

import warnings

import pytest

import lightning_lab as ll
from shared_agents import parity_agent as shared_parity_agent
from lightning_lab import tracking

pytest.importorskip("wandb")

TASKS = [{"task_id": f"t{i}", "q": f"Question {i} " + "word " * i} for i in range(4)]


def parity_agent(policy):
    return shared_parity_agent(policy, roles=("writer", "checker"), max_new_tokens=4)


@pytest.fixture(scope="module")
def policy():
    return ll.models.load("tiny")


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")


def make_trainer(policy, **kw):
    config = ll.PPOConfig(tasks_per_step=2, group_size=2, minibatch_size=8, rollout_workers=4, **kw)
    return ll.PPOTrainer(policy, parity_agent(policy), TASKS, credit="discounted", config=config)


def test_callback_logs_metrics_table_config_and_eval(policy, tmp_path):
    trainer = make_trainer(policy, lr=1e-3)
    cb = tracking.WandbCallback(project="t", config={"env": "parity"}, table_every=2,
                                table_rows=5, dir=str(tmp_path)).attach(trainer)
    cb.attach(trainer)  # idempotent
    assert sum(c is cb for c in trainer.callbacks) == 1
    states = trainer.fit(2, progress=False)
    cb.log_eval({"acc": 0.25})
    cb.log_eval({"acc": 0.5})
    cb.log_eval({"acc": 0.1})
    cb.finish()

    [run_dir] = tracking.find_runs(tmp_path)
    run = tracking.read_run(run_dir)
    cfg = run["config"]
    assert cfg["model"] == "tiny" and cfg["env"] == "parity"
    assert cfg["credit"] == trainer.credit.describe() and cfg["credit_name"] == "discounted"
    assert cfg["credit_params"]["gamma"] == 0.9
    assert cfg["ppo"]["lr"] == 1e-3 and cfg["ppo"]["group_size"] == 2
    steps = [h for h in run["history"] if "train/reward_mean" in h]
    assert [h["_step"] for h in steps] == [1, 2]
    for h, s in zip(steps, states):
        assert h["train/reward_mean"] == pytest.approx(s.metrics["reward_mean"])
        assert h["losses/kl"] == pytest.approx(s.metrics["kl"])
        assert "losses/policy_loss" in h and "train/tokens_per_s" in h
    # the table is logged at step 2 only, with the sampled transitions of that batch
    [(columns, data)] = run["tables"]["samples/transitions"]
    assert {"question", "role", "response", "reward", "advantage"} <= set(columns)
    assert len(data) == 5 and {r[columns.index("step")] for r in data} == {2}
    batch_rewards = {round(tr.reward, 6) for _, tr in states[1].batch.transitions()}
    assert {round(r[columns.index("reward")], 6) for r in data} <= batch_rewards
    assert {r[columns.index("role")] for r in data} <= {"writer", "checker"}
    assert run["summary"]["best/eval_acc"] == 0.5
    # evals at the same trainer step share its history row (W&B merges one step's logs): last wins
    assert [h["eval/acc"] for h in run["history"] if "eval/acc" in h] == [0.1]


def test_split_metrics_puts_each_adapters_metric_beside_its_family():
    metrics = {"step": 3, "kl": 0.1, "kl/writer": 0.2, "grad_norm/checker": 1.5,
               "loss/writer": -0.3, "clip_frac/writer": 0.25, "reward_mean": 0.5,
               "reward/writer": 0.75, "tokens_per_s": 9.0}
    assert tracking.split_metrics(metrics) == {
        "losses/kl": 0.1, "losses/kl/writer": 0.2, "losses/grad_norm/checker": 1.5,
        "losses/loss/writer": -0.3, "losses/clip_frac/writer": 0.25, "train/reward_mean": 0.5,
        "train/reward/writer": 0.75, "train/tokens_per_s": 9.0}


def test_a_two_adapter_run_logs_each_adapters_reward_and_kl(tmp_path):
    policy = ll.models.load("tiny", adapters=["writer", "checker"])
    trainer = make_trainer(policy, lr=1e-3)
    cb = tracking.WandbCallback(project="t", table_every=0, dir=str(tmp_path)).attach(trainer)
    [state] = trainer.fit(1, progress=False)
    cb.finish()
    [row] = [h for h in tracking.read_run(tracking.find_runs(tmp_path)[0])["history"]
             if "train/reward_mean" in h]
    for name in ("writer", "checker"):
        assert row[f"train/reward/{name}"] == pytest.approx(state.metrics[f"reward/{name}"])
        assert row[f"losses/kl/{name}"] == pytest.approx(state.metrics[f"kl/{name}"])
        assert row[f"losses/grad_norm/{name}"] == pytest.approx(state.metrics[f"grad_norm/{name}"])


def test_checkpoint_artifact(policy, tmp_path):
    trainer = make_trainer(policy)
    cb = tracking.WandbCallback(project="t", table_every=0, log_checkpoints=True,
                                checkpoint_every=1, dir=str(tmp_path)).attach(trainer)
    trainer.step()
    cb.finish()
    run = tracking.read_run(tracking.find_runs(tmp_path)[0])
    assert any(name.endswith("-checkpoint") for name in run["artifacts"])


def test_offline_by_default(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert tracking.wandb_mode() == "offline"
    assert tracking.wandb_mode("disabled") == "disabled"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert tracking.wandb_mode() is None  # logged in: wandb's default (online)
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert tracking.wandb_mode() == "dryrun"


def test_failing_wandb_warns_and_training_continues(policy, monkeypatch):
    import wandb

    def broken(*a, **k):
        raise RuntimeError("no network")

    monkeypatch.setattr(wandb, "init", broken)
    trainer = make_trainer(policy)
    cb = tracking.WandbCallback(project="t").attach(trainer)
    with pytest.warns(RuntimeWarning, match="tracking is off.*no network"):
        trainer.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning only; later steps are silent
        trainer.step()
        cb.log_eval({"acc": 1.0})
        cb.finish()
    assert trainer.iteration == 2 and not cb.enabled


def test_wandb_not_installed(policy, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *a, **k):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    trainer = make_trainer(policy)
    tracking.WandbCallback().attach(trainer)
    with pytest.warns(RuntimeWarning, match="tracking is off"):
        trainer.step()
    assert trainer.iteration == 1


# ---------------------------------------------------------------------- sweeps
def test_expand_grid_random_bayes():
    grid = {"method": "grid", "parameters": {"credit": {"values": ["uniform", "discounted"]},
                                             "gamma": {"values": [0.5, 0.9]}, "steps": {"value": 1}}}
    runs = tracking.expand_sweep(grid)
    assert len(runs) == 4 and {r["steps"] for r in runs} == {1}
    rnd = {"method": "random", "parameters": {"lr": {"min": 1e-4, "max": 1e-2,
                                                     "distribution": "log_uniform_values"},
                                              "group_size": {"min": 2, "max": 4}}}
    samples = tracking.expand_sweep(rnd, count=20, seed=1)
    assert len(samples) == 20 and all(1e-4 <= s["lr"] <= 1e-2 for s in samples)
    assert {s["group_size"] for s in samples} <= {2, 3, 4}
    with pytest.warns(UserWarning, match="random"):
        assert len(tracking.expand_sweep({**rnd, "method": "bayes"}, count=3)) == 3
    with pytest.raises(ValueError, match="grid search needs 'values'"):
        tracking.expand_sweep({**rnd, "method": "grid"})


def test_sweep_rejects_unknown_parameter_before_any_run():
    calls = []
    bad = {"method": "grid", "parameters": {"credit": {"values": ["uniform"]},
                                            "learning_rate": {"values": [0.1]}}}
    with pytest.raises(ValueError, match=r"unknown sweep parameter.*learning_rate.*valid:.*kl_coef"):
        tracking.sweep(bad, train_fn=None)
    bad_credit = {"method": "grid", "parameters": {"credit": {"values": ["uniform", "nope"]}}}
    with pytest.raises(ValueError, match="unknown credit strategy 'nope'.*discounted, uniform, value"):
        tracking.sweep(bad_credit, train_fn=lambda p, cb: calls.append(p) or {})
    assert calls == []


def test_offline_sweep_groups_runs_and_returns_dataframe(tmp_path):
    """The default train_fn (the CLI's build_trainer) on wordplay with the tiny model."""
    config = {"method": "grid", "metric": {"name": "eval_one_word", "goal": "maximize"},
              "parameters": {"credit": {"values": ["uniform", "discounted"]},
                             "gamma": {"values": [0.5, 1.0]},
                             "model": {"value": "tiny"}, "env": {"value": "wordplay"},
                             "steps": {"value": 1}, "tasks_per_step": {"value": 2},
                             "group_size": {"value": 2}, "eval_limit": {"value": 2}}}
    frame = tracking.sweep(config, project="sw", dir=tmp_path, progress=False)
    # uniform has no gamma, so the grid is 1 uniform run + 2 discounted runs
    assert len(frame) == 3
    assert sorted(frame["credit"]) == ["discounted", "discounted", "uniform"]
    assert frame.loc[frame.credit == "uniform", "gamma"].isna().all()
    assert {"reward_mean", "eval_one_word", "run_id", "seconds"} <= set(frame.columns)
    assert "error" not in frame.columns
    runs = [tracking.read_run(d) for d in tracking.find_runs(tmp_path)]
    assert len(runs) == 3
    assert {r["group"] for r in runs} == {frame.attrs["group"]}
    assert {r["id"] for r in runs} == set(frame["run_id"])
    by_id = {r["id"]: r for r in runs}
    for _, row in frame.iterrows():
        run = by_id[row.run_id]
        assert run["config"]["credit_name"] == row.credit and run["config"]["sweep"]["credit"] == row.credit
        assert run["config"]["credit"].startswith(f"{row.credit}(")
        assert run["config"]["ppo"]["tasks_per_step"] == 2
        if row.credit == "discounted":
            assert run["config"]["credit_params"]["gamma"] == row.gamma
        assert run["summary"]["reward_mean"] == pytest.approx(row.reward_mean)


def test_sweep_cli(tmp_path, capsys):
    from lightning_lab.cli import main

    yaml_path = tmp_path / "sweep.yaml"
    yaml_path.write_text("method: grid\nparameters:\n  credit:\n    values: [uniform]\n"
                         "  steps:\n    value: 1\n  tasks_per_step:\n    value: 1\n"
                         "  group_size:\n    value: 2\n  eval_limit:\n    value: 1\n")
    out = tmp_path / "results.csv"
    code = main(["sweep", str(yaml_path), "--set", "model=tiny", "--dir", str(tmp_path),
                 "--mode", "offline", "--out", str(out)])
    assert code == 0
    import pandas as pd

    frame = pd.read_csv(out)
    assert list(frame["credit"]) == ["uniform"] and frame["model"][0] == "tiny"
    yaml_path.write_text("method: grid\nparameters:\n  credits:\n    values: [uniform]\n")
    assert main(["sweep", str(yaml_path)]) == 2
    assert "unknown sweep parameter" in capsys.readouterr().err


def test_an_sft_run_logs_its_sft_config_under_sft_not_ppo(tmp_path):
    """The callback labelled every trainer's config ``ppo``, an SFT run's SFTConfig included."""
    from lightning_lab.train.config import RunConfig
    from lightning_lab.train.run import run

    cb = tracking.WandbCallback(project="t", dir=str(tmp_path / "wandb"))
    config = RunConfig(algorithm="sft", model="tiny", env="text_to_sql", limit=4, eval_limit=1,
                       agent_options={"max_turns": 1, "max_new_tokens": 4},
                       sft={"batch_size": 4, "lr": 1e-3, "epochs": 1}, out=str(tmp_path / "run"))
    run(config, [cb], log=lambda _line: None)
    [run_dir] = tracking.find_runs(tmp_path / "wandb")
    logged = tracking.read_run(run_dir)["config"]
    assert "ppo" not in logged
    assert logged["sft"]["batch_size"] == 4 and logged["sft"]["lr"] == 1e-3
