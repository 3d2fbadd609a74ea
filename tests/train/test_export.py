"""PEFT export: what leaves lightning-lab must load in peft/transformers with the same logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lightning_lab as ll
from lightning_lab.train.checkpoint import CheckpointError
from lightning_lab.train.export import (ExportError, export_checkpoint, load_adapter, save_adapter,
                                        save_merged)


def save_base(directory: Path, seed: int = 0) -> Path:
    """The tiny model as a plain HF directory (config + safetensors + tokenizer)."""
    base = ll.models.load("tiny", seed=seed)
    base.model.save_pretrained(directory, safe_serialization=True)
    base.tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return save_base(tmp_path_factory.mktemp("base"))


def trained_policy(base_dir: Path):
    """A LoRA policy whose adapter is far from its zero init (as after many PPO steps)."""
    policy = ll.models.load(str(base_dir), lora=True)
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(1)
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    return policy


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def ids_for(policy) -> torch.Tensor:
    text = policy.prompt_text([{"role": "user", "content": "Name a fruit."}])
    return torch.tensor([policy.tokenizer(text, add_special_tokens=False)["input_ids"]])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_adapter_loads_in_peft_with_identical_logits(base_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    policy = trained_policy(base_dir)
    out = save_adapter(policy, tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in out.iterdir()}
    ids = ids_for(policy)
    ours = logits_of(policy.model, ids)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out).eval()
    theirs = logits_of(loaded, ids)
    base_only = logits_of(AutoModelForCausalLM.from_pretrained(base_dir), ids)
    assert rel_err(base_only, ours) > 1e-2  # the adapter matters, so equality below means something
    assert torch.equal(theirs, ours)


def test_merged_model_loads_with_from_pretrained(base_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    policy = trained_policy(base_dir)
    ids = ids_for(policy)
    ours = logits_of(policy.model, ids)
    out = save_merged(policy, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert rel_err(logits_of(merged, ids), ours) < 1e-4  # merging reorders float sums only
    assert AutoTokenizer.from_pretrained(out).encode("hello") == policy.tokenizer.encode("hello")
    assert rel_err(logits_of(policy.model, ids), ours) == 0.0  # the copy was merged, not the policy


def test_checkpoint_export_cli_round_trip(base_dir, tmp_path):
    from lightning_lab.cli import main

    policy = trained_policy(base_dir)
    trainer = ll.PPOTrainer(policy, lambda task: None, [_Task("t")])
    trainer.save(tmp_path / "ckpt")
    assert main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "a")]) == 0
    fresh = ll.models.load(str(base_dir), lora=True)
    load_adapter(fresh, tmp_path / "a")
    ids = ids_for(policy)
    assert torch.equal(logits_of(fresh.model, ids), logits_of(policy.model, ids))
    assert main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "m"),
                 "--merge"]) == 0
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert rel_err(logits_of(merged, ids), logits_of(policy.model, ids)) < 1e-4


def test_adapter_from_another_base_is_refused(base_dir, tmp_path):
    out = save_adapter(trained_policy(base_dir), tmp_path / "adapter")
    other = ll.models.load(str(save_base(tmp_path / "other", seed=1)), lora=True)
    with pytest.raises(ExportError, match="trained on base model .* weights differ"):
        load_adapter(other, out)
    ckpt = tmp_path / "ckpt"
    ll.PPOTrainer(trained_policy(base_dir), lambda t: None, [_Task("t")]).save(ckpt)
    with pytest.raises(ExportError, match="weights differ"):
        export_checkpoint(ckpt, tmp_path / "x", model=str(tmp_path / "other"))


class _Payload:
    """Unpickling this runs ``open(marker, "w")``: the code execution a crafted file attempts."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_crafted_pickle_in_checkpoint_is_not_executed(tmp_path):
    from lightning_lab.train.checkpoint import load_policy_weights

    marker = tmp_path / "pwned"
    policy = ll.models.load("tiny")
    step = ll.PPOTrainer(policy, lambda task: None, [_Task("t")]).save(tmp_path / "ckpt")
    torch.save({"params": _Payload(marker)}, step / "state.pt")  # a real checkpoint, tampered
    with pytest.raises(CheckpointError, match="not a weights-only file .*nothing is unpickled"):
        load_policy_weights(policy, step)
    with pytest.raises(ExportError, match="no adapter/ folder"):
        export_checkpoint(step, tmp_path / "out")
    assert not marker.exists()


class _Task:
    def __init__(self, task_id: str):
        self.task_id = task_id
