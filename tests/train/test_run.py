"""One run config, one run loop: CLI, sweeps and notebooks make the same run; resume applies or
refuses changes; strategies compared on one seed see the same tasks; old states refuse stale
critics; the dashboard does not swallow a failed step."""

from __future__ import annotations

import json

import pytest

import lightning_lab as ll
from shared_agents import parity_agent
from lightning_lab.cli import main
from lightning_lab.train.callbacks import CallbackBase
from lightning_lab.train.config import ConfigError, RunConfig, load_config, override, save_config
from lightning_lab.train.run import run

TINY = dict(model="tiny", env="wordplay", steps=2, eval_limit=2, save_every=1,
            ppo={"tasks_per_step": 2, "group_size": 2, "rollout_workers": 4})
TASKS = [{"task_id": f"t{i}", "q": f"Question number {i} " + "word " * i} for i in range(8)]


def cli_args(config: RunConfig) -> list[str]:
    return ["train", "--model", config.model, "--env", config.env, "--steps", str(config.steps),
            "--eval-limit", str(config.eval_limit), "--save-every", "1", "--tasks-per-step", "2",
            "--group-size", "2", "--rollout-workers", "4", "--out", config.out]


def test_cli_sweep_and_notebook_make_the_same_run(tmp_path):
    from lightning_lab import tracking

    config = override(RunConfig(), {**TINY, "out": str(tmp_path / "nb")})
    summary_nb = run(config, log=lambda _line: None)                       # a notebook
    cli_out = tmp_path / "cli"
    assert main(cli_args(override(config, {"out": str(cli_out)}))) == 0  # the shell
    sweep_out = tmp_path / "sweep"
    params = {**{k: v for k, v in TINY.items() if k != "ppo"}, "tasks_per_step": 2, "group_size": 2,
              "rollout_workers": 4, "out": str(sweep_out)}
    swept = tracking.train_run(params, tracking.WandbCallback(mode="disabled"))

    summaries = [summary_nb] + [json.loads((d / "summary.json").read_text()) for d in (cli_out, sweep_out)]
    assert summaries[0] == json.loads((tmp_path / "nb" / "summary.json").read_text())
    for s in summaries:
        assert set(s) == {"before", "after", "history", "train_minutes", "checkpoint"}
        assert set(s["before"]) == set(s["after"]) == set(summaries[0]["after"])
        assert len(s["history"]) == 2
    # the same resolved config everywhere (only the folder differs)
    configs = [load_config(d / "config.yaml") for d in (tmp_path / "nb", cli_out, sweep_out)]
    assert len({json.dumps({**vars(c), "out": None, "ppo": vars(c.ppo)}, sort_keys=True, default=str)
                for c in configs}) == 1
    for d in (tmp_path / "nb", cli_out, sweep_out):  # a swept run checkpoints like any other
        assert (d / "checkpoints" / "LATEST").read_text() == "step-000002"
    assert swept["eval_n"] == summaries[2]["after"]["n"]


def test_resume_applies_a_changed_lr_and_refuses_a_changed_env(tmp_path, capsys):
    out = tmp_path / "run"
    args = cli_args(override(RunConfig(), {**TINY, "out": str(out)}))
    assert main(args + ["--lr", "1e-3"]) == 0
    assert load_config(out / "config.yaml").ppo.lr == 1e-3
    capsys.readouterr()

    # no flags: the saved config is the base, nothing changes (the default lr does not sneak in)
    assert main(["train", "--resume", "--out", str(out), "--steps", "3"]) == 0
    text = capsys.readouterr().out
    assert "resume: steps changed 2 -> 3" in text and "ppo.lr" not in text

    assert main(["train", "--resume", "--out", str(out), "--steps", "4", "--lr", "5e-4"]) == 0
    assert "resume: ppo.lr changed 0.001 -> 0.0005" in capsys.readouterr().out
    saved = load_config(out / "config.yaml")
    assert saved.ppo.lr == 5e-4 and saved.steps == 4
    trainer = ll.PPOTrainer.load(out / "checkpoints", ll.models.load("tiny"), lambda t: None,
                                 [{"task_id": "x"}], config=saved.ppo)
    assert trainer.optimizer.param_groups[0]["lr"] == 5e-4 and trainer.iteration == 4
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4

    assert main(["train", "--resume", "--out", str(out), "--env", "rag"]) == 2
    assert "cannot resume with a different env ('wordplay' -> 'rag')" in capsys.readouterr().err


def test_resume_with_another_credit_drops_parameters_it_does_not_take(tmp_path, capsys):
    out = tmp_path / "run"
    args = cli_args(override(RunConfig(), {**TINY, "out": str(out)}))
    assert main(args + ["--credit", "discounted", "--gamma", "0.5", "--steps", "1"]) == 0
    assert main(["train", "--resume", "--out", str(out), "--credit", "uniform"]) == 0
    text = capsys.readouterr().out
    assert "resume: credit changed 'discounted' -> 'uniform'" in text
    assert "resume: gamma changed 0.5 -> None" in text and "with uniform(" in text


def test_config_file_and_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: tiny\nsteps: 1\neval_limit: 1\nppo:\n  lr: 0.003\n  group_size: 2\n"
                    "  tasks_per_step: 1\n  trainable_roles: [namer]\n")
    config = load_config(path)
    assert config.ppo.lr == 0.003 and config.ppo.trainable_roles == ("namer",) and config.steps == 1
    save_config(config, tmp_path / "copy.yaml")
    assert load_config(tmp_path / "copy.yaml") == config
    (tmp_path / "bad.yaml").write_text("ppo:\n  learning_rate: 1\n")
    with pytest.raises(ConfigError, match="bad.yaml.*unknown config field 'ppo.learning_rate'"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="steps must be int"):
        override(config, {"steps": "many"})
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "r"), "--lr", "0.01"]) == 0
    resolved = load_config(tmp_path / "r" / "config.yaml")
    assert resolved.ppo.lr == 0.01 and resolved.ppo.group_size == 2 and resolved.model == "tiny"


def test_strategies_compared_on_one_seed_see_the_same_tasks(tiny):
    """Notebook 04's comparison: the task order must not depend on the credit strategy (which
    changes how many rows enter the loss, so it used to shift a shared RNG)."""
    config = ll.PPOConfig(tasks_per_step=2, group_size=4, minibatch_size=4, seed=3, rollout_workers=8)
    seen = {}
    for name in ("uniform", "discounted", "value"):
        trainer = ll.PPOTrainer(tiny, parity_agent(tiny, max_new_tokens=3), TASKS, credit=name,
                                config=config)
        seen[name] = [sorted(t.task_id for t in trainer.step().batch.trajectories) for _ in range(3)]
    assert seen["uniform"] == seen["discounted"] == seen["value"]


def test_an_old_state_refuses_recompute_with_a_moved_critic(tiny):
    trainer = ll.PPOTrainer(tiny, parity_agent(tiny, max_new_tokens=3), TASKS, credit="uniform",
                            config=ll.PPOConfig(tasks_per_step=2, group_size=2, rollout_workers=4))
    first = trainer.step()
    latest = first.recompute("value")  # still the latest step: the current critic applies
    assert all(tr.value is not None for _, tr in latest.batch.transitions())
    trainer.step()
    with pytest.raises(ValueError, match="iteration 1's batch has no critic values.*at iteration 2"):
        first.recompute("value")
    assert first.recompute("discounted", gamma=0.5).credit.name == "discounted"  # needs no critic


def test_dashboard_run_raises_a_failed_step_and_shows_it(tiny):
    def broken(task):
        raise RuntimeError("agent exploded")

    trainer = ll.PPOTrainer(tiny, broken, TASKS, config=ll.PPOConfig(tasks_per_step=1, group_size=2))
    dash = ll.widgets.Dashboard(trainer)
    with pytest.raises(RuntimeError, match="all 2 rollouts failed"):
        dash.run(2)
    assert isinstance(dash.error, RuntimeError)
    dash.run(1, block=False)
    dash.wait(60)
    assert "all 2 rollouts failed" in str(dash.error)


def test_callbacks_are_functions_or_callback_objects(tiny):
    seen = []

    class Recorder(CallbackBase):
        def on_step(self, state):
            seen.append(("object", state.iteration))

    trainer = ll.PPOTrainer(tiny, parity_agent(tiny, max_new_tokens=2), TASKS,
                            config=ll.PPOConfig(tasks_per_step=1, group_size=2),
                            callbacks=[lambda s: seen.append(("function", s.iteration)), Recorder()])
    trainer.step()
    assert seen == [("function", 1), ("object", 1)]
    with pytest.raises(TypeError, match="a callback is a function"):
        trainer.add_callback(42)


def test_no_import_cycles_inside_the_package():
    """Each module imports only what sits below it on the data path (see DESIGN.md)."""
    import ast
    from pathlib import Path

    root = Path(ll.__file__).parent
    modules = {".".join(p.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__"): p
               for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                target = f"{base}.{node.module}" if node.level and node.module else (node.module or base)
                if node.level == 0 and not (node.module or "").startswith("lightning_lab"):
                    continue
                subs = {f"{target}.{a.name}" for a in node.names} & set(modules)
                # `from pkg import sub` needs pkg.sub; `from pkg import name` needs pkg itself
                candidates = subs | ({target} if len(subs) < len(node.names) else set())
                deps |= {c for c in candidates if c in modules and c != name}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in modules and a.name != name}
        graph[name] = deps

    def parents(mod: str) -> set[str]:  # importing a.b.c runs a/__init__ and a/b/__init__
        parts = mod.split(".")
        return {".".join(parts[:i]) for i in range(1, len(parts))} & set(modules)

    cycles = []
    for start in graph:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for dep in graph[node]:
                if dep == start:
                    cycles.append(path + [dep])
                elif dep not in seen and dep not in parents(start):
                    seen.add(dep)
                    stack.append((dep, path + [dep]))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles[:5])
