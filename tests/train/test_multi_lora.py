"""One LoRA adapter per role on a shared base: routing, mixed-batch parity, training, persistence.

The adapters are initialised with nonzero, different ``lora_B`` (peft starts B at zero, which
would make every adapter equal the base and every parity check vacuous); each parity test also
asserts that the adapters really disagree.
"""

from __future__ import annotations

import pytest
import torch

import lightning_lab as ll
from numerics import assert_rel_close
from shared_agents import parity_agent
from lightning_lab.inference.decoding import DecodeBatch, Row
from lightning_lab.inference.multi_lora import adapter_parameters, use_adapter
from lightning_lab.inference.sampling import SamplingParams
from lightning_lab.train.multi_adapter import score_by_adapter
from lightning_lab.train.scoring import score

ADAPTERS = ["default", "writer", "checker"]
PROMPTS = [[1, 15, 300, 42, 7], [1, 99, 4, 4000, 12, 13, 14], [1, 15, 300, 42, 8, 9]]


def _distinct(policy: ll.Policy, std: float = 0.1) -> ll.Policy:
    """Give every adapter its own nonzero B (seeded per adapter)."""
    with torch.no_grad():
        for k, name in enumerate(policy.adapters):
            gen = torch.Generator().manual_seed(100 + k)
            for pname, p in adapter_parameters(policy.model, name).items():
                if ".lora_B." in pname:
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
    return policy


@pytest.fixture
def multi(device):
    policy = _distinct(ll.models.load("tiny", adapters=["writer", "checker"], device=device))
    yield policy
    policy.close()


def _decode(policy, rows, fast=True):
    """Decode ``rows`` (greedy) to the end in one DecodeBatch; rows keep their results."""
    batch = DecodeBatch(policy.model, policy.engine._decode, policy.engine.stop_token_ids, fast=fast)
    batch.admit([[r] for r in rows])
    while len(batch):
        batch.step()
    return rows


def _rows(adapters, prompts, max_new_tokens=8):
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
    return [Row(prompt_ids=p, params=params, owner=None, index=0, adapter=a)
            for a, p in zip(adapters, prompts)]


# ---------------------------------------------------------------- 1. adapters by role

def test_roles_pick_adapters_and_transitions_record_them(multi):
    multi.map_roles({"rewriter": "writer"})
    with ll.rollout(task_id="t") as traj:
        for role in ("writer", "checker", "rewriter", "planner"):
            with ll.role(role):
                multi.chat("hello", max_new_tokens=3)
        multi.chat("hello", max_new_tokens=3)
    assert [tr.meta["adapter"] for tr in traj.transitions] == [
        "writer", "checker", "writer", "default", "default"]
    assert multi.adapters == ADAPTERS


def test_single_adapter_code_records_default(tiny_lora):
    with ll.rollout(task_id="t") as traj:
        with ll.role("writer"):  # no adapter of that name: the default one, as before
            tiny_lora.chat("hello", max_new_tokens=3)
    assert traj.transitions[0].meta["adapter"] == "default"


def test_unknown_adapter_names_are_refused_naming_it(multi):
    with pytest.raises(ValueError, match=r"'nope'.*default, writer, checker"):
        multi.generate(["x"], adapter="nope")
    with pytest.raises(ValueError, match=r"role_adapters\['rewriter'\].*'nope'"):
        multi.map_roles({"rewriter": "nope"})
    with pytest.raises(ValueError, match=r"'nope'"):
        ll.PPOTrainer(multi, parity_agent(multi), [{"task_id": "t", "q": "x"}],
                      config=ll.PPOConfig(trainable_adapters=("writer", "nope")))
    with pytest.raises(ValueError, match="already exists"):
        multi.add_adapter("writer")
    with pytest.raises(ValueError, match="adapters= needs LoRA"):
        ll.models.load("tiny", lora=False, adapters=["writer"])


def test_add_adapter_takes_per_adapter_overrides(tiny_lora):
    tiny_lora.add_adapter("checker", r=4)
    a = adapter_parameters(tiny_lora.model, "checker")
    assert a and all(p.requires_grad for p in a.values())
    assert all(p.shape[0] == 4 for n, p in a.items() if ".lora_A." in n)
    assert tiny_lora.model.peft_config["default"].r == 16


# ---------------------------------------------------------------- 2. one batch, many adapters

@pytest.mark.parametrize("fast", [True, False], ids=["fast_llama", "hf_forward"])
def test_mixed_decode_batch_equals_each_adapter_alone(multi, fast):
    adapters = ["writer", "checker", "default", "checker", "writer", "default"]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(adapters))]
    mixed = _decode(multi, _rows(adapters, prompts), fast)
    for name in ADAPTERS:
        together = [r for r in mixed if r.adapter == name]
        alone = _decode(multi, _rows([name] * len(together), [r.prompt_ids for r in together]),
                        fast)
        for a, b in zip(together, alone):
            assert a.response_ids == b.response_ids, name
            assert_rel_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), 1e-6, name)
    # the check can fail: one prompt, three adapters, three different first-token logprobs
    params = SamplingParams(temperature=0.0, max_new_tokens=1)
    same = _decode(multi, [Row(PROMPTS[0], params, None, 0, adapter=a) for a in ADAPTERS], fast)
    firsts = [r.logprobs[0] for r in same]
    assert min(abs(x - y) for i, x in enumerate(firsts) for y in firsts[i + 1:]) > 1e-3, firsts


def test_engine_batches_adapters_and_matches_trainer_forward(multi):
    """Requests of three adapters through the engine (prefix cache on): logprobs equal each
    adapter's HF forward, and the decode step saw rows of several adapters together."""
    batch = _through_engine(multi)
    rows = [tr for _, tr in batch.transitions()]
    assert {tr.meta["adapter"] for tr in rows} == set(ADAPTERS)
    fwd = score_by_adapter(multi.model, rows)
    recorded = torch.tensor([x for tr in rows for x in tr.logprobs])
    assert_rel_close(fwd.logprobs, recorded, 1e-5, "engine vs scorer")


def _through_engine(policy, group_size=2):
    def agent(task):
        for role in ("writer", "checker", "main"):
            with ll.role(role):
                policy.chat(task["q"], max_new_tokens=6)
    tasks = [{"task_id": f"t{i}", "q": f"Say {i} things " + "x " * i} for i in range(4)]
    return ll.run_rollouts(agent, tasks, group_size=group_size, temperature=1.0)


def test_scorer_mixed_rows_equal_each_adapter_alone_logprobs_and_grads(multi):
    batch = _through_engine(multi)
    rows = [tr for _, tr in batch.transitions()]
    mixed = score_by_adapter(multi.model, rows, grad=True, share_prefixes=True)
    mixed.logprobs.sum().backward()
    grads = {n: p.grad.clone() for n, p in multi.model.named_parameters() if p.grad is not None}
    multi.model.zero_grad(set_to_none=True)
    for name in ADAPTERS:
        idx = [i for i, tr in enumerate(rows) if tr.meta["adapter"] == name]
        with use_adapter(multi.model, name):
            alone = score(multi.model, [rows[i] for i in idx], grad=True, share_prefixes=True)
        alone.logprobs.sum().backward()
        expected = torch.cat([mixed.logprobs.split(mixed.lengths)[i] for i in idx])
        assert_rel_close(expected.detach(), alone.logprobs.detach(), 1e-6, name)
        params = adapter_parameters(multi.model, name)
        assert params
        for pname, p in params.items():
            assert_rel_close(grads[pname], p.grad, 1e-4, pname)
        multi.model.zero_grad(set_to_none=True)
    # the adapters disagree: scoring the writer's rows under the checker moves the logprobs
    idx = [i for i, tr in enumerate(rows) if tr.meta["adapter"] == "writer"]
    with torch.no_grad(), use_adapter(multi.model, "checker"):
        other = score(multi.model, [rows[i] for i in idx]).logprobs
    writer = torch.cat([mixed.logprobs.split(mixed.lengths)[i] for i in idx]).detach()
    assert (other - writer).abs().max() > 1e-2


# ---------------------------------------------------------------- 3. training

TASKS = [{"task_id": f"t{i}", "q": f"Question number {i} " + "word " * i} for i in range(4)]


def _config(**kw):
    base = dict(tasks_per_step=2, group_size=4, lr=3e-3, minibatch_size=8, kl_coef=0.02)
    return ll.PPOConfig(**{**base, **kw})


def test_each_adapter_trains_on_its_own_transitions_frozen_ones_stay_bit_identical(multi):
    agent = parity_agent(multi, roles=("writer", "checker", "rewriter"))
    config = _config(trainable_adapters=("writer", "default"), role_adapters={"rewriter": "writer"},
                     adapter_lr={"default": 0.0})
    trainer = ll.PPOTrainer(multi, agent, TASKS, credit="uniform", config=config)
    before = {n: {k: p.detach().clone() for k, p in adapter_parameters(multi.model, n).items()}
              for n in ADAPTERS}
    state = trainer.step()
    after = {n: adapter_parameters(multi.model, n) for n in ADAPTERS}
    assert all(torch.equal(before["checker"][k], p) for k, p in after["checker"].items())
    # default trained at lr 0: in the optimizer, but unmoved; the writer moved
    assert all(torch.equal(before["default"][k], p) for k, p in after["default"].items())
    assert any(not torch.equal(before["writer"][k], p) for k, p in after["writer"].items())
    adapters = {tr.meta["adapter"] for _, tr in state.batch.transitions()}
    assert adapters == {"writer", "checker"}  # rewriter -> writer
    m = state.metrics
    for key in ("reward/writer", "reward/checker", "kl/writer", "clip_frac/writer",
                "loss/writer", "grad_norm/writer"):
        assert key in m, key
    assert "kl/checker" not in m and m["grad_norm/writer"] > 0
    assert m["n_loss_transitions"] == sum(
        tr.meta["adapter"] == "writer" for _, tr in state.batch.transitions())


# ---------------------------------------------------------------- 4. persistence and export

def _multi(seed_shift: float = 0.0):
    policy = _distinct(ll.models.load("tiny", adapters=["writer", "checker"]))
    if seed_shift:
        with torch.no_grad():
            for p in adapter_parameters(policy.model, "checker").values():
                p.add_(seed_shift)
    return policy


def _weights(policy):
    return {n: p.detach().clone() for name in policy.adapters
            for n, p in adapter_parameters(policy.model, name).items()}


def test_checkpoint_holds_every_adapter_and_resumes_exactly(tmp_path):
    config = _config(rollout_workers=1, seed=3, trainable_adapters=("writer", "default"))
    agent_roles = ("writer", "checker")
    keys = ("reward_mean", "policy_loss", "kl", "grad_norm", "kl/writer", "grad_norm/writer")

    policy = _multi()
    straight = ll.PPOTrainer(policy, parity_agent(policy, agent_roles), TASKS, config=config)
    straight.step()
    expected = straight.step().metrics
    expected_weights = _weights(policy)

    policy = _multi()
    first = ll.PPOTrainer(policy, parity_agent(policy, agent_roles), TASKS, config=config)
    first.step()
    first.save(tmp_path / "ckpt")

    policy = _multi(seed_shift=0.5)  # a different frozen checker: the checkpoint's must win
    resumed = ll.PPOTrainer.load(tmp_path / "ckpt", policy, parity_agent(policy, agent_roles), TASKS)
    got = resumed.step().metrics
    assert {k: got[k] for k in keys} == {k: expected[k] for k in keys}
    assert all(torch.equal(p, expected_weights[n]) for n, p in _weights(policy).items())


def test_checkpoint_of_another_adapter_set_is_refused_naming_both(tmp_path):
    from lightning_lab.train.checkpoint import CheckpointError

    policy = _multi()
    ll.PPOTrainer(policy, parity_agent(policy), TASKS, config=_config()).save(tmp_path / "ckpt")
    other = ll.models.load("tiny", adapters=["writer"])
    with pytest.raises(CheckpointError, match=r"\['default', 'writer', 'checker'\].*"
                                              r"\['default', 'writer'\]"):
        ll.PPOTrainer.load(tmp_path / "ckpt", other, parity_agent(other), TASKS)


def test_export_writes_one_peft_folder_per_adapter_loading_with_identical_logits(tmp_path, capsys):
    from peft import PeftModel

    from lightning_lab.cli import main

    policy = _multi()
    ll.PPOTrainer(policy, parity_agent(policy), TASKS, config=_config()).save(tmp_path / "ckpt")
    assert main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--out",
                 str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(ADAPTERS)
    ids = torch.tensor([PROMPTS[1]])
    logits = {}
    for name in ADAPTERS:
        with torch.no_grad(), use_adapter(policy.model, name):
            ours = policy.model(input_ids=ids).logits
        base = ll.models.load("tiny").model  # the seeded base, plain transformers
        loaded = PeftModel.from_pretrained(base, tmp_path / "out" / name).eval()
        with torch.no_grad():
            theirs = loaded(input_ids=ids).logits
        assert torch.equal(theirs, ours), name
        logits[name] = ours
    assert (logits["writer"] - logits["checker"]).abs().max() > 1e-2  # the folders differ
    assert main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "m"),
                 "--merge"]) == 2
    assert "--merge folds one adapter" in capsys.readouterr().err


# ---------------------------------------------------------------- 5. over HTTP

def _two_client_agent(task, base_url):
    """An unchanged LangGraph graph, a writer node and a checker node, each with its own
    ``ChatOpenAI`` client naming its adapter (as with vLLM's multi-LoRA serving); rewarded over
    HTTP."""
    from typing import TypedDict

    import httpx
    from langchain_openai import ChatOpenAI
    from langgraph.graph import END, START, StateGraph

    import lightning_lab.proxy as proxy

    class State(TypedDict, total=False):
        q: str
        draft: str
        verdict: str

    def llm(model):
        return ChatOpenAI(model=model, base_url=base_url, api_key="unused", max_tokens=6,
                          max_retries=0)

    writer, checker = llm("writer"), llm("checker")
    graph = StateGraph(State)
    graph.add_node("write", lambda s: {"draft": writer.invoke(s["q"]).content})
    graph.add_node("check", lambda s: {"verdict": checker.invoke("Check: " + s["draft"]).content})
    graph.add_edge(START, "write")
    graph.add_edge("write", "check")
    graph.add_edge("check", END)
    out = graph.compile().invoke({"q": task["q"]})
    httpx.post(proxy.reward_url(base_url),
               json={"reward": (len(out["draft"]) + len(out["verdict"])) % 3 / 2, "final": True})


def test_proxy_model_names_the_adapter_and_a_ppo_step_trains_both(multi):
    import httpx

    import lightning_lab.proxy as proxy

    with ll.serve(multi, default_max_tokens=8) as server:
        models = httpx.get(f"{server.base_url}/models").json()["data"]
        assert {m["id"] for m in models} == {"tiny", *ADAPTERS}
        bad = httpx.post(f"{server.base_url}/chat/completions", json={
            "model": "nope", "messages": [{"role": "user", "content": "x"}]})
        assert bad.json()["error"]["code"] == "model_not_found" and "'nope'" in bad.text
        config = _config(tasks_per_step=2, group_size=2, minibatch_size=16, lr=1e-2)
        trainer = ll.PPOTrainer(multi, proxy.http_agent(server, _two_client_agent), TASKS,
                                config=config)
        before = _weights(multi)
        state = trainer.step()
    rows = [tr for _, tr in state.batch.transitions()]
    assert [tr.meta["adapter"] for tr in rows[:2]] == ["writer", "checker"]
    assert state.metrics["behaviour_logprob_err"] < 1e-4  # each row scored by its own adapter
    after = _weights(multi)
    for name in ("writer", "checker"):
        assert any(not torch.equal(before[n], p) for n, p in after.items() if f".{name}." in n), name
        assert f"kl/{name}" in state.metrics
    assert all(torch.equal(before[n], p) for n, p in after.items() if ".default." in n)


def test_adapter_fields_parse_from_flags_and_round_trip_through_yaml(tmp_path):
    from lightning_lab.errors import ConfigError
    from lightning_lab.train.config import RunConfig, load_config, save_config

    ppo = ll.PPOConfig(role_adapters="rewriter=writer", adapter_lr="checker=1e-4",
                       trainable_adapters="writer,checker")
    assert ppo.role_adapters == {"rewriter": "writer"} and ppo.adapter_lr == {"checker": 1e-4}
    assert ppo.trainable_adapters == ("writer", "checker")
    path = save_config(RunConfig(ppo=ppo, adapters="writer,checker"), tmp_path / "config.yaml")
    assert load_config(path).adapters == ("writer", "checker")
    loaded = load_config(path).ppo
    assert (loaded.role_adapters, loaded.adapter_lr, loaded.trainable_adapters) == (
        ppo.role_adapters, ppo.adapter_lr, ppo.trainable_adapters)
    with pytest.raises(ConfigError, match="adapter_lr must be NAME=VALUE"):
        ll.PPOConfig(adapter_lr="checker")


def test_sft_warm_start_targets_one_adapter(multi):
    from lightning_lab.train.sft import SFTTrainer

    batch = _through_engine(multi, group_size=1)
    before = _weights(multi)
    trainer = SFTTrainer(multi, batch, ll.SFTConfig(adapter="checker", batch_size=64, lr=1e-2))
    trainer.step()
    after = _weights(multi)
    moved = {n for n, p in after.items() if not torch.equal(before[n], p)}
    assert moved and all(".checker." in n for n in moved)
    with pytest.raises(ValueError, match="'nope'"):
        SFTTrainer(multi, batch, ll.SFTConfig(adapter="nope"))


def test_cli_trains_adapters_per_role_and_exports_each(tmp_path):
    import json

    from lightning_lab.cli import main
    from lightning_lab.train.config import load_config

    out = tmp_path / "run"
    assert main(["train", "--model", "tiny", "--env", "wordplay", "--adapters", "writer,checker",
                 "--role-adapters", "namer=writer,shouter=checker", "--trainable-adapters",
                 "writer", "--adapter-lr", "writer=1e-3", "--steps", "1", "--eval-limit", "2",
                 "--save-every", "1", "--tasks-per-step", "2", "--group-size", "2",
                 "--out", str(out)]) == 0
    config = load_config(out / "config.yaml")
    assert config.adapters == ("writer", "checker")
    assert config.ppo.role_adapters == {"namer": "writer", "shouter": "checker"}
    assert config.ppo.adapter_lr == {"writer": 1e-3}
    rows = [tr for line in (out / "trajectories.jsonl").read_text().splitlines()
            for tr in json.loads(line)["transitions"]]
    assert {(tr["role"], tr["meta"]["adapter"]) for tr in rows} == {
        ("namer", "writer"), ("shouter", "checker")}
    assert main(["export", "--checkpoint", str(out / "checkpoints"), "--out",
                 str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(ADAPTERS)
