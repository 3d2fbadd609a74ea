"""Response-token logprobs of recorded transitions under a model: the PPO update's forward pass.

Two kinds of sharing, both exact (tests check logprobs and gradients against scoring each row
alone):

* **Prompts** (GRPO groups): a step samples each task ``group_size`` times, so a group's
  transitions carry the same prompt, and on agent tasks the prompt (a schema, retrieved passages)
  is most of the tokens. Each distinct prompt in a chunk runs once; its KV cache is indexed out to
  the rows that share it and only the response tokens run per row.
* **Turns** (multi-turn agents): turn k+1's prompt usually *is* turn k's prompt + response + the
  next user message, so scoring every turn re-runs the whole history and a trajectory costs
  quadratically in its turns. A row whose inputs (prompt + response) are a prefix of another row's
  inputs "rides" on it: a causal forward over the longer sequence already computed the hidden
  states at its positions, so its logprobs are gathered from there at no extra forward cost.

* **Prefixes** (``share_prefixes=True``): different prompts that start alike (the questions of
  one database after the same schema) run their common leading tokens once. The hosts' prompts
  are sorted and split into groups by ``prefix_groups``; the first pass runs each group's common
  prefix, the second the rest of each host's prompt and its response on top of that prefix's
  keys/values. Without it, a group is the hosts of one identical prompt (the first bullet).

``index_select`` is differentiable, so the gradient through a shared position is the sum over
the rows that read it, which is what scoring them separately gives.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from ..inference.adapters import base_model, decoder_layers
from ..inference.prompts import dedupe_prompts
from ..records import Transition

__all__ = ["Scores", "chunk_rows", "common_length", "hosts", "padded_tokens", "prefix_groups", "score",
           "sharing_groups"]


@dataclass
class Scores:
    logprobs: torch.Tensor  # (N,) response-token logprobs, all rows concatenated
    entropy: torch.Tensor  # (N,) detached
    prompt_hidden: torch.Tensor | None  # (B, H) last hidden state at each row's last prompt token
    lengths: list[int]  # response tokens per row, to split the flat tensors


def _inputs(tr: Transition) -> list[int]:
    """Tokens whose hidden states score ``tr``: the prompt and all response tokens but the last."""
    return tr.prompt_ids + tr.response_ids[:-1] if tr.response_ids else list(tr.prompt_ids)


def hosts(rows: Sequence[Transition]) -> list[int]:
    """For each row, the row whose forward covers it: itself, or a row whose inputs extend its own.

    Longest rows are hosts first; a shorter row rides on the first host whose inputs start with
    all of its inputs (the previous turn of the same multi-turn trajectory, typically; also a
    GRPO sample whose response is a prefix of a sibling's). Hosts never ride.
    """
    inputs = [_inputs(tr) for tr in rows]
    order = sorted(range(len(rows)), key=lambda i: -len(inputs[i]))
    of_row = list(range(len(rows)))
    chosen: list[int] = []
    for i in order:
        seq, n = inputs[i], len(inputs[i])
        for h in chosen:
            host = inputs[h]
            # cheap rejects before the O(n) comparison: the last input token, the prompt's end
            if host[n - 1] == seq[-1] and host[len(rows[i].prompt_ids) - 1] == rows[i].prompt_ids[-1] \
                    and host[:n] == seq:
                of_row[i] = h
                break
        else:
            chosen.append(i)
    return of_row


def sharing_groups(rows: Sequence[Transition]) -> list[list[int]]:
    """Row indices grouped so that rows sharing a prompt or riding on each other stay together.

    The trainer keeps each group inside one minibatch (in its original order), so ``score``
    can share the prompt pass and the turns' forward. Groups come in first-seen order.
    """
    parent = list(range(len(rows)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    _, of_prompt = dedupe_prompts([tr.prompt_ids for tr in rows])
    first_of: dict[int, int] = {}
    for i, (p, h) in enumerate(zip(of_prompt, hosts(rows))):
        parent[find(i)] = find(first_of.setdefault(p, i))
        parent[find(i)] = find(h)
    groups: dict[int, list[int]] = {}
    for i in range(len(rows)):
        groups.setdefault(find(i), []).append(i)
    return sorted(groups.values(), key=lambda g: g[0])


def _padded(seqs: Sequence[Sequence[int]], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask, (len(seqs), width) each."""
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, seq in enumerate(seqs):
        ids[b, :len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        mask[b, :len(seq)] = 1
    return ids, mask


def common_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    if n == 0 or a[0] != b[0]:
        return 0
    diff = (torch.as_tensor(a[:n]) != torch.as_tensor(b[:n])).nonzero()
    return int(diff[0]) if len(diff) else n


def _partition_cost(groups: list[list[int]], cuts: list[int], lengths: Sequence[int]) -> int:
    """Padded tokens of two passes: the groups' prefixes, then every member's rest."""
    rest = max(lengths[m] - c for g, c in zip(groups, cuts) for m in g)
    return len(groups) * max(cuts) + sum(map(len, groups)) * rest


def _split_run(run: list[int], adjacent: list[int], prompts: Sequence[Sequence[int]],
               lengths: Sequence[int]) -> tuple[list[list[int]], list[int]]:
    """Groups and prefix lengths for ``run`` (positions in prompt-sorted order).

    The run's common prefix is the least adjacent common length; the run stays one group unless
    splitting it where that minimum sits (recursively) pads fewer tokens: a short shared system
    line is not worth padding every schema after it into the second pass.
    """
    if len(run) == 1:
        return [run], [len(prompts[run[0]])]
    cut = min(adjacent[k] for k in run[:-1])
    pieces: list[list[int]] = [[run[0]]]
    for k in run[1:]:
        if adjacent[k - 1] == cut:
            pieces.append([])
        pieces[-1].append(k)
    groups: list[list[int]] = []
    cuts: list[int] = []
    for piece in pieces:
        g, c = _split_run(piece, adjacent, prompts, lengths)
        groups += g
        cuts += c
    if cut > 0 and _partition_cost([run], [cut], lengths) <= _partition_cost(groups, cuts, lengths):
        return [run], [cut]
    return groups, cuts


def prefix_groups(prompts: Sequence[Sequence[int]], lengths: Sequence[int], *,
                  share_prefixes: bool) -> tuple[list[tuple[int, ...]], list[int]]:
    """Prefixes run once by ``score``'s first pass and, per prompt, the index of its prefix.

    ``lengths``: each prompt's whole sequence (prompt + scored response tokens), which the
    second pass pads to. Without ``share_prefixes`` the prefixes are the distinct prompts; with
    it, prompts sorted together share their common leading tokens (a prompt that is a prefix
    of another is its group's prefix whole), grouped so the two passes pad fewest tokens.
    """
    if not share_prefixes:
        return dedupe_prompts(prompts)
    order = sorted(range(len(prompts)), key=lambda i: list(prompts[i]))
    ranked = [prompts[i] for i in order]
    adjacent = [common_length(a, b) for a, b in zip(ranked, ranked[1:])]
    groups, cuts = _split_run(list(range(len(order))), adjacent, ranked,
                              [lengths[i] for i in order])
    of_prompt = [0] * len(prompts)
    for g, members in enumerate(groups):
        for k in members:
            of_prompt[order[k]] = g
    return [tuple(ranked[g[0]][:c]) for g, c in zip(groups, cuts)], of_prompt


def padded_tokens(rows: Sequence[Transition], *, share_prefixes: bool = False) -> int:
    """Tokens ``score`` runs for ``rows``: the hosts' prefixes (``prefix_groups``) plus the rest
    of each host, each padded (riders are free)."""
    host_rows = [rows[h] for h in sorted(set(hosts(rows)))]
    lengths = [len(tr.prompt_ids) + len(tr.response_ids) for tr in host_rows]
    prefixes, of_host = prefix_groups([tr.prompt_ids for tr in host_rows], lengths,
                                      share_prefixes=share_prefixes)
    rest = max((n - len(prefixes[u]) for n, u in zip(lengths, of_host)), default=0)
    return len(prefixes) * max(map(len, prefixes), default=0) + len(host_rows) * rest


def chunk_rows(rows: Sequence[Transition], budget: int, *, share_prefixes: bool = False
               ) -> list[list[int]]:
    """Split rows (in order) into forward passes of at most ``budget`` padded tokens.

    Activation memory grows with tokens (a 135M model's backward over a few thousand tokens
    already takes gigabytes). Keep rows of a group (or of a trajectory's turns) adjacent so they
    land in one chunk and share their forward; a single row over budget gets a chunk of its own.
    """
    chunks: list[list[int]] = []
    for i in range(len(rows)):
        if chunks and padded_tokens([rows[j] for j in chunks[-1] + [i]],
                                    share_prefixes=share_prefixes) <= budget:
            chunks[-1].append(i)
        else:
            chunks.append([i])
    return chunks


def _autocast(device: str | torch.device, dtype: torch.dtype = torch.float32) -> Any:
    """bf16 autocast on CUDA always (fp32 LoRA weights meet bf16 base weights in bf16 matmuls),
    on CPU when ``dtype`` asks for it (native bf16 matmuls run ~2x fp32 there); the logits are
    taken in float32 either way."""
    kind = torch.device(device).type
    if kind == "cuda" or dtype == torch.bfloat16:
        return torch.autocast(kind, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def score(model: Any, rows: Sequence[Transition], *, device: str | torch.device = "cpu",
          grad: bool = False, hidden: bool = False, checkpointing: bool = False,
          dtype: torch.dtype = torch.float32, share_prefixes: bool = False) -> Scores:
    """Logprobs (at each transition's sampling temperature) of every response token of ``rows``.

    Two decoder passes over the host rows (see ``hosts``): their prefixes (``prefix_groups``:
    the distinct prompts, or with ``share_prefixes`` the common leading tokens of prompts that
    start alike), right-padded so every sequence sits at positions 0..L-1 as it did during
    sampling; then each host's remaining prompt tokens and response (all but its last token) on
    top of its prefix's cached keys/values, at positions ``len(prefix) + j``. Every row, host or
    rider, then reads the hidden states at its own positions of its host's sequence. Logits are
    computed only at positions that predict response tokens, which keeps the (tokens x vocab)
    tensor small.

    ``checkpointing=True`` (with ``gradient_checkpointing_enable()`` called on the model) trades
    compute for activation memory: each row then runs as one prompt+response sequence without a
    KV cache (a cache cannot be recomputed in the backward), every decoder layer recomputed.
    ``dtype=torch.bfloat16`` runs the matmuls under bf16 autocast (see ``_autocast``).
    """
    core = base_model(model)
    decoder, head = core.get_decoder(), core.get_output_embeddings()
    if checkpointing and grad:
        return _score_whole_rows(decoder, head, rows, device, hidden, dtype)
    of_row = hosts(rows)
    host_ids = sorted(set(of_row))
    slot = {h: b for b, h in enumerate(host_ids)}  # row index -> position among hosts
    host_inputs = [_inputs(rows[h]) for h in host_ids]
    prefixes, of_host = prefix_groups([rows[h].prompt_ids for h in host_ids],
                                      [len(x) for x in host_inputs], share_prefixes=share_prefixes)
    cut = [len(prefixes[u]) for u in of_host]  # per host: tokens run by the first pass
    lp = max(map(len, prefixes))
    host_prefix = torch.tensor(of_host)
    width = max(len(x) - c for x, c in zip(host_inputs, cut))
    lengths = [len(tr.response_ids) for tr in rows]
    with torch.set_grad_enabled(grad), _autocast(device, dtype):
        p_ids, p_mask = _padded(prefixes, lp)
        first = decoder(input_ids=p_ids.to(device), attention_mask=p_mask.to(device),
                        use_cache=width > 0)
        hidden_size = first.last_hidden_state.shape[-1]
        states = [first.last_hidden_state.reshape(-1, hidden_size)]  # (U * Lp, H)
        if width > 0:
            r_ids, r_mask = _padded([x[c:] for x, c in zip(host_inputs, cut)], width)
            cache = first.cache
            cache.reorder_cache(host_prefix.to(device))  # (U, ...) -> (B_hosts, ...) per layer
            mask = torch.cat([p_mask[host_prefix], r_mask], dim=1)  # (Bh, Lp + width)
            positions = torch.tensor(cut)[:, None] + torch.arange(width)[None, :]  # (Bh, width)
            rest = decoder(input_ids=r_ids.to(device), attention_mask=mask.to(device),
                           position_ids=positions.to(device), cache=cache,
                           use_cache=False).last_hidden_state  # (Bh, width, H)
            states.append(rest.reshape(-1, hidden_size))
        states = torch.cat(states)  # first-pass positions, then second-pass positions

        def flat(i: int, position: int) -> int:
            """Row of ``states`` holding row i's host's hidden state at ``position``."""
            b = slot[of_row[i]]
            if position < cut[b]:
                return of_host[b] * lp + position
            return len(prefixes) * lp + b * width + position - cut[b]

        # Response token j of row i sits at position P_i + j and is predicted at P_i + j - 1.
        at = torch.tensor([flat(i, len(tr.prompt_ids) - 1 + j)
                           for i, tr in enumerate(rows) for j in range(len(tr.response_ids))],
                          dtype=torch.long, device=device)
        logprobs, entropy = _token_logprobs(head(states[at]), rows, lengths, device)  # (N,) each
        prompt_hidden = None
        if hidden:
            last = torch.tensor([flat(i, len(tr.prompt_ids) - 1) for i, tr in enumerate(rows)],
                                dtype=torch.long, device=device)
            prompt_hidden = states[last].float()  # (B, H); the critic's head is fp32
    return Scores(logprobs=logprobs, entropy=entropy, prompt_hidden=prompt_hidden, lengths=lengths)


def _token_logprobs(logits: torch.Tensor, rows: Sequence[Transition], lengths: list[int],
                    device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, V) logits at the positions predicting each response token -> (N,) logprobs, entropy."""
    logits = logits.float()
    temps = torch.cat([torch.full((n,), tr.temperature or 1.0)  # greedy (0): T=1, as sampled
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
    layers = decoder_layers(decoder)
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
                      hidden: bool, dtype: torch.dtype) -> Scores:
    """``score`` with gradient checkpointing: every row is one right-padded prompt+response."""
    lengths = [len(tr.response_ids) for tr in rows]
    seqs = [list(tr.prompt_ids) + list(tr.response_ids[:-1]) for tr in rows]
    ids, mask = _padded(seqs, max(map(len, seqs)))
    with torch.enable_grad(), _autocast(device, dtype), _layers_checkpointed(decoder):
        states = decoder(input_ids=ids.to(device), attention_mask=mask.to(device),
                         use_cache=False).last_hidden_state  # (B, L, H)
        # Row b's response token j is predicted at position len(prompt) - 1 + j.
        b_at = torch.tensor([b for b, n in enumerate(lengths) for _ in range(n)], device=device)
        t_at = torch.tensor([len(tr.prompt_ids) - 1 + j for tr, n in zip(rows, lengths)
                             for j in range(n)], device=device)
        logprobs, entropy = _token_logprobs(head(states[b_at, t_at]), rows, lengths, device)
        plen = torch.tensor([len(tr.prompt_ids) - 1 for tr in rows], device=device)
        last_prompt = states[torch.arange(len(rows), device=device), plen].float()  # (B, H)
    return Scores(logprobs=logprobs, entropy=entropy,
                  prompt_hidden=last_prompt if hidden else None, lengths=lengths)


def _entropy(logp: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Per-row entropy of (N, V) log-probabilities, a few rows at a time: the full
    ``exp(logp) * logp`` would allocate two more (N, V) tensors (~100 MB each at N=512)."""
    with torch.no_grad():
        return torch.cat([-(part.exp() * part).sum(-1) for part in logp.split(chunk)])
