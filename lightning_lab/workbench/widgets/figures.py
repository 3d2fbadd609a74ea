"""Pure matplotlib figures behind the widgets (training curves, advantage heatmaps).

They use ``matplotlib.figure.Figure`` directly, never pyplot, so they are safe to build from the
dashboard's training thread and do not pop up extra outputs in notebooks.
"""

from __future__ import annotations

import io
import math
from typing import Any, Sequence

from ...records import Batch

__all__ = ["CURVES", "ADAPTER_CURVES", "adapter_keys", "curves_figure", "advantage_matrix",
           "advantage_heatmaps", "figure_png"]

CURVES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("reward", ("reward_mean",)),
    ("KL to reference", ("kl",)),
    ("clip fraction", ("clip_frac",)),
    ("losses", ("policy_loss", "value_loss")),
    ("tokens / s", ("tokens_per_s",)),
    ("staleness (steps)", ("staleness_mean", "staleness_max")),
)
"""Panel title -> metric keys, in dashboard order."""

ADAPTER_CURVES: dict[str, str] = {"reward": "reward", "KL to reference": "kl",
                                  "clip fraction": "clip_frac", "losses": "loss"}
"""Panel title -> the per-adapter family it also draws: with one LoRA adapter per role the trainer
logs ``reward/<adapter>``, ``kl/<adapter>``..., one dashed line each beside the overall curve, so
a role that learns while another stalls shows in the same panel."""


def adapter_keys(history: Sequence[dict[str, float]], family: str) -> list[str]:
    """The ``<family>/<adapter>`` keys any step logged, in first-seen order (adapters can appear
    later, when a role first runs)."""
    return list(dict.fromkeys(k for h in history for k in h if k.startswith(f"{family}/")))


def curves_figure(history: Sequence[dict[str, float]], width: float = 12.0):
    """One small panel per entry of ``CURVES`` over steps; reward gets a ±std band; per-adapter
    metrics (``ADAPTER_CURVES``) are dashed lines in their family's panel."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, 2.4), layout="constrained")
    axes = fig.subplots(1, len(CURVES))
    steps = [h.get("step", i + 1) for i, h in enumerate(history)]
    for ax, (title, keys) in zip(axes, CURVES):
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
        family = ADAPTER_CURVES.get(title)
        per_adapter = adapter_keys(history, family) if family else []
        for key in (*keys, *per_adapter):
            ys = [h.get(key, math.nan) for h in history]
            if all(math.isnan(y) for y in ys):
                continue
            ax.plot(steps, ys, marker="o", markersize=3, label=key,
                    linestyle="--" if key in per_adapter else "-")
            if key == "reward_mean" and history and "reward_std" in history[0]:
                sd = [h.get("reward_std", 0.0) for h in history]
                ax.fill_between(steps, [y - s for y, s in zip(ys, sd)],
                                [y + s for y, s in zip(ys, sd)], alpha=0.2)
        if len(ax.lines) > 1:
            ax.legend(fontsize=7)
        ax.set_xlabel("step", fontsize=8)
    if not history:
        axes[0].text(0.5, 0.5, "no steps yet", ha="center", va="center", transform=axes[0].transAxes)
    return fig


def advantage_matrix(batch: Batch, field: str = "advantage") -> tuple[Any, list[str]]:
    """(n_trajectories, max_turns) array of a transition field; NaN where a turn does not exist."""
    import numpy as np

    width = max((len(t.transitions) for t in batch.trajectories), default=0)
    out = np.full((len(batch), max(width, 1)), np.nan)
    for i, traj in enumerate(batch.trajectories):
        for tr in traj.transitions:
            value = getattr(tr, field)
            if value is not None:
                out[i, tr.turn] = value
    labels = [f"{t.task_id}·{t.traj_id[:4]}" for t in batch.trajectories]
    return out, labels


def advantage_heatmaps(old: Batch, new: Batch, old_title: str = "old", new_title: str = "new",
                       height: float | None = None):
    """Old vs new per-turn advantages side by side (trajectory x turn), one shared colour scale
    centred at zero, so a change of strategy reads as a change of colour."""
    import numpy as np
    from matplotlib.figure import Figure

    a, labels = advantage_matrix(old)
    b, _ = advantage_matrix(new)
    vmax = float(np.nanmax(np.abs(np.concatenate([a.ravel(), b.ravel()])))) if np.isfinite(
        np.concatenate([a.ravel(), b.ravel()])).any() else 1.0
    vmax = vmax or 1.0
    h = height or min(8.0, 1.2 + 0.12 * len(labels))
    fig = Figure(figsize=(8.0, h), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    image = None
    for ax, mat, title in ((axes[0], a, old_title), (axes[1], b, new_title)):
        image = ax.imshow(mat, aspect="auto", cmap="RdBu", vmin=-vmax, vmax=vmax,
                          interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("turn", fontsize=8)
        ax.set_xticks(range(mat.shape[1]))
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("trajectory", fontsize=8)
    if len(labels) <= 24:
        axes[0].set_yticks(range(len(labels)), labels)
    fig.colorbar(image, ax=list(axes), label="advantage", shrink=0.9)
    return fig


def figure_png(fig: Any, dpi: int = 80) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()
