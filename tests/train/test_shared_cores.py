"""The update's threads while asynchronous rollouts sample beside it (``threads.SharedCores``)."""

from __future__ import annotations

import torch

import lightning_lab as ll
from lightning_lab.train.threads import SharedCores


class Recording(torch.nn.Linear):
    """A layer that notes the update thread's torch threads when its forward runs."""

    def __init__(self, seen: list[int]):
        super().__init__(4, 4)
        self.seen = seen

    def forward(self, x):
        self.seen.append(torch.get_num_threads())
        return super().forward(x)


def test_the_update_yields_a_core_while_sampling_and_takes_it_back_in_forward_or_backward():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen: list[int] = []
        layers = [Recording(seen) for _ in range(3)]
        sampling = [True]
        x = torch.ones(2, 4, requires_grad=True)
        with SharedCores(layers, lambda: sampling[0], sampler_threads=1):
            assert torch.get_num_threads() == 1
            out = layers[2](layers[1](layers[0](x)))  # sampling all along: 1 thread throughout
            sampling[0] = False  # the rollouts finish during the backward
            out.sum().backward()
            assert seen == [1, 1, 1] and torch.get_num_threads() == 2  # widened by a grad hook
            sampling[0] = True
            torch.set_num_threads(1)
            layers[0](x)
            sampling[0] = False
            layers[1](x)  # the forward's next layer takes both threads back
            assert seen[3:] == [1, 2]
        assert torch.get_num_threads() == 2
        with SharedCores(layers, lambda: False, sampler_threads=1):  # already done: no change
            layers[0](x)
        assert seen[-1] == 2
        torch.set_num_threads(1)
        with SharedCores(layers, lambda: True, sampler_threads=1):  # one thread: nothing to yield
            layers[0](x)
        assert seen[-1] == 1 and all(not layer._forward_pre_hooks for layer in layers)
    finally:
        torch.set_num_threads(before)


def test_an_asynchronous_step_restores_the_update_threads(tiny_lora):
    """With max_staleness=1 the update runs beside the next step's sampling; after it the
    update thread has its threads back and training went on."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        def agent(task):
            ll.reward(float(len(tiny_lora.chat([{"role": "user", "content": task["q"]}],
                                               max_new_tokens=8)) % 3))

        trainer = ll.PPOTrainer(tiny_lora, agent, [{"task_id": "a", "q": "hi"}], config=ll.PPOConfig(
            tasks_per_step=1, group_size=4, max_staleness=1, minibatch_size=4))
        states = trainer.fit(2, progress=False)
        trainer.settle()
        assert torch.get_num_threads() == 2 and len(states) == 2
        assert not any(layer._forward_pre_hooks for layer in
                       tiny_lora.model.modules() if hasattr(layer, "_forward_pre_hooks")
                       and type(layer).__name__.endswith("DecoderLayer"))
    finally:
        torch.set_num_threads(before)
