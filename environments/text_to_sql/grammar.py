"""A SQL grammar whose identifiers are one database's own tables and columns.

Why: after supervised warm-up on Spider a 135M model writes Spider-shaped queries whose
identifiers are wrong for an unseen database (it names the column the question says, `life
expectancy`, where the schema has `LifeExpectancy`): two thirds of its failures were `no such
column` / `no such table`. Decoding under this grammar (llguidance, through `Policy.chat(grammar=)`)
makes those two errors impossible by construction, the idea of PICARD (Scholak et al., 2021) in a
context-free form: every table name is one of the database's tables, every column one of its
columns, aliases are Spider's `T1`..`T9`, and the statement is one line of the SELECT subset
Spider's queries use (joins, subqueries, set operations, GROUP BY/HAVING, ORDER BY/LIMIT). What a
context-free grammar cannot know is which table a column belongs to, so `T2.x` may still name a
column of `T1`'s table.

The grammar describes what follows the writer's prefill (`"SELECT"` by default), so the constraint
applies to generated tokens only. Identifiers and keywords match in any ASCII case, as SQLite
resolves them; blanks are one to three spaces (as in Spider's gold queries).
"""
from __future__ import annotations

import json
import re
import sqlite3
from functools import lru_cache

from .schema import table_names_conn
from .sql import connect_readonly

__all__ = ["schema_grammar", "schema_identifiers"]

# Rules of the SELECT subset; TABLE and COLUMN are appended per database. One line, no comments.
# Blanks are explicit (no %ignore): two words need a space between them, or a lexer-based grammar
# would accept "SELECTSUM(x)" as SELECT + SUM.
_RULES = r"""
query: "SELECT"i WS select_body compound_tail
compound_tail: (WS compound WS "SELECT"i WS select_body)* (WS order_by)? (WS limit)?
compound: "UNION"i (WS "ALL"i)? | "INTERSECT"i | "EXCEPT"i
select_body: ("DISTINCT"i WS)? result (list_sep result)* WS "FROM"i WS from_items (WS where)? (WS group_by)? (WS having)?
result: "*" | ALIAS "." "*" | expr
from_items: from_item (join from_item (WS "ON"i WS condition)?)*
join: list_sep | WS (("LEFT"i | "INNER"i) WS)? "JOIN"i WS
from_item: TABLE (WS "AS"i WS ALIAS)? | "(" WS? query WS? ")" (WS? "AS"i WS ALIAS)?
where: "WHERE"i WS condition
group_by: "GROUP"i WS "BY"i WS expr (list_sep expr)*
having: "HAVING"i WS condition
order_by: "ORDER"i WS "BY"i WS ordering (list_sep ordering)*
ordering: expr (WS ("ASC"i | "DESC"i))?
limit: "LIMIT"i WS INT
condition: conjunction (WS "OR"i WS conjunction)*
conjunction: predicate (WS "AND"i WS predicate)*
predicate: ("NOT"i WS)? comparison | "(" WS? condition WS? ")"
comparison: expr (WS? COMPARE WS? expr)?
    | expr WS ("NOT"i WS)? "LIKE"i WS expr
    | expr WS ("NOT"i WS)? "BETWEEN"i WS expr WS "AND"i WS expr
    | expr WS ("NOT"i WS)? "IN"i WS? "(" WS? (query | literal (list_sep literal)*) WS? ")"
    | expr WS "IS"i WS ("NOT"i WS)? "NULL"i
expr: term (WS? ARITH WS? term)*
term: column | literal | aggregate | "(" WS? query WS? ")" | "(" WS? expr WS? ")"
aggregate: "count"i WS? "(" WS? ("*" | ("DISTINCT"i WS)? expr) WS? ")"
    | AGG WS? "(" WS? ("DISTINCT"i WS)? expr WS? ")"
column: COLUMN | TABLE "." COLUMN | ALIAS "." COLUMN
literal: INT | FLOAT | STRING
list_sep: WS? "," WS?
AGG: "sum"i | "avg"i | "min"i | "max"i
COMPARE: "=" | "!=" | "<>" | "<" | ">" | "<=" | ">="
ARITH: "+" | "-" | "*" | "/"
ALIAS: /[Tt][1-9]/
INT: /-?[0-9]{1,9}/
FLOAT: /-?[0-9]{1,9}\.[0-9]{1,6}/
STRING: /'[^'\n]{0,60}'/ | /"[^"\n]{0,60}"/
WS: /[ ]{1,3}/
"""


@lru_cache(maxsize=256)
def schema_identifiers(db_path: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(tables, columns) of a database, read from SQLite itself (as the schema prompt is)."""
    conn = connect_readonly(db_path)
    try:
        tables = table_names_conn(conn)
        columns: dict[str, None] = {}
        for table in tables:
            for row in conn.execute(f'PRAGMA table_info("{table}")'):
                columns.setdefault(row[1], None)
    except sqlite3.Error as exc:
        raise ValueError(f"cannot read the schema of {db_path}: {exc}") from exc
    finally:
        conn.close()
    if not tables:
        raise ValueError(f"{db_path} has no tables to build a grammar from")
    return tuple(tables), tuple(columns)


def _any_case(word: str) -> str:
    """A regex of `word` in any ASCII case. Not Lark's `"word"i`: that folds Unicode, so `"s"i`
    also matches `ſ` (U+017F), which SQLite does not take for `s`."""
    return "/" + "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else re.escape(c)
                         for c in word) + "/"


def _names(names: tuple[str, ...]) -> str:
    """Alternatives of a terminal: a plain name matches in any case, an odd one only quoted."""
    out = []
    for name in sorted(set(names), key=str.lower):
        if name.isascii() and name.replace("_", "a").isalnum() and not name[0].isdigit():
            out.append(_any_case(name))
        else:
            out.append(json.dumps(f'"{name}"'))
    return " | ".join(out)


@lru_cache(maxsize=256)
def schema_grammar(db_path: str, prefill: str = "SELECT") -> str:
    """Lark grammar (llguidance dialect) of one query over `db_path`, after `prefill`.

    `prefill` must be "" (the whole query is generated) or "SELECT" (the writer's default);
    a query may end with ";".
    """
    if prefill.strip().upper() not in ("", "SELECT"):
        raise ValueError(f"schema grammar supports the prefill '' or 'SELECT', got {prefill!r}")
    start = ('start: WS select_body compound_tail WS? ";"?' if prefill.strip()
             else 'start: WS? query WS? ";"?')
    tables, columns = schema_identifiers(str(db_path))
    rules = re.sub(r'"(\w+)"i', lambda m: _any_case(m.group(1)), _RULES)
    return f"{start}\n{rules}TABLE: {_names(tables)}\nCOLUMN: {_names(columns)}\n"
