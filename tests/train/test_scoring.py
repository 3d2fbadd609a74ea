"""The update's forward pass: prompts and turns shared within a chunk score exactly like separate
rows (logprobs and LoRA gradients, tolerances relative to their magnitudes)."""

import pytest
import torch

from lightning_lab.records import Transition
from lightning_lab.train.scoring import (chunk_rows, hosts, padded_tokens, prefix_groups, score,
                                         sharing_groups)
from numerics import assert_rel_close


def row(prompt, response, temperature=1.0):
    return Transition(prompt_ids=list(prompt), response_ids=list(response),
                      logprobs=[0.0] * len(response), temperature=temperature)


def rows_with_shared_prompts():
    """Two groups sharing a prompt (of different lengths), a single row, and uneven responses
    (one of length 1, which has nothing to run past its prompt)."""
    p1, p2, p3 = [5, 17, 42, 8, 99, 3], [7, 7, 250, 31], [11, 12, 13, 14, 15, 16, 17, 18, 19]
    return [row(p1, [4, 9, 21]), row(p2, [60, 2]), row(p1, [4, 88, 3, 77, 5]), row(p3, [101]),
            row(p2, [61, 62, 63, 64], temperature=0.7), row(p1, [300])]


def test_padded_tokens_count_each_prompt_once():
    rows = rows_with_shared_prompts()
    # 3 distinct prompts padded to 9 tokens + 5 responses padded to 5 tokens: r5 (p1, one token)
    # needs only p1's hidden states, which r0's forward computes anyway
    assert hosts(rows)[5] in (0, 2)
    assert padded_tokens(rows) == 3 * 9 + 5 * 5
    assert padded_tokens([rows[0], rows[5]]) == 1 * 6 + 1 * 3
    assert padded_tokens(rows[:1] + rows[2:3]) == 1 * 6 + 2 * 5
    # budget 38: [r0, r1] costs 2*6 + 2*3 = 18, + r2 -> 2*6 + 3*5 = 27, + r3 -> 3*9 + 4*5 = 47;
    # [r3, r4] costs 2*9 + 2*4 = 26, + r5 -> 3*9 + 3*4 = 39
    assert chunk_rows(rows, 38) == [[0, 1, 2], [3, 4], [5]]
    assert chunk_rows(rows, 39) == [[0, 1, 2], [3, 4, 5]]
    assert chunk_rows(rows, 1) == [[i] for i in range(6)]  # an oversized row still gets a chunk


@pytest.mark.parametrize("hidden", [False, True])
def test_shared_prompt_logprobs_and_gradients_equal_per_row(tiny_lora, hidden):
    model = tiny_lora.model
    rows = rows_with_shared_prompts()
    lora = [p for n, p in model.named_parameters() if p.requires_grad]

    def loss_and_grads(parts):
        model.zero_grad(set_to_none=True)
        outs = [score(model, part, grad=True, hidden=hidden) for part in parts]
        logprobs = torch.cat([o.logprobs for o in outs])
        total = (logprobs * torch.linspace(-1, 1, len(logprobs))).sum()
        if hidden:
            total = total + torch.cat([o.prompt_hidden for o in outs]).sum()
        total.backward()
        return logprobs.detach(), [p.grad.clone() for p in lora]

    shared_lp, shared_grads = loss_and_grads([rows])
    alone_lp, alone_grads = loss_and_grads([[r] for r in rows])
    assert shared_lp.shape == (sum(len(r.response_ids) for r in rows),)
    assert_rel_close(shared_lp, alone_lp, 1e-6, "logprobs")
    assert sum(g.abs().sum().item() for g in alone_grads) > 0
    for name, a, b in zip([n for n, p in model.named_parameters() if p.requires_grad],
                          shared_grads, alone_grads):
        assert_rel_close(a, b, 1e-4, f"gradient of {name}")


def test_temperature_scales_logits(tiny):
    r1, r2 = row([5, 6, 7], [8, 9]), row([5, 6, 7], [8, 9], temperature=0.5)
    with torch.no_grad():
        out = score(tiny.model, [r1, r2])
    lp1, lp2 = out.logprobs.split(out.lengths)
    assert out.lengths == [2, 2]
    assert not torch.allclose(lp1, lp2)  # same tokens, other temperature, other logprobs
    assert (lp1 <= 0).all() and (lp2 <= 0).all()


def test_greedy_rows_score_at_temperature_one(tiny):
    """A greedy transition records temperature 0; its logprobs are those of T=1 (as sampled)."""
    greedy, plain = row([5, 6, 7], [8, 9], temperature=0.0), row([5, 6, 7], [8, 9])
    with torch.no_grad():
        out = score(tiny.model, [greedy, plain])
    lp0, lp1 = out.logprobs.split(out.lengths)
    torch.testing.assert_close(lp0, lp1, atol=1e-6, rtol=0)


def multi_turn_rows():
    """Two 3-turn trajectories of one task (a GRPO pair): each turn's prompt is the previous
    prompt + response + a new user message; the second trajectory diverges at its first response.
    One turn ends without a stop token (its next prompt still extends it), one samples at 0.7."""
    p0 = [5, 17, 42, 8, 99, 3, 60]
    a0 = row(p0, [4, 9, 21, 2])
    a1 = row(p0 + [4, 9, 21, 2] + [7, 250, 31], [77, 78, 2], temperature=0.7)
    a2 = row(a1.prompt_ids + [77, 78, 2] + [7, 251, 32, 33], [300, 301, 302, 303, 2])
    b0 = row(p0, [4, 88, 3])
    b1 = row(p0 + [4, 88, 3] + [7, 250, 31], [64, 2])
    b2 = row(b1.prompt_ids + [64, 2] + [7, 252], [11, 2])
    return [a0, a1, a2, b0, b1, b2]


def test_turns_ride_on_their_last_turn():
    rows = multi_turn_rows()
    assert hosts(rows) == [2, 2, 2, 5, 5, 5]
    # the whole trajectory costs what its last turn costs alone
    assert padded_tokens(rows[:3]) == padded_tokens(rows[2:3])
    assert padded_tokens(rows) == padded_tokens([rows[2], rows[5]])
    # a GRPO pair of trajectories (shared first prompt) is one group; an unrelated row is its own
    lone = row([1, 2, 3], [4])
    assert sharing_groups(rows + [lone]) == [[0, 1, 2, 3, 4, 5], [6]]
    assert sharing_groups([rows[0], lone, rows[1]]) == [[0, 2], [1]]


@pytest.mark.parametrize("hidden", [False, True])
def test_multi_turn_logprobs_and_gradients_equal_per_turn(hidden):
    import lightning_lab as ll

    model = ll.models.load("tiny", lora={"r": 4, "init_lora_weights": False}).model
    rows = multi_turn_rows()
    lora = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads(parts):
        model.zero_grad(set_to_none=True)
        outs = [score(model, part, grad=True, hidden=hidden) for part in parts]
        logprobs = torch.cat([o.logprobs for o in outs])
        total = (logprobs * torch.linspace(-1, 1, len(logprobs))).sum()
        if hidden:
            total = total + torch.cat([o.prompt_hidden for o in outs]).pow(2).sum()
        total.backward()
        return logprobs.detach(), torch.cat([p.grad.flatten() for p in lora])

    shared_lp, shared_grad = loss_and_grads([rows])
    alone_lp, alone_grad = loss_and_grads([[r] for r in rows])
    assert shared_lp.shape == (sum(len(r.response_ids) for r in rows),)
    assert_rel_close(shared_lp, alone_lp, 1e-6, "logprobs")
    assert alone_grad.norm() > 0
    assert_rel_close(shared_grad, alone_grad, 1e-4, "LoRA gradient")


def test_gradient_checkpointing_gives_the_same_logprobs_and_gradients(tiny_lora):
    """The memory-saving path (whole rows, layers recomputed in the backward) is the same math."""
    rows = rows_with_shared_prompts()
    params = [p for p in tiny_lora.model.parameters() if p.requires_grad]
    with torch.random.fork_rng():  # LoRA B starts at 0; make the adapter matter
        torch.manual_seed(3)
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p) * 0.05)

    def run(checkpointing):
        out = score(tiny_lora.model, rows, grad=True, hidden=True, checkpointing=checkpointing)
        loss = out.logprobs.sum() + out.prompt_hidden.square().mean()
        return out, torch.autograd.grad(loss, params)

    plain, plain_grads = run(False)
    tiny_lora.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ckpt, ckpt_grads = run(True)
    scale = plain.logprobs.abs().max()
    assert (ckpt.logprobs - plain.logprobs).abs().max() <= 1e-5 * scale
    for a, b in zip(ckpt_grads, plain_grads):
        assert (a - b).norm() <= 1e-4 * b.norm() + 1e-7 * max(g.norm() for g in plain_grads)


def rows_with_shared_prefixes():
    """(a) three prompts sharing a 12-token prefix with different questions after it, one of
    them a GRPO pair; (b) a second family sharing 5 tokens, and a loner that shares nothing;
    (c) a prompt that is a prefix of another's (its response differs from the extension, so it
    does not ride on it)."""
    schema = [5, 17, 42, 8, 99, 3, 60, 61, 62, 63, 64, 65]
    other = [7, 7, 250, 31, 40]
    return [row(schema + [100, 101], [4, 9, 21]), row(schema + [102], [60, 2]),
            row(other + [1, 2, 3], [8, 9]), row(schema + [100, 101], [4, 88, 3, 77, 5]),
            row(schema + [103, 104, 105], [11], temperature=0.7), row([300, 301, 302], [6, 7]),
            row(other + [4], [12, 13, 14]), row(other, [90, 91]),
            row(other + [1, 2, 3, 9, 9], [15, 16])]


def test_prefix_groups_share_common_leading_tokens():
    rows = rows_with_shared_prefixes()
    prompts = [tr.prompt_ids for tr in rows]
    lengths = [len(tr.prompt_ids) + len(tr.response_ids) for tr in rows]
    prefixes, of_prompt = prefix_groups(prompts, lengths, share_prefixes=True)
    schema, other = rows[0].prompt_ids[:12], rows[7].prompt_ids
    assert [prefixes[u] for u in of_prompt] == [tuple(schema)] * 2 + [tuple(other)] + \
        [tuple(schema)] * 2 + [(300, 301, 302)] + [tuple(other)] * 3
    # off: one prefix per distinct prompt, as before
    assert prefix_groups(prompts, lengths, share_prefixes=False)[0] == \
        list(dict.fromkeys(map(tuple, prompts)))
    # sharing the schema: 3 prefixes (padded to 12) + 9 rests (padded to 5 + 2 ... the longest)
    rest = max(n - len(prefixes[u]) for n, u in zip(lengths, of_prompt))
    assert padded_tokens(rows, share_prefixes=True) == 3 * 12 + 9 * rest < padded_tokens(rows)
    # a 2-token common start is not worth padding a long prompt into the second pass when the
    # others share 30 tokens: groups {schema + 1, schema + 2 tokens} and the long prompt whole
    schema = list(range(10, 40))
    long_one = [10, 11] + list(range(50, 80))
    mixed = [row(schema + [1], [5, 6]), row(schema + [2, 3], [5]), row(long_one, [5])]
    prefixes, _ = prefix_groups([tr.prompt_ids for tr in mixed], [33, 33, 33], share_prefixes=True)
    assert sorted(prefixes) == [tuple(schema), tuple(long_one)]
    assert padded_tokens(mixed, share_prefixes=True) == 2 * 32 + 3 * 3 < padded_tokens(mixed)


@pytest.mark.parametrize("hidden", [False, True])
@pytest.mark.parametrize("pick", [[0, 1, 3, 4], [7, 8], None], ids=["long-prefix", "prompt-is-prefix", "mixed"])
def test_shared_prefix_logprobs_and_gradients_equal_per_row(hidden, pick):
    import lightning_lab as ll

    model = ll.models.load("tiny", lora={"r": 4, "init_lora_weights": False}).model
    rows = rows_with_shared_prefixes()
    rows = rows if pick is None else [rows[i] for i in pick]
    lora = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads(parts, share):
        model.zero_grad(set_to_none=True)
        outs = [score(model, part, grad=True, hidden=hidden, share_prefixes=share) for part in parts]
        logprobs = torch.cat([o.logprobs for o in outs])
        total = (logprobs * torch.linspace(-1, 1, len(logprobs))).sum()
        if hidden:
            total = total + torch.cat([o.prompt_hidden for o in outs]).pow(2).sum()
        total.backward()
        return logprobs.detach(), torch.cat([p.grad.flatten() for p in lora])

    assert padded_tokens(rows, share_prefixes=True) < padded_tokens(rows)  # something is shared
    shared_lp, shared_grad = loss_and_grads([rows], True)
    alone_lp, alone_grad = loss_and_grads([[r] for r in rows], False)
    assert shared_lp.shape == (sum(len(r.response_ids) for r in rows),)
    assert_rel_close(shared_lp, alone_lp, 1e-6, "logprobs")
    assert alone_grad.norm() > 0
    assert_rel_close(shared_grad, alone_grad, 1e-4, "LoRA gradient")
