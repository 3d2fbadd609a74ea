"""Agents shared by the tests that train the tiny model (not `agents`: that is the OpenAI Agents SDK)."""

import lightning_lab as ll


def parity_agent(policy, roles=("a", "b"), max_new_tokens=6):
    """One call per role; each earns the share of its tokens whose id is divisible by 3.

    A reward the tiny random model can move: it only needs to shift probability among tokens it
    already samples, which a few PPO steps do.
    """

    def agent(task):
        for role in roles:
            with ll.role(role):
                policy.chat(task["q"], max_new_tokens=max_new_tokens)
            tr = ll.current().transitions[-1]
            ll.reward(sum(t % 3 == 0 for t in tr.response_ids) / len(tr.response_ids))

    return agent
