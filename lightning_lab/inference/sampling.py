"""Per-row token choice for batched decoding: temperature, top-p, greedy, seeded rows.

Kept apart from the decode loop because it is pure tensor math that is easy to test on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


MAX_TOP_LOGPROBS = 20
"""OpenAI's bound on ``top_logprobs``."""
GREEDY_BELOW = 1e-3
"""Temperatures under this are greedy: logits / T would overflow float32 into inf/NaN logprobs."""


def normalize_temperature(temperature: float) -> float:
    """The temperature actually used (and that recorded logprobs refer to): tiny values mean 0."""
    return 0.0 if 0 <= temperature < GREEDY_BELOW else float(temperature)


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded; every field may differ between rows of one batch."""

    temperature: float = 1.0
    """Softmax temperature; 0 means greedy argmax (its logprobs then use T=1)."""
    top_p: float = 1.0
    """Nucleus sampling mass; 1 disables it. Recorded logprobs ignore it (the trainer's do too)."""
    max_new_tokens: int = 64
    """Hard cap on generated tokens, stop token included."""
    stop: tuple[str, ...] = ()
    """Strings that end the generation; the returned text is cut before the first one."""
    seed: int | None = None
    """Seed for this request's sampling noise, so results do not depend on who shares the batch."""
    grammar: str | None = None
    """Compiled llguidance grammar (``constraints.compile_grammar``): every row is masked to it.
    Recorded logprobs stay the unmasked policy's (see ``constraints``)."""
    top_logprobs: int = 0
    """Also keep the k most likely tokens (and logprobs) of each position, OpenAI's
    ``top_logprobs``; 0 (the default) costs nothing."""

    def __post_init__(self) -> None:
        stop = self.stop
        stop = () if stop is None else (stop,) if isinstance(stop, str) else tuple(stop)
        object.__setattr__(self, "stop", stop)  # accept None / str / list from callers
        object.__setattr__(self, "temperature", normalize_temperature(self.temperature))

    def validate(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got "
                             f"{self.top_logprobs}")


def top_p_filter(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Zero the tail of each row outside its smallest set of tokens with mass >= top_p.

    probs: (B, V), top_p: (B,). The most likely token always survives.
    """
    sorted_probs, order = probs.sort(dim=-1, descending=True)  # (B, V)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of strictly better tokens
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p[:, None], 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


def _scale(temperature: torch.Tensor) -> torch.Tensor:
    """The divisor of the logits: T, or 1 for greedy rows (whose logprobs use T=1)."""
    return torch.where(temperature == 0, torch.ones_like(temperature), temperature)


def top_logprobs(logits: torch.Tensor, temperature: torch.Tensor, k: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logprobs, token ids)``, both (B, k), best first: the k most likely tokens of the
    distribution whose logprobs ``choose_tokens`` records (unmasked, logits / T)."""
    scale = _scale(temperature.to(logits.device))
    return torch.log_softmax(logits / scale[:, None], dim=-1).topk(k, dim=-1)


def choose_tokens(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    generators: list[torch.Generator | None],
    allowed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row and return ``(tokens, logprobs)``, both (B,).

    logits: (B, V) float32 on any device; temperature, top_p: (B,) on the host (the "any row
    greedy / any top-p" branches are decided there, without waiting on the device); results stay on
    the logits' device. Logprobs are ``log_softmax(logits / T)`` at
    the chosen token with T=1 for greedy rows, i.e. exactly what a training forward recomputes.
    Sampling inverts the CDF with one uniform per row: far cheaper than drawing V random numbers
    per row (multinomial/Gumbel), and a seeded row draws its uniform from its own generator, so
    its samples do not depend on who else shares the batch.

    ``allowed`` (B, V) bool restricts the *choice* to grammar-valid tokens; the returned logprobs
    are still the unmasked distribution's, the quantity the trainer recomputes.
    """
    device = logits.device
    all_greedy, any_top_p = bool((temperature == 0).all()), bool((top_p < 1).any())  # host flags
    temperature, top_p = temperature.to(device), top_p.to(device)
    greedy = temperature == 0  # (B,)
    scale = _scale(temperature)
    logp = torch.log_softmax(logits / scale[:, None], dim=-1)  # (B, V)
    choice_logits, choice_logp = logits, logp
    if allowed is not None:
        choice_logits = logits.masked_fill(~allowed, float("-inf"))
        choice_logp = torch.log_softmax(choice_logits / scale[:, None], dim=-1)
    tokens = choice_logits.argmax(dim=-1)
    if not all_greedy:
        probs = choice_logp.exp()
        if any_top_p:
            probs = top_p_filter(probs, top_p)
        cdf = probs.cumsum(dim=-1, dtype=torch.float64)  # (B, V); float64 keeps the tail unbiased
        uniform = torch.rand(len(generators), dtype=torch.float64, device=device)
        seeded = [i for i, g in enumerate(generators) if g is not None]
        if seeded:  # a seeded row's uniform comes from its own (host) generator: one small copy
            own = torch.cat([torch.rand(1, generator=generators[i], dtype=torch.float64)
                             for i in seeded])
            uniform[torch.tensor(seeded, device=device)] = own.to(device)
        target = (uniform * cdf[:, -1])[:, None]  # (B, 1); scaling absorbs top-p's lost mass
        sampled = torch.searchsorted(cdf, target, right=True)[:, 0].clamp(max=cdf.shape[1] - 1)
        tokens = torch.where(greedy, tokens, sampled)
    return tokens, logp.gather(1, tokens[:, None]).squeeze(1)
