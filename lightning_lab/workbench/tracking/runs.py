"""Read back what an offline W&B run recorded (config, history, summary, tables, artifacts)."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any

__all__ = ["find_runs", "read_run"]


def find_runs(root: str | Path) -> list[Path]:
    """Run folders under ``root`` (``root/wandb/*run-*`` or ``root/*run-*``), oldest first."""
    root = Path(root)
    base = root / "wandb" if (root / "wandb").is_dir() else root
    return sorted(p for p in base.glob("*run-*") if p.is_dir() and list(p.glob("run-*.wandb")))


def read_run(run_dir: str | Path, wait: float = 15.0) -> dict[str, Any]:
    """What a (offline) run recorded, parsed from its ``.wandb`` log.

    Returns ``{"id", "group", "config", "history": [dict per log call], "summary", "tables":
    {key: [(columns, data), ...]}, "artifacts": [names]}``. The log is a LevelDB-style record file
    of protobuf ``Record`` messages; this reader exists because offline runs write no
    ``wandb-summary.json``/``config.yaml`` and wandb ships no Python reader any more.
    ``run.finish()`` can return before the writer has flushed, so this re-reads for up to ``wait``
    seconds until the run's exit record is there (``finished`` tells whether it was).
    """
    deadline = time.monotonic() + wait
    while True:
        out = _parse_run(Path(run_dir))
        if out["finished"] or time.monotonic() > deadline:
            return out
        time.sleep(0.2)


def _parse_run(run_dir: Path) -> dict[str, Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    log_file = next(run_dir.glob("run-*.wandb"))
    out: dict[str, Any] = {"id": "", "group": "", "config": {}, "history": [], "summary": {},
                           "tables": {}, "artifacts": [], "finished": False}
    for raw in _leveldb_records(log_file.read_bytes()):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out["id"], out["group"] = rec.run.run_id, rec.run.run_group
            for item in rec.run.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in rec.config.update:
                out["config"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "history":
            out["history"].append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                   for item in rec.history.item})
        elif kind == "summary":
            for item in rec.summary.update:
                out["summary"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "artifact":
            out["artifacts"].append(rec.artifact.name)
        elif kind == "exit":
            out["finished"] = True
    out["config"].pop("_wandb", None)
    for path in sorted((run_dir / "files" / "media" / "table").rglob("*.table.json")):
        key = str(path.relative_to(run_dir / "files" / "media" / "table").parent / path.name.rsplit("_", 2)[0])
        table = json.loads(path.read_text())
        out["tables"].setdefault(key, []).append((table["columns"], table["data"]))
    return out


_BLOCK, _HEADER = 32768, 7


def _leveldb_records(data: bytes):
    """Reassemble the records of a W&B ``.wandb`` file (LevelDB log format, 32 KiB blocks)."""
    if data[:4] != b":W&B":
        raise ValueError("not a W&B run log")
    pos, pending = _HEADER, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        pos += _HEADER
        if kind == 0 and length == 0:
            break
        pending += data[pos:pos + length]
        pos += length
        if kind in (1, 4):  # FULL or LAST
            yield pending
            pending = b""
