"""LangChain/LangGraph callback: graph node names become transition roles.

One added line in the user's code: ``graph.invoke(inputs, config={"callbacks":
[ll.LangGraphRoles()]})``. The handler is created inside the rollout (``http_agent`` runs the agent
inside one), remembers which LangGraph node started each chat-model run (``metadata
["langgraph_node"]``), and when the run ends finds the transition the proxy recorded for that
completion id (``llm_output["id"]`` == the proxy's ``meta["request_id"]``) and names its role. Matching
by completion id, not by order, keeps it right when nodes run in parallel.
"""

from __future__ import annotations

import threading
from typing import Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler

from lightning_lab import tracing
from lightning_lab.records import Trajectory

__all__ = ["LangGraphRoles"]


class LangGraphRoles(BaseCallbackHandler):
    """Set ``transition.role`` to the LangGraph node (or chain ``run_name``) that made the call."""

    raise_error = False  # a labelling problem must never break the user's graph

    def __init__(self, trajectory: Trajectory | None = None, override: bool = False):
        self.trajectory = trajectory if trajectory is not None else tracing.active_trajectory()
        if self.trajectory is None:
            raise tracing.TracingError("LangGraphRoles() needs an open rollout (create it inside "
                                       "the agent function) or an explicit trajectory")
        self.override = override
        """Also replace roles the call already had (from ``X-LL-Role``/``metadata``)."""
        self._nodes: dict[UUID, str] = {}
        self._lock = threading.Lock()
        self.unmatched = 0
        """Completions whose transition was not found (e.g. streamed, or another backend)."""

    def on_chat_model_start(self, serialized: Any, messages: Any, *, run_id: UUID,
                            metadata: dict[str, Any] | None = None, **kwargs: Any) -> None:
        node = (metadata or {}).get("langgraph_node") or kwargs.get("name")
        if node:
            with self._lock:
                self._nodes[run_id] = str(node)

    def on_llm_end(self, response: Any, *, run_id: UUID, **kwargs: Any) -> None:
        with self._lock:
            node = self._nodes.pop(run_id, None)
        completion_id = (getattr(response, "llm_output", None) or {}).get("id")
        if node is None or completion_id is None:
            return
        found = False
        for tr in self.trajectory.transitions:
            if tr.meta.get("request_id") == completion_id:
                found = True
                if self.override or tr.role in ("", tracing.DEFAULT_ROLE):
                    tr.role = node
        self.unmatched += not found

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        with self._lock:
            self._nodes.pop(run_id, None)
