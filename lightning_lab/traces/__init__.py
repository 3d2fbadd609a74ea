"""Traces in and out: a ``Batch`` as OpenTelemetry spans (OTLP-JSON, OTLP/HTTP), and Agent
Lightning's stored spans as a ``Batch``. opentelemetry itself is imported only when used."""

from . import agentlightning, otel
from .agentlightning import load_agentlightning
from .otel import export_otlp_http, load_otlp_json, save_otlp_json

__all__ = ["agentlightning", "otel", "load_agentlightning", "export_otlp_http", "load_otlp_json",
           "save_otlp_json"]
