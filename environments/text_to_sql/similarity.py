"""Structural similarity of a predicted and a gold query, for partial-credit reward shaping.

A small policy almost never matches the gold result, so a 0/1 reward gives PPO groups with no
signal. Like the schema-linking and n-gram rewards of Reasoning-SQL (Pourreza et al. 2025) and
SQL-R1, this scores how much of the gold query's structure the prediction gets right, so queries
that name the right tables and columns rank above unrelated ones. It is a shaping term only:
execution accuracy stays the metric.

The score is the F1 between two sets of components read from the sqlglot trees:

- `table`: table names (lower-cased; SQLite names are case-insensitive). Picking the right
  tables is the first half of schema linking.
- `column`: column names, lower-cased and unqualified (aliases like `T1.` differ freely).
  The other half of schema linking, and where small models most often go wrong.
- `agg`: aggregate functions used (count, sum, avg, min, max, ...): what is computed.
- `clause`: clause kinds present (where, group, having, order, limit, distinct, join, union,
  intersect, except, subquery, with): the shape of the query.
- `value`: literal values (filter constants, LIMIT counts), case kept since SQLite compares
  text case-sensitively: whether the constants were read off the question.

All components count equally (no per-category weights to tune), so a category weighs by how
many components it holds; in Spider that is mostly tables and columns.
"""
from __future__ import annotations

from functools import lru_cache

from sqlglot import exp

from .sql import parse_query

# Node types whose presence is a `clause` component, and the component's name.
_CLAUSES: dict[type[exp.Expression], str] = {
    exp.Where: "where", exp.Group: "group", exp.Having: "having", exp.Order: "order",
    exp.Limit: "limit", exp.Distinct: "distinct", exp.Join: "join", exp.Union: "union",
    exp.Intersect: "intersect", exp.Except: "except", exp.Subquery: "subquery",
    exp.Exists: "subquery", exp.CTE: "with",
}

Component = tuple[str, str]


def _component(node: exp.Expression) -> Component | None:
    """The component `node` stands for, if any."""
    if isinstance(node, exp.Table):
        return "table", node.name.lower()
    if isinstance(node, exp.Column):
        return "column", node.name.lower()
    if isinstance(node, exp.AggFunc):
        return "agg", node.key
    if isinstance(node, exp.Literal):
        return "value", node.name
    clause = _CLAUSES.get(type(node))
    return ("clause", clause) if clause else None


@lru_cache(maxsize=4096)
def query_components(sql: str) -> frozenset[Component] | None:
    """The components of `sql`, or None if it does not parse as a query.

    Cached: the gold query is scored once per rollout and sampled predictions repeat.
    """
    tree = parse_query(sql)
    if tree is None:
        return None
    return frozenset(c for c in map(_component, tree.walk()) if c is not None)


def sql_similarity(pred_sql: str | None, gold_sql: str) -> float:
    """F1 in [0, 1] of the components of `pred_sql` against those of `gold_sql`; never raises.

    1.0 for identical queries, 0.0 when either side is missing or does not parse.
    """
    pred = query_components(pred_sql) if pred_sql else None
    gold = query_components(gold_sql) if gold_sql else None
    if pred is None or gold is None:
        return 0.0
    if not pred and not gold:  # e.g. "SELECT random()" twice: nothing differs
        return 1.0
    return 2 * len(pred & gold) / (len(pred) + len(gold))
