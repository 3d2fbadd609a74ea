"""Traces in and out: OpenTelemetry round trips (OTLP-JSON, OTLP/HTTP) and Agent Lightning import."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

import lightning_lab as ll
from shared_agents import parity_agent
from lightning_lab.traces.agentlightning import load_agentlightning
from lightning_lab.traces.otel import (export_otlp_http, load_otlp_json, request_to_batch,
                                       save_otlp_json)
from lightning_lab.train.offline import OfflineBatchError, check_offline_batch, offline_ppo_step
from lightning_lab.train.sft import SFTConfig, SFTTrainer

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "agentlightning_spans.json"
TASKS = [{"task_id": f"t{i}", "q": f"Question number {i} " + "word " * i} for i in range(4)]


def _batch(tiny) -> ll.Batch:
    """Real rollouts with credit assigned, plus a failed one and a call without response."""
    state = ll.PPOTrainer(tiny, parity_agent(tiny), TASKS,
                          config=ll.PPOConfig(tasks_per_step=2, group_size=2)).step()
    batch = state.batch
    batch.trajectories.append(ll.Trajectory(task_id="bad", status="failed", error="ValueError: x",
                                            meta={"note": ["a", 1]},
                                            transitions=[ll.Transition(prompt_ids=[5], role="a")]))
    return batch


def _same(a: ll.Batch, b: ll.Batch) -> None:
    assert [t.to_dict() for t in a] == [t.to_dict() for t in b]


def test_otlp_json_round_trip_is_lossless(tiny, tmp_path):
    batch = _batch(tiny)
    path = save_otlp_json(batch, tmp_path / "spans.json", model="tiny")
    back = load_otlp_json(path)
    assert not back.load_errors
    _same(batch, back)
    assert any(tr.advantage for _, tr in back.transitions())  # credit survives too

    doc = json.loads(path.read_text())
    spans = [s for rs in doc["resourceSpans"] for ss in rs["scopeSpans"] for s in ss["spans"]]
    n_calls = sum(len(t.transitions) for t in batch)
    assert len(spans) == len(batch) + n_calls
    chat = next(s for s in spans if s["name"] == "chat tiny")
    attrs = {kv["key"]: kv["value"] for kv in chat["attributes"]}
    assert attrs["gen_ai.operation.name"] == {"stringValue": "chat"}
    assert attrs["gen_ai.request.model"] == {"stringValue": "tiny"}
    for key in ("gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens", "gen_ai.agent.name",
                "gen_ai.response.finish_reasons", "gen_ai.request.temperature", "prompt_token_ids"):
        assert key in attrs
    assert len(chat["traceId"]) == 32 and len(chat["spanId"]) == 16  # OTLP/JSON: hex ids
    int(chat["traceId"], 16)
    assert chat["kind"] == 3  # SPAN_KIND_CLIENT as an integer, as OTLP/JSON requires
    rewarded = [s for s in spans if any(e["name"] == "gen_ai.reward" for e in s.get("events", []))]
    assert rewarded
    failed = next(s for s in spans if s["name"] == "invoke_agent bad")
    assert failed["status"]["code"] == 2 and failed["status"]["message"] == "ValueError: x"


def test_contradictory_trace_is_skipped_and_named(tiny, tmp_path):
    batch = _batch(tiny)
    path = save_otlp_json(batch, tmp_path / "spans.json")
    doc = json.loads(path.read_text())
    spans = [s for rs in doc["resourceSpans"] for ss in rs["scopeSpans"] for s in ss["spans"]]
    victim = next(s for s in spans if s.get("events") and s["name"].startswith("chat"))
    victim["events"][0]["attributes"][0]["value"] = {"doubleValue": 123.0}
    path.write_text(json.dumps(doc))
    back = load_otlp_json(path)
    assert len(back) == len(batch) - 1
    assert len(back.load_errors) == 1
    assert str(path) in back.load_errors[0] and victim["traceId"] in back.load_errors[0]
    assert "contradicts" in back.load_errors[0]


def _otlp_spans(doc: dict) -> list:
    return doc["resourceSpans"][0]["scopeSpans"][0]["spans"]


def test_otlp_bad_spans_are_skipped_with_file_and_index_and_the_rest_load(tiny, tmp_path):
    """A null span, a numeric traceId, ``"spans": 5``, a null resourceSpans entry and a null
    event cost themselves (and that event's trace) only; each is named with file and index."""
    batch = _batch(tiny)
    path = save_otlp_json(batch, tmp_path / "spans.json")
    doc = json.loads(path.read_text())
    spans = _otlp_spans(doc)
    n = len(spans)
    victim = next(s for s in spans if s.get("events") and s["name"].startswith("chat"))
    victim["events"].append(None)
    spans += [None, {"traceId": 5, "name": "chat"}]
    doc["resourceSpans"][0]["scopeSpans"].append({"spans": 5})
    doc["resourceSpans"].append(None)
    path.write_text(json.dumps(doc))
    with pytest.warns(UserWarning, match=f"{re.escape(str(path))}: skipped 5 bad record"):
        back = load_otlp_json(path)
    assert len(back) == len(batch) - 1
    assert all(str(path) in e for e in back.load_errors), back.load_errors
    errors = "\n".join(back.load_errors)
    assert f"resourceSpans[0].scopeSpans[0].spans[{n}]: expected an object, got NoneType" in errors
    assert f"spans[{n + 1}]: traceId must be a string, got int" in errors
    assert "resourceSpans[0].scopeSpans[1].spans: expected a list, got int" in errors
    assert "resourceSpans[1]: expected an object, got NoneType" in errors
    assert f"trace {victim['traceId']}" in errors


def test_otlp_rewards_are_checked_after_summing(tiny, tmp_path):
    """Two finite per-call rewards of 1e308 sum to inf: the trace is skipped, not loaded."""
    batch = _batch(tiny)
    path = save_otlp_json(batch, tmp_path / "spans.json")
    doc = json.loads(path.read_text())
    ok = next(t for t in batch if t.status == "ok" and len(t.transitions) >= 2)
    for span in _otlp_spans(doc):
        attrs = {kv["key"]: kv["value"] for kv in span["attributes"]}
        if attrs.get("lightning_lab.traj_id") == {"stringValue": ok.traj_id}:
            root_id = span["spanId"]
            for kv in span["attributes"]:  # what an exporter summing the steps would write
                if kv["key"] == "lightning_lab.total_reward":
                    kv["value"] = {"doubleValue": "Infinity"}
    for span in _otlp_spans(doc):
        if span.get("parentSpanId") == root_id:
            span["events"] = []
            for kv in span["attributes"]:
                if kv["key"] == "lightning_lab.reward":
                    kv["value"] = {"doubleValue": 1e308}
    path.write_text(json.dumps(doc))
    with pytest.warns(UserWarning, match="skipped 1 bad record"):
        back = load_otlp_json(path)
    assert ok.traj_id not in [t.traj_id for t in back] and len(back) == len(batch) - 1
    assert str(path) in back.load_errors[0] and ok.traj_id not in back.load_errors[0]
    assert "rewards summed out of range (step 0): reward magnitude 1e+308" in back.load_errors[0]
    back.save_jsonl(tmp_path / "out.jsonl")


def test_otlp_file_with_nothing_loadable_raises_naming_it(tmp_path):
    path = tmp_path / "null.json"
    path.write_text(json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": [None]}]}]}))
    with pytest.raises(ll.TraceFormatError, match=f"{re.escape(str(path))}: no loadable trace"):
        load_otlp_json(path)


def test_otlp_http_exporter_round_trip(tiny):
    """The SDK's OTLP/HTTP exporter posts protobuf to a collector; reading the body back
    gives the same batch."""
    received: list[bytes] = []

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's naming
            received.append(self.rfile.read(int(self.headers["Content-Length"])))
            assert self.path == "/v1/traces"
            assert self.headers["Content-Type"] == "application/x-protobuf"
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        batch = _batch(tiny)
        export_otlp_http(batch, f"http://127.0.0.1:{server.server_port}/v1/traces", model="tiny")
    finally:
        server.shutdown()
    assert len(received) == 1
    _same(batch, request_to_batch(received[0]))


def test_agentlightning_spans_import(tiny):
    with pytest.warns(UserWarning, match=f"{re.escape(str(FIXTURE))}: skipped 3 bad record"):
        batch = load_agentlightning(FIXTURE, tiny.tokenizer)
    assert [t.task_id for t in batch] == ["ro-1", "ro-2"]
    errors = "\n".join(batch.load_errors)
    assert len(batch.load_errors) == 3, errors
    assert "record 11: field 'rollout_id' missing" in errors
    assert "rollout 'ro-3'" in errors and "reward must be a real number, got str: 'high'" in errors
    assert "rollout 'ro-4'" in errors and "1 entries for 2 response tokens" in errors
    assert str(FIXTURE) in batch.load_errors[1]

    recorded, retok = batch
    assert [tr.prompt_ids for tr in recorded.transitions] == [[1, 9690, 198, 2683, 3575, 28, 2],
                                                             [1, 555, 556, 2]]
    assert recorded.transitions[0].response_ids == [18578, 1032, 2093, 2]
    assert recorded.transitions[0].logprobs == [-0.5, -0.25, -1.0, -0.125]
    assert [tr.reward for tr in recorded.transitions] == [0.0, 1.0]  # primary dimension, last call
    assert [tr.role for tr in recorded.transitions] == ["sql_agent", "sql_agent"]
    assert [tr.temperature for tr in recorded.transitions] == [0.7, 0.7]
    assert recorded.transitions[1].finish_reason == "length"
    assert recorded.transitions[0].meta["response_id"] == "chatcmpl-1"
    assert "retokenized" not in recorded.transitions[0].meta

    assert [tr.reward for tr in retok.transitions] == [0.5, 0.25]
    assert retok.transitions[0].role == "namer"
    first = retok.transitions[0]
    assert "re-tokenised" in first.meta["retokenized"] and first.logprobs == []
    expected = tiny.tokenizer.apply_chat_template([{"role": "user", "content": "Name a fruit."}],
                                                  tokenize=False, add_generation_prompt=True)
    assert first.prompt == expected
    assert first.prompt_ids == tiny.tokenizer(expected, add_special_tokens=False)["input_ids"]
    assert tiny.tokenizer.decode(first.response_ids) == "Apple"


def _al_rollout(rollout_id: str, rewards: list[float]) -> list[dict]:
    """Agent Lightning spans: one LLM call with recorded token ids, then one reward span each."""
    call = {"rollout_id": rollout_id, "attempt_id": "a", "span_id": f"{rollout_id}-call",
            "name": "openai.chat.completion", "start_time": 1.0, "end_time": 2.0,
            "attributes": {"prompt_token_ids": [1, 2], "response_token_ids": [3]}}
    return [call] + [{"rollout_id": rollout_id, "attempt_id": "a", "span_id": f"{rollout_id}-r{i}",
                      "name": "agentlightning.annotation", "start_time": 3.0 + i,
                      "end_time": 3.0 + i, "attributes": {"agentlightning.reward.0.value": r}}
                     for i, r in enumerate(rewards)]


def test_agentlightning_rewards_are_checked_after_summing(tmp_path):
    """1e308 twice summed to inf and loaded (then ``save_jsonl`` raised); 6e11 twice passes a
    per-reward check but not the sum's."""
    path = tmp_path / "spans.json"
    spans = (_al_rollout("huge", [1e308, 1e308]) + _al_rollout("sum", [6e11, 6e11])
             + _al_rollout("ok", [0.5, 0.25]))
    path.write_text(json.dumps(spans))
    with pytest.warns(UserWarning, match="skipped 2 bad record"):
        batch = load_agentlightning(path)
    assert [t.task_id for t in batch] == ["ok"] and batch[0].total_reward == 0.75
    errors = "\n".join(batch.load_errors)
    assert len(batch.load_errors) == 2 and all(str(path) in e for e in batch.load_errors)
    assert "rollout 'huge'" in errors and "reward magnitude 1e+308 exceeds 1e+12" in errors
    assert "rollout 'sum'" in errors and "summed out of range" in errors and "1.2e+12" in errors
    batch.save_jsonl(tmp_path / "out.jsonl")
    assert ll.Batch.load_jsonl(tmp_path / "out.jsonl")[0].total_reward == 0.75


def test_agentlightning_file_with_nothing_loadable_raises_naming_it(tmp_path):
    path = tmp_path / "spans.jsonl"
    path.write_text("\n".join(json.dumps(s) for s in _al_rollout("huge", [1e308]) + [None]))
    with pytest.raises(ll.TraceFormatError, match=f"{re.escape(str(path))}: no loadable trace"):
        load_agentlightning(path)
    path.write_text(json.dumps({"spans": 5}))
    with pytest.raises(ll.TraceFormatError, match=f"{re.escape(str(path))}: expected a list"):
        load_agentlightning(path)


def test_saving_a_batch_with_an_infinite_reward_names_the_file_and_trajectory(tmp_path):
    batch = ll.Batch([ll.Trajectory(task_id="t", traj_id="x-1", transitions=[
        ll.Transition(prompt_ids=[1], response_ids=[2], reward=float("inf"))])])
    path = tmp_path / "out.jsonl"
    with pytest.raises(ll.TraceFormatError, match=f"{re.escape(str(path))}: trajectory 0 .*x-1"):
        batch.save_jsonl(path)


def test_agentlightning_without_token_ids_or_tokenizer_is_skipped_with_reason():
    batch = load_agentlightning(FIXTURE)
    assert [t.task_id for t in batch] == ["ro-1"]
    assert any("rollout 'ro-2'" in e and "no tokenizer" in e for e in batch.load_errors)


def test_imported_spans_train_sft_and_offline_ppo_names_missing_logprobs(tiny):
    batch = load_agentlightning(FIXTURE, tiny.tokenizer)
    state = SFTTrainer(tiny, batch, SFTConfig(batch_size=4, lr=1e-3)).step()
    assert state.metrics["n_rows"] == 4 and state.metrics["loss"] > 0
    trainer = ll.PPOTrainer(tiny, parity_agent(tiny), TASKS, config=ll.PPOConfig())
    with pytest.raises(OfflineBatchError, match=r"'logprobs' is missing in trajectory 1 .*ro-2"):
        offline_ppo_step(trainer, batch)
    check_offline_batch(ll.Batch([batch[0]]))  # the rollout with recorded logprobs is fine


def test_imported_agentlightning_batch_opens_in_the_inspector(tiny, monkeypatch):
    pytest.importorskip("ipywidgets")
    from lightning_lab.workbench.widgets import dashboard

    monkeypatch.setattr(dashboard, "widgets_available", lambda: (True, ""))  # as test_widgets does
    batch = load_agentlightning(FIXTURE, tiny.tokenizer)
    inspector = dashboard.TrajectoryInspector(batch)
    assert len(inspector.pick.options) == 2
    assert "total reward 1.000" in inspector.detail.value  # ro-1: 0 + 1.0
    inspector.task.value = "ro-2"
    assert "total reward 0.750" in inspector.detail.value and "namer" in inspector.detail.value
