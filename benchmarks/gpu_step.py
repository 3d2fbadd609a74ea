"""GPU rollout and train-step speed on Qwen2.5-0.5B / 1.5B-shaped models (random weights, no downloads).

The configs are Qwen2.5's shapes written out in code, initialised at random in bf16 on the GPU,
with the SmolLM2 tokenizer (its ids fit Qwen's 151,936-token vocabulary), so the benchmark needs no
model hub. Random weights rarely emit a stop token, so every row runs to ``--max-new-tokens``: the
comparison is throughput at equal work, not answer quality.

Measured in one run, on the same GPU:
  (a) rollouts: ``Policy.generate`` (continuous batching, sampling on the device) vs one batched HF
      ``generate`` call (``do_sample``, top_k=0), completion tokens per second;
  (b) a train step: ``PPOTrainer.step()`` (LoRA r=16, bf16 weights, fp32 adapters under autocast)
      vs TRL's ``GRPOTrainer`` (same LoRA, ``bf16=True``), seconds per step, if TRL is installed.

    python benchmarks/gpu_step.py [--size 0.5b|1.5b] [--prompts 64] [--max-new-tokens 128] [--steps 3]

Refuses to run without CUDA (the numbers would say nothing about a GPU).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

# Qwen2.5 shapes (config.json of Qwen/Qwen2.5-0.5B-Instruct and -1.5B-Instruct).
QWEN25 = {
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2),
}
QUESTIONS = ["What is the capital of France?", "Why is the sky blue?", "Explain gravity briefly.",
             "What does a CPU do?", "How do birds fly?", "What is photosynthesis?",
             "Name a famous painter.", "How does a rainbow form?"]


def qwen_config(size: str, **overrides):
    from transformers import Qwen2Config

    shape = dict(QWEN25[size]) if size in QWEN25 else {}
    shape.update(overrides)
    return Qwen2Config(vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
                       rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False,
                       bos_token_id=1, eos_token_id=2, pad_token_id=2,
                       attn_implementation="sdpa", **shape)


def build_model_dir(config, directory: Path, dtype: torch.dtype, device: str) -> Path:
    """Random-initialised Qwen2 weights + the SmolLM2 tokenizer saved as a local HF directory."""
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    from lightning_lab.inference.models import smollm2_tokenizer_dir

    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype)
    model.save_pretrained(directory, safe_serialization=True)
    AutoTokenizer.from_pretrained(smollm2_tokenizer_dir()).save_pretrained(directory)
    del model
    return directory


def prompts(n: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)] + f" ({i})"}] for i in range(n)]


def rollout_ours(policy, n: int, max_new: int) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    gens = policy.generate(prompts(n), temperature=1.0, max_new_tokens=max_new)
    torch.cuda.synchronize()
    return sum(len(g.response_ids) for g in gens) / (time.perf_counter() - t0)


def rollout_hf(policy, n: int, max_new: int) -> float:
    tok = policy.tokenizer
    tok.padding_side = "left"
    texts = [policy.prompt_text(p) for p in prompts(n)]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to("cuda")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = policy.model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                    max_new_tokens=max_new, min_new_tokens=max_new,
                                    pad_token_id=tok.pad_token_id)
    torch.cuda.synchronize()
    return (out.shape[1] - enc["input_ids"].shape[1]) * n / (time.perf_counter() - t0)


def step_ours(model_dir: Path, steps: int, group: int, max_new: int) -> float:
    import lightning_lab as ll

    policy = ll.models.load(str(model_dir), device="cuda", lora={"r": 16, "lora_alpha": 32})

    def agent(task):
        text = policy.chat(task["prompt"], max_new_tokens=max_new)
        ll.reward(1.0 / (1.0 + len(text.split())))

    tasks = [{"task_id": str(i), "prompt": p} for i, p in enumerate(prompts(8))]
    trainer = ll.PPOTrainer(policy, agent, tasks, config=ll.PPOConfig(
        tasks_per_step=len(tasks), group_size=group, kl_coef=0.0, minibatch_size=len(tasks) * group))
    trainer.step()  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def step_trl(model_dir: Path, steps: int, group: int, max_new: int) -> float | None:
    try:
        from trl import GRPOConfig, GRPOTrainer
    except ImportError:
        return None
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from lightning_lab.inference.models import LORA_TARGETS

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

    def reward(completions, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [1.0 / (1.0 + len(t.split())) for t in texts]

    n = 8 * group
    args = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=n,
                      num_generations=group, max_completion_length=max_new, temperature=1.0,
                      beta=0.0, bf16=True, report_to="none", save_strategy="no",
                      max_steps=steps + 1, logging_steps=1000, disable_tqdm=True)
    data = Dataset.from_list([{"prompt": p} for p in prompts(8)] * group * (steps + 2))
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS,
                      task_type="CAUSAL_LM")
    GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data,
                processing_class=tokenizer, peft_config=lora, callbacks=[Timer()]).train()
    return sum(times[1:]) / max(len(times) - 1, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(QWEN25), default="0.5b")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--group", type=int, default=8, help="samples per prompt in a train step")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/gpu_step.py measures a GPU, and torch sees no CUDA device here "
              f"(torch {torch.__version__}); run it on a machine with one.", file=sys.stderr)
        return 2
    import lightning_lab as ll

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model_dir(qwen_config(args.size), Path(tmp), torch.bfloat16, "cuda")
        policy = ll.models.load(str(model_dir), device="cuda", lora=False)
        rollout_ours(policy, 8, 8)  # warm-up: CUDA context, kernels, allocator
        rollout_hf(policy, 8, 8)
        ours = rollout_ours(policy, args.prompts, args.max_new_tokens)
        hf = rollout_hf(policy, args.prompts, args.max_new_tokens)
        print(f"{torch.cuda.get_device_name()}  Qwen2.5-{args.size}-shaped, bf16, "
              f"{args.prompts} prompts x {args.max_new_tokens} new tokens")
        print(f"rollout: Policy.generate {ours:8.0f} tok/s   HF generate {hf:8.0f} tok/s   "
              f"ratio {ours / hf:.2f}x")
        del policy
        torch.cuda.empty_cache()
        ours_step = step_ours(model_dir, args.steps, args.group, args.max_new_tokens)
        torch.cuda.empty_cache()
        trl_step = step_trl(model_dir, args.steps, args.group, args.max_new_tokens)
        line = f"train step (8 prompts x {args.group}): PPOTrainer.step {ours_step:.2f} s"
        if trl_step is None:
            line += "   TRL not installed (pip install -e '.[bench]')"
        else:
            line += f"   TRL GRPOTrainer {trl_step:.2f} s   ratio {trl_step / ours_step:.2f}x"
        print(line)
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
