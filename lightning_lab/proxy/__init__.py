"""OpenAI-compatible endpoint over a policy: trace unchanged HTTP agents, batch their calls.

    with ll.serve(policy) as server:                       # 127.0.0.1, free port
        with server.rollout(task_id="t1") as r:            # r.base_url, r.trajectory
            openai.OpenAI(base_url=r.base_url, api_key="-").chat.completions.create(...)

``/v1/...`` (chat completions with token streaming, completions, responses, models) is served
untraced; ``/rollout/<id>/v1/...`` (or Agent Lightning's ``/rollout/<id>/attempt/<aid>/v1/...``)
appends every call to that rollout's trajectory. ``http_agent(server, fn)`` lets ``PPOTrainer``
train an OpenAI-SDK agent. FastAPI and uvicorn are imported here only, so ``import lightning_lab``
stays light.
"""

from __future__ import annotations

from .backends import Backend, LocalBackend, RemoteBackend
from .cli import add_cli
from .config import ServeConfig
from .protocol import ChatRequest, ProtocolError, parse_chat_request
from .registry import RolloutRegistry, TraceStats
from .server import ProxyServer, RolloutHandle, http_agent, reward_url, serve

__all__ = ["serve", "ProxyServer", "ServeConfig", "RolloutHandle", "http_agent", "reward_url",
           "Backend", "LocalBackend", "RemoteBackend", "RolloutRegistry", "TraceStats",
           "ChatRequest", "ProtocolError", "parse_chat_request", "add_cli"]
