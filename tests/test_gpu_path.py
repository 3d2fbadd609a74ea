"""The device path: what can be checked on a CPU runs in CI; the CUDA-only checks need --device cuda."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lightning_lab as ll

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def qwen_mini_dir(tmp_path: Path) -> Path:
    """A Qwen2-architecture model at test size, built by the GPU benchmark's own code."""
    sys.path.insert(0, str(BENCH))
    try:
        import gpu_step
    finally:
        sys.path.remove(str(BENCH))
    config = gpu_step.qwen_config("mini", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2)
    return gpu_step.build_model_dir(config, tmp_path / "qwen-mini", torch.float32, "cpu")


def test_qwen2_shaped_model_samples_and_scores_consistently(tmp_path, device):
    """The benchmark's architecture (biases on q/k/v, HF's forward: not the lean Llama path)
    records logprobs the trainer's forward reproduces, and a PPO step runs on it."""
    policy = ll.models.load(str(qwen_mini_dir(tmp_path)), lora=True, device=device)
    from lightning_lab.inference.fast_llama import supports

    assert type(policy.model.get_base_model()).__name__ == "Qwen2ForCausalLM"
    assert not supports(policy.model)  # decoded by HF's forward with our cache and sampler

    def agent(task):
        ll.reward(float(len(policy.chat(task["q"], max_new_tokens=8))))

    trainer = ll.PPOTrainer(policy, agent, [{"task_id": "a", "q": "Hi"}, {"task_id": "b", "q": "Yo"}],
                            config=ll.PPOConfig(tasks_per_step=2, group_size=2, rollout_workers=2))
    metrics = trainer.step().metrics
    tolerance = 1e-4 if device == "cpu" else 5e-2  # bf16 sampling vs bf16-autocast scoring
    assert metrics["behaviour_logprob_err"] < tolerance
    assert metrics["response_tokens"] > 0 and metrics["grad_norm"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_benchmark_refuses_clearly_without_cuda():
    out = subprocess.run([sys.executable, str(BENCH / "gpu_step.py"), "--steps", "1"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert "sees no CUDA device" in out.stderr


def test_cuda_sampling_stays_on_the_device(device):
    """On a GPU the decode loop's logits and sampling live on the device (CPU: skipped)."""
    if device != "cuda":
        pytest.skip("needs --device cuda")
    from lightning_lab.inference.sampling import choose_tokens

    logits = torch.randn(4, 100, device="cuda")
    tokens, logprobs = choose_tokens(logits, torch.tensor([0.0, 1.0, 0.7, 1.0]),
                                     torch.tensor([1.0, 0.9, 1.0, 1.0]),
                                     [None, torch.Generator().manual_seed(1), None, None])
    assert tokens.device.type == "cuda" and logprobs.device.type == "cuda"
    assert int(tokens[0]) == int(logits[0].argmax())
    policy = ll.models.load("tiny", device="cuda")
    gens = policy.generate(["Hello"], n=4, max_new_tokens=8, temperature=1.0)
    assert all(len(g.response_ids) == len(g.logprobs) > 0 for g in gens)
