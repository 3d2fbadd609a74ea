"""RAG environment: multi-hop question answering with BM25 retrieval (HotpotQA-style).

Data: generated fictional multi-hop questions (default; names the model cannot know) or a
HotpotQA JSON file. Agent: query -> retrieve -> reformulate -> retrieve -> answer, rewarded by
answer F1. Registers itself as `ll.envs.get("rag")`.
"""

from __future__ import annotations

from pathlib import Path
from statistics import fmean
from typing import Any

import lightning_lab as ll

from .agent import RagConfig, extract_answer, make_agent
from .generate import generate_tasks
from .hotpotqa import HotpotQAFormatError, HotpotQAFormatWarning, load_hotpotqa
from .retrieval import BM25Index, Hit, retrieve
from .reward import answer_em, answer_f1, normalize_answer, support_recall
from .tasks import Corpus, Paragraph, RagTask

__all__ = [
    "BM25Index", "Corpus", "Hit", "HotpotQAFormatError", "HotpotQAFormatWarning", "Paragraph",
    "RagConfig", "RagTask", "answer_em", "answer_f1", "extract_answer", "generate_tasks",
    "load_hotpotqa", "load_tasks", "make_agent", "normalize_answer", "retrieve", "summarize",
    "support_recall",
]


def load_tasks(split: str = "train", data: str | Path | None = None, seed: int = 0,
               limit: int | None = None) -> list[RagTask]:
    """Tasks of a split: generated (data=None or "generated") or read from a HotpotQA JSON file.

    For a file, `split` and `seed` are ignored (the file is the split). `limit` keeps the first
    tasks; the open-setting corpus still holds the paragraphs of every task loaded, so a small
    limit does not make open retrieval easier.
    """
    if data is None or str(data) == "generated":
        tasks = generate_tasks(seed=seed, split=split)
    else:
        path = Path(data)
        if not path.is_file():
            raise FileNotFoundError(f"rag: no HotpotQA file at {path} (or pass data='generated')")
        tasks = load_hotpotqa(path)
    return tasks if limit is None else tasks[:limit]


def summarize(batch: Any) -> dict[str, float]:
    """Mean answer F1/EM and support recall over a batch; rollouts that failed count as 0."""
    trajectories = list(batch)
    if not trajectories:
        return {"f1": 0.0, "em": 0.0, "sp_recall": 0.0, "n": 0.0, "failed": 0.0}
    metas = [t.meta for t in trajectories]
    summary = {
        "f1": fmean(float(m.get("f1", 0.0)) for m in metas),
        "em": fmean(float(m.get("em", 0.0)) for m in metas),
        "sp_recall": fmean(float(m.get("sp_recall", 0.0)) for m in metas),
        "hops": fmean(float(m.get("hops", 0.0)) for m in metas),
        "n": float(len(trajectories)),
        "failed": float(sum(getattr(t, "status", "ok") != "ok" for t in trajectories)),
    }
    for kind in ("bridge", "comparison"):
        scores = [float(m.get("f1", 0.0)) for m in metas if m.get("kind") == kind]
        if scores:
            summary[f"f1_{kind}"] = fmean(scores)
    return summary


ll.envs.register(ll.envs.Environment(
    name="rag",
    load_tasks=load_tasks,
    make_agent=make_agent,
    summarize=summarize,
    description="multi-hop QA with BM25 retrieval (generated fictional KB or HotpotQA), reward = answer F1",
))
