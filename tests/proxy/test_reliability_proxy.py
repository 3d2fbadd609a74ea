"""Issue 11, proxy defects: the pickle RCE (1), client errors answered 5xx (8), unbounded and
on-loop request handling (9). Each test reproduces the attack that worked before the fix.

A real uvicorn server on a loopback port, raw httpx requests (an attacker does not use the SDK).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import httpx
import openai
import pytest

import lightning_lab as ll
from lightning_lab.proxy.limits import Limits
from lightning_lab.train.checkpoint import CheckpointError, FORMAT_VERSION, load_policy_weights

USER = [{"role": "user", "content": "Say something."}]
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def server(policy):
    limits = Limits(max_body_bytes=1 << 20, max_tokens=4096, max_request_tokens=20000,
                    max_queued_tokens=40000)
    with ll.serve(policy, default_max_tokens=4, limits=limits) as s:
        yield s


class _Payload:
    """Unpickling this runs a shell command: the exploit that used to work."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _malicious_checkpoint(directory: Path, marker: Path) -> Path:
    import torch

    directory.mkdir(parents=True)
    torch.save({"params": {}, "boom": _Payload(marker)}, directory / "state.pt")
    meta = {"format_version": FORMAT_VERSION, "step": 1, "model": "tiny", "config": {},
            "credit": {"name": "uniform", "params": {}}, "params": {}}
    (directory / "meta.json").write_text(json.dumps(meta))
    return directory


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


# ---------------------------------------------------------------- 1: remote code execution
def test_pickle_payload_is_never_unpickled(policy, server, tmp_path):
    marker = tmp_path / "pwned"
    evil = _malicious_checkpoint(tmp_path / "adapters" / "evil", marker)
    body = json.dumps({"lora_name": "x", "lora_path": str(evil)})
    # the attack as it was: a CORS-simple text/plain POST, no key, to the default server
    r = httpx.post(server.url + "/v1/load_lora_adapter", content=body,
                   headers={"content-type": "text/plain"})
    assert r.status_code == 415 and error_of(r)["code"] == "unsupported_media_type"
    r = httpx.post(server.url + "/v1/load_lora_adapter", content=body, headers=JSON)
    assert r.status_code == 404  # management endpoints are off unless enabled
    # enabling it needs a key, and then it loads only from the allowed directory, weights-only
    with pytest.raises(ValueError, match="api_key"):
        ll.serve(policy, adapter_dirs=(str(tmp_path / "adapters"),))
    with ll.serve(policy, api_key="k", adapter_dirs=(str(tmp_path / "adapters"),)) as s:
        url = s.url + "/v1/load_lora_adapter"
        assert httpx.post(url, content=body, headers=JSON).status_code == 401
        auth = {**JSON, "authorization": "Bearer k"}
        outside = _malicious_checkpoint(tmp_path / "elsewhere", marker)
        r = httpx.post(url, json={"lora_path": str(outside)}, headers=auth)
        assert r.status_code == 403 and error_of(r)["code"] == "path_not_allowed"
        sneaky = str(tmp_path / "adapters" / ".." / "elsewhere")
        assert httpx.post(url, json={"lora_path": sneaky}, headers=auth).status_code == 403
        r = httpx.post(url, content=body, headers=auth)
        assert r.status_code == 400 and "weights-only" in error_of(r)["message"]
    with pytest.raises(CheckpointError, match="weights-only"):
        load_policy_weights(policy, evil)
    assert not marker.exists()


def test_dns_rebinding_host_header_is_refused(server):
    port = server.port
    r = httpx.get(server.url + "/v1/models", headers={"host": f"attacker.example:{port}"})
    assert r.status_code == 400 and error_of(r)["code"] == "invalid_host"
    for host in (f"127.0.0.1:{port}", f"localhost:{port}"):
        assert httpx.get(server.url + "/v1/models", headers={"host": host}).status_code == 200


# ---------------------------------------------------------------- 8: client errors were 500s
def test_fuzz_cases_that_were_500_are_400(server):
    url = server.url + "/v1/chat/completions"
    deep = b"[" * 100_000 + b"]" * 100_000
    r = httpx.post(url, content=deep, headers=JSON)
    assert r.status_code == 400 and error_of(r)["code"] == "invalid_json"
    surrogate = b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}'
    r = httpx.post(url, content=surrogate, headers=JSON)
    assert r.status_code == 400 and error_of(r)["param"] == "messages[0].content"
    for field in ("temperature", "top_p"):
        r = httpx.post(url, content=json.dumps({"messages": USER, field: 10**400}), headers=JSON)
        assert r.status_code == 400 and error_of(r)["param"] == field
    with server.rollout(task_id="huge") as handle:
        for reward in ("1" + "0" * 400, "1e308", "-1e13"):
            r = httpx.post(handle.reward_url, content=f'{{"reward": {reward}}}', headers=JSON)
            assert r.status_code == 400 and error_of(r)["param"] == "reward", reward


# ---------------------------------------------------------------- 9: no limits, work on the loop
def test_oversize_bodies_and_caps_get_clear_4xx(server):
    url = server.url + "/v1/chat/completions"
    big = json.dumps({"messages": [{"role": "user", "content": "x" * (2 << 20)}]})
    r = httpx.post(url, content=big, headers=JSON)
    assert r.status_code == 413 and error_of(r)["code"] == "request_too_large"

    def chunks():  # no Content-Length: the cap must hold while streaming the body in
        for _ in range(40):
            yield b" " * 65536

    assert httpx.post(url, content=chunks(), headers=JSON).status_code == 413
    many = [{"role": "user", "content": ""}] * 5000
    r = httpx.post(url, json={"messages": many})
    assert r.status_code == 400 and error_of(r)["code"] == "too_many_messages"
    r = httpx.post(url, json={"messages": USER, "max_tokens": 5000})
    assert r.status_code == 400 and error_of(r)["param"] == "max_tokens"
    r = httpx.post(url, json={"messages": USER, "n": 32, "max_tokens": 2048})
    assert r.status_code == 400 and error_of(r)["code"] == "request_too_large"
    r = httpx.post(url, json={"messages": USER, "n": 33})
    assert r.status_code == 400 and error_of(r)["param"] == "n"


def test_queued_tokens_are_capped_per_server_with_429(policy, server):
    gate = threading.Event()
    original = server.backend.generate

    async def held(prepared, request, temperature, max_tokens):  # park admitted requests
        import asyncio

        while not gate.is_set():
            await asyncio.sleep(0.01)
        return await original(prepared, request, temperature, 1)  # 1 token: keep the test short

    server.backend.generate = held
    try:
        body = {"messages": USER, "n": 8, "max_tokens": 2000}  # ~16k tokens each, cap 40k
        with httpx.Client(base_url=server.url, timeout=120) as c:
            results: list[httpx.Response] = []
            threads = [threading.Thread(target=lambda: results.append(
                c.post("/v1/chat/completions", json=body))) for _ in range(2)]
            for t in threads:
                t.start()
            while server.app.state.serving.inflight < 2:
                threading.Event().wait(0.01)
            r = c.post("/v1/chat/completions", json=body)
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert error_of(r)["code"] == "rate_limit_exceeded"
            with pytest.raises(openai.RateLimitError):
                openai.OpenAI(base_url=server.base_url, api_key="-", max_retries=0).chat \
                    .completions.create(model="tiny", messages=USER, n=8, max_tokens=2000)
            gate.set()
            for t in threads:
                t.join()
        assert [x.status_code for x in results] == [200, 200]
    finally:
        gate.set()
        server.backend.generate = original
    ok = httpx.post(server.url + "/v1/chat/completions", json=body | {"max_tokens": 2}, timeout=120)
    assert ok.status_code == 200  # the budget was given back


def test_tokenisation_runs_off_the_event_loop(server):
    """While a request is being tokenised, /health answers (it used to wait 9.6 s)."""
    entered, release = threading.Event(), threading.Event()
    original = server.backend.prepare

    def slow_prepare(request):
        entered.set()
        release.wait(60)
        return original(request)

    server.backend.prepare = slow_prepare
    try:
        worker = threading.Thread(target=lambda: httpx.post(
            server.url + "/v1/chat/completions", json={"messages": USER}, timeout=120))
        worker.start()
        assert entered.wait(60)
        health = httpx.get(server.url + "/health", timeout=30)  # would time out if blocked
        assert health.status_code == 200 and health.json()["status"] == "ok"
    finally:
        release.set()
        server.backend.prepare = original
    worker.join()


# ---------------------------------------------------------------- issue 23, item 6: /v1/completions
def test_completions_surrogate_prompt_is_a_400(server):
    url = server.url + "/v1/completions"
    for prompt in (b'"a\\ud800b"', b'["ok", "\\udfff"]'):
        r = httpx.post(url, content=b'{"prompt": ' + prompt + b', "max_tokens": 2}', headers=JSON)
        assert r.status_code == 400 and error_of(r)["param"] == "prompt", r.text


def test_completions_tokenisation_runs_off_the_event_loop(server):
    """While a completions prompt is being tokenised, /health answers (it waited 5.2 s)."""
    entered, release = threading.Event(), threading.Event()
    original = server.backend.prepare_text
    replies: list[httpx.Response] = []

    def slow_prepare_text(prompt, param="prompt"):
        entered.set()
        release.wait(60)
        return original(prompt, param)

    server.backend.prepare_text = slow_prepare_text
    try:
        worker = threading.Thread(target=lambda: replies.append(httpx.post(
            server.url + "/v1/completions", json={"prompt": "Once", "max_tokens": 2}, timeout=120)))
        worker.start()
        assert entered.wait(60)
        health = httpx.get(server.url + "/health", timeout=30)  # would time out if blocked
        assert health.status_code == 200 and not replies  # answered while the prompt waits
    finally:
        release.set()
        server.backend.prepare_text = original
    worker.join()
    assert replies[0].status_code == 200


# ---------------------------------------------------------------- issue 23, item 11: hardening
def test_host_header_must_be_exactly_a_known_host(server):
    port = server.port
    for host in ("[::1]attacker.example", f"[::1]attacker.example:{port}", "localhost:x",
                 f"localhost:{port}:1", "127.0.0.1.attacker.example", "[::1"):
        r = httpx.get(server.url + "/v1/models", headers={"host": host})
        assert r.status_code == 400 and error_of(r)["code"] == "invalid_host", host
    for host in (f"[::1]:{port}", "[::1]", "localhost", f"LOCALHOST:{port}", "localhost."):
        assert httpx.get(server.url + "/v1/models", headers={"host": host}).status_code == 200, host


def test_adapter_loading_refuses_symlinks_out_of_the_allowed_dirs(policy, tmp_path):
    trainer = ll.PPOTrainer(policy, lambda task: None, [{"task_id": "x"}])
    trainer.save(tmp_path / "outside" / "ckpt")
    allowed = tmp_path / "adapters"
    (allowed / "ckpt").mkdir(parents=True)
    for entry in (tmp_path / "outside" / "ckpt").iterdir():  # the LATEST file and step dir: links
        (allowed / "ckpt" / entry.name).symlink_to(entry)
    trainer.save(allowed / "own")
    with ll.serve(policy, api_key="k", adapter_dirs=(str(allowed),)) as s:
        url, auth = s.url + "/v1/load_lora_adapter", {**JSON, "authorization": "Bearer k"}
        r = httpx.post(url, json={"lora_name": "a", "lora_path": str(allowed / "ckpt")},
                       headers=auth)
        assert r.status_code == 403 and error_of(r)["code"] == "path_not_allowed"
        assert "outside" in error_of(r)["message"]
        for name in ("x" * 100_000, "bad name", "a\nb", "../up"):
            r = httpx.post(url, json={"lora_name": name, "lora_path": str(allowed / "own")},
                           headers=auth)
            assert r.status_code == 400 and error_of(r)["param"] == "lora_name", name[:20]
        r = httpx.post(url, json={"lora_name": "step-1.v2", "lora_path": str(allowed / "own")},
                       headers=auth)
        assert r.status_code == 200 and r.json()["model"] == "step-1.v2"


@pytest.mark.parametrize("key", ["", " ", "\t\n", " padded "])
def test_blank_api_key_is_refused_at_start(policy, key):
    with pytest.raises(ValueError, match="api_key"):
        ll.serve(policy, api_key=key)


def test_cli_api_key_from_env_or_file(tmp_path, monkeypatch, capsys):
    import argparse

    from lightning_lab.cli import main
    from lightning_lab.errors import ConfigError
    from lightning_lab.proxy.cli import api_key_of

    def args(**kw):
        return argparse.Namespace(**{"api_key": None, "api_key_file": None, **kw})

    monkeypatch.delenv("LIGHTNING_LAB_API_KEY", raising=False)
    assert api_key_of(args()) is None
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    assert api_key_of(args(api_key_file=str(key_file))) == "from-file"
    monkeypatch.setenv("LIGHTNING_LAB_API_KEY", "from-env")
    assert api_key_of(args()) == "from-env"
    assert api_key_of(args(api_key="flag")) == "flag"
    with pytest.raises(ConfigError, match="one of"):
        api_key_of(args(api_key="flag", api_key_file=str(key_file)))
    with pytest.raises(ConfigError, match="nope"):
        api_key_of(args(api_key_file=str(tmp_path / "nope")))
    key_file.write_text("  \n")
    with pytest.raises(ConfigError, match="blank"):
        api_key_of(args(api_key_file=str(key_file)))
    monkeypatch.setenv("LIGHTNING_LAB_API_KEY", " ")
    assert main(["serve", "--model", "tiny"]) == 2
    assert "LIGHTNING_LAB_API_KEY" in capsys.readouterr().err
