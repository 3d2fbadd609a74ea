"""The ``lightning-lab`` console script, end to end on the tiny model."""

import json
import subprocess
import sys

from lightning_lab.cli import main


def test_train_resume_and_eval_with_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--model", "tiny", "--env", "wordplay", "--tasks-per-step", "2",
            "--group-size", "2", "--out", str(out), "--save-every", "1", "--eval-limit", "2"]
    assert main(args + ["--steps", "2", "--credit", "discounted", "--gamma", "0.5"]) == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines] == [1, 2]
    assert (out / "checkpoints" / "LATEST").read_text() == "step-000002"
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"before", "after", "history", "train_minutes", "checkpoint"} and len(summary["history"]) == 2

    assert main(args + ["--steps", "3", "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]

    results = tmp_path / "eval.jsonl"
    assert main(["eval", "--model", "tiny", "--env", "wordplay", "--limit", "3",
                 "--checkpoint", str(out / "checkpoints"), "--out", str(results)]) == 0
    assert len(results.read_text().splitlines()) == 3
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["n"] == 3 and "one_word" in metrics


def test_task_options_reach_the_loader(capsys):
    assert main(["eval", "--model", "tiny", "--env", "text_to_sql", "--limit", "2",
                 "--task-option", "levels=extra", "--agent-option", "max_turns=1",
                 "--agent-option", "max_new_tokens=4"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["n"] == 2 and "exec_acc_extra" in metrics and "exec_acc_easy" not in metrics
    assert main(["eval", "--model", "tiny", "--env", "text_to_sql", "--task-option", "levels=x"]) == 2
    assert "unknown levels ['x']" in capsys.readouterr().err
    assert main(["eval", "--model", "tiny", "--env", "text_to_sql", "--task-option", "levels"]) == 2
    assert "--task-option expects KEY=VALUE" in capsys.readouterr().err


def test_bad_names_give_clear_errors(capsys):
    assert main(["train", "--model", "tiny", "--env", "nope", "--steps", "1"]) == 2
    assert "unknown environment 'nope'" in capsys.readouterr().err
    assert main(["train", "--model", "tiny", "--env", "wordplay", "--credit", "nope"]) == 2
    assert "registered:" in capsys.readouterr().err
    assert main(["train", "--model", "tiny", "--env", "wordplay", "--credit", "uniform",
                 "--gamma", "0.9"]) == 2
    assert "no parameter" in capsys.readouterr().err


def test_console_script_lists_environments_and_strategies():
    envs = subprocess.run([sys.executable, "-m", "lightning_lab.cli", "envs"], capture_output=True,
                          text=True, check=True).stdout.split()
    assert {"wordplay", "text_to_sql", "rag"} <= set(envs)
    strategies = subprocess.run([sys.executable, "-m", "lightning_lab.cli", "credit"],
                                capture_output=True, text=True, check=True).stdout.split()
    assert {"uniform", "discounted", "value"} <= set(strategies)
