"""Issue 11: each defect reproduced, then shown fixed. Proxy defects are in
``proxy/test_reliability_proxy.py``; this file covers checkpoints (2, 3, 4, 12), rewards (6),
agent faults (7), the SQL sandbox (10) and malformed files (11).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import lightning_lab as ll
from shared_agents import parity_agent
from lightning_lab.train import checkpoint as ckpt_mod
from lightning_lab.train.checkpoint import CheckpointError, latest_checkpoint

TASKS = [{"task_id": f"t{i}", "q": f"Question number {i} " + "word " * i} for i in range(8)]


def _config(**kw) -> ll.PPOConfig:
    return ll.PPOConfig(**{"tasks_per_step": 2, "group_size": 2, "minibatch_size": 8, **kw})


# ---------------------------------------------------------------- 2, 3, 4: crash windows
class _Killed(BaseException):
    """The process died here: after it, no code of the dying save runs (no cleanup either)."""


class _Killer:
    """Counts the durable steps of a save (writes, fsyncs, renames, deletions); dies at one."""

    STEPS = [(torch, "save"), (os, "rename"), (os, "replace"), (shutil, "rmtree"),
             (ckpt_mod, "_fsync_dir"), (ckpt_mod, "_fsync_file"), (ckpt_mod, "_write_text_durably")]

    def __init__(self, monkeypatch: pytest.MonkeyPatch, at: int | None):
        self.at, self.count, self.dead = at, 0, False
        for owner, name in self.STEPS:
            monkeypatch.setattr(owner, name, self._wrap(getattr(owner, name)))

    def _wrap(self, fn):
        def step(*args, **kwargs):
            if self.dead:
                raise _Killed()
            self.count += 1
            if self.count == self.at:
                self.dead = True
                raise _Killed()
            return fn(*args, **kwargs)
        return step


def _scenario(kind: str, trainer, directory: Path) -> tuple[int, int]:
    """Prepare ``directory``; return (step resumable before the save, step it saves)."""
    if kind == "first":  # defect 3: nothing complete exists yet
        trainer.iteration = 1
        return 0, 1
    trainer.iteration = 1
    trainer.save(directory)
    trainer.iteration = 2
    trainer.save(directory)
    if kind == "resave":  # defect 2: a finished run saved again at the same step
        return 2, 2
    trainer.iteration = 3  # "prune": a new step with keep_last=1 deletes two old ones
    return 2, 3


@pytest.mark.filterwarnings("ignore:.*which is not a complete checkpoint")  # the window
@pytest.mark.parametrize("kind", ["first", "resave", "prune"])
def test_a_kill_at_every_step_of_a_save_leaves_a_resumable_run(kind, tmp_path, monkeypatch,
                                                               tiny):
    trainer = ll.PPOTrainer(tiny, parity_agent(tiny), TASKS, config=_config())
    probe_dir = tmp_path / "probe"
    _scenario(kind, trainer, probe_dir)
    with monkeypatch.context() as m:  # how many durable steps does this save take?
        probe = _Killer(m, at=None)
        trainer.save(probe_dir, keep_last=1)
    assert probe.count >= 6
    for at in range(1, probe.count + 1):
        directory = tmp_path / f"kill{at}"
        before, saving = _scenario(kind, trainer, directory)
        with monkeypatch.context() as m:
            _Killer(m, at=at)
            with pytest.raises(_Killed):
                trainer.save(directory, keep_last=1)
        found = latest_checkpoint(directory)
        if found is None:  # only possible before the first checkpoint ever completed
            assert kind == "first" and before == 0
        else:
            loaded = ll.PPOTrainer.load(directory, tiny, parity_agent(tiny), TASKS)
            assert loaded.iteration in (before, saving), (kind, at)
        trainer.iteration = saving
        trainer.save(directory, keep_last=1)  # the next run saves again: everything heals
        leftovers = sorted(p.name for p in directory.iterdir())
        assert leftovers == ["LATEST", f"step-{saving:06d}"], (kind, at, leftovers)
        assert ll.PPOTrainer.load(directory, tiny, parity_agent(tiny), TASKS).iteration == saving


def test_orphans_are_cleaned_and_a_lost_latest_falls_back(tmp_path, tiny):
    trainer = ll.PPOTrainer(tiny, parity_agent(tiny), TASKS, config=_config())
    directory = tmp_path / "ckpt"
    for step in (1, 2):
        trainer.iteration = step
        trainer.save(directory)
    for i in range(10):  # defect 4: what 15 kills during saves left behind
        (directory / f".step-00000{i % 3}.tmp-{i}").mkdir()
    (directory / ".step-000001.stale-x").mkdir()
    (directory / "LATEST").unlink()  # the pointer is gone: the newest complete one is used
    assert latest_checkpoint(directory).name == "step-000002"
    (directory / "LATEST").write_text("step-000099")  # dangling
    with pytest.warns(UserWarning, match="not a complete checkpoint"):
        loaded = ll.PPOTrainer.load(directory, tiny, parity_agent(tiny), TASKS)
    assert loaded.iteration == 2
    assert len([p for p in directory.iterdir() if p.name.startswith(".step-")]) == 11  # a reader
    loaded.save(directory)  # the writer cleans up
    assert sorted(p.name for p in directory.iterdir()) == ["LATEST", "step-000001", "step-000002"]


def test_checkpoint_files_are_fsynced(tmp_path, monkeypatch, tiny):
    """Defect 12: nothing was fsynced. Now every file and each directory change is."""
    synced: list[str] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                 real(fd))[1])
    trainer = ll.PPOTrainer(tiny, parity_agent(tiny), TASKS, config=_config())
    final = trainer.save(tmp_path / "ckpt")
    names = [Path(p).name for p in synced]
    assert "state.pt" in names and "meta.json" in names and ".LATEST.tmp" in names
    assert str(final.parent) in synced  # the rename and the pointer swap are durable


def test_meta_json_and_config_errors_name_the_file(tmp_path, tiny):
    trainer = ll.PPOTrainer(tiny, parity_agent(tiny), TASKS, config=_config())
    path = trainer.save(tmp_path / "ckpt")
    meta = json.loads((path / "meta.json").read_text())
    for broken, message in ((dict(meta, config=None), "'config' missing"),
                            (dict(meta, format_version=1), "format 1")):
        (path / "meta.json").write_text(json.dumps(broken))
        with pytest.raises(CheckpointError, match=message) as info:
            ll.PPOTrainer.load(tmp_path / "ckpt", tiny, parity_agent(tiny), TASKS)
        assert str(path / "meta.json") in str(info.value)
    (path / "meta.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(CheckpointError, match="meta.json"):
        ll.PPOTrainer.load(tmp_path / "ckpt", tiny, parity_agent(tiny), TASKS)
    (path / "meta.json").write_text(json.dumps(meta))
    state = torch.load(path / "state.pt", weights_only=True)
    state["config"]["bogus"] = 1  # written by another version
    torch.save(state, path / "state.pt")
    with pytest.raises(CheckpointError, match="bogus") as info:
        ll.PPOTrainer.load(tmp_path / "ckpt", tiny, parity_agent(tiny), TASKS)
    assert str(path) in str(info.value)


def _samples(states) -> list[list[list[int]]]:
    return [[tr.response_ids for tr in traj.transitions] for s in states for traj in s.batch]


def _same(a: list, b: list) -> float:
    """Fraction of trajectories whose sampled tokens are identical."""
    assert len(a) == len(b)
    return sum(x == y for x, y in zip(a, b)) / len(a)


def _weights(policy) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in policy.model.parameters() if p.requires_grad])


def _one_row_per_batch(policy: ll.Policy) -> ll.Policy:
    """Make the engine decode one row at a time, so each row's logits come from the same matmul
    shapes whatever else is queued: float results no longer depend on how the 32 concurrent
    agents' calls happened to be batched (which thread scheduling, and so the load, decides).
    The prefix cache is off for the same reason: a cached prompt block holds the keys/values of
    whichever row computed it first, in that row's forward shapes (exact to ~1e-7, not bitwise)."""
    policy.engine.config.max_batch_rows = 1
    policy.engine.prefix_cache = None
    return policy


def test_same_seed_same_run_and_resume_with_the_default_rollout_workers(tmp_path):
    """Defect 12: with 32 concurrent agents two same-seed runs sampled differently from step 1
    (unseeded rows drew from one RNG in thread order: ~0% identical trajectories). Rollouts are
    now seeded per call.

    Batched decoding is not bit-reproducible: rows batched differently round logits differently
    (~1e-7), which now and then moves a sampling boundary past a uniform draw (measured: 8 of 256
    trajectories of two 6-token calls differ between a one-row and a batched engine). One flip
    changes the Adam update by ~20% of its size, and the next step's samples with it, so the
    old checks (weights within 1e-5, >= 90% identical over two steps) failed under load, where
    batches are composed differently. Exactness is therefore checked where it holds by
    construction, an engine that decodes one row per batch, still with the default 32 rollout
    workers: any dependence of seeds, task order or resume on thread timing fails it. The
    batched engine is checked against that run statistically on step 1 (same weights): at 3%
    flips, > 4 of 16 trajectories differ with probability ~1e-4, while seeds mixed up between
    rows or threads differ in nearly all."""
    config = _config(tasks_per_step=4, group_size=4, lr=3e-3, seed=5)
    assert config.rollout_workers == 32
    policy = _one_row_per_batch(ll.models.load("tiny", seed=0))
    first = ll.PPOTrainer(policy, parity_agent(policy), TASKS, config=config)
    first_states = first.fit(2, progress=False)
    first.save(tmp_path / "ckpt")
    saved = _weights(policy)
    first_next = first.step()  # the uninterrupted run's step 3
    first_weights = _weights(policy)
    assert not torch.equal(first_weights, saved)  # step 3 did update

    policy = ll.models.load("tiny", seed=0)  # batched as the load decides
    second = ll.PPOTrainer(policy, parity_agent(policy), TASKS, config=config)
    assert _same(_samples([second.step()]), _samples(first_states[:1])) >= 12 / 16

    policy = _one_row_per_batch(ll.models.load("tiny", seed=0))
    resumed = ll.PPOTrainer.load(tmp_path / "ckpt", policy, parity_agent(policy), TASKS)
    assert resumed.iteration == 2 and resumed.history == first.history[:2]
    assert torch.equal(_weights(policy), saved)  # the checkpoint itself is exact
    state = resumed.step()
    assert [t.task_id for t in state.batch] == [t.task_id for t in first_next.batch]
    assert _samples([state]) == _samples([first_next])
    assert torch.equal(_weights(policy), first_weights)  # same samples, same update: bit-exact


# ---------------------------------------------------------------- 3, 5: resume in a run folder
RUN = dict(model="tiny", env="wordplay", eval_limit=2, save_every=2,
           ppo={"tasks_per_step": 2, "group_size": 2, "rollout_workers": 4})


def _logged_steps(out: Path) -> tuple[list[int], list[str]]:
    metrics = [json.loads(line)["step"] for line in (out / "metrics.jsonl").open()]
    groups = [json.loads(line)["group_id"].split("/")[0]
              for line in (out / "trajectories.jsonl").open()]
    return metrics, groups


def test_resume_rolls_logs_back_and_survives_a_crashed_first_save(tmp_path):
    from lightning_lab.train.config import RunConfig, override
    from lightning_lab.train.run import run

    out = tmp_path / "run"
    config = override(RunConfig(), {**RUN, "steps": 3, "out": str(out)})
    run(config, log=lambda _: None)
    ckpts = out / "checkpoints"
    shutil.rmtree(ckpts / "step-000003")  # killed after step 3 was logged, before its save
    (ckpts / "LATEST").write_text("step-000002")
    lines: list[str] = []
    run(override(config, {"resume": True}), log=lines.append)
    assert any("dropped 1 line(s) of metrics.jsonl, 4 line(s) of trajectories.jsonl" in x
               for x in lines), lines
    metrics, groups = _logged_steps(out)
    assert metrics == [1, 2, 3]  # defect 5: step 3 was logged twice
    assert groups == ["s0"] * 4 + ["s1"] * 4 + ["s2"] * 4

    # defect 3: the first save crashed, only its temp dir exists; --resume used to exit 2 forever
    fresh = tmp_path / "fresh"
    (fresh / "checkpoints" / ".step-000002.tmp-abc").mkdir(parents=True)
    lines = []
    run(override(config, {"out": str(fresh), "resume": True, "steps": 2}), log=lines.append)
    assert any("starting at step 0" in x for x in lines)
    assert sorted(p.name for p in (fresh / "checkpoints").iterdir()) == ["LATEST", "step-000002"]


def test_ctrl_c_during_rollouts_saves_the_last_step_and_resumes(tmp_path, monkeypatch):
    from lightning_lab.train import collect
    from lightning_lab.train.config import RunConfig, override
    from lightning_lab.train.run import run

    real, calls = collect.run_rollouts, []

    def interrupted_in_step_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt()  # what Ctrl-C raises in the main thread
        return real(*args, **kwargs)

    monkeypatch.setattr(collect, "run_rollouts", interrupted_in_step_2)
    out = tmp_path / "run"
    config = override(RunConfig(), {**RUN, "steps": 3, "save_every": 0, "out": str(out)})
    lines: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        run(config, log=lines.append)
    assert any("interrupted: saved" in x for x in lines)
    assert (out / "checkpoints" / "LATEST").read_text() == "step-000001"
    state = torch.load(out / "checkpoints" / "step-000001" / "state.pt", weights_only=True)
    assert len(state["task_queue"]) == len(_wordplay_train_tasks()) - 2  # step 2 drew none
    monkeypatch.setattr(collect, "run_rollouts", real)
    run(override(config, {"resume": True}), log=lambda _: None)
    assert _logged_steps(out)[0] == [1, 2, 3]


def test_ctrl_c_leaves_the_trainer_at_its_last_step_until_the_weights_move(tiny, monkeypatch):
    """Interrupted in its rollouts, a step puts back the RNGs and task queue it advanced
    (``mid_update`` False: a checkpoint now resumes exactly); interrupted after an optimizer
    step, ``mid_update`` says the weights belong to no step."""
    from lightning_lab.train import collect

    tasks = [{"task_id": f"t{i}", "q": f"Question {i}"} for i in range(5)]
    config = ll.PPOConfig(tasks_per_step=2, group_size=2, minibatch_size=2, rollout_workers=1)
    trainer = ll.PPOTrainer(tiny, parity_agent(tiny), tasks, config=config)
    trainer.step()
    before = trainer.state_dict()

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt()

    with monkeypatch.context() as patch:
        patch.setattr(collect, "run_rollouts", ctrl_c)
        with pytest.raises(KeyboardInterrupt):
            trainer.step()
    after = trainer.state_dict()
    assert not trainer.mid_update and after["step"] == 1
    assert after["task_queue"] == before["task_queue"]
    assert torch.equal(after["rng"]["torch"], before["rng"]["torch"])
    assert after["rng"]["tasks"] == before["rng"]["tasks"]
    assert after["rng"]["minibatches"] == before["rng"]["minibatches"]

    trainer.optimizer.register_step_post_hook(ctrl_c)  # Ctrl-C right after the first step
    with pytest.raises(KeyboardInterrupt):
        trainer.step()
    assert trainer.mid_update and trainer.iteration == 1


def _wordplay_train_tasks() -> list:
    return ll.envs.get("wordplay").load_tasks("train")


# ---------------------------------------------------------------- 6: reward sums
def test_rewards_that_sum_out_of_range_fail_their_trajectory(tiny, tmp_path):
    with pytest.raises(ValueError, match="exceeds"):
        with ll.rollout("x"):
            ll.reward(1e308)  # finite, but two of them are inf
    with pytest.raises(ValueError, match="finite"):
        with ll.rollout("x"):
            ll.reward(10**400)

    def greedy_agent(task):
        tiny.chat("hi", max_new_tokens=2)
        if task["task_id"] == "t0":
            ll.reward(1e12)
            ll.reward(1e12)  # each in range, the sum is not
        else:
            ll.reward(1.0)

    trainer = ll.PPOTrainer(tiny, greedy_agent, TASKS[:2], config=_config(group_size=2))
    state = trainer.step()  # used to raise AttributeError in credit/baselines.py
    bad = [t for t in state.batch if t.task_id == "t0"]
    assert bad and all(t.status == "failed" and "out of range" in t.error for t in bad)
    assert state.metrics["n_failed"] == 2 and state.metrics["reward_mean"] == 1.0
    state.batch.save_jsonl(tmp_path / "t.jsonl")  # used to raise on inf
    assert len(ll.Batch.load_jsonl(tmp_path / "t.jsonl")) == 4


# ---------------------------------------------------------------- 7: BaseException in agents
@pytest.mark.parametrize("workers", [1, 4])
def test_sys_exit_and_other_base_exceptions_are_contained(workers):
    class Weird(BaseException):
        pass

    def agent(task):
        raise {"t0": SystemExit(3), "t1": Weird("odd"), "t2": ValueError("v")}.get(
            task["task_id"], KeyboardInterrupt() if workers > 1 else ValueError("w"))

    batch = ll.run_rollouts(agent, TASKS[:4], max_workers=workers)
    assert [t.status for t in batch] == ["failed"] * 4
    assert batch[0].error == "SystemExit: 3" and batch[1].error == "Weird: odd"
    if workers > 1:  # a KeyboardInterrupt raised in a worker thread is not the user's Ctrl-C
        assert batch[3].error.startswith("KeyboardInterrupt")


def _until_main_thread_runs_in(filename: str) -> None:
    """Poll until the main thread's innermost Python frame is in ``filename`` (blocked in a C
    call made there, such as a queue wait), so a signal lands there, not in ``Thread.start``.
    Gives up after 10,000 polls: a signal landing elsewhere must stop the rollouts too."""
    main = threading.main_thread().ident
    for _ in range(10_000):
        if sys._current_frames()[main].f_code.co_filename == filename:
            return
        time.sleep(0.001)


def test_ctrl_c_of_the_user_still_stops_the_rollouts():
    from lightning_lab.rollouts import threads as threads_mod

    def agent(task):
        raise KeyboardInterrupt()  # on the main thread: what Ctrl-C raises

    with pytest.raises(KeyboardInterrupt):
        ll.run_rollouts(agent, TASKS[:2], max_workers=1)

    # A real SIGINT at the main thread while it waits on 2 running rollouts (62 more queued).
    # It was _thread.interrupt_main(), which only sets a flag: a main thread blocked on the
    # runner's queue sees it when some rollout ends, so the test leaned on its agents' sleeps and
    # on thread timing. Here the agents hold until released: the signal must break the wait
    # itself, and no queued rollout may start, whatever the load.
    started, lock, release = [], threading.Lock(), threading.Event()

    def held(task):
        with lock:
            started.append(task["task_id"])
            both_running = len(started) == 2
        if both_running:
            _until_main_thread_runs_in(threads_mod.__file__)
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
        if not release.wait(60):  # the Ctrl-C was lost: let the rest end, so the test fails
            release.set()

    handler = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own Ctrl-C
    try:
        with pytest.raises(KeyboardInterrupt):
            ll.run_rollouts(held, TASKS * 8, max_workers=2)
        assert not release.is_set()  # it arrived while both rollouts were still held
    finally:
        release.set()
        signal.signal(signal.SIGINT, handler)
    assert sorted(started) == ["t0", "t1"], started  # the first two of 64 jobs, and no more


# ---------------------------------------------------------------- 10: SQL sandbox
@pytest.fixture
def db(tmp_path) -> str:
    path = tmp_path / "s.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE singer (id INTEGER, name TEXT)")
    conn.executemany("INSERT INTO singer VALUES (?, ?)", [(i, f"s{i}") for i in range(6)])
    conn.commit()
    conn.close()
    return str(path)


def test_single_function_queries_stop_at_the_deadline_and_512mb(db, monkeypatch):
    from environments.text_to_sql import sandbox
    from environments.text_to_sql.sql import run_sql

    killed: list[int] = []
    real_kill = sandbox._Worker.kill

    def counted_kill(worker) -> None:
        killed.append(worker.proc.pid)
        real_kill(worker)

    monkeypatch.setattr(sandbox._Worker, "kill", counted_kill)
    # Bounds, checked by what stopped each query rather than by a clock (a clock fails under
    # load): the length limit refuses the first at once; the printf, one VM step of ~14 s that
    # no progress handler interrupts, is stopped by killing its worker at the deadline; the
    # third, past the length limit, fails inside its worker at the 512 MB address-space cap.
    for sql, error, kills in (("SELECT zeroblob(900000000) FROM singer", "too big", 0),
                              ("SELECT printf('%.*c', 999999999, 'x')", "time limit", 1),
                              ("SELECT zeroblob(900000000)", "memory", 0)):
        kw = {"max_value_bytes": 2_000_000_000} if error == "memory" else {}
        killed.clear()
        result = run_sql(db, sql, **kw)
        assert error in result.error and len(killed) == kills, (sql, result.error, killed)
    assert run_sql(db, "SELECT name FROM singer WHERE id = 2").rows == [("s2",)]


def test_results_and_previews_are_capped_in_bytes(db):
    from environments.text_to_sql.prompts import result_preview
    from environments.text_to_sql.sql import run_sql

    wide = "SELECT printf('%.*c', 1000000, 'x'), zeroblob(1000000) FROM singer"
    result = run_sql(db, wide, max_bytes=3_000_000)
    assert result.ok and result.truncated and 1 <= len(result.rows) <= 2
    assert len(result_preview(result)) <= 300


# ---------------------------------------------------------------- 11: malformed files
def _line(task_id: str, **overrides) -> str:
    traj = ll.Trajectory(task_id=task_id, transitions=[ll.Transition(
        prompt_ids=[1], response_ids=[2], logprobs=[-0.5], reward=1.0)]).to_dict()
    traj.update(overrides)
    return json.dumps(traj)


def test_jsonl_keeps_valid_lines_around_undecodable_ones(tmp_path):
    path = tmp_path / "t.jsonl"
    lines = [_line("a").encode(), b'{"task_id": "\xff\xfe"}', b"[" * 100_000 + b"]" * 100_000,
             _line("b", meta=5).encode(), _line("c", transitions=[{"reward": float("nan")}])
             .encode(), _line("d").encode()]
    path.write_bytes(b"\n".join(lines))
    with pytest.warns(UserWarning, match="skipped 4"):
        batch = ll.Batch.load_jsonl(path)
    assert [t.task_id for t in batch] == ["a", "d"]
    assert [e.split(": ")[0] for e in batch.load_errors] == [f"{path}:{i}" for i in (2, 3, 4, 5)]
    assert "UnicodeDecodeError" in batch.load_errors[0]
    assert "nested too deeply" in batch.load_errors[1] and "meta" in batch.load_errors[2]
    with pytest.raises(ll.TraceFormatError, match=f"{path}:2"):
        ll.Batch.load_jsonl(path, strict=True)


def test_parquet_names_the_bad_row_and_keeps_the_rest(tmp_path):
    import pandas as pd

    path = tmp_path / "t.parquet"
    rows = [_line("a"), _line("b", transitions=[{"reward": float("inf")}]), "{oops", _line("c")]
    pd.DataFrame({"trajectory": rows}).to_parquet(path)
    with pytest.warns(UserWarning, match="skipped 2"):
        batch = ll.Batch.load_parquet(path)
    assert [t.task_id for t in batch] == ["a", "c"]
    assert [e.split(": ")[0] for e in batch.load_errors] == [f"{path}:row 1", f"{path}:row 2"]
    with pytest.raises(ll.TraceFormatError, match="row 1"):
        ll.Batch.load_parquet(path, strict=True)


def test_hotpotqa_and_spider_errors_name_the_file(tmp_path, capsys):
    from environments.rag.hotpotqa import HotpotQAFormatError, load_hotpotqa
    from lightning_lab.cli import main

    bad = tmp_path / "hotpot.json"
    bad.write_bytes(b'[{"question": "\xff"}]')
    with pytest.raises(HotpotQAFormatError, match=str(bad)):
        load_hotpotqa(bad)

    spider = tmp_path / "spider"
    (spider / "database" / "x").mkdir(parents=True)
    (spider / "database" / "x" / "x.sqlite").write_bytes(b"this is not a database" * 100)
    (spider / "dev.json").write_text(json.dumps([{"db_id": "x", "question": "q?",
                                                  "query": "SELECT 1"}]))
    code = main(["eval", "--model", "tiny", "--env", "text_to_sql", "--data", str(spider)])
    assert code == 2  # was a traceback and exit 1
    assert str(spider / "database" / "x" / "x.sqlite") in capsys.readouterr().err
