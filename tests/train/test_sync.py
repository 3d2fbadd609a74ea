"""Live adapter sync into a vLLM-style server (an independent transformers + peft stand-in)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import openai
import pytest
import torch

import lightning_lab as ll
from lightning_lab import proxy
from lightning_lab.inference.servers import RolloutServerError, ServerPool
from lightning_lab.train import trainer as trainer_module
from lightning_lab.train.callbacks import CallbackBase
from lightning_lab.train.config import RunConfig
from lightning_lab.train.run import build, resume_config, run
from lightning_lab.train.export import load_adapter
from lightning_lab.train.sync import AdapterSync, AdapterSyncError, SyncConfig

from standin_vllm import StandIn
from test_export import save_base


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_base(tmp_path_factory.mktemp("base"))


@pytest.fixture
def standin(base_dir):
    server = StandIn(base_dir).start()
    yield server
    server.stop()


def writer_agent(task, base_url):
    """An unchanged OpenAI-SDK agent: one call, rewarded 1 for whatever it says."""
    client = openai.OpenAI(base_url=base_url, api_key="-", max_retries=0)
    served = client.models.list().data[0].id  # the proxy names the newest adapter version
    client.chat.completions.create(model=served, messages=[{"role": "user", "content": task["q"]}],
                                   max_tokens=6)
    ll.reward(1.0)


def make_trainer(base_dir, standin, tmp_path, **config):
    policy = ll.models.load(str(base_dir), lora=True)
    backend = proxy.RemoteBackend(standin.url + "/v1", model=standin.base_name)
    front = ll.serve(backend=backend)
    tasks = [{"task_id": f"t{i}", "q": f"Say something about {i}."} for i in range(4)]
    sync = AdapterSync(backend, SyncConfig(export_dir=str(tmp_path / "adapters")))
    # baseline=None: every sampled token is reinforced, so one step moves the weights visibly.
    trainer = ll.PPOTrainer(policy, proxy.http_agent(front, writer_agent), tasks,
                            credit=ll.credit.get("uniform", baseline=None), sync=sync,
                            config=ll.PPOConfig(tasks_per_step=2, group_size=2, lr=0.05,
                                                kl_coef=0.0, rollout_workers=4, **config))
    return trainer, backend, front


def rows_of(state):
    return [tr for _, tr in state.batch.transitions()]


def test_rollouts_after_a_sync_come_from_the_new_weights(base_dir, standin, tmp_path):
    trainer, backend, front = make_trainer(base_dir, standin, tmp_path)
    try:
        first = trainer.step()
        assert {tr.meta["adapter_version"] for tr in rows_of(first)} == {"ll-policy-v0"}
        second = trainer.step()
    finally:
        front.stop()
    rows = rows_of(second)
    assert {tr.meta["adapter_version"] for tr in rows} == {"ll-policy-v1"}
    assert second.metrics["stale_transitions"] == 0
    assert standin.loaded == ["ll-policy-v1"]  # v0 was unloaded once v1 was live
    assert set(standin.served) == {"ll-policy-v0", "ll-policy-v1"}
    sampled = torch.tensor([x for tr in rows for x in tr.logprobs])
    # The server's logprobs of step 2's tokens are those of the weights after step 1's update...
    after_update = ll.models.load(str(base_dir), lora=True)
    load_adapter(after_update, tmp_path / "adapters" / "ll-policy-v1")
    new = trainer.scorer.forward(rows, grad=False, model=after_update.model).logprobs
    # ...and not those of the weights the first step sampled with.
    before_update = ll.models.load(str(base_dir), lora=True)
    old = trainer.scorer.forward(rows, grad=False, model=before_update.model).logprobs
    scale = sampled.abs().max()
    assert (new - sampled).abs().max() < 1e-4 * scale
    assert (old - sampled).abs().max() > 1e-2 * scale
    assert second.metrics["behaviour_logprob_err"] < 1e-4 * scale


def test_prefetched_rollouts_sample_the_adapter_synced_before_the_update(base_dir, standin,
                                                                         tmp_path):
    """max_staleness=1: step k+1's rollouts sample during step k's update, from the version
    synced right before it; they record its name and a lag of 1."""
    trainer, backend, front = make_trainer(base_dir, standin, tmp_path, max_staleness=1)
    try:
        states = [trainer.step() for _ in range(3)]
        trainer.settle()  # an evaluation now would sample the current weights
    finally:
        front.stop()
    assert [{tr.meta["adapter_version"] for tr in rows_of(s)} for s in states] == [
        {"ll-policy-v0"}, {"ll-policy-v0"}, {"ll-policy-v1"}]
    assert [{tr.meta["lag"] for tr in rows_of(s)} for s in states] == [{0}, {1}, {1}]
    assert [s.metrics["staleness_max"] for s in states] == [0.0, 1.0, 1.0]
    assert states[1].metrics["stale_transitions"] == len(rows_of(states[1]))
    assert "is_weight_mean" in states[-1].metrics  # truncated IS is on
    assert backend.name == "ll-policy-v3" and trainer._prefetch is None


def test_rollout_time_and_tokens_per_s_leave_the_sync_out(base_dir, standin, tmp_path,
                                                          monkeypatch):
    """A slow adapter load once made a vLLM run's rollout tok/s look like the sampler's fault."""
    trainer, _, front = make_trainer(base_dir, standin, tmp_path)
    skipped = 0.0  # seconds the trainer's clock jumps during the sync

    def clock() -> float:
        return time.perf_counter() + skipped

    real_sync = trainer.sync.sync

    def slow_sync(policy, step):
        nonlocal skipped
        skipped += 1000.0
        return real_sync(policy, step)

    monkeypatch.setattr(trainer_module, "time", SimpleNamespace(perf_counter=clock))
    monkeypatch.setattr(trainer.sync, "sync", slow_sync)
    try:
        metrics = trainer.step().metrics
    finally:
        front.stop()
    assert metrics["sync_s"] >= 1000.0
    assert 0 < metrics["rollout_s"] < 1000.0
    assert metrics["tokens_per_s"] == metrics["response_tokens"] / metrics["rollout_s"]


@pytest.mark.parametrize("failure", ["refused", "timeout", "unreachable"])
def test_failed_sync_fails_the_step_cleanly_and_the_next_step_retries(base_dir, standin, tmp_path,
                                                                       failure):
    trainer, backend, front = make_trainer(base_dir, standin, tmp_path)
    try:
        trainer.step()
        if failure == "refused":
            standin.refuse_loads = True
        elif failure == "timeout":
            standin.load_delay_s, trainer.sync.config.timeout_s = 1.5, 0.3
        else:
            good_urls, backend.pool.urls = backend.pool.urls, ["http://127.0.0.1:9/v1"]
        before = {n: p.detach().clone() for n, p in trainer.policy.model.named_parameters()
                  if p.requires_grad}
        expected = {"refused": "refused with HTTP 500.*refuse adapter loads",
                    "timeout": "timed out after 0.3 s", "unreachable": "server unreachable"}[failure]
        with pytest.raises(AdapterSyncError, match=f"load_lora_adapter of adapter version "
                                                   f"ll-policy-v1 at .*{expected}.*stay on ll-policy-v0"):
            trainer.step()
        assert trainer.iteration == 1 and len(trainer.history) == 1
        assert trainer.sync.version == "ll-policy-v0" and backend.name == "ll-policy-v0"
        assert all(torch.equal(p, before[n]) for n, p in trainer.policy.model.named_parameters()
                   if p.requires_grad)
        standin.refuse_loads, standin.load_delay_s = False, 0.0
        if failure == "unreachable":
            backend.pool.urls = good_urls
        if failure == "timeout":
            import time

            deadline = time.monotonic() + 60  # a safety limit: the stalled load takes 1.5 s
            while "ll-policy-v1" not in standin.loaded and time.monotonic() < deadline:
                time.sleep(0.02)
            assert "ll-policy-v1" in standin.loaded  # the stalled load finished server-side
            trainer.sync.config.timeout_s = 60
        state = trainer.step()  # retries v1 (unloading a half-finished earlier attempt first)
    finally:
        front.stop()
    assert trainer.iteration == 2
    assert {tr.meta["adapter_version"] for tr in rows_of(state)} == {"ll-policy-v1"}
    assert standin.loaded == ["ll-policy-v1"]


def test_sync_config_is_checked():
    with pytest.raises(ValueError, match="every must be >= 1"):
        SyncConfig(export_dir="x", every=0)


# ---- several rollout servers (issue 25, item 5) and a server dying mid-run (item 6) ----------

def test_each_request_goes_to_the_server_with_fewest_outstanding():
    pool = ServerPool(["http://a", "http://b", "http://c"])
    with pool.lease() as first, pool.lease() as second:
        with pool.lease() as third:
            assert {first, second, third} == {"http://a", "http://b", "http://c"}
        with pool.lease() as fourth:  # the only idle one
            assert fourth == third
    one_at_a_time = []
    for _ in range(6):  # all idle: taken in turn
        with pool.lease() as url:
            one_at_a_time.append(url)
    assert sorted(one_at_a_time) == sorted(pool.urls * 2)


@pytest.fixture
def standins(base_dir):
    servers = [StandIn(base_dir).start() for _ in range(2)]
    yield servers
    for server in servers:
        server.stop()


def vllm_config(base_dir, urls, out, **fields) -> RunConfig:
    """A run sampling through ``urls`` (stand-ins speaking vLLM's /v1/completions)."""
    config = RunConfig(model=str(base_dir), lora="on", env="wordplay", rollout_engine="vllm",
                       vllm_url=urls, out=str(out), eval_limit=0, **{"steps": 2, **fields})
    config.ppo = dataclasses.replace(config.ppo, tasks_per_step=2, group_size=2, minibatch_size=4)
    return config


def stop_after_next_sync(trainer, server):
    """``server`` dies right after the next adapter sync: during that step's rollouts."""
    real_sync = trainer.sync.sync

    def sync_then_die(policy, step):
        name = real_sync(policy, step)
        server.stop()
        return name

    trainer.sync.sync = sync_then_die


def test_two_servers_share_the_rollouts_and_every_sync_reaches_both(base_dir, standins,
                                                                    tmp_path):
    config = vllm_config(base_dir, [s.url for s in standins], tmp_path / "run")
    setup = build(config)
    try:
        states = [setup.trainer.step(), setup.trainer.step()]
    finally:
        setup.close()
    version = setup.rollouts.sync.version_name
    for server in standins:  # the base model was fingerprinted on both, then v0 and v1 loaded
        assert server.loaded == [version(1)]
        assert set(server.served) == {"base", version(0), version(1)}
    rows = [[tr for _, tr in s.batch.transitions()] for s in states]
    assert [{tr.meta["adapter_version"] for tr in r} for r in rows] == [{version(0)}, {version(1)}]
    served = [sum(n != "base" for n in server.served) for server in standins]
    assert sum(served) == sum(map(len, rows)) and min(served) > 0  # every call, spread over both
    assert all(s.metrics["n_failed"] == 0 for s in states)


def test_a_load_one_server_refuses_is_undone_on_the_others(base_dir, standins, tmp_path):
    config = vllm_config(base_dir, [s.url for s in standins], tmp_path / "run")
    setup = build(config)
    sync = setup.rollouts.sync
    try:
        setup.trainer.step()
        standins[1].refuse_loads = True
        with pytest.raises(AdapterSyncError, match=f"{sync.version_name(1)} at "
                                                   f"{standins[1].url}/v1 refused with HTTP 500"):
            setup.trainer.step()
    finally:
        setup.close()
    assert [s.loaded for s in standins] == [[sync.version_name(0)]] * 2  # v1 unloaded from [0]
    assert sync.version == sync.version_name(0) == setup.policy.engine.name
    assert setup.trainer.iteration == 1


def test_a_server_dying_mid_step_fails_it_naming_the_server(base_dir, standins, tmp_path):
    config = vllm_config(base_dir, [s.url for s in standins], tmp_path / "run")
    setup = build(config)
    try:
        setup.trainer.step()
        stop_after_next_sync(setup.trainer, standins[1])
        with pytest.raises(RolloutServerError, match=f"{standins[1].url}/v1: .*Error") as caught:
            setup.trainer.step()
    finally:
        setup.close()
    assert setup.trainer.iteration == 1  # no update on what the other server sampled
    assert len(caught.value.batch) == 4 and caught.value.batch.n_failed > 0
    assert "--vllm-allow-degraded" in str(caught.value)


def test_with_allow_degraded_the_run_goes_on_with_the_other_server(base_dir, standins, tmp_path):
    config = vllm_config(base_dir, [s.url for s in standins], tmp_path / "run", steps=3,
                         vllm_allow_degraded=True)
    setup = build(config)
    try:
        setup.trainer.step()
        stop_after_next_sync(setup.trainer, standins[1])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            second = setup.trainer.step()  # its requests to the dead server went to the other
        third = setup.trainer.step()
    finally:
        setup.close()
    assert any(f"rollout server {standins[1].url}/v1 failed" in str(w.message) for w in caught)
    assert second.metrics["n_failed"] == 0 == third.metrics["n_failed"]
    assert setup.policy.engine.pool.live == [standins[0].url + "/v1"]
    assert standins[0].loaded == [setup.rollouts.sync.version_name(2)]


class KillAfterStep(CallbackBase):
    """Kills ``server`` during the rollouts of the step after ``step``."""

    def __init__(self, server, step: int):
        self.server, self.step, self.trainer = server, step, None

    def attach(self, trainer):
        self.trainer = trainer

    def on_step(self, state):
        if self.trainer.iteration == self.step:
            stop_after_next_sync(self.trainer, self.server)


def test_a_run_whose_server_dies_stops_after_a_checkpoint_and_resumes(base_dir, standins,
                                                                      tmp_path):
    out = tmp_path / "run"
    config = vllm_config(base_dir, [s.url for s in standins], out, steps=3)
    with pytest.raises(RolloutServerError, match=standins[1].url):
        run(config, callbacks=[KillAfterStep(standins[1], step=1)], log=lambda line: None)
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-000001"]
    failed = [json.loads(line) for line in (out / "failed_rollouts.jsonl").read_text().splitlines()]
    assert len(failed) == 4 and all(standins[1].url in t["meta"]["not_trained"] for t in failed)
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text()
            .splitlines()] == [1]
    replacement = StandIn(base_dir).start()  # the user restarts the server (new port)
    try:
        resumed = resume_config(out, {"vllm_url": [standins[0].url, replacement.url]},
                                log=lambda line: None)
        summary = run(resumed, log=lambda line: None)
    finally:
        replacement.stop()
    assert len(summary["history"]) == 3
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text()
            .splitlines()] == [1, 2, 3]
    assert replacement.loaded  # the new server took the resumed run's adapter versions


def test_torchrun_processes_share_the_servers_and_process_0_loads_each_version(
        base_dir, standins, tmp_path):
    out, urls = tmp_path / "run", [s.url for s in standins]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "lightning_lab.cli", "train", "--model", str(base_dir), "--lora", "on",
         "--env", "wordplay", "--steps", "2", "--eval-limit", "0", "--tasks-per-step", "2",
         "--group-size", "2", "--rollout-workers", "2", "--rollout-engine", "vllm",
         "--vllm-url", urls[0], "--vllm-url", urls[1], "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all(m["n_failed"] == 0 for m in metrics)
    trajectories = [json.loads(line)
                    for line in (out / "trajectories.jsonl").read_text().splitlines()]
    metas = [(t["group_id"], tr["meta"]) for t in trajectories for tr in t["transitions"]]
    assert {meta["server"] for _, meta in metas} == {url + "/v1" for url in urls}
    assert {(g[:3], m["adapter_version"][-3:]) for g, m in metas} == {("s0/", "-v0"),
                                                                      ("s1/", "-v1")}
    for server in standins:  # each version loaded once (a second load of a name is refused)
        assert len(server.loaded) == 1 and server.loaded[0].endswith("-v1")


# ---------------------------------------------------------------- one LoRA module per adapter

def test_each_adapter_syncs_as_its_own_module_and_each_role_samples_from_its_own(
        base_dir, standin, tmp_path):
    """A policy with adapters writer + checker (+ default) on the vLLM engine: every adapter is
    loaded as ``<prefix>-<adapter>-v<step>``; a call inside ``ll.role`` samples from its role's
    module, records it, and the server's logprobs are that adapter's, not another's."""
    from shared_agents import parity_agent
    from test_multi_lora import _distinct
    from lightning_lab.train.multi_adapter import score_by_adapter
    from lightning_lab.train.run import start_rollout_engine

    policy = _distinct(ll.models.load(str(base_dir), lora=True, adapters=["writer", "checker"]))
    config = vllm_config(base_dir, [standin.url], tmp_path / "run", adapters="writer,checker")
    rollouts = start_rollout_engine(config, policy, tmp_path / "run", step=0, log=lambda _: None)
    sync = rollouts.sync
    modules = {a: f"{sync.config.prefix}-{a}-v0" for a in ("default", "writer", "checker")}
    try:
        assert standin.loaded == list(modules.values())
        assert sync.versions == modules and sync.version == modules["default"]
        with ll.rollout(task_id="t", seed=1) as traj:
            for role in ("writer", "checker", "planner"):  # planner: no adapter, the default
                with ll.role(role):
                    policy.chat("Say something.", max_new_tokens=6, temperature=1.0)
        rows = traj.transitions
        assert [tr.meta["adapter"] for tr in rows] == ["writer", "checker", "default"]
        assert [tr.meta["adapter_version"] for tr in rows] == [
            modules["writer"], modules["checker"], modules["default"]]
        sampled = torch.tensor([x for tr in rows for x in tr.logprobs])
        own = score_by_adapter(policy.model, rows).logprobs
        swapped = [dataclasses.replace(tr, meta={**tr.meta, "adapter": other})
                   for tr, other in zip(rows, ("checker", "writer", "writer"))]
        other = score_by_adapter(policy.model, swapped).logprobs
        scale = sampled.abs().max()
        assert (own - sampled).abs().max() < 1e-4 * scale  # each row: its adapter's weights
        assert (other - sampled).abs().max() > 1e-2 * scale  # ...and not another adapter's

        trainer = ll.PPOTrainer(policy, parity_agent(policy, ("writer", "checker", "rewriter")),
                                TASKS, credit="uniform", sync=sync,
                                config=ll.PPOConfig(tasks_per_step=2, group_size=2,
                                                    minibatch_size=4, lr=0.05,
                                                    role_adapters={"rewriter": "writer"}))
        first, second = trainer.step(), trainer.step()
    finally:
        rollouts.close()
    by_step = [{(tr.meta["adapter"], tr.meta["adapter_version"]) for tr in rows_of(s)}
               for s in (first, second)]
    assert by_step == [{(a, f"{sync.config.prefix}-{a}-v{k}") for a in ("writer", "checker")}
                       for k in (0, 1)]  # rewriter -> writer
    assert first.metrics["stale_transitions"] == 0 == second.metrics["stale_transitions"]
    assert standin.loaded == [f"{sync.config.prefix}-{a}-v1" for a in ("default", "writer",
                                                                       "checker")]
    version_dirs = sorted(p.name for p in (tmp_path / "run" / "adapters").iterdir())
    assert version_dirs == [sync.version_name(0), sync.version_name(1)]  # a folder per version
    assert sorted(p.name for p in (tmp_path / "run" / "adapters" / sync.version_name(1))
                  .iterdir()) == ["checker", "default", "writer"]


TASKS = [{"task_id": f"t{i}", "q": f"Question number {i}."} for i in range(4)]


def test_a_refused_module_unloads_the_versions_other_modules_everywhere(base_dir, standins,
                                                                       tmp_path):
    """All or nothing over adapters and servers: the checker module refused by the second
    server leaves no module of that version anywhere and the previous version live."""
    config = vllm_config(base_dir, [s.url for s in standins], tmp_path / "run",
                         adapters="writer,checker")
    setup = build(config)
    sync = setup.rollouts.sync
    try:
        setup.trainer.step()
        standins[1].refuse_load_of = "-checker-"
        with pytest.raises(AdapterSyncError, match=f"{sync.config.prefix}-checker-v1 at "
                                                   f"{standins[1].url}/v1 refused with HTTP 500"):
            setup.trainer.step()
    finally:
        setup.close()
    v0 = [f"{sync.config.prefix}-{a}-v0" for a in ("default", "writer", "checker")]
    assert [s.loaded for s in standins] == [v0, v0]
    assert list(sync.versions.values()) == v0 and setup.policy.engine.adapter_models == \
        dict(zip(("default", "writer", "checker"), v0))
    assert setup.trainer.iteration == 1


def test_several_adapters_behind_a_backend_that_cannot_route_them_are_refused(base_dir, standin,
                                                                            tmp_path):
    """The proxy's RemoteBackend names one model for every request: every role would sample
    from (and train) the default adapter."""
    policy = ll.models.load(str(base_dir), lora=True, adapters=["writer", "checker"])
    backend = proxy.RemoteBackend(standin.url + "/v1", model=standin.base_name)
    sync = AdapterSync(backend, SyncConfig(export_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="adapters default, writer, checker need requests routed "
                                         "by role, which RemoteBackend does not do"):
        sync.sync(policy, 0)
    assert standin.loaded == [] and sync.version is None
