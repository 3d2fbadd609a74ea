import json
import math

import pytest

import lightning_lab as ll


def _traj(task_id: str, rewards: list[float], status: str = "ok") -> ll.Trajectory:
    return ll.Trajectory(task_id=task_id, status=status, transitions=[
        ll.Transition(prompt_ids=[1, 2], response_ids=[3, 4, 5], logprobs=[-0.1, -0.2, -0.3],
                      reward=r, role=f"a{i}") for i, r in enumerate(rewards)])


def test_to_pandas_one_row_per_transition_with_counts():
    batch = ll.Batch([_traj("t1", [0.0, 1.0]), _traj("t2", [0.5])])
    ll.credit.get("uniform", baseline=None).assign(batch)
    df = batch.to_pandas()
    assert len(df) == 3
    assert list(df["turn"]) == [0, 1, 0]
    assert list(df["return"]) == [1.0, 1.0, 0.5]
    assert list(df["advantage"]) == [1.0, 1.0, 0.5]
    assert set(df["prompt_tokens"]) == {2} and set(df["response_tokens"]) == {3}
    assert {"traj_id", "task_id", "role", "reward"} <= set(df.columns)


def test_jsonl_roundtrip_and_append(tmp_path):
    path = tmp_path / "trace.jsonl"
    ll.Batch([_traj("t1", [1.0])]).save_jsonl(path)
    ll.Batch([_traj("t2", [0.0, 2.0])]).save_jsonl(path, append=True)
    loaded = ll.Batch.load_jsonl(path)
    assert [t.task_id for t in loaded] == ["t1", "t2"]
    assert loaded[1].transitions[1].reward == 2.0
    assert loaded[1].transitions[1].logprobs == [-0.1, -0.2, -0.3]


def test_jsonl_truncated_and_malformed_lines_report_file_line_and_keep_valid(tmp_path):
    path = tmp_path / "trace.jsonl"
    good = json.dumps(_traj("ok1", [1.0]).to_dict())
    bad_reward = _traj("nan", [1.0]).to_dict()
    bad_reward["transitions"][0]["reward"] = "high"
    lines = [good, "{not json", json.dumps(bad_reward), good.replace("ok1", "ok2"), good[: len(good) // 2]]
    path.write_text("\n".join(lines))
    with pytest.warns(UserWarning, match="skipped 3"):
        batch = ll.Batch.load_jsonl(path)
    assert [t.task_id for t in batch] == ["ok1", "ok2"]
    assert [e.split(": ")[0] for e in batch.load_errors] == [f"{path}:2", f"{path}:3", f"{path}:5"]
    with pytest.raises(ll.TraceFormatError, match=f"{path}:2"):
        ll.Batch.load_jsonl(path, strict=True)


def test_parquet_roundtrip(tmp_path):
    batch = ll.Batch([_traj("t1", [0.25, 0.75]), _traj("t2", [], status="failed")])
    batch.save_parquet(tmp_path / "b.parquet")
    back = ll.Batch.load_parquet(tmp_path / "b.parquet")
    assert [t.to_dict() for t in back] == [t.to_dict() for t in batch]


def _old_format(traj: ll.Trajectory) -> dict:
    """``traj`` as a version before the role/turn rename stored it: ``agent`` and ``step``."""
    data = traj.to_dict()
    for tr in data["transitions"]:
        tr["agent"], tr["step"] = tr.pop("role"), tr.pop("turn")
    return data


def test_old_jsonl_names_agent_and_step_load_as_role_and_turn(tmp_path):
    path = tmp_path / "old.jsonl"
    path.write_text(json.dumps(_old_format(_traj("t1", [0.0, 1.0]))) + "\n")
    (traj,) = ll.Batch.load_jsonl(path, strict=True)
    assert [(tr.role, tr.turn) for tr in traj.transitions] == [("a0", 0), ("a1", 1)]
    ll.Batch([traj]).save_jsonl(path)  # written back under the new names only
    stored = json.loads(path.read_text())["transitions"][1]
    assert (stored["role"], stored["turn"]) == ("a1", 1) and not {"agent", "step"} & set(stored)


def test_old_parquet_names_agent_and_step_load_as_role_and_turn(tmp_path):
    import pandas as pd

    old = [_old_format(_traj("t1", [0.25, 0.75])), _old_format(_traj("t2", [1.0]))]
    pd.DataFrame({"trajectory": [json.dumps(d) for d in old], "task_id": ["t1", "t2"],
                  "total_reward": [1.0, 1.0], "status": ["ok", "ok"]}).to_parquet(
        tmp_path / "old.parquet", index=False)
    back = ll.Batch.load_parquet(tmp_path / "old.parquet", strict=True)
    assert [[(tr.role, tr.turn) for tr in t.transitions] for t in back] == [
        [("a0", 0), ("a1", 1)], [("a0", 0)]]


def test_a_record_with_old_and_new_names_disagreeing_is_refused_by_name(tmp_path):
    data = _traj("t1", [1.0, 0.0]).to_dict()
    data["transitions"][1]["agent"] = "a1"  # the same value under both names: accepted
    data["transitions"][1]["step"] = 1
    assert ll.Trajectory.from_dict(data).transitions[1].role == "a1"
    data["transitions"][1]["agent"] = "writer"
    with pytest.raises(ValueError, match=r"transitions\[1\]: holds both 'agent' \('writer'\) "
                                         r"and its new name 'role' \('a1'\)"):
        ll.Trajectory.from_dict(data)
    path = tmp_path / "both.jsonl"
    path.write_text(json.dumps(data) + "\n")
    with pytest.raises(ll.TraceFormatError, match=f"{path}:1: ValueError: transitions\\[1\\]: "
                                                  "holds both 'agent'"):
        ll.Batch.load_jsonl(path, strict=True)


def test_usable_excludes_failed_and_empty():
    assert _traj("a", [1.0]).usable
    assert not _traj("a", [1.0], status="failed").usable
    assert not ll.Trajectory(task_id="a").usable
    assert math.isclose(_traj("a", [0.5, 0.25]).total_reward, 0.75)


def test_greedy_temperature_round_trips_and_negative_is_refused(tmp_path):
    """0 is a recorded temperature (greedy); a negative one names the field."""
    traj = _traj("g", [1.0])
    traj.transitions[0].temperature = 0.0
    path = tmp_path / "greedy.jsonl"
    ll.Batch([traj]).save_jsonl(path)
    assert ll.Batch.load_jsonl(path, strict=True)[0].transitions[0].temperature == 0.0
    bad = traj.to_dict()
    bad["transitions"][0]["temperature"] = -0.5
    path.write_text(json.dumps(bad))
    with pytest.raises(ll.TraceFormatError, match=r"transitions\[0\].temperature"):
        ll.Batch.load_jsonl(path, strict=True)
