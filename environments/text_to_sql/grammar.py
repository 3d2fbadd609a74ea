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
resolves them; blanks are one to three spaces (as in Spider's gold queries). String literals hold
no `;` or backtick: those begin the writer's stop strings, which would cut a query inside a string.
"""
from __future__ import annotations

import json
import re
import sqlite3
from functools import lru_cache
from typing import Iterable

from .schema import table_names_conn
from .sql import connect_readonly

__all__ = ["schema_grammar", "schema_identifiers", "table_columns"]

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
STRING: /'[^'\n;`]{0,60}'/ | /"[^"\n;`]{0,60}"/
WS: /[ ]{1,3}/
"""


@lru_cache(maxsize=256)
def table_columns(db_path: str) -> dict[str, tuple[str, ...]]:
    """Each table of a database with its columns, read from SQLite itself (as the schema prompt
    is). Cached: treat the result as read-only."""
    conn = connect_readonly(db_path)
    try:
        out = {table: tuple(row[1] for row in conn.execute(f'PRAGMA table_info("{table}")'))
               for table in table_names_conn(conn)}
    except sqlite3.Error as exc:
        raise ValueError(f"cannot read the schema of {db_path}: {exc}") from exc
    finally:
        conn.close()
    if not out:
        raise ValueError(f"{db_path} has no tables to build a grammar from")
    return out


def schema_identifiers(db_path: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(tables, columns) of a database; a column shared by several tables is listed once."""
    tables = table_columns(db_path)
    columns = dict.fromkeys(c for cols in tables.values() for c in cols)
    return tuple(tables), tuple(columns)


def _any_case(word: str) -> str:
    """A regex body of `word` in any ASCII case. Not Lark's `"word"i`: that folds Unicode, so
    `"s"i` also matches `ſ` (U+017F), which SQLite does not take for `s`."""
    return "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else re.escape(c).replace("/", r"\/")
                   for c in word)


def _plain(name: str) -> bool:
    return name.isascii() and name.replace("_", "a").isalnum() and not name[0].isdigit()


def _names(names: Iterable[str]) -> str:
    """Alternatives of a terminal: a plain name matches in any case, an odd one only quoted."""
    return " | ".join(f"/{_any_case(name)}/" if _plain(name) else json.dumps(f'"{name}"')
                      for name in sorted(set(names), key=str.lower))


def _name_regex(name: str) -> str:
    return _any_case(name) if _plain(name) else _any_case(f'"{name}"')


def _qualified_columns(tables: dict[str, tuple[str, ...]]) -> str:
    """One terminal of every real `table.column` pair: a table's name binds its own columns."""
    return " | ".join(
        f"/{_name_regex(table)}\\.(?:{'|'.join(_name_regex(c) for c in sorted(set(cols)))})/"
        for table, cols in sorted(tables.items(), key=lambda kv: kv[0].lower()) if cols)


# Rules replaced when columns are table-qualified: no bare columns, no aliases.
_QUALIFIED_RULES = {
    "result": 'result: "*" | expr',
    "from_item": 'from_item: TABLE | "(" WS? query WS? ")"',
    "column": "column: QCOLUMN",
    "ALIAS": "",
}


@lru_cache(maxsize=256)
def schema_grammar(db_path: str, prefill: str = "SELECT", qualified: bool = False) -> str:
    """Lark grammar (llguidance dialect) of one query over `db_path`, after `prefill`.

    `prefill` must be "" (the whole query is generated) or "SELECT" (the writer's default);
    a query may end with ";". `qualified=True`: every column is written `table.column` with a
    pair that exists in the database, and tables take no aliases (the form `qualify.qualify_sql`
    writes demonstrations in).
    """
    if prefill.strip().upper() not in ("", "SELECT"):
        raise ValueError(f"schema grammar supports the prefill '' or 'SELECT', got {prefill!r}")
    start = ('start: WS select_body compound_tail WS? ";"?' if prefill.strip()
             else 'start: WS? query WS? ";"?')
    rules = _RULES
    if qualified:
        rules = "".join(_QUALIFIED_RULES.get(line.split(":")[0], line) + "\n"
                        for line in _RULES.splitlines() if line)
    rules = re.sub(r'"(\w+)"i', lambda m: f"/{_any_case(m.group(1))}/", rules)
    tables = table_columns(str(db_path))
    names = f"TABLE: {_names(tables)}\n"
    if qualified:
        return f"{start}\n{rules}{names}QCOLUMN: {_qualified_columns(tables)}\n"
    _, columns = schema_identifiers(str(db_path))
    return f"{start}\n{rules}{names}COLUMN: {_names(columns)}\n"
