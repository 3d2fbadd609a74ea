"""Spider's difficulty levels (easy / medium / hard / extra) of a gold query.

Spider (Yu et al. 2018) grades a query by counting parts of its outermost SELECT: clause-like
parts (WHERE, GROUP BY, ORDER BY, LIMIT, each extra table joined, each OR and LIKE in the WHERE),
nested queries (subqueries, and the right side of UNION / INTERSECT / EXCEPT), and "other"
signs of width (more than one aggregate, selected column, WHERE condition or GROUP BY key).
This re-derives those counts from a sqlglot tree so the shared Spider slice, whose records carry
no level, can be reported per level like the generated data.
"""
from __future__ import annotations

from sqlglot import exp

from .sql import parse_query

LEVELS = ("easy", "medium", "hard", "extra")


def _own(node: exp.Expression, kind: type, root: exp.Select) -> list[exp.Expression]:
    """Nodes of `kind` under `node` that belong to `root`, not to a query nested inside it."""
    return [n for n in node.find_all(kind) if n.find_ancestor(exp.Select) is root]


def _counts(tree: exp.Expression) -> tuple[int, int, int]:
    nested = 0
    while isinstance(tree, exp.SetOperation):  # the left-most SELECT is the outer query
        nested += 1
        tree = tree.this
    if not isinstance(tree, exp.Select):
        return 0, nested, 0
    where, group = tree.args.get("where"), tree.args.get("group")
    clauses = sum(tree.args.get(k) is not None for k in ("where", "group", "order", "limit"))
    clauses += len(tree.args.get("joins") or [])
    conditions = 0
    if where is not None:
        ors = len(_own(where, exp.Or, tree))
        clauses += ors + len(_own(where, exp.Like, tree))
        conditions = 1 + ors + len(_own(where, exp.And, tree))
    nested += sum(1 for s in tree.find_all(exp.Select)
                  if s is not tree and s.parent_select is tree)
    others = sum([
        len(_own(tree, exp.AggFunc, tree)) > 1,
        len(tree.expressions) > 1,
        conditions > 1,
        group is not None and len(group.expressions) > 1,
    ])
    return clauses, nested, others


def spider_hardness(sql: str) -> str | None:
    """"easy", "medium", "hard" or "extra" by Spider's rules; None if `sql` does not parse."""
    tree = parse_query(sql)
    if tree is None:
        return None
    clauses, nested, others = _counts(tree)
    if clauses <= 1 and others == 0 and nested == 0:
        return "easy"
    if nested == 0 and ((others <= 2 and clauses <= 1) or (clauses <= 2 and others < 2)):
        return "medium"
    if ((others > 2 and clauses <= 2 and nested == 0)
            or (2 < clauses <= 3 and others <= 2 and nested == 0)
            or (clauses <= 1 and others == 0 and nested <= 1)):
        return "hard"
    return "extra"
