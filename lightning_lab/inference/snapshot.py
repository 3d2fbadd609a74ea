"""A frozen copy of a model's trainable weights for the decoder (asynchronous rollouts).

Why: with ``PPOConfig.max_staleness > 0`` the next step's rollouts are sampled while the
optimizer updates the policy in place. Decoding the live weights would then mix versions within
one completion and race the optimizer's writes. The engine instead decodes a model that shares
every frozen tensor with the live one (the base weights: no second copy in memory) and holds its
own copy of the trainable ones (the LoRA adapter, a few MB; the whole model when it is trained in
full). ``refresh`` copies the live values in at a version boundary, when no update runs.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

__all__ = ["WeightSnapshot"]


class WeightSnapshot:
    """``model``: a decode-only twin of the live model whose trainable tensors are private."""

    def __init__(self, live: Any):
        shared = {id(t): t for t in live.buffers()}
        shared.update({id(p): p for p in live.parameters() if not p.requires_grad})
        self.model = copy.deepcopy(live, memo=shared).eval()
        mine = dict(self.model.named_parameters())
        self._pairs = [(p, mine[name]) for name, p in live.named_parameters() if p.requires_grad]
        self.model.requires_grad_(False)
        self.version: int | None = None
        """The version (trainer steps taken) whose weights the copy holds."""

    def refresh(self, version: int) -> None:
        """Copy the live trainable weights in; they are ``version``'s from now on."""
        with torch.no_grad():
            for live, private in self._pairs:
                private.copy_(live)
        self.version = version
