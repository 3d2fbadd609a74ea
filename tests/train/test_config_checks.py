"""Config values are checked where they enter (YAML file, flag, notebook) and name the field and
the file or flag; resume falls back to the newest intact checkpoint and names any bad file;
``--resume`` on an empty folder starts a run; the update's threads follow the machine's load."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from lightning_lab.cli import main
from lightning_lab.train.checkpoint import CheckpointError
from lightning_lab.train.config import ConfigError, PPOConfig, RunConfig, SFTConfig, load_config
from lightning_lab.train.run import build, resume_config, run
from lightning_lab.train.threads import ENV_VAR, choose_threads, requested_threads

TINY = ["--model", "tiny", "--env", "wordplay", "--tasks-per-step", "2", "--group-size", "2",
        "--rollout-workers", "4", "--eval-limit", "1"]


# ---------------------------------------------------------------- 9: config values
@pytest.mark.parametrize("text, message", [
    ("lr: .nan\n", "ppo.lr must be a finite number, got nan"),
    ("ppo:\n  lr: -1\n", "ppo.lr must be >= 0, got -1"),
    ("temperature: -1\n", "ppo.temperature must be >= 0"),
    ("ppo:\n  clip_eps: .inf\n", "ppo.clip_eps must be a finite number, got inf"),
    ("keep_checkpoints: -2\n", "keep_checkpoints must be >= 0, got -2"),
    ("steps: -4\n", "steps must be >= 0, got -4"),
    ("seed: 100000000000000000000000\n", "seed must be <= 4294967295"),
    ("out: ''\n", "out must name a folder"),
    ("steps: 3\nlr: 0.1\nsteps: 4\n", "duplicate key 'steps'"),
    ("ppo:\n  lr: 0.1\n  lr: 0.2\n", "duplicate key 'lr'"),
    ("ppo: null\n", "ppo must be a mapping of fields"),
    ("ppo: 3\n", "ppo must be a mapping of fields"),
])
def test_a_bad_yaml_value_names_the_field_and_the_file(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("text, message", [
    ("lr: .nan\n", "sft.lr must be a finite number"),
    ("temperature: -1\n", "sft.temperature must be > 0"),
    ("keep_checkpoints: -2\n", "keep_checkpoints must be >= 0"),
    ("sft: null\n", "sft must be a mapping of fields"),
    ("out: ' '\n", "out must name a folder"),
    ("n: 2\nn: 3\n", "duplicate key 'n'"),
    ("n: '3'\n", "sft.n must be int, got '3'"),  # the old SFT loader let strings through
    ("wandb: 'yes'\n", "wandb must be true or false"),
    ("sft:\n  epochs: two\n", "sft.epochs must be float"),
    ("algorithm: sft\nresume: true\n", "resume continues ppo runs only"),
    ("algorithm: bogus\n", "algorithm must be one of ppo, sft, rejection"),
])
def test_a_bad_sft_yaml_value_names_the_field_and_the_file(tmp_path, text, message):
    """``lightning-lab sft --config``: a RunConfig over SFT defaults, checked as train's is."""
    path = tmp_path / "sft.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path, RunConfig(algorithm="sft"))
    assert str(path) in str(info.value)


def test_an_old_sft_yaml_loads_into_the_sft_section_with_a_deprecation(tmp_path):
    """What ``lightning-lab sft`` saved before ``algorithm``: ``mode`` and top-level sampling
    fields; ``mode`` is read as ``algorithm`` (with a warning naming the rewrite)."""
    path = tmp_path / "old.yaml"
    path.write_text("model: tiny\nmode: rejection\nn: 4\nthreshold: 0.25\nrounds: 3\n"
                    "temperature: 0.5\ntraces: null\ntraces_format: auto\n"
                    "sft: {lr: 0.001, epochs: 2.0, agents: [writer]}\nout: runs/old\n")
    with pytest.warns(FutureWarning, match="write 'algorithm: rejection' instead"), \
            pytest.warns(FutureWarning, match="'sft.agents' is deprecated; write 'sft.roles'"):
        config = load_config(path)
    assert config.algorithm == "rejection"
    assert (config.sft.n, config.sft.threshold, config.sft.rounds) == (4, 0.25, 3)
    assert (config.sft.temperature, config.sft.lr, config.sft.roles) == (0.5, 1e-3, ("writer",))
    assert config.ppo == PPOConfig()  # the bare names went to the algorithm's own section
    path.write_text("mode: sft\nalgorithm: sft\n")
    with pytest.raises(ConfigError, match="give only algorithm"):
        load_config(path)


@pytest.mark.parametrize("text, key", [("ppo: {trainable_agents: [writer, checker]}\n",
                                        "ppo.trainable_agents"),
                                       ("trainable_agents: writer,checker\n", "trainable_agents")])
def test_the_old_key_trainable_agents_loads_as_trainable_roles_with_a_warning(tmp_path, text, key):
    path = tmp_path / "old.yaml"
    path.write_text(text)
    with pytest.warns(FutureWarning, match=f"field '{key}' is deprecated; write "
                                                f"'{key.replace('agents', 'roles')}'"):
        config = load_config(path)
    assert config.ppo.trainable_roles == ("writer", "checker")
    path.write_text("ppo: {trainable_agents: [writer], trainable_roles: [checker]}\n")
    with pytest.raises(ConfigError, match="'ppo.trainable_agents' is the old name of "
                                          "'ppo.trainable_roles'; give only"):
        load_config(path)


def test_the_old_role_flags_still_work():
    from lightning_lab.cli import build_parser, train_config

    args = build_parser().parse_args(["train", "--trainable-agents", "writer,checker"])
    assert train_config(args).ppo.trainable_roles == ("writer", "checker")
    args = build_parser().parse_args(["sft", "--agents", "writer"])
    assert vars(args)["sft.roles"] == "writer"


@pytest.mark.parametrize("flags, message", [
    (["--lr", "nan"], "--lr: ppo.lr must be a finite number, got nan"),
    (["--lr", "-1"], "--lr: ppo.lr must be >= 0, got -1.0"),
    (["--temperature", "-1"], "--temperature: ppo.temperature must be >= 0"),
    (["--clip-eps", "inf"], "--clip-eps: ppo.clip_eps must be a finite number"),
    (["--keep-checkpoints", "-2"], "--keep-checkpoints: keep_checkpoints must be >= 0"),
    (["--steps", "-4"], "--steps: steps must be >= 0, got -4"),
    (["--seed", str(10**23)], "--seed: seed must be <= 4294967295"),
    (["--out", ""], "--out: out must name a folder"),
])
def test_a_bad_flag_is_a_usage_error_naming_the_flag(tmp_path, capsys, monkeypatch, flags, message):
    monkeypatch.chdir(tmp_path)  # had it run, `--out ''` would have written here
    assert main(["train", *TINY, "--out", str(tmp_path / "run"), *flags]) == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_sft_and_resume_flags_are_checked_too(tmp_path, capsys):
    assert main(["sft", "--model", "tiny", "--lr", "-1", "--out", str(tmp_path / "s")]) == 2
    assert "--lr: sft.lr must be >= 0" in capsys.readouterr().err
    path = tmp_path / "run" / "config.yaml"
    path.parent.mkdir()
    path.write_text("model: tiny\n")
    assert main(["train", "--resume", "--out", str(path.parent), "--max-grad-norm", "0"]) == 2
    assert "--max-grad-norm: ppo.max_grad_norm must be > 0" in capsys.readouterr().err
    path.write_text("model: tiny\nppo:\n  value_lr: -1\n")  # a hand-edited saved config
    assert main(["train", "--resume", "--out", str(path.parent)]) == 2
    assert f"{path}: ppo.value_lr must be >= 0" in capsys.readouterr().err
    assert main(["eval", "--model", "tiny", "--env", "calc", "--rollout-timeout-s", "0"]) == 2
    assert "--rollout-timeout-s: ppo.rollout_timeout_s must be > 0" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["sft", "--model", "tiny", "--traces", str(empty), "--out", str(tmp_path / "t")]) == 2
    assert f"{empty}" in capsys.readouterr().err


@pytest.mark.parametrize("cls", [RunConfig, PPOConfig, SFTConfig])
def test_every_numeric_field_declares_its_range(cls):
    numeric = [f for f in dataclasses.fields(cls) if {"int", "float"} & set(f.type.split())]
    assert numeric, cls
    undeclared = [f.name for f in numeric if "ge" not in f.metadata]
    assert undeclared == []


# ---------------------------------------------------------------- 10: resume
@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """A finished 2-step run on the tiny model, checkpointed at steps 1 and 2."""
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(["train", *TINY, "--steps", "2", "--save-every", "1", "--out", str(out)]) == 0
    return out


@pytest.fixture()
def run_copy(two_steps, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(two_steps, out)
    return out


def _resume(out):
    return build(resume_config(out, {"resume": True}, log=lambda _line: None))


def test_a_truncated_newest_state_resumes_from_the_previous_step(run_copy):
    state = run_copy / "checkpoints" / "step-000002" / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    with pytest.warns(UserWarning, match=f"skipping a broken checkpoint: {state}.*step-000001"):
        setup = _resume(run_copy)
    assert setup.resumed and setup.trainer.iteration == 1


def test_a_broken_newest_meta_resumes_from_the_previous_step(run_copy, capsys):
    meta = run_copy / "checkpoints" / "step-000002" / "meta.json"
    meta.write_text('{"format_version": 2, "step": ')
    with pytest.warns(UserWarning, match=f"skipping a broken checkpoint: {meta}"):
        summary = run(resume_config(run_copy, {"resume": True}, log=print), log=print)
    assert "resumed from" in capsys.readouterr().out and len(summary["history"]) == 2
    lines = (run_copy / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]  # step 2 rolled back, redone
    assert json.loads(meta.read_text())["step"] == 2  # and its checkpoint written whole


def test_an_edited_state_names_the_file(run_copy):
    for step in (1, 2):
        path = run_copy / "checkpoints" / f"step-{step:06d}" / "state.pt"
        state = torch.load(path, weights_only=True)
        state["rng"] = {"torch": 5}  # valid torch data, wrong structure
        torch.save(state, path)
    with pytest.raises(CheckpointError, match="state.pt: TypeError: expected a torch.ByteTensor"
                       ) as info:
        _resume(run_copy)
    assert str(run_copy / "checkpoints" / "step-000002" / "state.pt") in str(info.value)


def test_no_intact_checkpoint_names_every_file(run_copy):
    for step in (1, 2):
        (run_copy / "checkpoints" / f"step-{step:06d}" / "state.pt").write_bytes(b"PK\x03")
    with pytest.warns(UserWarning, match="step-000002"), \
            pytest.raises(CheckpointError, match="no intact checkpoint") as info:
        _resume(run_copy)
    for step in (1, 2):
        assert f"step-{step:06d}/state.pt" in str(info.value)


def test_resume_on_an_empty_folder_starts_a_run(tmp_path, capsys):
    out = tmp_path / "new"  # nonexistent; then, as a restart loop would, the same command again
    args = ["train", *TINY, "--steps", "1", "--resume", "--threads", "1", "--out", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "no run in" in text and "starting a new run" in text
    assert "threads: 1 for the update (requested 1)" in text
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1]
    assert main(args[:-4] + ["--steps", "2", "--out", str(out)]) == 0
    assert "resumed from" in capsys.readouterr().out


def test_resume_with_a_config_file_starts_then_applies_its_changes(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    out = tmp_path / "run"
    text = (f"model: tiny\nsteps: 1\neval_limit: 1\nout: {out}\n"
            "ppo: {tasks_per_step: 2, group_size: 2, rollout_workers: 4}\n")
    path.write_text(text)
    assert main(["train", "--config", str(path), "--resume"]) == 0
    assert "starting a new run" in capsys.readouterr().out
    path.write_text(text.replace("steps: 1", "steps: 2"))
    assert main(["train", "--config", str(path), "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "resume: steps changed 1 -> 2" in printed and "resumed from" in printed
    assert main(["train", "--resume", "--out", ""]) == 2
    assert "--out: out must name a folder" in capsys.readouterr().err


def test_resume_refuses_checkpoints_without_their_config(run_copy, capsys):
    (run_copy / "config.yaml").unlink()
    assert main(["train", "--resume", "--out", str(run_copy)]) == 2
    assert "holds checkpoints" in capsys.readouterr().err


# ---------------------------------------------------------------- 14: threads
@pytest.mark.parametrize("load, cpus, requested, own, threads", [
    (0.2, 2, None, 0.0, 2),     # quiet: every core
    (10.0, 2, None, 0.0, 1),    # the case: load ~10 on 2 cores -> one thread
    (2.1, 2, None, 2.0, 2),     # the load is our own update: stay on both cores
    (10.0, 2, None, 0.4, 1),    # ours is a small part of a busy machine
    (1.0, 2, None, 0.0, 1),     # one core taken by someone else
    (4.0, 16, None, 0.0, 12),   # a fair share of a big machine
    (40.0, 16, None, 0.0, 1),
    (10.0, 2, 2, 0.0, 2),       # a cap is the user's call, load or not
    (0.0, 2, 8, 0.0, 2),        # ... up to the cores there are
    (0.0, 8, 1, 0.0, 1),
])
def test_thread_choice(load, cpus, requested, own, threads):
    got, why = choose_threads(load, cpus, requested, own)
    assert got == threads
    assert ("busy" in why) == (requested is None and threads < cpus)


def test_thread_cap_from_flag_then_env(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert requested_threads(None) is None
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert requested_threads(None) == 2
    monkeypatch.setenv(ENV_VAR, "3")
    assert requested_threads(None) == 3 and requested_threads(1) == 1
    for bad in ("0", "two"):
        monkeypatch.setenv(ENV_VAR, bad)
        with pytest.raises(ConfigError, match=f"{ENV_VAR} must be a whole number >= 1"):
            requested_threads(None)
