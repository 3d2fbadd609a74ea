"""Live adapter sync into a vLLM-style server (an independent transformers + peft stand-in)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import openai
import pytest
import torch

import lightning_lab as ll
from lightning_lab import proxy
from lightning_lab.train import trainer as trainer_module
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
            good_url, backend.base_url = backend.base_url, "http://127.0.0.1:9/v1"
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
            backend.base_url = good_url
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
