"""Fuzz a running proxy with hostile and valid requests; report 5xx count and server RSS.

The server runs in a child process (``--serve``, the tiny model, one open rollout) so its memory
is measured alone, from ``/proc/<pid>/status`` (VmRSS now, VmHWM peak). The parent sends
``--requests`` requests from ``--threads`` threads, drawn by a seeded RNG from: valid chat
requests (some streamed, some traced), completions, responses, tools, response_format,
guided grammars and top_logprobs (valid and broken), wrong types, ints beyond float range, NaN, lone
surrogates, deep nesting, oversize and endless bodies, thousands of messages, huge n x
max_tokens, non-JSON content types, foreign Host headers, bad and huge rewards. The acceptance
bar of issues 11 and 23 is 0 responses >= 500, no dropped connections, and bounded RSS.

    python benchmarks/proxy_fuzz.py [--requests 10000] [--threads 8] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx

JUNK = [None, True, -1, 0, 2.5, "x", [], {}, [1, 2], {"a": 1}, 10**400, "\ud800", float("nan")]


def _serve(port: int) -> None:
    import lightning_lab as ll

    policy = ll.models.load("tiny", lora=True)
    server = ll.serve(policy, port=port, default_max_tokens=3)
    handle = server.open_rollout(ll.Trajectory(task_id="fuzz"))
    print(handle.base_url, flush=True)
    while True:
        time.sleep(3600)


def _json(body: object) -> bytes:
    return json.dumps(body).encode()  # lone surrogates become "\ud800": valid JSON


def _request(rng: random.Random, url: str, traced: str) -> tuple[str, str, bytes, dict]:
    """(method, url, body, headers) of one fuzz case."""
    chat, headers = url + "/v1/chat/completions", {"content-type": "application/json"}
    text = "".join(rng.choice("ab c") for _ in range(rng.randint(0, 30)))
    user = [{"role": "user", "content": text}]
    kind = rng.random()
    if kind < 0.2:  # the other endpoints and constrained decoding, valid and broken
        return "POST", *_mixed(rng, url, traced, text), headers
    kind = 0.2 + kind * 0.8  # the original mix in the remaining share
    if kind < 0.35:  # valid
        body = {"messages": user, "max_tokens": rng.randint(1, 3), "n": rng.randint(1, 2),
                "temperature": rng.choice([0, 0.7, 1.0]), "stream": rng.random() < 0.3}
        target = rng.choice([chat, traced + "/chat/completions"])
        return "POST", target, _json(body), headers
    if kind < 0.6:  # a valid request with one field broken
        body = {"messages": user, "max_tokens": 2}
        field = rng.choice(["model", "temperature", "top_p", "max_tokens", "n", "stop", "seed",
                            "logprobs", "stream", "user", "metadata", "messages"])
        body[field] = rng.choice(JUNK)
        if rng.random() < 0.3:
            body["messages"] = [{"role": "user", "content": rng.choice(JUNK)}]
        return "POST", chat, _json(body), headers
    if kind < 0.7:  # reward endpoint
        value = rng.choice(["1", "1e308", "-1e13", "1" + "0" * 400, '"x"', "NaN", "Infinity",
                            "0.5"])
        reward_url = traced.removesuffix("/v1") + "/reward"
        return "POST", reward_url, f'{{"reward": {value}}}'.encode(), headers
    if kind < 0.76:
        depth = rng.choice([1000, 100_000])
        return "POST", chat, b"[" * depth + b"]" * depth, headers
    if kind < 0.8:
        return "POST", chat, _json({"messages": [{"role": "user", "content": ""}] * 5000}), headers
    if kind < 0.83:
        return "POST", chat, _json({"messages": user, "n": 32, "max_tokens": 2**20}), headers
    if kind < 0.86:
        return "POST", chat, b" " * (9 << 20), headers  # past the 8 MiB body limit
    if kind < 0.9:
        return "POST", chat, _json({"messages": user}), {"content-type": "text/plain"}
    if kind < 0.94:
        return "GET", url + "/v1/models", b"", {"host": "attacker.example"}
    if kind < 0.97:
        return "POST", chat, bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64))), headers
    return "GET", url + "/health", b"", {}


TOOL = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}


def _mixed(rng: random.Random, url: str, traced: str, text: str) -> tuple[str, bytes]:
    """(target, body) for completions, responses, tools, response_format or a guided grammar."""
    stream = rng.random() < 0.4
    case = rng.randrange(6)
    if case == 0:
        prompt = rng.choice([text or "a", [1, 2, 3], [text or "b", "c"], "a\ud800", [10**9], ""])
        return url + "/v1/completions", _json({"prompt": prompt, "max_tokens": rng.randint(1, 3),
                                                "logprobs": rng.choice([None, 1, 9]),
                                                "stream": stream})
    if case == 1:
        body = {"input": rng.choice([text or "hi", [{"role": "user", "content": text}],
                                     rng.choice(JUNK)]), "max_output_tokens": rng.randint(1, 3),
                "stream": stream}
        if rng.random() < 0.5:
            body["tools"] = [{"type": "function", "name": "add",
                              "parameters": TOOL["function"]["parameters"]}]
        return rng.choice([url + "/v1/responses", traced + "/responses"]), _json(body)
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": rng.randint(1, 6),
            "stream": stream}
    if case == 2:
        body["tools"] = [TOOL]
        body["tool_choice"] = rng.choice(["auto", "none", "required", rng.choice(JUNK)])
    elif case == 3:
        body["response_format"] = rng.choice([{"type": "json_object"}, {"type": "xml"},
                                              rng.choice(JUNK)])
    elif case == 4:
        body["guided_grammar"] = rng.choice(['start: "yes" | "no"', "start: /[0-9]+/",
                                             "start: undefined", rng.choice(JUNK)])
    else:
        body["logprobs"] = True
        body["top_logprobs"] = rng.choice([0, 2, 21, rng.choice(JUNK)])
    return rng.choice([url + "/v1/chat/completions", traced + "/chat/completions"]), _json(body)


def _rss_mb(pid: int) -> tuple[float, float]:
    fields = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status"))
    return (int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=18911)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        _serve(args.port)
        return 0
    child = subprocess.Popen([sys.executable, __file__, "--serve", "--port", str(args.port)],
                             stdout=subprocess.PIPE, text=True)
    try:
        traced = child.stdout.readline().strip()
        url = f"http://127.0.0.1:{args.port}"
        for _ in range(3):  # warm up, then measure
            httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user",
                       "content": "hi"}], "max_tokens": 2}, timeout=60)
        rss_before, _ = _rss_mb(child.pid)
        statuses: Counter = Counter()
        failures: list[str] = []
        lock = threading.Lock()
        local = threading.local()

        def send(i: int) -> None:
            if not hasattr(local, "client"):
                local.client = httpx.Client(timeout=120)
            # built when sent, from its own seeded RNG: the same cases every run, few in memory
            method, target, body, headers = _request(random.Random(f"{args.seed}/{i}"), url,
                                                     traced)
            try:
                response = local.client.request(method, target, content=body or None,
                                                headers=headers)
                status = response.status_code
                if status == 200 and b'"server_error"' in response.content:  # in-band SSE error
                    status = "200 with a server_error event"
            except httpx.HTTPError as exc:  # a dropped connection counts as a failure
                status = f"{type(exc).__name__}"
            with lock:
                statuses[status] += 1
                if not isinstance(status, int) or status >= 500:
                    failures.append(f"{status}: {method} {target} {body[:120]!r}")

        start = time.perf_counter()
        with ThreadPoolExecutor(args.threads) as pool:
            list(pool.map(send, range(args.requests)))
        elapsed = time.perf_counter() - start
        rss_after, rss_peak = _rss_mb(child.pid)
        n_5xx = sum(n for s, n in statuses.items() if not isinstance(s, int) or s >= 500)
        print(json.dumps({"requests": args.requests, "seconds": round(elapsed, 1),
                          "status_counts": {str(k): v for k, v in sorted(statuses.items(), key=str)},
                          "5xx_or_dropped": n_5xx, "server_rss_mb_before": round(rss_before),
                          "server_rss_mb_after": round(rss_after),
                          "server_rss_mb_peak": round(rss_peak)}, indent=1))
        for line in failures[:10]:
            print(line)
        return 1 if n_5xx else 0
    finally:
        child.kill()


if __name__ == "__main__":
    sys.exit(main())
