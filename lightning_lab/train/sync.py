"""Live weight sync: the trainer's LoRA adapter into an OpenAI-compatible server (vLLM), by version.

Why adapters and not weights: vLLM can add a LoRA adapter to a running server
(``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``, ``--enable-lora``) through ``POST
/v1/load_lora_adapter {"lora_name", "lora_path"}`` and serve it as ``model=<lora_name>``; a
LoRA adapter is megabytes, written in PEFT's format (``export.save_adapter``). Each sync is a new
name, ``<prefix>-v<step>``, so a request names exactly the weights it wants and a transition can
record which version sampled it; older versions are unloaded after the new one is live.

Consistency: a sync runs at the start of a trainer step, before any rollout. It either completes
(adapter written, loaded into every server of the backend's pool, the backend switched to the new
name) or raises ``AdapterSyncError`` naming the server and the version, with the servers that had
loaded it unloaded again, the previous version still current and the trainer's step not started;
the next ``step()`` retries the same version from scratch. The one exception is a server that
gives no answer while the pool allows going on without it (``allow_degraded``): it is dropped
(``ServerPool.fail``) and the version goes live on the rest.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["AdapterSync", "AdapterSyncError", "SyncConfig", "sync_everywhere"]


class AdapterSyncError(RuntimeError):
    """Loading an adapter version into the inference server failed; nothing was switched."""


@dataclass
class SyncConfig:
    export_dir: str
    """Where adapter versions are written; the server must be able to read this path."""
    every: int = 1
    """Trainer steps between syncs (1 = rollouts are always on-policy up to numerics)."""
    prefix: str = "ll-policy"
    """Adapter names are ``<prefix>-v<step>``."""
    keep_loaded: int = 1
    """Versions left loaded on the server (older ones are unloaded after a successful sync)."""
    keep_files: int = 2
    """Exported adapter folders kept on disk."""
    timeout_s: float = 120.0
    """Per-request timeout of the management calls."""

    def __post_init__(self) -> None:
        for name in ("every", "keep_loaded", "keep_files"):
            if getattr(self, name) < 1:
                raise ValueError(f"SyncConfig.{name} must be >= 1, got {getattr(self, name)}")


class AdapterSync:
    """Exports the policy's adapter and loads it into the server behind ``backend``.

    ``backend`` is the ``RemoteBackend`` or ``VLLMEngine`` the rollouts use (its ``name`` is
    switched to the newest version, so every later request samples from it); it supplies the
    servers (``backend.pool``) and the API key.
    """

    def __init__(self, backend: Any, config: SyncConfig):
        self.backend = backend
        self.config = config
        self.version: str | None = None
        """The adapter name rollouts use now; None before the first sync."""
        self.synced_step: int | None = None
        self._loaded: list[str] = []
        self._attempted: set[str] = set()

    @property
    def servers(self) -> list[str]:
        """Where versions are loaded: every server requests may go to."""
        return self.backend.pool.live

    def due(self, step: int) -> bool:
        return self.synced_step is None or step - self.synced_step >= self.config.every

    def version_name(self, step: int) -> str:
        return f"{self.config.prefix}-v{step}"

    def sync(self, policy: Any, step: int) -> str:
        """Export the adapter as version ``step``, load it, switch rollouts to it; returns its name."""
        from .export import save_adapter

        name = self.version_name(step)
        path = (Path(self.config.export_dir) / name).resolve()
        try:
            save_adapter(policy, path, step=step)
        except OSError as exc:
            raise AdapterSyncError(f"could not write adapter version {name} to {path} for "
                                   f"{', '.join(self.servers)}: {exc}") from exc
        retry, loaded = name in self._attempted, []
        self._attempted.add(name)
        try:
            for server in self.servers:
                if retry:  # a failed or timed-out try may have loaded it there
                    self._post(server, "/unload_lora_adapter", {"lora_name": name}, name,
                               quiet=True, warn=False)
                if self._post(server, "/load_lora_adapter",
                              {"lora_name": name, "lora_path": str(path)}, name):
                    loaded.append(server)
        except AdapterSyncError:
            for server in loaded:  # all or nothing: no server keeps a version not live
                self._post(server, "/unload_lora_adapter", {"lora_name": name}, name, quiet=True)
            raise
        if not loaded:
            raise AdapterSyncError(f"adapter version {name}: no server left to load it into "
                                   f"({self.backend.pool.report()})")
        self._attempted.discard(name)
        self._loaded.append(name)
        self.backend.name = name  # from here on, rollouts sample from the new version
        self.version, self.synced_step = name, step
        self._retire()
        return name

    def adopt(self, version: str, step: int) -> None:
        """Switch this process's rollouts to a version another process synced (data parallel:
        rank 0 exports and loads, the other ranks only rename their requests)."""
        self.backend.name = version
        self.version, self.synced_step = version, step

    def _retire(self) -> None:
        """Unload versions beyond ``keep_loaded`` and delete old folders; failures only warn."""
        import shutil

        while len(self._loaded) > self.config.keep_loaded:
            old = self._loaded.pop(0)
            for server in self.servers:
                self._post(server, "/unload_lora_adapter", {"lora_name": old}, old, quiet=True)
        pattern = re.compile(rf"{re.escape(self.config.prefix)}-v(\d+)")
        versions = [(int(m.group(1)), p) for p in Path(self.config.export_dir).iterdir()
                    if p.is_dir() and (m := pattern.fullmatch(p.name))]
        folders = [p for _, p in sorted(versions)]
        for old_dir in folders[:-self.config.keep_files]:
            if old_dir.name not in self._loaded:
                shutil.rmtree(old_dir, ignore_errors=True)

    def _post(self, server: str, route: str, body: dict[str, Any], version: str,
              quiet: bool = False, warn: bool = True) -> bool:
        """POST a management call to ``server``; True if it succeeded. A failure raises
        ``AdapterSyncError`` unless ``quiet`` (then it warns, or with ``warn=False`` passes
        silently: a clean-up that found nothing), or the server gave no answer and the pool
        dropped it (``allow_degraded``: False)."""
        import httpx

        what = f"{route.strip('/')} of adapter version {version} at {server}"
        try:
            response = httpx.post(server + route, json=body, headers=dict(self.backend.headers),
                                  timeout=self.config.timeout_s)
            if response.status_code < 400:
                return True
            problem, answered = (f"refused with HTTP {response.status_code}: "
                                 f"{_message(response)}"), True
        except httpx.TimeoutException:
            problem, answered = f"timed out after {self.config.timeout_s:g} s", False
        except httpx.HTTPError as exc:
            problem, answered = f"server unreachable ({type(exc).__name__}: {exc})", False
        if quiet:
            if warn:
                warnings.warn(f"{what} {problem}", stacklevel=3)
            return False
        pool = self.backend.pool
        if not answered and pool.allow_degraded and pool.fail(server, f"{what} {problem}"):
            return False
        current = f"rollouts stay on {self.version}" if self.version else "no version is live yet"
        raise AdapterSyncError(f"{what} {problem}; {current}, the next step retries")


def sync_everywhere(sync: AdapterSync, policy: Any, step: int, parallel: Any) -> None:
    """``sync.sync`` under data parallelism (``DataParallel``): process 0 loads the version into
    the servers, every process learns the outcome, so all fail or all switch together."""
    error = None
    if parallel.is_main:
        try:
            sync.sync(policy, step)
        except AdapterSyncError as exc:
            error = str(exc)
    error, version = parallel.broadcast((error, sync.version))
    if error is not None:
        raise AdapterSyncError(error)
    if not parallel.is_main:
        sync.adopt(version, step)


def _message(response: Any) -> str:
    try:
        body = response.json()
        return str(body.get("error", {}).get("message") or body.get("message") or body)[:500]
    except ValueError:
        return response.text[:500]
