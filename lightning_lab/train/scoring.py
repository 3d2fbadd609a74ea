"""Response-token logprobs of recorded transitions under a model: the PPO update's forward pass.

Why prompts are shared: a step samples each task ``group_size`` times, so the transitions of a
group carry the same prompt, and on agent tasks the prompt (a schema, retrieved passages) is most
of the tokens. Scoring every row's prompt again costs ``group_size`` times the prompt compute.
Here each distinct prompt in a chunk runs once; its KV cache is indexed out to the rows that share
it and only the response tokens run per row. ``index_select`` is differentiable, so the gradient
through the shared prompt is the sum over its rows: logprobs and gradients are those of scoring
each row on its own (tests check both).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from ..inference.adapters import base_model
from ..inference.prompts import dedupe_prompts
from ..records import Transition

__all__ = ["Scores", "chunk_rows", "padded_tokens", "score"]


@dataclass
class Scores:
    logprobs: torch.Tensor  # (N,) response-token logprobs, all rows concatenated
    entropy: torch.Tensor  # (N,) detached
    prompt_hidden: torch.Tensor | None  # (B, H) last hidden state at each row's last prompt token
    lengths: list[int]  # response tokens per row, to split the flat tensors


def _padded(seqs: Sequence[Sequence[int]], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask, (len(seqs), width) each."""
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, seq in enumerate(seqs):
        ids[b, :len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        mask[b, :len(seq)] = 1
    return ids, mask


def padded_tokens(rows: Sequence[Transition]) -> int:
    """Tokens ``score`` runs for ``rows``: distinct prompts, plus responses, each padded."""
    prompts, _ = dedupe_prompts([tr.prompt_ids for tr in rows])
    longest_response = max((len(tr.response_ids) for tr in rows), default=0)
    return len(prompts) * max(map(len, prompts), default=0) + len(rows) * longest_response


def chunk_rows(rows: Sequence[Transition], budget: int) -> list[list[int]]:
    """Split rows (in order) into forward passes of at most ``budget`` padded tokens.

    Activation memory grows with tokens (a 135M model's backward over a few thousand tokens
    already takes gigabytes). Keep rows of a group adjacent so they land in one chunk and share
    their prompt; a single row over budget gets a chunk of its own.
    """
    chunks: list[list[int]] = []
    for i in range(len(rows)):
        if chunks and padded_tokens([rows[j] for j in chunks[-1] + [i]]) <= budget:
            chunks[-1].append(i)
        else:
            chunks.append([i])
    return chunks


def _autocast(device: str | torch.device) -> Any:
    """bf16 autocast on CUDA (fp32 LoRA weights meet bf16 base weights in bf16 matmuls); the
    logits are taken in float32 either way."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def score(model: Any, rows: Sequence[Transition], *, device: str | torch.device = "cpu",
          grad: bool = False, hidden: bool = False, checkpointing: bool = False) -> Scores:
    """Logprobs (at each transition's sampling temperature) of every response token of ``rows``.

    Two decoder passes: the distinct prompts, right-padded so every sequence sits at positions
    0..L-1 as it did during sampling; then each row's response (all but its last token) on top
    of its prompt's cached keys/values, at positions ``len(prompt) + j``. Logits are computed only
    at positions that predict response tokens, which keeps the (tokens x vocab) tensor small.

    ``checkpointing=True`` (with ``gradient_checkpointing_enable()`` called on the model) trades
    compute for activation memory: each row then runs as one prompt+response sequence without a
    KV cache (a cache cannot be recomputed in the backward), every decoder layer recomputed.
    """
    core = base_model(model)
    decoder, head = core.get_decoder(), core.get_output_embeddings()
    if checkpointing and grad:
        return _score_whole_rows(decoder, head, rows, device, hidden)
    prompts, of_row = dedupe_prompts([tr.prompt_ids for tr in rows])
    plen = torch.tensor([len(p) for p in prompts])
    row_prompt = torch.tensor(of_row)
    lengths = [len(tr.response_ids) for tr in rows]
    width = max(lengths) - 1  # the last response token predicts nothing
    with torch.set_grad_enabled(grad), _autocast(device):
        p_ids, p_mask = _padded(prompts, int(plen.max()))
        first = decoder(input_ids=p_ids.to(device), attention_mask=p_mask.to(device),
                        use_cache=width > 0)
        last_prompt = first.last_hidden_state[row_prompt.to(device),
                                              (plen[row_prompt] - 1).to(device)]  # (B, H)
        states = [last_prompt]
        if width > 0:
            r_ids, r_mask = _padded([tr.response_ids[:-1] for tr in rows], width)
            cache = first.cache
            cache.reorder_cache(row_prompt.to(device))  # (U, ...) -> (B, ...) per layer
            mask = torch.cat([p_mask[row_prompt], r_mask], dim=1)  # (B, Lp + width)
            positions = plen[row_prompt][:, None] + torch.arange(width)[None, :]  # (B, width)
            rest = decoder(input_ids=r_ids.to(device), attention_mask=mask.to(device),
                           position_ids=positions.to(device), cache=cache,
                           use_cache=False).last_hidden_state  # (B, width, H)
            states.append(rest.reshape(-1, rest.shape[-1]))
        # Row b's token 0 is predicted at last_prompt[b]; its token j >= 1 at rest[b, j - 1].
        at = torch.tensor([i for b, n in enumerate(lengths) if n > 0
                           for i in [b] + [len(rows) + b * width + j for j in range(n - 1)]],
                          dtype=torch.long, device=device)
        logprobs, entropy = _token_logprobs(head(torch.cat(states)[at]), rows, lengths, device)
    return Scores(logprobs=logprobs, entropy=entropy,
                  prompt_hidden=last_prompt if hidden else None, lengths=lengths)


def _token_logprobs(logits: torch.Tensor, rows: Sequence[Transition], lengths: list[int],
                    device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, V) logits at the positions predicting each response token -> (N,) logprobs, entropy."""
    logits = logits.float()
    temps = torch.cat([torch.full((n,), tr.temperature or 1.0)
                       for tr, n in zip(rows, lengths)]).to(logits)
    logp_all = torch.log_softmax(logits / temps[:, None], dim=-1)
    targets = torch.tensor([t for tr in rows for t in tr.response_ids], device=device)
    return logp_all.gather(-1, targets[:, None]).squeeze(-1), _entropy(logp_all.detach())


@contextlib.contextmanager
def _layers_checkpointed(decoder: Any) -> Iterator[None]:
    """Turn on HF's per-layer recomputation for one forward.

    HF recomputes a layer only when the layer is in training mode; flipping ``training`` on the
    layer objects alone (not ``.train()``, which recurses) leaves dropout modules in eval mode, so
    the numbers stay those of the cached path.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in decoder.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers or not all(getattr(m, "gradient_checkpointing", False) for m in layers):
        raise RuntimeError("checkpointing=True needs model.gradient_checkpointing_enable() first")
    modes = [m.training for m in layers]
    for m in layers:
        m.training = True
    try:
        yield
    finally:
        for m, mode in zip(layers, modes):
            m.training = mode


def _score_whole_rows(decoder: Any, head: Any, rows: Sequence[Transition], device: Any,
                      hidden: bool) -> Scores:
    """``score`` with gradient checkpointing: every row is one right-padded prompt+response."""
    lengths = [len(tr.response_ids) for tr in rows]
    seqs = [list(tr.prompt_ids) + list(tr.response_ids[:-1]) for tr in rows]
    ids, mask = _padded(seqs, max(map(len, seqs)))
    with torch.enable_grad(), _autocast(device), _layers_checkpointed(decoder):
        states = decoder(input_ids=ids.to(device), attention_mask=mask.to(device),
                         use_cache=False).last_hidden_state  # (B, L, H)
        # Row b's response token j is predicted at position len(prompt) - 1 + j.
        b_at = torch.tensor([b for b, n in enumerate(lengths) for _ in range(n)], device=device)
        t_at = torch.tensor([len(tr.prompt_ids) - 1 + j for tr, n in zip(rows, lengths)
                             for j in range(n)], device=device)
        logprobs, entropy = _token_logprobs(head(states[b_at, t_at]), rows, lengths, device)
        plen = torch.tensor([len(tr.prompt_ids) - 1 for tr in rows], device=device)
        last_prompt = states[torch.arange(len(rows), device=device), plen]  # (B, H)
    return Scores(logprobs=logprobs, entropy=entropy,
                  prompt_hidden=last_prompt if hidden else None, lengths=lengths)


def _entropy(logp: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Per-row entropy of (N, V) log-probabilities, a few rows at a time: the full
    ``exp(logp) * logp`` would allocate two more (N, V) tensors (~100 MB each at N=512)."""
    with torch.no_grad():
        return torch.cat([-(part.exp() * part).sum(-1) for part in logp.split(chunk)])
