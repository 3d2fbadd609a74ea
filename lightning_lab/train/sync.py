"""Live weight sync: the trainer's LoRA adapter into an OpenAI-compatible server (vLLM), by version.

Why adapters and not weights: vLLM can add a LoRA adapter to a running server
(``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``, ``--enable-lora``) through ``POST
/v1/load_lora_adapter {"lora_name", "lora_path"}`` and serve it as ``model=<lora_name>``; a
LoRA adapter is megabytes, written in PEFT's format (``export.save_adapter``). Each sync is a new
name, ``<prefix>-v<step>``, so a request names exactly the weights it wants and a transition can
record which version sampled it; older versions are unloaded after the new one is live.

A policy with several adapters (one per role, ``inference/multi_lora``) syncs each as its own
LoRA module, ``<prefix>-<adapter>-v<step>`` (exported to ``<prefix>-v<step>/<adapter>``), as vLLM
serves several LoRAs side by side; a version is every adapter's module, and the backend's
``adapter_models`` (adapter -> module) tells it which one a request of each role names.

Consistency: a sync runs at the start of a trainer step, before any rollout. It either completes
(adapters written, every module loaded into every server of the backend's pool, the backend switched to the new
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

from ..inference.multi_lora import DEFAULT, adapter_names

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
    """Adapter names are ``<prefix>-v<step>`` (several adapters: ``<prefix>-<adapter>-v<step>``)."""
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
    """Exports the policy's adapters and loads them into the servers behind ``backend``.

    ``backend`` is the ``RemoteBackend`` or ``VLLMEngine`` the rollouts use (its ``name`` is
    switched to the newest version of the default adapter and its ``adapter_models`` to every
    adapter's, so every later request samples from them); it supplies the servers
    (``backend.pool``) and the API key.
    """

    def __init__(self, backend: Any, config: SyncConfig):
        self.backend = backend
        self.config = config
        self.versions: dict[str, str] = {}
        """Adapter -> the module its rollouts use now; empty before the first sync."""
        self.synced_step: int | None = None
        self._loaded: list[tuple[str, list[str]]] = []
        """Versions live on the servers, oldest first: (folder name, module names)."""
        self._attempted: set[str] = set()

    @property
    def version(self) -> str | None:
        """The default adapter's module rollouts use now (the only one of a single adapter)."""
        return self.versions.get(DEFAULT, next(iter(self.versions.values()), None))

    @property
    def servers(self) -> list[str]:
        """Where versions are loaded: every server requests may go to."""
        return self.backend.pool.live

    def due(self, step: int) -> bool:
        return self.synced_step is None or step - self.synced_step >= self.config.every

    def version_name(self, step: int) -> str:
        """Version ``step``'s folder, and its module name for a single adapter."""
        return f"{self.config.prefix}-v{step}"

    def current(self, adapter: str) -> str | None:
        """The module rollouts of ``adapter`` sample from now."""
        return self.versions.get(adapter, self.version)

    def modules(self, policy: Any, step: int) -> dict[str, tuple[str, Path]]:
        """Adapter -> (module name, exported folder) of version ``step``: the one adapter as
        ``<prefix>-v<step>``, or with several one module each (``<prefix>-<adapter>-v<step>``)."""
        root = (Path(self.config.export_dir) / self.version_name(step)).resolve()
        names = adapter_names(getattr(policy, "model", policy)) or [DEFAULT]
        if len(names) == 1:
            return {names[0]: (self.version_name(step), root)}
        return {a: (f"{self.config.prefix}-{a}-v{step}", root / a) for a in names}

    def sync(self, policy: Any, step: int) -> str:
        """Export the adapters as version ``step``, load every module into every server, switch
        rollouts to them; returns the default adapter's module name."""
        folder = self.version_name(step)
        modules = self.modules(policy, step)
        if len(modules) > 1 and not hasattr(self.backend, "model_for"):
            raise ValueError(f"adapters {', '.join(modules)} need requests routed by role, which "
                             f"{type(self.backend).__name__} does not do; sample through the vLLM "
                             f"rollout engine (inference.vllm_engine.VLLMEngine)")
        self._export(policy, step, len(modules))
        retry, loaded = folder in self._attempted, []
        self._attempted.add(folder)
        try:
            for server in self.servers:
                self._load_into(server, list(modules.values()), retry, loaded)
        except AdapterSyncError:
            for server, name in loaded:  # all or nothing: no server keeps a version not live
                self._post(server, "/unload_lora_adapter", {"lora_name": name}, name, quiet=True)
            raise
        if not loaded:
            raise AdapterSyncError(f"adapter version {folder}: no server left to load it into "
                                   f"({self.backend.pool.report()})")
        self._attempted.discard(folder)
        self._loaded.append((folder, [name for name, _ in modules.values()]))
        self._switch({a: name for a, (name, _) in modules.items()}, step)
        self._retire()
        return self.version

    def _load_into(self, server: str, modules: list[tuple[str, Path]], retry: bool,
                   loaded: list[tuple[str, str]]) -> None:
        """Load every module into ``server``, appending each success to ``loaded``; stops at a
        server the pool dropped (``allow_degraded``), raises ``AdapterSyncError`` otherwise."""
        for name, path in modules:
            if retry:  # a failed or timed-out try may have loaded it there
                self._post(server, "/unload_lora_adapter", {"lora_name": name}, name,
                           quiet=True, warn=False)
            if not self._post(server, "/load_lora_adapter",
                              {"lora_name": name, "lora_path": str(path)}, name):
                return
            loaded.append((server, name))

    def _export(self, policy: Any, step: int, n_adapters: int) -> None:
        """Write version ``step``: the adapter's PEFT folder, or one subfolder per adapter."""
        from .export import save_adapter, save_adapters

        root = (Path(self.config.export_dir) / self.version_name(step)).resolve()
        try:
            if n_adapters == 1:
                save_adapter(policy, root, step=step)
            else:
                save_adapters(policy, root, step=step)
        except OSError as exc:
            raise AdapterSyncError(f"could not write adapter version {root.name} to {root} for "
                                   f"{', '.join(self.servers)}: {exc}") from exc

    def _switch(self, versions: dict[str, str], step: int) -> None:
        """From here on, rollouts of each adapter sample from its module of ``versions``."""
        self.versions, self.synced_step = dict(versions), step
        self.backend.name = self.version
        self.backend.adapter_models = dict(versions)

    def adopt(self, versions: dict[str, str], step: int) -> None:
        """Switch this process's rollouts to a version another process synced (data parallel:
        rank 0 exports and loads, the other ranks only rename their requests)."""
        self._switch(versions, step)

    def _retire(self) -> None:
        """Unload versions beyond ``keep_loaded`` and delete old folders; failures only warn."""
        import shutil

        while len(self._loaded) > self.config.keep_loaded:
            _, old = self._loaded.pop(0)
            for server in self.servers:
                for name in old:
                    self._post(server, "/unload_lora_adapter", {"lora_name": name}, name,
                               quiet=True)
        pattern = re.compile(rf"{re.escape(self.config.prefix)}-v(\d+)")
        versions = [(int(m.group(1)), p) for p in Path(self.config.export_dir).iterdir()
                    if p.is_dir() and (m := pattern.fullmatch(p.name))]
        folders = [p for _, p in sorted(versions)]
        live = {folder for folder, _ in self._loaded}
        for old_dir in folders[:-self.config.keep_files]:
            if old_dir.name not in live:
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
    error, versions = parallel.broadcast((error, sync.versions))
    if error is not None:
        raise AdapterSyncError(error)
    if not parallel.is_main:
        sync.adopt(versions, step)


def _message(response: Any) -> str:
    try:
        body = response.json()
        return str(body.get("error", {}).get("message") or body.get("message") or body)[:500]
    except ValueError:
        return response.text[:500]
