"""``lightning-lab sft`` end to end on the tiny model, then ``train --init-from`` its weights."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

import lightning_lab as ll
from lightning_lab.cli import main
from lightning_lab.train.checkpoint import load_checkpoint

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "agentlightning_spans.json"


def test_sft_from_demonstrations_then_train_from_its_weights(tmp_path, capsys):
    out = tmp_path / "sft"
    rc = main(["sft", "--model", "tiny", "--env", "text_to_sql", "--limit", "12",
               "--agent-option", "max_turns=1", "--batch-size", "4", "--epochs", "1",
               "--lr", "1e-3", "--eval-limit", "0", "--out", str(out)])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"] == 12 and len(summary["loss"]) == 3
    assert yaml.safe_load((out / "config.yaml").read_text())["sft"]["lr"] == 1e-3
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    _, state = load_checkpoint(out / "checkpoints", require=("params",))
    assert state["kind"] == "sft" and state["step"] == 3

    train_out = tmp_path / "rl"
    rc = main(["train", "--model", "tiny", "--env", "text_to_sql", "--limit", "4",
               "--agent-option", "max_turns=1", "--agent-option", "max_new_tokens=8",
               "--init-from", str(out / "checkpoints"), "--steps", "0", "--eval-limit", "2",
               "--out", str(train_out)])
    assert rc == 0
    _, trained = load_checkpoint(train_out / "checkpoints")
    for name, tensor in state["params"].items():  # zero RL steps: the weights are the SFT ones
        assert torch.equal(trained["params"][name], tensor), name
    fresh = ll.models.load("tiny")
    moved = [n for n, p in fresh.model.named_parameters() if not torch.equal(p, state["params"][n])]
    assert moved  # and they differ from an untrained model's


def test_sft_from_agentlightning_traces_reports_skipped_records(tmp_path, capsys):
    rc = main(["sft", "--model", "tiny", "--env", "wordplay", "--traces", str(FIXTURE),
               "--batch-size", "4", "--eval-limit", "0", "--out", str(tmp_path / "al")])
    assert rc == 0
    printed = capsys.readouterr().out
    assert printed.count("skipped: ") == 3 and "rollout 'ro-3'" in printed
    summary = json.loads((tmp_path / "al" / "summary.json").read_text())
    assert summary["rows"] == 4 and summary["skipped"]["load_errors"] == 3


def test_sft_usage_errors_exit_2(tmp_path, capsys):
    assert main(["sft", "--model", "tiny", "--traces", str(tmp_path / "missing.jsonl"),
                 "--out", str(tmp_path / "x")]) == 2
    assert "no trace file" in capsys.readouterr().err
    assert main(["sft", "--model", "tiny", "--env", "wordplay", "--eval-limit", "0",
                 "--out", str(tmp_path / "y")]) == 2
    assert "has no demonstrations" in capsys.readouterr().err


def test_sft_rejection_mode_runs_rounds(tmp_path):
    out = tmp_path / "rs"
    rc = main(["sft", "--model", "tiny", "--env", "wordplay", "--mode", "rejection", "--n", "2",
               "--rounds", "2", "--tasks-per-round", "2", "--threshold", "-1", "--batch-size", "8",
               "--eval-limit", "0", "--out", str(out)])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [r["sampled"] for r in summary["rounds"]] == [4.0, 4.0]
    assert all(r["kept"] == r["sampled"] for r in summary["rounds"])  # threshold -1 keeps all
    assert summary["rows"] == 16 and summary["loss"]  # 8 trajectories of 2 calls (namer, shouter)
    _, state = load_checkpoint(out / "checkpoints", require=("params",))
    assert state["step"] == 2  # a rejection run's step is a round
    assert len(state["history"]) == len(summary["loss"])  # every fine-tuning step of both
    sampled = (out / "trajectories.jsonl").read_text().splitlines()
    assert len(sampled) == 8  # each round's samples, as a PPO run's


def test_sft_is_a_run_with_the_same_callbacks_evaluations_and_checkpoints(tmp_path, monkeypatch):
    """``algorithm: sft`` goes through ``run(config)``: callbacks are attached to its trainer
    and see each evaluation at its step (the old SFT pipeline said step 0 after training too),
    the policy gets the run's decode options, checkpoints follow save_every/keep_checkpoints."""
    from lightning_lab.inference import models
    from lightning_lab.train.callbacks import CallbackBase
    from lightning_lab.train.config import RunConfig
    from lightning_lab.train.run import run

    loaded: dict = {}
    real_load = models.load
    monkeypatch.setattr(models, "load", lambda *a, **kw: loaded.update(kw) or real_load(*a, **kw))

    class Recorder(CallbackBase):
        def __init__(self):
            self.events: list = []

        def attach(self, trainer):
            self.events.append(("attach", trainer.iteration))

        def on_step(self, state):
            self.events.append(("step", state.iteration))

        def on_eval(self, metrics, step):
            self.events.append(("eval", step))

        def on_finish(self):
            self.events.append(("finish",))

    recorder, out = Recorder(), tmp_path / "sft"
    config = RunConfig(algorithm="sft", model="tiny", env="text_to_sql", limit=12, eval_limit=1,
                       agent_options={"max_turns": 1, "max_new_tokens": 4}, decode_dtype="auto",
                       save_every=2, keep_checkpoints=0, sft={"batch_size": 4, "lr": 1e-3},
                       out=str(out))
    summary = run(config, [recorder], log=lambda _line: None)
    assert recorder.events == [("attach", 0), ("eval", 0), ("step", 1), ("step", 2), ("step", 3),
                               ("eval", 3), ("finish",)]
    assert loaded["decode_dtype"] == "auto" and loaded["decode_threads"] == 1
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-000002", "step-000003"]
    assert sorted(p.name for p in out.glob("eval_*.jsonl")) == ["eval_step0000.jsonl",
                                                                "eval_step0003.jsonl"]
    assert summary["rows"] == 12 and len(summary["history"]) == 3
    assert summary["checkpoint"].endswith("step-000003")
    assert yaml.safe_load((out / "config.yaml").read_text())["algorithm"] == "sft"


def test_warm_started_run_takes_its_warm_start_as_kl_reference(tmp_path):
    """``train --init-from`` (LoRA): the KL reference is the fine-tuned adapter, not the
    adapter-off base, so the first update's KL is 0 (one minibatch, nothing stepped yet) although
    the warm start moved far from the base; a resumed run keeps that reference."""
    from lightning_lab.train.config import RunConfig
    from lightning_lab.train.run import build

    sft_out = tmp_path / "sft"
    assert main(["sft", "--model", "tiny", "--lora", "on", "--env", "wordplay", "--mode",
                 "rejection", "--n", "2", "--rounds", "1", "--tasks-per-round", "4", "--threshold",
                 "-1", "--batch-size", "8", "--lr", "5e-2", "--eval-limit", "0",
                 "--out", str(sft_out)]) == 0
    _, sft_state = load_checkpoint(sft_out / "checkpoints", require=("params",))
    rl_out = tmp_path / "rl"
    args = ["train", "--model", "tiny", "--lora", "on", "--env", "wordplay", "--steps", "1",
            "--init-from", str(sft_out / "checkpoints"), "--tasks-per-step", "2",
            "--group-size", "2", "--minibatch-size", "64", "--kl-coef", "0.1", "--eval-limit", "0",
            "--out", str(rl_out)]
    assert main(args) == 0
    kl = json.loads((rl_out / "metrics.jsonl").read_text().splitlines()[0])["kl"]
    assert abs(kl) < 1e-5, kl

    setup = build(RunConfig(model="tiny", lora="on", env="wordplay", init_from=str(sft_out / "checkpoints"),
                            out=str(rl_out), resume=True))
    assert setup.resumed and setup.trainer.iteration == 1
    ref = setup.trainer.reference_weights
    assert set(ref) == set(sft_state["params"])
    assert all(torch.equal(ref[n], t) for n, t in sft_state["params"].items())
    params = dict(setup.policy.model.named_parameters())
    with torch.no_grad():
        params[next(iter(ref))].add_(1.0)  # stands in for an RL update away from the warm start
    before = {n: params[n].detach().clone() for n in ref}
    with setup.policy.reference(ref) as model:
        swapped = {n: p.detach().clone() for n, p in model.named_parameters() if n in ref}
    assert all(torch.equal(swapped[n], ref[n]) for n in ref)
    assert all(torch.equal(params[n], before[n]) for n in ref)  # and the policy's are put back
