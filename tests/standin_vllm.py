"""An independent stand-in for a vLLM OpenAI server with runtime LoRA, built on transformers + peft.

It shares no code with lightning-lab (no engine, no loader, no protocol module): adapters are
loaded with ``peft.PeftModel.from_pretrained`` / ``load_adapter`` exactly as a third party would,
so a test that passes against it shows our export format is what peft reads, and our client speaks
vLLM's endpoints: ``/v1/models``, ``/v1/chat/completions`` (with ``logprobs`` and vLLM's
``return_token_ids``: ``prompt_token_ids`` and per-choice ``token_ids``), ``/v1/completions`` with
a token-id prompt (``logprobs.token_logprobs``, ``prompt_logprobs``: what ``VLLMEngine`` sends),
``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` (400 for a name loaded twice or an
unknown name, as vLLM does).
Knobs make it misbehave on purpose: refuse loads (all, or some names), or stall them past a client's timeout.
"""


import contextlib
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class StandIn:
    base_dir: Path
    refuse_loads: bool = False
    """Answer every load with 500, as a server whose adapter directory is unreadable would."""
    refuse_load_of: str = ""
    """Answer 500 to loads of adapter names containing this (one module of several refused)."""
    load_delay_s: float = 0.0
    """Sleep this long before loading (a slow or hung server)."""
    loaded: list[str] = field(default_factory=list)
    """Adapter names currently loaded, oldest first."""
    served: list[str] = field(default_factory=list)
    """Model name of every chat completion served, in order."""

    def __post_init__(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.base_name = "base"
        self.tokenizer = AutoTokenizer.from_pretrained(self.base_dir)
        self.model: Any = AutoModelForCausalLM.from_pretrained(self.base_dir).eval()
        self.lock = threading.Lock()
        self.url = ""

    # ---- adapters, the way any peft user loads them -----------------------------------------
    def load(self, name: str, path: str) -> None:
        from peft import PeftModel

        if self.load_delay_s:
            time.sleep(self.load_delay_s)
        if self.refuse_loads or (self.refuse_load_of and self.refuse_load_of in name):
            raise RuntimeError("stand-in configured to refuse adapter loads")
        with self.lock:
            if name in self.loaded:
                raise ValueError(f"The lora adapter '{name}' has already been loaded.")
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(path, adapter_name=name)
            else:
                self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name).eval()
            self.loaded.append(name)

    def unload(self, name: str) -> None:
        with self.lock:
            if name not in self.loaded:
                raise ValueError(f"The lora adapter '{name}' cannot be found.")
            self.model.delete_adapter(name)
            self.loaded.remove(name)

    # ---- sampling -----------------------------------------------------------------------
    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        name = body.get("model") or self.base_name
        text = self.tokenizer.apply_chat_template(body["messages"], tokenize=False,
                                                  add_generation_prompt=True)
        prompt = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        temperature = float(body.get("temperature") if body.get("temperature") is not None else 1.0)
        eos = [self.tokenizer.convert_tokens_to_ids("<|im_end|>"), self.tokenizer.eos_token_id]
        choices = []
        with self.lock:
            if name != self.base_name and name not in self.loaded:
                raise KeyError(f"The model `{name}` does not exist.")
            self.served.append(name)
            for index in range(int(body.get("n") or 1)):
                ids, logprobs = self._sample(name, prompt, temperature,
                                             int(body.get("max_tokens") or 16), eos)
                stopped = bool(ids) and ids[-1] in eos
                choices.append({
                    "index": index, "finish_reason": "stop" if stopped else "length",
                    "message": {"role": "assistant", "content": self.tokenizer.decode(
                        ids[:-1] if stopped else ids)},
                    "token_ids": ids,
                    "logprobs": {"content": [{"token": self.tokenizer.decode([i]), "logprob": lp}
                                             for i, lp in zip(ids, logprobs)]},
                })
        return {"id": "cmpl-standin", "object": "chat.completion", "model": name,
                "prompt_token_ids": prompt, "choices": choices}

    def complete_ids(self, body: dict[str, Any]) -> dict[str, Any]:
        """``/v1/completions`` with a token-id prompt, as vLLM answers it with
        ``return_token_ids`` (and ``prompt_logprobs`` when asked)."""
        name = body.get("model") or self.base_name
        prompt = [int(t) for t in body["prompt"]]
        temperature = float(body.get("temperature") if body.get("temperature") is not None else 1.0)
        eos = list(body.get("stop_token_ids") or [self.tokenizer.eos_token_id])
        with self.lock:
            if name != self.base_name and name not in self.loaded:
                raise KeyError(f"The model `{name}` does not exist.")
            self.served.append(name)
            ids, logprobs = self._sample(name, prompt, temperature,
                                         int(body.get("max_tokens") or 16), eos)
            choice = {"index": 0, "text": self.tokenizer.decode(ids), "token_ids": ids,
                      "prompt_token_ids": prompt, "logprobs": {"token_logprobs": logprobs},
                      "finish_reason": "stop" if ids and ids[-1] in eos else "length"}
            if body.get("prompt_logprobs") is not None:
                scored = self._prompt_logprobs(name, prompt)
                choice["prompt_logprobs"] = [None] + [{str(t): {"logprob": lp}}
                                                      for t, lp in zip(prompt[1:], scored)]
        return {"id": "cmpl-standin", "object": "text_completion", "model": name,
                "choices": [choice]}

    def _prompt_logprobs(self, name: str, prompt: list[int]) -> list[float]:
        from peft import PeftModel

        peft = isinstance(self.model, PeftModel)
        if peft and name != self.base_name:
            self.model.set_adapter(name)
        with (self.model.disable_adapter() if peft and name == self.base_name
              else contextlib.nullcontext()), torch.no_grad():
            logits = self.model(torch.tensor([prompt])).logits[0, :-1].float()
        return torch.log_softmax(logits, -1).gather(-1, torch.tensor(prompt[1:])[:, None])[:, 0] \
            .tolist()

    def _sample(self, name: str, prompt: list[int], temperature: float, max_tokens: int,
                eos: list[int]) -> tuple[list[int], list[float]]:
        from peft import PeftModel

        if isinstance(self.model, PeftModel):
            if name == self.base_name:
                with self.model.disable_adapter():
                    return self._generate(prompt, temperature, max_tokens, eos)
            self.model.set_adapter(name)
        return self._generate(prompt, temperature, max_tokens, eos)

    def _generate(self, prompt: list[int], temperature: float, max_tokens: int,
                  eos: list[int]) -> tuple[list[int], list[float]]:
        ids = torch.tensor([prompt])
        sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) \
            if temperature > 0 else dict(do_sample=False)
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                      max_new_tokens=max_tokens, eos_token_id=eos,
                                      pad_token_id=eos[0], output_logits=True,
                                      return_dict_in_generate=True, **sampling)
        new = out.sequences[0, len(prompt):].tolist()
        scale = temperature if temperature > 0 else 1.0
        logprobs = [float(torch.log_softmax(logits[0].float() / scale, -1)[token])
                    for token, logits in zip(new, out.logits)]
        return new, logprobs

    # ---- HTTP -----------------------------------------------------------------------------
    def app(self) -> Any:
        from fastapi import FastAPI, Request
        from fastapi.responses import JSONResponse, PlainTextResponse

        app = FastAPI()

        def error(message: str, status: int) -> JSONResponse:
            return JSONResponse({"error": {"message": message, "type": "BadRequestError",
                                           "code": status}}, status)

        @app.get("/v1/models")
        def models() -> dict[str, Any]:
            return {"object": "list", "data": [{"id": n, "object": "model"}
                                               for n in [self.base_name, *self.loaded]]}

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            try:
                return self.complete(await request.json())
            except KeyError as exc:
                return error(str(exc.args[0]), 404)

        @app.post("/v1/completions")
        async def completions(request: Request):
            try:
                return self.complete_ids(await request.json())
            except KeyError as exc:
                return error(str(exc.args[0]), 404)

        @app.post("/v1/load_lora_adapter")
        async def load(request: Request):
            body = await request.json()
            try:
                self.load(body["lora_name"], body["lora_path"])
            except ValueError as exc:
                return error(str(exc), 400)
            except Exception as exc:  # noqa: BLE001 - report like a server that failed to load
                return error(f"{type(exc).__name__}: {exc}", 500)
            return PlainTextResponse(f"Success: LoRA adapter '{body['lora_name']}' added successfully.")

        @app.post("/v1/unload_lora_adapter")
        async def unload(request: Request):
            body = await request.json()
            try:
                self.unload(body["lora_name"])
            except ValueError as exc:
                return error(str(exc), 400)
            return PlainTextResponse(f"Success: LoRA adapter '{body['lora_name']}' removed successfully.")

        return app

    def start(self) -> "StandIn":
        import uvicorn

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self._server = uvicorn.Server(uvicorn.Config(self.app(), log_level="warning", lifespan="off"))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("stand-in server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)
