"""Spider execution accuracy, plus optional shaping terms kept separate from it.

Execution accuracy (Yu et al. 2018; Zhong et al. 2020): run predicted and gold SQL on the same
database and compare the results as multisets of rows; row order matters only when the gold
query orders its output. Column order is forgiven (`SELECT a, b` vs `SELECT b, a`), as in the
test-suite evaluation, because the question rarely fixes it.

Shaping terms (all off by default) only change `SQLScore.reward`, never `exec_acc`. The
structural similarity to the gold query (`similarity.py`) is always reported, and is added as
partial credit to non-matching predictions when `RewardConfig.partial_credit` > 0.
"""
from __future__ import annotations

import itertools
import re
from collections import Counter
from dataclasses import dataclass

from .similarity import sql_similarity
from .sql import ExecResult, parse_query, run_sql

_MAX_PERMUTED_COLUMNS = 6  # 720 permutations; wider results must match column order exactly


@dataclass
class RewardConfig:
    """How the scalar training reward is built from the match and the shaping terms."""

    valid_sql_bonus: float = 0.0
    """Added when the prediction parses as SQL (off by default: it rewards form, not meaning)."""
    executed_bonus: float = 0.0
    """Added when the prediction executes without error on the database."""
    empty_match_reward: float = 1.0
    """Training reward when gold and prediction are both empty. Spider scores it as a match (and
    exec_acc always does), but 16 of the 213 shared Spider dev golds return no rows, so any
    query returning nothing "solves" them; lower this to stop training from learning that."""
    timeout_s: float = 1.5
    """Wall-clock limit per query (Spider gold queries take milliseconds)."""
    max_rows: int = 10_000
    """Rows fetched per query; a truncated prediction can only match a truncated gold."""
    partial_credit: float = 0.0
    """Weight of the structural similarity given when the result does not match (0 = off)."""

    def __post_init__(self) -> None:
        # At 1 or more, a near-identical wrong query would earn as much as a correct one.
        if not 0.0 <= self.partial_credit < 1.0:
            raise ValueError(f"partial_credit must be in [0, 1), got {self.partial_credit!r}")


@dataclass
class SQLScore:
    """Execution accuracy and the shaping facts it was computed from."""

    exec_acc: float
    """1.0 if the results match, else 0.0."""
    parsed: bool
    """The prediction parses as a SELECT-like query (sqlglot)."""
    executed: bool
    """The prediction ran without error."""
    error: str | None
    """Error of the prediction (or of the gold query, prefixed 'gold:')."""
    reward: float
    """exec_acc (or empty_match_reward) plus enabled shaping terms."""
    gold_empty: bool = False
    """The gold query returned no rows (then any empty prediction matches)."""
    similarity: float = 0.0
    """Structural similarity to the gold query (`sql_similarity`), computed even when
    partial credit is off so runs with and without it can be compared."""


def gold_orders_rows(gold_sql: str) -> bool:
    """Does the outermost gold query have ORDER BY (so row order is part of the answer)?"""
    tree = parse_query(gold_sql)
    if tree is not None:
        return tree.args.get("order") is not None
    # Spider's own evaluator uses a substring test; fall back to it if sqlglot cannot parse.
    return re.search(r"\border\s+by\b", gold_sql, re.I) is not None


def _norm(value: object) -> object:
    # Floats from avg()/division differ in the last bits across equivalent queries.
    if isinstance(value, float):
        r = round(value, 6)
        return int(r) if r.is_integer() else r
    return value


def results_match(pred: list[tuple], gold: list[tuple], *, ordered: bool) -> bool:
    """Compare two row lists as multisets (or sequences when `ordered`), allowing a column
    permutation of the prediction."""
    if len(pred) != len(gold):
        return False
    pred = [tuple(_norm(v) for v in row) for row in pred]
    gold = [tuple(_norm(v) for v in row) for row in gold]
    if not gold:
        return True
    ncols = len(gold[0])
    if any(len(r) != ncols for r in pred):
        return False

    def same(p: list[tuple]) -> bool:
        return p == gold if ordered else Counter(p) == Counter(gold)

    if same(pred):
        return True
    if ncols > _MAX_PERMUTED_COLUMNS:
        return False
    # Prune permutations: a column can only map to a gold column with the same value multiset.
    pcols = [Counter(r[i] for r in pred) for i in range(ncols)]
    gcols = [Counter(r[i] for r in gold) for i in range(ncols)]
    for perm in itertools.permutations(range(ncols)):
        if perm == tuple(range(ncols)):
            continue
        if all(pcols[perm[j]] == gcols[j] for j in range(ncols)):
            if same([tuple(r[i] for i in perm) for r in pred]):
                return True
    return False


def score_sql(db_path: str, pred_sql: str | None, gold_sql: str,
              config: RewardConfig | None = None) -> SQLScore:
    """Execution accuracy of `pred_sql` against `gold_sql`, with shaping facts; never raises."""
    cfg = config or RewardConfig()
    parsed = bool(pred_sql) and parse_query(pred_sql) is not None
    # Missing SQL is not an engine error; keep the reason readable in logs.
    pred = (run_sql(db_path, pred_sql, timeout_s=cfg.timeout_s, max_rows=cfg.max_rows)
            if pred_sql else ExecResult(error="no SQL found in model output"))
    # Gold runs even when the prediction failed, so `gold_empty` describes the task alone and
    # per-task rates built on it compare across checkpoints.
    gold = run_sql(db_path, gold_sql, timeout_s=cfg.timeout_s, max_rows=cfg.max_rows)
    exec_acc, gold_empty = 0.0, gold.ok and not gold.rows
    error = pred.error
    if pred.ok:
        if not gold.ok:
            error = f"gold: {gold.error}"
        elif pred.truncated == gold.truncated and results_match(
                pred.rows, gold.rows, ordered=gold_orders_rows(gold_sql)):
            exec_acc = 1.0
    match_reward = cfg.empty_match_reward if gold_empty else 1.0
    similarity = sql_similarity(pred_sql, gold_sql)
    partial = cfg.partial_credit * similarity if not exec_acc else 0.0
    reward = (exec_acc * match_reward + partial + cfg.valid_sql_bonus * parsed
              + cfg.executed_bonus * pred.ok)
    return SQLScore(exec_acc=exec_acc, parsed=parsed, executed=pred.ok, error=error,
                    reward=reward, gold_empty=gold_empty, similarity=similarity)


def execution_match(db_path: str, pred_sql: str | None, gold_sql: str) -> float:
    """Spider execution accuracy: 1.0 if `pred_sql` returns the same result as `gold_sql`."""
    return score_sql(db_path, pred_sql, gold_sql).exec_acc


__all__ = ["RewardConfig", "SQLScore", "execution_match", "gold_orders_rows", "results_match",
           "score_sql", "ExecResult"]
