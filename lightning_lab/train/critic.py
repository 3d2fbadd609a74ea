"""A small value head for the ``value`` credit strategy.

V(s_t) is read from the policy's own last hidden state at the final prompt token of transition t
(the state the agent was in just before the call). The head is an MLP on *detached* features: the
critic costs no second model and no extra forward pass during the update, and its regression loss
cannot pull the policy's LoRA weights around (the classic shared-trunk instability at small batch).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ValueHead"]


class ValueHead(nn.Module):
    def __init__(self, hidden_size: int, width: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, width), nn.Tanh(),
                                 nn.Linear(width, 1))
        nn.init.zeros_(self.net[-1].weight)  # start at V=0: GAE then begins as plain returns
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, H) detached hidden states -> (B,) values."""
        return self.net(hidden.detach().float()).squeeze(-1)
