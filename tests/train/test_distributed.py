"""Data parallel PPO on CPU: two gloo processes under torchrun vs one process on the same batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

WORKER = Path(__file__).resolve().parents[1] / "ddp_worker.py"


def run(cmd: list[str], out: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(WORKER.parents[1]), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(cmd + [str(WORKER), str(out)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]


def test_two_gloo_processes_match_one_process_on_the_same_batch(tmp_path):
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"],
        tmp_path)
    run([sys.executable], tmp_path)
    init = None
    ranks = [torch.load(tmp_path / f"weights-{r}-of-2.pt", weights_only=True) for r in range(2)]
    single = torch.load(tmp_path / "weights-0-of-1.pt", weights_only=True)
    # After the step the ranks hold bit-identical parameters (same summed gradient, same update).
    assert all(torch.equal(ranks[0][n], ranks[1][n]) for n in single)
    meta = {k: json.loads((tmp_path / f"metrics-{k}.json").read_text())
            for k in ("0-of-2", "1-of-2", "0-of-1")}
    assert meta["0-of-2"]["rows"] == meta["0-of-1"]["rows"]  # the same batch, in the same order
    assert meta["1-of-2"]["rows"] == meta["0-of-1"]["rows"]
    # ...and match the single process within float-summation noise, relative to the step's size.
    import lightning_lab as ll

    init = {n: p.detach() for n, p in ll.models.load("tiny", lora=True).model.named_parameters()
            if p.requires_grad}
    moved = torch.cat([(single[n] - init[n]).flatten() for n in single]).norm()
    diff = torch.cat([(ranks[0][n] - single[n]).flatten() for n in single]).norm()
    assert moved > 0
    assert diff <= 1e-3 * moved, (float(diff), float(moved))
    m2, m1 = meta["0-of-2"]["metrics"], meta["0-of-1"]["metrics"]
    assert m2["n_loss_transitions"] == m1["n_loss_transitions"] == 8
    assert m2["reward_mean"] == m1["reward_mean"]
    for key in ("loss", "policy_loss", "grad_norm", "kl"):
        assert abs(m2[key] - m1[key]) <= 1e-4 * max(abs(m1[key]), 1e-6), key


def test_torchrun_runs_lightning_lab_train_with_rank_0_writing(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(WORKER.parents[1]), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "lightning_lab.cli", "train", "--model", "tiny", "--env", "wordplay", "--steps", "2",
         "--eval-limit", "2", "--save-every", "1", "--tasks-per-step", "2", "--group-size", "2",
         "--rollout-workers", "2", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("step   1  reward") == 1  # only rank 0 logs
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["n_trajectories"] == 4 for r in rows)  # the whole step's batch, both ranks' halves
    assert (out / "checkpoints" / "LATEST").read_text().strip() == "step-000002"
    assert json.loads((out / "summary.json").read_text())["history"]
