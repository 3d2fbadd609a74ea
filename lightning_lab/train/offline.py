"""Offline PPO: the trainer's update on a stored batch instead of fresh rollouts.

A batch saved by a run (``trajectories.jsonl``), exported as OpenTelemetry spans, or imported
from Agent Lightning carries the behaviour logprobs of every response token: the "old" policy of
PPO's ratio. With them, the clipped update of ``PPOTrainer.learn`` applies unchanged, and on the
very batch a run sampled it reproduces that run's update. Without them the ratio is undefined;
such a batch can still be used for SFT (``sft.SFTTrainer``), and the error says so.
"""

from __future__ import annotations

from typing import Any

from ..records import Batch

__all__ = ["OfflineBatchError", "check_offline_batch", "offline_ppo_step"]


class OfflineBatchError(ValueError):
    """A stored batch lacks what offline PPO needs; the message names the field and record."""


def check_offline_batch(batch: Batch, *, roles: tuple[str, ...] | None = None) -> None:
    """Raise ``OfflineBatchError`` unless every trainable transition has one behaviour logprob
    per response token (field ``Transition.logprobs``)."""
    if not len(batch):
        raise OfflineBatchError("offline PPO got an empty batch")
    for i, traj in enumerate(batch):
        if not traj.usable:
            continue
        for tr in traj.transitions:
            if not tr.trainable or (roles is not None and tr.role not in roles):
                continue
            if len(tr.logprobs) != len(tr.response_ids):
                what = "missing" if not tr.logprobs else (
                    f"{len(tr.logprobs)} values for {len(tr.response_ids)} response tokens")
                source = tr.meta.get("source") or traj.meta.get("source") or "batch"
                raise OfflineBatchError(
                    f"offline PPO needs behaviour logprobs: field 'logprobs' is {what} in "
                    f"trajectory {i} (traj_id {traj.traj_id!r}, task {traj.task_id!r}), transition "
                    f"{tr.turn} (role {tr.role!r}, from {source}); record them when sampling, or "
                    "train on this batch with SFT, which does not need them")


def offline_ppo_step(trainer: Any, batch: Batch) -> Any:
    """One PPO update of ``trainer`` on a stored ``batch``; returns the ``StepState``.

    Advantages are recomputed by the trainer's credit strategy from the stored rewards (stored
    ``ret``/``advantage`` values are overwritten), exactly as the online step does.
    """
    check_offline_batch(batch, roles=trainer.config.trainable_roles)
    return trainer.learn(batch)
