"""Question templates over a `Domain`, covering the query shapes of Spider's levels.

From single-table filters and counts, through aggregates, GROUP BY / HAVING / ORDER BY + LIMIT,
to JOINs, nested queries and set operations (UNION / INTERSECT / EXCEPT, NOT IN). The level of
each instance is graded from its gold SQL by Spider's rules (`hardness.py`), not by hand.

Parameters (filter values, thresholds) are drawn from the live database with the domain's rng,
so every question talks about values that exist; `data.py` still executes each gold query and
drops the ones with empty results.
"""
from __future__ import annotations

import random
import sqlite3
from typing import Callable, Iterator

from .domains import Domain, Entity, Extra, Relation

Question = tuple[str, str]  # (question, gold_sql)


def lit(value: object) -> str:
    """SQL literal for a value taken from the database."""
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return repr(value)


class Sampler:
    """Draws template parameters from the database, deterministically via `rng`."""

    def __init__(self, conn: sqlite3.Connection, rng: random.Random):
        self.conn, self.rng = conn, rng

    def values(self, sql: str) -> list:
        return [r[0] for r in self.conn.execute(sql) if r[0] is not None]

    def pick(self, sql: str) -> object | None:
        # Sorted so the draw depends only on the rng, not on SQLite's scan order.
        vals = sorted(self.values(sql), key=lambda v: (type(v).__name__, v))
        return self.rng.choice(vals) if vals else None

    def say(self, *phrasings: str) -> str:
        """One of several wordings of the same question.

        Spider's questions are free-form ("Find the ...", "Return the ...", "What is the number
        of ..."); a single fixed wording per template teaches a policy the template, not the task.
        """
        return self.rng.choice(phrasings)

    def quantile(self, table: str, col: str, q: float) -> object | None:
        """A value near quantile `q` of `table.col`, so comparisons select a sensible share."""
        vals = sorted(self.values(f"SELECT {col} FROM {table}"))
        return vals[min(len(vals) - 1, int(q * len(vals)))] if vals else None


def _num(v: object) -> object:
    # Thresholds read better rounded ("greater than 3.2" rather than 3.1873).
    return round(v, 1) if isinstance(v, float) else v


def entity_questions(e: Entity, s: Sampler) -> Iterator[Question]:
    T, N, P, S, NP = e.table, e.name_col, e.plural, e.singular, e.name_phrase
    yield s.say(f"How many {P} are there?", f"Count the number of {P}.",
                        f"How many {P} do we have?", f"What is the total number of {P}?",
                        f"Find the number of {P}."), f"SELECT count(*) FROM {T}"
    for c, cp in e.categorical:
        v = s.pick(f"SELECT DISTINCT {c} FROM {T}")
        yield (s.say(f"How many {P} have {cp} {v}?", f"Count the {P} whose {cp} is {v}.",
                             f"Find the number of {P} with {cp} {v}.",
                             f"What is the number of {P} whose {cp} is {v}?"),
               f"SELECT count(*) FROM {T} WHERE {c} = {lit(v)}")
        v = s.pick(f"SELECT DISTINCT {c} FROM {T}")
        yield (s.say(f"List the {NP} of every {S} whose {cp} is {v}.",
                             f"What are the {NP}s of the {P} with {cp} {v}?",
                             f"Find the {NP} of the {P} whose {cp} is {v}.",
                             f"Return the {NP}s of {P} whose {cp} is {v}.",
                             f"Which {P} have {cp} {v}? Give their {NP}s."),
               f"SELECT {N} FROM {T} WHERE {c} = {lit(v)}")
        yield s.say(f"What are the distinct {cp} values of {P}?",
                            f"Show the different {cp} values of all {P}.",
                            f"Find the distinct {cp} of {P}."), f"SELECT DISTINCT {c} FROM {T}"
        yield (s.say(f"How many {P} are there for each {cp}?",
                               f"Show each {cp} and the number of {P} with it.",
                               f"For each {cp}, count the {P}.",
                               f"Find the number of {P} for each {cp}."),
               f"SELECT {c}, count(*) FROM {T} GROUP BY {c}")
        yield (s.say(f"Which {cp} has the most {P}?",
                               f"What is the most common {cp} among {P}?",
                               f"Find the {cp} with the largest number of {P}.",
                               f"Return the {cp} shared by the most {P}."),
               f"SELECT {c} FROM {T} GROUP BY {c} ORDER BY count(*) DESC LIMIT 1")
        k = s.pick(f"SELECT count(*) FROM {T} GROUP BY {c}")
        yield (s.say(f"Which {cp} values have at least {k} {P}?",
                               f"Find the {cp} values that have {k} or more {P}.",
                               f"Show the {cp} values with at least {k} {P}."),
               f"SELECT {c} FROM {T} GROUP BY {c} HAVING count(*) >= {k}")
        distinct = s.values(f"SELECT DISTINCT {c} FROM {T} ORDER BY {c}")
        if len(distinct) >= 2:
            v1, v2 = sorted(s.rng.sample(distinct, 2), key=str)
            yield (s.say(f"List the {NP} of {P} whose {cp} is {v1} or {v2}.",
                                 f"Find the {NP}s of {P} with {cp} {v1} or {cp} {v2}.",
                                 f"Which {P} have {cp} {v1} or {v2}? Give their {NP}s."),
                   f"SELECT {N} FROM {T} WHERE {c} = {lit(v1)} UNION SELECT {N} FROM {T} WHERE {c} = {lit(v2)}")
        for n, nphrase in e.numeric[:1]:
            yield (s.say(f"What is the average {nphrase} of {P} for each {cp}?",
                                   f"For each {cp}, find the average {nphrase} of {P}.",
                                   f"Show each {cp} with the average {nphrase} of its {P}."),
                   f"SELECT {c}, avg({n}) FROM {T} GROUP BY {c}")
            v = s.pick(f"SELECT DISTINCT {c} FROM {T}")
            if "year" not in n:  # a sum of years means nothing
                yield (s.say(f"What is the total {nphrase} of {P} whose {cp} is {v}?",
                                       f"Find the sum of the {nphrase} of {P} with {cp} {v}.",
                                       f"Return the total {nphrase} of all {P} whose {cp} is {v}."),
                       f"SELECT sum({n}) FROM {T} WHERE {c} = {lit(v)}")
            hi, lo = _num(s.quantile(T, n, 0.7)), _num(s.quantile(T, n, 0.3))
            yield (s.say(f"Which {cp} values have both a {S} with {nphrase} above {hi} and a {S} with {nphrase} below {lo}?",
                                 f"Find the {cp} values that have {P} with {nphrase} above {hi} and also {P} with {nphrase} below {lo}."),
                   f"SELECT {c} FROM {T} WHERE {n} > {hi} INTERSECT SELECT {c} FROM {T} WHERE {n} < {lo}")
            top = _num(s.quantile(T, n, 0.9))
            yield (s.say(f"Which {cp} values have no {S} with {nphrase} above {top}?",
                                 f"Find the {cp} values where no {S} has a {nphrase} above {top}."),
                   f"SELECT {c} FROM {T} EXCEPT SELECT {c} FROM {T} WHERE {n} > {top}")
    for n, nphrase in e.numeric:
        x = _num(s.quantile(T, n, 0.6))
        yield (s.say(f"Which {P} have a {nphrase} greater than {x}? Give their {NP}.",
                             f"Find the {NP} of {P} whose {nphrase} is more than {x}.",
                             f"What are the {NP}s of the {P} with {nphrase} above {x}?",
                             f"List the {NP} of {P} that have a {nphrase} greater than {x}."),
               f"SELECT {N} FROM {T} WHERE {n} > {x}")
        if N != e.key:
            v = s.pick(f"SELECT {N} FROM {T}")
            yield s.say(f"What is the {nphrase} of the {S} {v}?",
                                f"Find the {nphrase} of the {S} whose {NP} is {v}.",
                                f"Give the {nphrase} of {v}."), f"SELECT {n} FROM {T} WHERE {N} = {lit(v)}"
        yield s.say(f"Show the {NP} and {nphrase} of every {S}.",
                            f"What are the {NP} and {nphrase} of all {P}?",
                            f"List the {NP} and {nphrase} of each {S}."), f"SELECT {N}, {n} FROM {T}"
        yield s.say(f"What is the average {nphrase} of all {P}?",
                              f"Find the average {nphrase} of {P}.",
                              f"Give the mean {nphrase} of all {P}."), f"SELECT avg({n}) FROM {T}"
        yield (s.say(f"What are the maximum and minimum {nphrase} of {P}?",
                               f"Find the maximum and minimum {nphrase} among all {P}.",
                               f"Show the highest and lowest {nphrase} of {P}."),
               f"SELECT max({n}), min({n}) FROM {T}")
        yield (s.say(f"List the {NP} of all {P} ordered by {nphrase} from highest to lowest.",
                               f"Show the {NP} of {P} in descending order of {nphrase}.",
                               f"What are the {NP}s of all {P}, sorted by {nphrase} from highest to lowest?"),
               f"SELECT {N} FROM {T} ORDER BY {n} DESC")
        yield (s.say(f"What are the {NP}s of the 3 {P} with the lowest {nphrase}?",
                               f"Find the {NP} of the three {P} with the smallest {nphrase}.",
                               f"List the {NP}s of the 3 {P} that have the lowest {nphrase}."),
               f"SELECT {N} FROM {T} ORDER BY {n} ASC LIMIT 3")
        yield (s.say(f"What is the {NP} of the {S} with the highest {nphrase}?",
                               f"Find the {NP} of the {S} that has the largest {nphrase}.",
                               f"Return the {NP} of the {S} with the greatest {nphrase}.",
                               f"Which {S} has the highest {nphrase}? Give its {NP}."),
               f"SELECT {N} FROM {T} ORDER BY {n} DESC LIMIT 1")
        yield (s.say(f"Which {P} have a {nphrase} above the average? Give their {NP}.",
                             f"Find the {NP} of {P} whose {nphrase} is higher than the average.",
                             f"What are the {NP}s of {P} whose {nphrase} is greater than the average {nphrase} of all {P}?"),
               f"SELECT {N} FROM {T} WHERE {n} > (SELECT avg({n}) FROM {T})")


def relation_questions(r: Relation, parent: Entity, s: Sampler) -> Iterator[Question]:
    P, C, F, K, N = r.parent, r.child, r.fk, parent.key, parent.name_col
    PP, PS, NP, CP = parent.plural, parent.singular, parent.name_phrase, r.child_plural
    CS = r.child_singular
    join = f"FROM {P} AS T1 JOIN {C} AS T2 ON T1.{K} = T2.{F}"
    yield (s.say(f"List the {NP} of {PP} that have at least one {CS}.",
                         f"Find the distinct {NP}s of {PP} with some {CP}.",
                         f"Which {PP} have any {CP}? Give their {NP}s."),
           f"SELECT DISTINCT T1.{N} {join}")
    yield (s.say(f"How many {CP} does each {PS} have? Show the {NP} and the count.",
                         f"For each {PS}, show its {NP} and the number of {CP}.",
                         f"Find the number of {CP} of each {PS}, with the {PS}'s {NP}."),
           f"SELECT T1.{N}, count(*) {join} GROUP BY T1.{K}")
    yield (s.say(f"Which {PP} have no {CP}? Give their {NP}.",
                         f"Find the {NP}s of {PP} without any {CP}.",
                         f"List the {NP} of {PP} that do not have any {CS}."),
           f"SELECT {N} FROM {P} WHERE {K} NOT IN (SELECT {F} FROM {C} WHERE {F} IS NOT NULL)")
    yield (s.say(f"What is the {NP} of the {PS} with the most {CP}?",
                         f"Find the {NP} of the {PS} that has the largest number of {CP}.",
                         f"Which {PS} has the most {CP}? Return its {NP}."),
           f"SELECT T1.{N} {join} GROUP BY T1.{K} ORDER BY count(*) DESC LIMIT 1")
    k = s.pick(f"SELECT count(*) FROM {C} GROUP BY {F}")
    yield (s.say(f"Which {PP} have more than {k} {CP}? Give their {NP}.",
                         f"Find the {NP}s of {PP} with more than {k} {CP}.",
                         f"List the {NP} of every {PS} that has over {k} {CP}."),
           f"SELECT T1.{N} {join} GROUP BY T1.{K} HAVING count(*) > {k}")
    for n, nphrase in r.child_numeric[:1]:
        yield (s.say(f"What is the average {nphrase} of {CP} for each {PS}? Show the {NP} too.",
                             f"For each {PS}, show its {NP} and the average {nphrase} of its {CP}.",
                             f"Find the {NP} of each {PS} and the mean {nphrase} of its {CP}."),
               f"SELECT T1.{N}, avg(T2.{n}) {join} GROUP BY T1.{K}")
    for c, cp in parent.categorical[:1]:
        v = s.pick(f"SELECT DISTINCT T1.{c} {join}")
        yield (s.say(f"How many {CP} belong to {PP} whose {cp} is {v}?",
                             f"Count the {CP} of {PP} with {cp} {v}.",
                             f"Find the total number of {CP} of the {PP} whose {cp} is {v}."),
               f"SELECT count(*) {join} WHERE T1.{c} = {lit(v)}")
    if N != K:
        v = s.pick(f"SELECT DISTINCT T1.{N} {join}")
        yield (s.say(f"How many {CP} does the {PS} {v} have?",
                             f"Count the {CP} of the {PS} named {v}.",
                             f"What is the number of {CP} that {v} has?"),
               f"SELECT count(*) {join} WHERE T1.{N} = {lit(v)}")


def extra_questions(x: Extra, s: Sampler) -> Iterator[Question]:
    if x.values_sql is None:
        yield x.question, x.sql
        return
    v = s.pick(x.values_sql)
    if v is not None:
        shown = _num(v)
        yield x.question.format(v=shown), x.sql.format(v=lit(shown))


def domain_questions(domain: Domain, conn: sqlite3.Connection,
                     rng: random.Random) -> list[Question]:
    """All template instances for one domain (unfiltered; may contain empty-result queries)."""
    s = Sampler(conn, rng)
    entities = {e.table: e for e in domain.entities}
    out: list[Question] = []
    gens: list[Callable[[], Iterator[Question]]] = []
    gens += [lambda e=e: entity_questions(e, s) for e in domain.entities]
    gens += [lambda r=r: relation_questions(r, entities.get(r.parent) or _bare(r.parent), s)
             for r in domain.relations]
    gens += [lambda x=x: extra_questions(x, s) for x in domain.extras]
    for gen in gens:
        out.extend(gen())
    return out


def _bare(table: str) -> Entity:
    # Parents not described as entities (e.g. branches, playlists) still have id + name.
    singular = table[:-1] if table.endswith("s") else table
    return Entity(table, singular, table)
