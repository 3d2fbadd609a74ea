"""A ``Batch`` as OpenTelemetry spans and back, losslessly: OTLP-JSON files and OTLP/HTTP.

Why OpenTelemetry: it is what agent stacks already emit and what trace viewers (Jaeger, Phoenix,
Langfuse, Grafana Tempo) read, so a batch exported here can be looked at there, and traces
collected elsewhere can come back to train on.

Layout (one trace per trajectory):

* root span ``invoke_agent <task_id>``: ``gen_ai.operation.name = "invoke_agent"``, the
  trajectory's ids, status (OTel status ERROR for failed rollouts), total reward as an attribute
  and a ``gen_ai.reward`` event;
* one child span per LLM call, ``chat <model>``, with the GenAI semantic-convention attributes
  (``gen_ai.operation.name``, ``gen_ai.request.model``, ``gen_ai.request.temperature``,
  ``gen_ai.response.finish_reasons``, ``gen_ai.usage.input_tokens`` / ``output_tokens``,
  ``gen_ai.agent.name``, ``gen_ai.input.messages`` / ``gen_ai.output.messages``), token ids
  under Agent Lightning's keys (``prompt_token_ids`` / ``response_token_ids``, so its adapters
  read them too), and what the GenAI conventions have no key for under ``lightning_lab.*``
  (behaviour logprobs, exact prompt/response text, turn index, reward and credit, meta as JSON). A
  non-zero per-call reward is also a ``gen_ai.reward`` event on its span.

OTLP-JSON follows the OTLP/JSON spec (hex trace/span ids, lowerCamelCase keys), one
``ExportTraceServiceRequest`` per file, written with the SDK's own protobuf encoder.
"""

from __future__ import annotations

import base64
import json
import math
import random
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..records import Batch, Trajectory, Transition, upgrade_names
from ._checks import finish_load, rewards_problem

__all__ = ["batch_to_spans", "spans_to_batch", "save_otlp_json", "load_otlp_json",
           "export_otlp_http", "request_to_batch", "SCOPE"]

SCOPE = "lightning_lab.traces.otel"
_LL = "lightning_lab."
_TRAJ_FIELDS = ("task_id", "traj_id", "group_id", "status", "error")
_MS = 1_000_000  # ns; synthetic span times are 1 ms apart (transitions carry no timestamps)


# ------------------------------------------------------------------------------ export
def batch_to_spans(batch: Batch, *, model: str = "", seed: int = 0) -> list[Any]:
    """Finished ``ReadableSpan``s (opentelemetry-sdk) for every trajectory of ``batch``.

    Span ids come from a seeded generator so an export is reproducible; ``model`` fills
    ``gen_ai.request.model``.
    """
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import Status, StatusCode

    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "lightning-lab"}),
                              id_generator=_SeededIds(seed))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer(SCOPE)
    clock = 1_700_000_000_000 * _MS  # a fixed epoch: exports of the same batch are identical
    for traj in batch:
        start = clock
        root = tracer.start_span(f"invoke_agent {traj.task_id}", start_time=start,
                                 kind=trace.SpanKind.INTERNAL,
                                 attributes=_trajectory_attributes(traj))
        ctx = trace.set_span_in_context(root)
        for tr in traj.transitions:
            clock += _MS
            span = tracer.start_span(f"chat {model}".strip(), context=ctx, start_time=clock,
                                     kind=trace.SpanKind.CLIENT,
                                     attributes=_transition_attributes(tr, model))
            if tr.reward:
                span.add_event("gen_ai.reward", {"value": tr.reward}, timestamp=clock + _MS // 2)
            span.end(end_time=clock + _MS // 2)
        clock += _MS
        root.add_event("gen_ai.reward", {"value": traj.total_reward, "final": True},
                       timestamp=clock)
        if traj.status != "ok":
            root.set_status(Status(StatusCode.ERROR, traj.error or traj.status))
        root.end(end_time=clock)
        clock += _MS
    provider.shutdown()
    return list(memory.get_finished_spans())


def _SeededIds(seed: int) -> Any:
    """An OTel ``IdGenerator`` with reproducible ids (the SDK's default draws from os.urandom)."""
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    class SeededIds(RandomIdGenerator):
        def __init__(self) -> None:
            self._rng = random.Random(seed)

        def generate_span_id(self) -> int:
            return self._rng.getrandbits(64) or 1

        def generate_trace_id(self) -> int:
            return self._rng.getrandbits(128) or 1

    return SeededIds()


def _trajectory_attributes(traj: Trajectory) -> dict[str, Any]:
    attrs: dict[str, Any] = {"gen_ai.operation.name": "invoke_agent",
                             "gen_ai.agent.name": "lightning-lab"}
    for name in _TRAJ_FIELDS:
        attrs[_LL + name] = getattr(traj, name)
    attrs[_LL + "total_reward"] = traj.total_reward
    attrs[_LL + "meta"] = json.dumps(traj.meta, allow_nan=False)
    return attrs


def _transition_attributes(tr: Transition, model: str) -> dict[str, Any]:
    attrs: dict[str, Any] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "lightning-lab",
        "gen_ai.request.model": model,
        "gen_ai.request.temperature": float(tr.temperature),
        "gen_ai.response.finish_reasons": [tr.finish_reason],
        "gen_ai.usage.input_tokens": len(tr.prompt_ids),
        "gen_ai.usage.output_tokens": len(tr.response_ids),
        "gen_ai.agent.name": tr.role,
        "gen_ai.input.messages": json.dumps([{"role": "user", "parts": [
            {"type": "text", "content": tr.prompt}]}]),
        "gen_ai.output.messages": json.dumps([{"role": "assistant", "finish_reason": tr.finish_reason,
                                               "parts": [{"type": "text", "content": tr.response}]}]),
        "prompt_token_ids": list(tr.prompt_ids),
        "response_token_ids": list(tr.response_ids),
        _LL + "logprobs": [float(x) for x in tr.logprobs],
        _LL + "prompt": tr.prompt,
        _LL + "response": tr.response,
        _LL + "turn": tr.turn,
        _LL + "reward": float(tr.reward),
        _LL + "meta": json.dumps(tr.meta, allow_nan=False),
    }
    for name in ("ret", "advantage", "value"):  # None (not assigned yet) is left out
        if getattr(tr, name) is not None:
            attrs[_LL + name] = float(getattr(tr, name))
    return attrs


def _request(spans: Sequence[Any]) -> Any:
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    return encode_spans(spans)


def save_otlp_json(batch: Batch, path: str | Path, *, model: str = "") -> Path:
    """Write ``batch`` as one OTLP/JSON ``ExportTraceServiceRequest`` (what an OTel collector's
    file exporter writes and its OTLP/HTTP JSON receiver accepts)."""
    from google.protobuf.json_format import MessageToDict

    doc = MessageToDict(_request(batch_to_spans(batch, model=model)), use_integers_for_enums=True)
    for _, span in _span_records(doc, "", []):
        for key in ("traceId", "spanId", "parentSpanId"):
            if span.get(key):  # protobuf's JSON gives bytes as base64; OTLP/JSON wants hex
                span[key] = base64.b64decode(span[key]).hex()
    path = Path(path)
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


def export_otlp_http(batch: Batch, endpoint: str, *, model: str = "", timeout: float = 10.0,
                     headers: dict[str, str] | None = None) -> None:
    """Send ``batch`` to an OTLP/HTTP collector (``http://host:4318/v1/traces``) with the SDK's
    protobuf exporter; raises ``RuntimeError`` if the collector does not accept it."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import SpanExportResult

    exporter = OTLPSpanExporter(endpoint=endpoint, timeout=timeout, headers=headers)
    try:
        result = exporter.export(batch_to_spans(batch, model=model))
    finally:
        exporter.shutdown()
    if result is not SpanExportResult.SUCCESS:
        raise RuntimeError(f"OTLP/HTTP export to {endpoint} failed ({result.name})")


# ------------------------------------------------------------------------------ import
def load_otlp_json(path: str | Path) -> Batch:
    """A ``Batch`` from an OTLP/JSON file written by ``save_otlp_json`` (or a collector's file
    exporter: one request per line is read too).

    A part of the file that is not OTLP's shape (a null span, ``"spans": 5``) is skipped and named
    with its position (``file: resourceSpans[0].scopeSpans[0].spans[7]: reason``); a trace that
    is not a lightning-lab trajectory, is malformed or has rewards out of range is skipped and
    named with its trace id; one warning says how many. The rest are kept. A file with nothing
    loadable raises ``TraceFormatError`` naming it.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    docs: list[tuple[str, Any]] = []
    try:
        docs.append((f"{path}", json.loads(text)))
    except json.JSONDecodeError:
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    docs.append((f"{path}:{lineno}", json.loads(line)))
                except json.JSONDecodeError as exc:
                    docs.append((f"{path}:{lineno}", exc))
    batch = Batch()
    for where, doc in docs:
        if isinstance(doc, Exception):
            batch.load_errors.append(f"{where}: not JSON ({doc})")
            continue
        errors: list[str] = []
        part = _records_to_batch(_span_records(doc, where, errors), source=where)
        batch.trajectories.extend(part.trajectories)
        batch.load_errors.extend(errors + part.load_errors)
    return finish_load(batch, path)


def request_to_batch(body: bytes, *, source: str = "otlp-http") -> Batch:
    """A ``Batch`` from the protobuf body of an OTLP/HTTP ``/v1/traces`` request."""
    from google.protobuf.json_format import MessageToDict
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    errors: list[str] = []
    batch = _records_to_batch(_span_records(MessageToDict(request), source, errors), source=source)
    batch.load_errors[:0] = errors
    return batch


_LEVELS = ("resourceSpans", "scopeSpans", "spans")


def _span_records(doc: Any, where: str, errors: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """``(position, span)`` for every span of one OTLP/JSON request, position as
    ``where: resourceSpans[i].scopeSpans[j].spans[k]``. A part that is not the shape OTLP gives
    it (a null span, ``"spans": 5``) is named in ``errors`` and skipped: it costs itself only."""
    nodes: list[tuple[str, Any]] = [("request", doc)]
    for key in (*_LEVELS, None):  # None: the spans themselves, which must be objects too
        children: list[tuple[str, Any]] = []
        for at, node in nodes:
            field = key if at == "request" else f"{at}.{key}"
            if not isinstance(node, dict):
                errors.append(f"{where}: {at}: expected an object, got {type(node).__name__} "
                              "(skipped)")
            elif key is None:
                children.append((f"{where}: {at}", node))
            elif not isinstance(items := node.get(key, []), list):
                errors.append(f"{where}: {field}: expected a list, got {type(items).__name__} "
                              "(skipped)")
            else:
                children += [(f"{field}[{i}]", item) for i, item in enumerate(items)]
        nodes = children
    return nodes


def spans_to_batch(spans: Sequence[Any], *, source: str = "spans") -> Batch:
    """Trajectories from OTLP span dicts (as in OTLP/JSON), grouped by trace id.

    A trace without a lightning-lab root span, or with contradictory parts (a transition whose
    turn is out of order, logprobs that do not match the response tokens, a reward attribute
    that disagrees with its event, rewards out of range), is skipped with the reason, and so is
    a span that is not an object or has no usable trace id (``source: spans[i]``); the others
    are kept.
    """
    return _records_to_batch([(f"{source}: spans[{i}]", span) for i, span in enumerate(spans)],
                             source=source)


def _records_to_batch(records: Iterable[tuple[str, Any]], *, source: str) -> Batch:
    traces: dict[str, list[dict[str, Any]]] = {}
    batch = Batch()
    for where, span in records:
        problem = _span_problem(span)
        if problem:
            batch.load_errors.append(f"{where}: {problem} (span skipped)")
            continue
        traces.setdefault(_hex_id(span.get("traceId", "")), []).append(span)
    for trace_id, members in traces.items():
        try:
            batch.trajectories.append(_trajectory(members))
        except (AttributeError, KeyError, OverflowError, TypeError, ValueError) as exc:
            batch.load_errors.append(f"{source}: trace {trace_id}: {type(exc).__name__}: {exc}")
    return batch


def _span_problem(span: Any) -> str | None:
    if not isinstance(span, dict):
        return f"expected a span object, got {type(span).__name__}"
    trace_id = span.get("traceId", "")
    if not isinstance(trace_id, str):
        return f"traceId must be a string, got {type(trace_id).__name__}"
    try:
        _hex_id(trace_id)
    except ValueError as exc:  # binascii.Error: neither hex nor base64
        return f"traceId {trace_id[:40]!r} is neither hex nor base64 ({exc})"
    return None


def _turn(span: dict[str, Any]) -> int:
    """The span's ``lightning_lab.turn`` (``lightning_lab.step`` in files from before the rename)."""
    attrs = _attrs(span)
    names = {new: attrs[_LL + new] for new in ("turn", "step") if _LL + new in attrs}
    return int(upgrade_names(names, f"span {span.get('spanId', '')!r}")["turn"])


def _trajectory(spans: list[dict[str, Any]]) -> Trajectory:
    roots = [s for s in spans if _attrs(s).get("gen_ai.operation.name") == "invoke_agent"
             and _LL + "traj_id" in _attrs(s)]
    if len(roots) != 1:
        raise ValueError(f"expected one lightning-lab invoke_agent root span, found {len(roots)}")
    root = roots[0]
    root_id = _hex_id(root.get("spanId", ""))
    ra = _attrs(root)
    calls = [s for s in spans if s is not root and _hex_id(s.get("parentSpanId", "")) == root_id]
    calls.sort(key=lambda s: _turn(s))
    transitions = []
    for i, span in enumerate(calls):
        a = _attrs(span)
        tr = Transition(prompt_ids=[int(x) for x in a["prompt_token_ids"]],
                        response_ids=[int(x) for x in a["response_token_ids"]],
                        logprobs=[float(x) for x in a.get(_LL + "logprobs", [])],
                        prompt=a[_LL + "prompt"], response=a[_LL + "response"],
                        role=a.get("gen_ai.agent.name", ""), turn=_turn(span),
                        reward=float(a[_LL + "reward"]),
                        temperature=float(a["gen_ai.request.temperature"]),
                        finish_reason=list(a["gen_ai.response.finish_reasons"])[0],
                        meta=json.loads(a[_LL + "meta"]),
                        ret=_opt(a, "ret"), advantage=_opt(a, "advantage"), value=_opt(a, "value"))
        if tr.turn != i:
            raise ValueError(f"transition turns are not 0..{len(calls) - 1} (found {tr.turn} at {i})")
        if tr.logprobs and len(tr.logprobs) != len(tr.response_ids):
            raise ValueError(f"turn {i}: {len(tr.logprobs)} logprobs for "
                             f"{len(tr.response_ids)} response tokens")
        events = [float(_attrs(e)["value"]) for e in span.get("events", [])
                  if e.get("name") == "gen_ai.reward"]
        if events and not math.isclose(sum(events), tr.reward, rel_tol=1e-9, abs_tol=1e-12):
            raise ValueError(f"turn {i}: reward attribute {tr.reward} contradicts its events {events}")
        transitions.append(tr)
    traj = Trajectory(transitions=transitions, meta=json.loads(ra[_LL + "meta"]),
                      **{name: str(ra[_LL + name]) for name in _TRAJ_FIELDS})
    total = float(ra.get(_LL + "total_reward", traj.total_reward))
    if not math.isclose(total, traj.total_reward, rel_tol=1e-9, abs_tol=1e-9):
        raise ValueError(f"total reward {total} contradicts the turns' rewards ({traj.total_reward})")
    problem = rewards_problem(traj)
    if problem:
        raise ValueError(problem)
    return traj


def _opt(attrs: dict[str, Any], name: str) -> float | None:
    value = attrs.get(_LL + name)
    return None if value is None else float(value)


def _hex_id(value: str) -> str:
    """OTLP/JSON ids are hex; protobuf's JSON mapping (an OTLP/HTTP body) gives base64."""
    if value and all(c in "0123456789abcdefABCDEF" for c in value) and len(value) in (16, 32):
        return value.lower()
    return base64.b64decode(value).hex() if value else ""


def _attrs(obj: dict[str, Any]) -> dict[str, Any]:
    return {kv["key"]: _any_value(kv.get("value", {})) for kv in obj.get("attributes", [])}


def _any_value(v: dict[str, Any]) -> Any:
    """Decode an OTLP ``AnyValue`` (JSON mapping: int64 as string, arrays nested)."""
    if "stringValue" in v:
        return v["stringValue"]
    if "boolValue" in v:
        return bool(v["boolValue"])
    if "intValue" in v:
        return int(v["intValue"])
    if "doubleValue" in v:
        return float(v["doubleValue"])
    if "arrayValue" in v:
        return [_any_value(x) for x in v["arrayValue"].get("values", [])]
    if "kvlistValue" in v:
        return {kv["key"]: _any_value(kv.get("value", {})) for kv in v["kvlistValue"].get("values", [])}
    if "bytesValue" in v:
        return base64.b64decode(v["bytesValue"])
    return None  # an empty AnyValue (e.g. an empty array attribute)
