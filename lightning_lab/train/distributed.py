"""Data parallel training over processes (``torchrun`` / ``accelerate launch``), without DDP's wrapper.

Why not ``DistributedDataParallel``: a PPO step is not one forward/backward per rank. Each rank
runs its share of the step's rollouts (that is where the time goes), then every rank needs the
*whole* batch: group baselines and batch-normalised advantages mix trajectories sampled on
different ranks, and rank 0 logs all of it. So the step is

1. tasks: every rank draws the same task list (same seed), and runs ``tasks[rank::world]``;
2. ``gather_batch``: trajectories are exchanged (``all_gather_object``; they are small) and put
   back in the single-process order, so credit, minibatch order and metrics are identical on
   every rank and equal to a one-process run on the same rollouts;
3. update: each minibatch is the same on every rank; a rank runs forward/backward only on the rows
   it sampled itself, with each row weighted by its share of the *global* minibatch tokens, and
   ``all_reduce_grads`` sums the gradients. Every rank then clips and steps the identical
   gradient, so parameters stay bit-identical without broadcasting them.

The process group is gloo on CPU and NCCL on CUDA, set up from torchrun's environment variables
(``accelerate launch`` sets the same ones). Models too large for one device need sharded
parameters instead (FSDP, e.g. ``accelerate launch --use_fsdp``); this module does not do that.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch

__all__ = ["DataParallel"]


@dataclass(frozen=True)
class DataParallel:
    """This process's place in a data-parallel group; the default is a single process."""

    rank: int = 0
    world_size: int = 1
    owns_group: bool = False
    """The process group was started here (``from_env``), so ``close`` ends it; a group the
    caller started stays theirs."""

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, checkpoints, evaluates and syncs adapters."""
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str = "cpu") -> "DataParallel":
        """Join the process group torchrun/accelerate describe in the environment, if any."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        owns = not dist.is_initialized()
        if owns:
            backend = "nccl" if device.startswith("cuda") else "gloo"
            if backend == "nccl":  # NCCL binds a process to the GPU current at init
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend=backend)
        return cls(dist.get_rank(), dist.get_world_size(), owns_group=owns)

    def close(self) -> None:
        """After a finished run, on every process: wait for the others, then end the group.

        A process that left while a peer still held the group died in gloo's threads:
        ``terminate called without an active exception`` (SIGABRT) on process 1 in 1 of 8
        two-process runs under load, after its last step, while process 0 was still evaluating;
        ending the group without waiting still did so 1 in 12. The wait may be long (process 0's
        final evaluation), longer than gloo's default 30-minute timeout, hence its own. Not
        called when a process fails (torchrun stops the others)."""
        if not (self.enabled and self.owns_group):
            return
        import torch.distributed as dist

        if dist.is_initialized():
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=datetime.timedelta(hours=24))
            else:
                dist.barrier()
            dist.destroy_process_group()

    @staticmethod
    def local_device(device: str) -> str:
        """``cuda`` becomes this process's own GPU (``cuda:$LOCAL_RANK``)."""
        if device == "cuda" and "LOCAL_RANK" in os.environ:
            return f"cuda:{int(os.environ['LOCAL_RANK'])}"
        return device

    # ---- collectives (no-ops for one process) ---------------------------------------------
    def shard(self, items: Sequence[Any]) -> list[Any]:
        return list(items[self.rank::self.world_size])

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (pickled by torch.distributed between our processes)."""
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def all_reduce_grads(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Sum gradients over ranks in one flat buffer (a rank with no rows contributes zeros)."""
        if not self.enabled:
            return
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
            offset += n

    def gather_batch(self, local: Any, n_tasks: int, group_size: int) -> tuple[Any, set[str]]:
        """All ranks' trajectories in single-process order (task-major), plus this rank's ids.

        ``local`` holds the trajectories of ``tasks[rank::world]`` as ``run_rollouts`` returns
        them: ``group_size`` consecutive ones per task.
        """
        own = {t.traj_id for t in local.trajectories}
        if not self.enabled:
            return local, own
        from ..records import Batch

        parts = self.gather(local.trajectories)
        ordered = []
        for i in range(n_tasks):
            j = i // self.world_size
            ordered.extend(parts[i % self.world_size][j * group_size:(j + 1) * group_size])
        return Batch(ordered), own
