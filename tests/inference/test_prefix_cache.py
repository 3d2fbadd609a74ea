"""Prefix caching in the engine: exact (same tokens and logprobs as without it), bounded, counted.

Every case submits requests one ``generate`` at a time, so each is its own batch and only the
cross-batch cache (not the in-batch prompt sharing) can reuse a prefix; the same requests go to
an engine with ``prefix_cache=False`` on the same model, which prefills everything.
"""

from __future__ import annotations

import random

import pytest
import torch

import lightning_lab as ll
from lightning_lab.inference.engine import Engine, EngineConfig, Request
from lightning_lab.inference.sampling import SamplingParams
from numerics import assert_rel_close

BLOCK = 8


@pytest.fixture(scope="module")
def tiny_policy():
    policy = ll.models.load("tiny")
    yield policy
    policy.close()


def engine(policy, **config) -> Engine:
    return Engine(policy.model, policy.tokenizer,
                  EngineConfig(**{"prefix_block_tokens": BLOCK, **config}))


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000, 40000) for _ in range(n)]


def request(prompt: list[int], n: int = 1, seed: int = 0) -> Request:
    return Request(prompt, SamplingParams(temperature=1.0, max_new_tokens=12, seed=seed), n=n)


def run_both(policy, prompts: list[tuple[list[int], int]], **config) -> Engine:
    """Each (prompt, n) as its own batch on a cached and an uncached engine; asserts parity and
    returns the cached engine."""
    cached, plain = engine(policy, **config), engine(policy, prefix_cache=False)
    try:
        for k, (prompt, n) in enumerate(prompts):
            check_same(cached.generate([request(prompt, n, seed=k)])[0],
                       plain.generate([request(prompt, n, seed=k)])[0], f"request {k}")
    finally:
        cached.close()
        plain.close()
    return cached


def check_same(with_cache, without, what: str) -> None:
    for a, b in zip(with_cache, without):
        assert a.response_ids == b.response_ids, what
        assert_rel_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), 1e-5, what)


def test_n_samples_of_one_prompt(tiny_policy):
    prompt = tokens(100, 0)
    e = run_both(tiny_policy, [(prompt, 1), (prompt, 4), (prompt, 1)])
    # 100 tokens, then twice only the 4 past the last full block below 100 (96)
    assert e.prefill_stats.computed_tokens == 100 + 4 + 4


def test_prompts_sharing_a_long_prefix(tiny_policy):
    schema = tokens(120, 1)
    questions = [tokens(5 + 3 * i, 10 + i) for i in range(3)]
    e = run_both(tiny_policy, [(schema + q, 2) for q in questions])
    assert e.prefill_stats.computed_tokens == 125 + (120 + 8 - 120) + (120 + 11 - 120)


def test_prompt_that_is_a_prefix_of_another(tiny_policy):
    long = tokens(90, 2)
    e = run_both(tiny_policy, [(long[:41], 1), (long, 2), (long[:41], 1), (long[:40], 1)])
    # 41; then 90 - 40; then 41 - 40; then 40 - 32 (one token must be computed for the logits)
    assert e.prefill_stats.computed_tokens == 41 + 50 + 1 + 8


def test_mixed_batch_of_hits_misses_and_a_shared_prefix(tiny_policy):
    """One batch holding a cached prompt, a new one sharing part of it, and unrelated ones."""
    base, other = tokens(70, 3), tokens(30, 4)
    cached, plain = engine(tiny_policy), engine(tiny_policy, prefix_cache=False)
    cached.generate([request(base)])
    batch = [base, base[:50] + tokens(20, 5), other + [7, 8, 9], other + [9]]
    a = cached.generate([request(p, 2, seed=k) for k, p in enumerate(batch)])
    b = plain.generate([request(p, 2, seed=k) for k, p in enumerate(batch)])
    for k, (x, y) in enumerate(zip(a, b)):
        check_same(x, y, f"prompt {k}")
    cached.close()
    plain.close()


def test_eviction_keeps_the_bound_and_stays_exact(tiny_policy):
    first, second = tokens(40, 6), tokens(40, 7)
    e = run_both(tiny_policy, [(first, 1), (second, 1), (first, 1), (first[:33], 1)],
                 prefix_cache_tokens=40)
    cache = e.prefix_cache
    assert cache.tokens <= 40 and cache.evicted > 0
    layers, kv_heads, head_dim = 2, 2, 16  # the tiny model
    assert cache.nbytes == cache.tokens * 2 * layers * kv_heads * head_dim * 4
    # first: 40 computed, 5 blocks; second evicts all of them; first again computes all 40,
    # evicting second; first[:33] then finds 4 of first's blocks
    assert e.prefill_stats.computed_tokens == 40 + 40 + 40 + 1


def test_hit_rate_hand_computed(tiny_policy):
    e = engine(tiny_policy, prefix_block_tokens=4)
    prompt = tokens(10, 8)
    e.generate([request(prompt, n=2)])
    assert e.take_prefix_hit_rate() == pytest.approx(10 / 20)  # 20 prompt tokens, 10 computed
    e.generate([request(prompt)])
    assert e.take_prefix_hit_rate() == pytest.approx(8 / 10)  # blocks [0:4], [0:8] reused
    assert e.prefill_stats.hit_rate() == pytest.approx(18 / 30)
    assert e.take_prefix_hit_rate() == 0.0  # nothing admitted since
    assert e.prefix_cache.tokens == 8
    e.close()


def test_changed_weights_empty_the_cache():
    """KV computed before an optimizer step is stale: the cache must not serve it after."""
    policy = ll.models.load("tiny")  # its own copy: the weights change below
    model = policy.model
    prompt = tokens(60, 9)
    cached, plain = engine(policy), engine(policy, prefix_cache=False)
    cached.generate([request(prompt)])
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(1.5)
    check_same(cached.generate([request(prompt, 2, seed=1)])[0],
               plain.generate([request(prompt, 2, seed=1)])[0], "after the weight change")
    assert cached.prefill_stats.computed_tokens == 60 + 60
    cached.close()
    plain.close()
    policy.close()


def test_off_shares_nothing_across_batches(tiny_policy):
    e = engine(tiny_policy, prefix_cache=False)
    prompt = tokens(50, 10)
    e.generate([request(prompt)])
    e.generate([request(prompt)])
    assert e.prefix_cache is None and e.prefill_stats.computed_tokens == 100
    e.close()
