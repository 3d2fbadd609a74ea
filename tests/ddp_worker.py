"""One PPO step of the tiny model, run alone (``python ddp_worker.py OUT``) or data parallel
(``torchrun --nproc-per-node 2 ddp_worker.py OUT``); writes each rank's trained weights and metrics.

Rollouts are greedy and rewards a function of the task, so one process and two processes see the
same batch; the ``batch`` baseline needs every rank's trajectories, so credit depends on the gather.
"""

import json
import sys
from pathlib import Path

import torch

import lightning_lab as ll
from lightning_lab.train.distributed import DataParallel



def make_agent(policy):
    def agent(task):
        for role in ("writer", "checker"):
            with ll.role(role):
                policy.chat(task["q"], max_new_tokens=5)
            ll.reward(task["k"] * (1.0 if role == "writer" else 0.5))

    return agent


def main(out: Path) -> None:
    torch.set_num_threads(1)
    parallel = DataParallel.from_env("cpu")
    policy = ll.models.load("tiny", lora=True)
    tasks = [{"task_id": f"t{i}", "q": f"Question number {i}: " + "go " * i, "k": float(i % 3)}
             for i in range(4)]
    config = ll.PPOConfig(tasks_per_step=4, group_size=1, temperature=0.0, minibatch_size=3,
                          lr=1e-3, rollout_workers=2, skip_zero_advantage=False)
    trainer = ll.PPOTrainer(policy, make_agent(policy), tasks, config=config, parallel=parallel,
                            credit=ll.credit.get("uniform", baseline="batch"))
    state = trainer.step()
    weights = {n: p.detach().clone() for n, p in policy.model.named_parameters() if p.requires_grad}
    torch.save(weights, out / f"weights-{parallel.rank}-of-{parallel.world_size}.pt")
    rows = [[tr.response_ids for tr in t.transitions] for t in state.batch.trajectories]
    (out / f"metrics-{parallel.rank}-of-{parallel.world_size}.json").write_text(
        json.dumps({"metrics": state.metrics, "rows": rows}))
    if parallel.enabled:
        import torch.distributed as dist

        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
