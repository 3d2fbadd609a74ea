"""bf16 decoding: the dtype choice, and that the bf16 path computes the fp32 model's function
(adapter included, refreshed after in-place weight updates) up to bf16 rounding."""

from __future__ import annotations

import pytest
import torch

import lightning_lab as ll
from lightning_lab.inference import precision
from lightning_lab.inference.fast_llama import FastLlama
from lightning_lab.inference.kvcache import growing_cache

IDS = torch.tensor([[5, 17, 42, 8, 99, 3, 60, 7], [11, 12, 13, 14, 15, 16, 17, 18]])


def test_auto_follows_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(precision, "cpu_info", lambda: ("x", frozenset({"avx2", "avx512_bf16"})))
    assert precision.resolve_dtype("auto") == torch.bfloat16
    assert precision.resolve_dtype("auto", device="cuda") == torch.float32
    monkeypatch.setattr(precision, "cpu_info", lambda: ("x", frozenset({"avx2", "avx512f"})))
    assert precision.resolve_dtype("auto") == torch.float32
    assert precision.resolve_dtype("bfloat16") == torch.bfloat16
    with pytest.raises(ValueError, match="auto, float32, bfloat16"):
        precision.resolve_dtype("fp8")


def test_cpu_info_names_this_cpu():
    name, flags = precision.cpu_info()
    assert isinstance(name, str) and name
    assert isinstance(flags, frozenset)


def last_logits(model, dtype):
    fast = FastLlama(model, dtype)
    positions = torch.arange(IDS.shape[1])[None].expand(len(IDS), -1)
    with torch.no_grad():
        return fast.forward(IDS, positions, torch.ones_like(IDS), growing_cache())  # (B, V)


def gap(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_bf16_forward_is_the_fp32_function_with_the_adapter():
    policy = ll.models.load("tiny", lora={"r": 4, "init_lora_weights": False})
    model = policy.model
    fp32, bf16 = last_logits(model, torch.float32), last_logits(model, torch.bfloat16)
    with model.disable_adapter():
        no_adapter = last_logits(model, torch.float32)
    assert 0 < gap(bf16, fp32) < 2e-2  # one bf16 rounding per matmul input, nothing more
    assert gap(no_adapter, fp32) > 10 * gap(bf16, fp32)  # so the adapter is really applied


def test_bf16_copies_follow_in_place_updates():
    """A full fine-tune changes the weights in place between rollouts: the decode path must not
    keep sampling from stale bf16 copies."""
    model = ll.models.load("tiny").model
    fast = FastLlama(model, torch.bfloat16)
    positions = torch.arange(IDS.shape[1])[None].expand(len(IDS), -1)

    def logits():
        with torch.no_grad():
            return fast.forward(IDS, positions, torch.ones_like(IDS), growing_cache())

    before = logits()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.mul_(-3.0)  # what optimizer.step does: in place
    after = logits()
    expected = last_logits(model, torch.float32)
    assert gap(after, expected) < 2e-2 < gap(before, expected)


def test_bf16_sampling_records_its_own_logprobs():
    """Recorded logprobs are those of the bf16 forward that sampled; they sit close to the fp32
    trainer's (the gap is what ``behaviour_logprob_err`` reports)."""
    from lightning_lab.records import Transition
    from lightning_lab.train.scoring import score

    policy = ll.models.load("tiny", lora={"r": 4, "init_lora_weights": False}, decode_dtype="bfloat16")
    assert policy.engine.decode_dtype == torch.bfloat16
    gens = policy.generate(["hello there", "a longer prompt about dragons"], n=3,
                           max_new_tokens=12, seed=0)
    policy.close()
    rows = [Transition(prompt_ids=g.prompt_ids, response_ids=g.response_ids, logprobs=g.logprobs)
            for g in gens]
    with torch.no_grad():
        trainer_lp = score(policy.model, rows).logprobs
    recorded = torch.tensor([x for g in gens for x in g.logprobs])
    err = (trainer_lp - recorded).abs()
    assert 0 < err.mean().item() < 0.05 * recorded.abs().mean().item()


def test_decode_threads_apply_to_the_sampling_worker_only():
    """``decode_threads`` sets torch's intra-op threads on the engine's worker thread (seen from
    the token listener, which runs there); the caller's thread keeps its own count."""
    from lightning_lab.inference.engine import Request
    from lightning_lab.inference.sampling import SamplingParams

    before = torch.get_num_threads()
    policy = ll.models.load("tiny", decode_threads=1)
    seen = []
    request = Request(prompt_ids=[5, 17, 42], params=SamplingParams(max_new_tokens=3),
                      on_token=lambda row: seen.append(torch.get_num_threads()))
    policy.engine.submit(request).result(timeout=60)
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == before


def test_decode_threads_follow_the_batch_size_when_asked():
    """``decode_rows_per_thread`` gives the worker one thread per that many rows, between
    ``decode_threads`` and the building thread's count; off by default."""
    from lightning_lab.inference.engine import Request
    from lightning_lab.inference.sampling import SamplingParams

    assert ll.models.load("tiny").engine.threads_for(64) == 1  # default: fixed
    policy = ll.models.load("tiny", decode_threads=1, decode_rows_per_thread=2)
    engine = policy.engine
    engine.max_threads = 2  # the same ceiling on any CPU
    assert [engine.threads_for(rows) for rows in (1, 2, 3, 4, 64)] == [1, 1, 1, 2, 2]
    seen = []
    request = Request(prompt_ids=[5, 17, 42], params=SamplingParams(max_new_tokens=2), n=8,
                      on_token=lambda row: seen.append(torch.get_num_threads()))
    engine.submit(request).result(timeout=60)
    assert seen[-1] == 2  # the 8-row step ran on two threads (>= 4 rows even if some stopped)
    small = Request(prompt_ids=[5, 17], params=SamplingParams(max_new_tokens=2),
                    on_token=lambda row: seen.append(torch.get_num_threads()))
    engine.submit(small).result(timeout=60)
    assert seen[-1] == 1  # back to one for a single row
    policy.close()
