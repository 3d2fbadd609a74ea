"""Credit strategies against values computed by hand (comments show the arithmetic)."""

import dataclasses

import pytest

import lightning_lab as ll
from lightning_lab.credit import discounted_returns, gae


def _batch(groups: dict[str, list[list[float]]]) -> ll.Batch:
    trajs = []
    for task, reward_lists in groups.items():
        for rewards in reward_lists:
            trajs.append(ll.Trajectory(task_id=task, transitions=[
                ll.Transition(prompt_ids=[0], response_ids=[1], reward=r) for r in rewards]))
    return ll.Batch(trajs)


def _col(batch, name):
    return [[getattr(tr, name) for tr in t.transitions] for t in batch]


def test_uniform_gives_total_reward_to_every_step():
    batch = ll.credit.get("uniform", baseline=None).assign(_batch({"a": [[0.0, 0.5, 1.0], [2.0]]}))
    assert _col(batch, "ret") == [[1.5, 1.5, 1.5], [2.0]]
    assert _col(batch, "advantage") == [[1.5, 1.5, 1.5], [2.0]]


def test_discounted_returns_by_hand():
    # G2 = 1; G1 = 0 + 0.5*1 = 0.5; G0 = 2 + 0.5*0.5 = 2.25
    assert discounted_returns([2.0, 0.0, 1.0], 0.5) == [2.25, 0.5, 1.0]
    batch = ll.credit.get("discounted", gamma=0.5, baseline=None).assign(_batch({"a": [[2.0, 0.0, 1.0]]}))
    assert _col(batch, "ret") == [[2.25, 0.5, 1.0]]
    assert discounted_returns([1.0, 1.0], 1.0) == [2.0, 1.0]


def test_group_baseline_subtracts_mean_score_of_same_task():
    # task a scores (uniform): 1, 3 -> mean 2; task b: 5 alone -> mean 5
    batch = ll.credit.get("uniform").assign(_batch({"a": [[1.0], [1.0, 2.0]], "b": [[5.0]]}))
    assert _col(batch, "advantage") == [[-1.0], [1.0, 1.0], [0.0]]


def test_group_baseline_with_std_scaling():
    # scores 1, 3: mean 2, population std 1 -> advantages -1, +1 (eps aside)
    batch = ll.credit.get("uniform", scale_std=True).assign(_batch({"a": [[1.0], [3.0]]}))
    assert [a for (a,) in _col(batch, "advantage")] == pytest.approx([-1.0, 1.0], abs=1e-5)


def test_rloo_baseline_is_leave_one_out_mean():
    # scores 1, 2, 6: baselines (2+6)/2=4, (1+6)/2=3.5, (1+2)/2=1.5
    batch = ll.credit.get("uniform", baseline="rloo").assign(_batch({"a": [[1.0], [2.0], [6.0]]}))
    assert _col(batch, "advantage") == [[-3.0], [-1.5], [4.5]]


def test_batch_baseline_uses_all_trajectories():
    # scores 1 (a), 3 (b): batch mean 2
    batch = ll.credit.get("uniform", baseline="batch").assign(_batch({"a": [[1.0]], "b": [[3.0]]}))
    assert _col(batch, "advantage") == [[-1.0], [1.0]]


def test_discounted_group_baseline_uses_first_step_return():
    # traj1 rewards [0, 1], gamma .5 -> returns [0.5, 1]; traj2 [1] -> [1]; scores .5, 1 -> mean .75
    batch = ll.credit.get("discounted", gamma=0.5).assign(_batch({"a": [[0.0, 1.0], [1.0]]}))
    assert _col(batch, "ret") == [[0.5, 1.0], [1.0]]
    assert _col(batch, "advantage") == [[-0.25, 0.25], [0.25]]


def test_failed_trajectories_get_no_advantage_and_do_not_shift_baseline():
    batch = _batch({"a": [[1.0], [3.0], [100.0]]})
    batch[2].status = "failed"
    ll.credit.get("uniform").assign(batch)
    assert _col(batch, "advantage") == [[-1.0], [1.0], [None]]


def test_gae_by_hand():
    # rewards [0, 1], values [0.5, 0.8], gamma .9, lam .5
    # delta1 = 1 + .9*0 - .8 = .2 ; delta0 = 0 + .9*.8 - .5 = .22
    # A1 = .2 ; A0 = .22 + .45*.2 = .31 ; returns = A + V = [.81, 1.0]
    adv, ret = gae([0.0, 1.0], [0.5, 0.8], gamma=0.9, lam=0.5)
    assert adv == pytest.approx([0.31, 0.2])
    assert ret == pytest.approx([0.81, 1.0])
    # lam = 1 with V = 0 reduces to discounted returns
    adv, _ = gae([2.0, 0.0, 1.0], [0.0, 0.0, 0.0], gamma=0.5, lam=1.0)
    assert adv == pytest.approx([2.25, 0.5, 1.0])


def test_value_strategy_reads_transition_values():
    batch = _batch({"a": [[0.0, 1.0]]})
    for tr, v in zip(batch[0].transitions, [0.5, 0.8]):
        tr.value = v
    ll.credit.get("value", gamma=0.9, lam=0.5).assign(batch)
    assert _col(batch, "advantage")[0] == pytest.approx([0.31, 0.2])
    missing = _batch({"a": [[1.0]]})
    with pytest.raises(ValueError, match="needs Transition.value"):
        ll.credit.get("value").assign(missing)


def test_registry_errors_and_user_strategies(monkeypatch):
    # register into a throwaway copy, so other tests see only the built-in strategies
    monkeypatch.setattr(ll.credit.registry, "_REGISTRY", dict(ll.credit.registry._REGISTRY))
    with pytest.raises(KeyError, match="registered: .*discounted.*uniform"):
        ll.credit.get("nope")
    with pytest.raises(TypeError, match="no parameter"):
        ll.credit.get("uniform", gamma=0.5)
    with pytest.raises(ValueError, match="unknown baseline"):
        ll.credit.get("uniform", baseline="median").assign(_batch({"a": [[1.0]]}))

    from dataclasses import dataclass

    @ll.credit.register("last_only")
    @dataclass
    class LastOnly(ll.credit.CreditStrategy):
        def assign(self, batch):
            for traj in batch:
                for i, tr in enumerate(traj.transitions):
                    tr.ret = tr.advantage = traj.total_reward if i == len(traj.transitions) - 1 else 0.0
            return batch

    assert "last_only" in ll.credit.names()
    with pytest.raises(ValueError, match="'discounted' is already registered .*replace=True"):
        ll.credit.register("discounted")(LastOnly)  # another class may not take a name silently
    assert ll.credit.get("discounted", gamma=0.5).gamma == 0.5
    LastOnly = ll.credit.register("last_only")(dataclass(type(  # a re-run cell: same definition
        "LastOnly", (ll.credit.CreditStrategy,), {"__qualname__": LastOnly.__qualname__,
                                                  "assign": LastOnly.assign})))
    batch = ll.credit.get("last_only").assign(_batch({"a": [[1.0, 2.0]]}))
    assert _col(batch, "advantage") == [[0.0, 3.0]]


def test_run_config_credit_fields_are_known_in_one_place():
    """Which RunConfig fields are strategy parameters, and which a strategy does not take, comes
    from ``config.CREDIT_FIELDS`` and the registry's ``param_names``: the run's strategy, a
    resumed run switching strategy and a sweep's grid all ask the same function."""
    from lightning_lab.train import config as run_config
    from lightning_lab.workbench.tracking.sweeps import effective_params

    for name in ll.credit.names():
        takes = set(ll.credit.param_names(name))
        dropped = run_config.credit_fields_not_taken(name)
        assert set(dropped) == set(run_config.CREDIT_FIELDS) - takes
        swept = {"credit": name, "gamma": 0.5, "lam": 0.9, "baseline": "group", "steps": 2}
        assert set(swept) - set(effective_params(swept)) == set(dropped)
    cfg = run_config.RunConfig(credit="value", gamma=0.5, lam=None, baseline="group")
    assert cfg.credit_params() == {"gamma": 0.5, "baseline": "group"}  # unset ones: defaults
    assert set(run_config.CREDIT_FIELDS) <= {f.name for f in dataclasses.fields(cfg)}
