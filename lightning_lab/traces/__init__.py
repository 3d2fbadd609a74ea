"""Traces in and out: a ``Batch`` as OpenTelemetry spans (OTLP-JSON, OTLP/HTTP), and Agent
Lightning's stored spans as a ``Batch``. Imported on use; opentelemetry loads only here."""
