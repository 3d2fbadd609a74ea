"""A fictional knowledge base rendered as Wikipedia-like paragraphs, with HotpotQA-style questions.

Why generated data: HotpotQA answers are often memorised by pretrained models; syllable-composed
names ("Velcor Dynamics", "Talven Morasko") force the agent to retrieve and read. Everything is
derived from one `random.Random(seed)`, so a seed reproduces the data exactly, and the train and
dev worlds are built from disjoint slices of one name pool, so no entity (and hence no question)
is shared between splits.

Each paragraph keeps one fact per sentence, so supporting facts (title, sentence index) are
precise, and a bridge question's answer only appears in the second-hop paragraph.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from .tasks import Paragraph, RagTask, attach_corpus

_ONSETS = "b br d dr f g gr k kr l m n p r s st t th v z".split()
_VOWELS = "a e i o u ae ei ou ia".split()
_CODAS = ["", "", "n", "r", "l", "s", "th", "x", "nd", "rk"]
_COMPANY_SUFFIX = ["Dynamics", "Holdings", "Works", "Labs", "Group", "Industries", "Systems"]
_INDUSTRIES = ["software", "shipbuilding", "textile", "mining", "pharmaceutical", "brewing",
               "aerospace", "publishing", "robotics", "glassmaking"]
_OCCUPATIONS = ["engineer", "painter", "economist", "novelist", "chemist", "architect",
                "composer", "merchant", "cartographer", "physician"]
_RIVER_WORDS = ["river", "lake", "bay", "valley", "plateau"]


@dataclass(frozen=True)
class GeneratorConfig:
    """Sizes of one generated split (a world of entities and the questions sampled from it)."""

    n_questions: int
    """number of questions (tasks) to produce"""
    n_people: int
    """people in this split's world"""
    n_cities: int
    """cities in this split's world (people are born in them, companies sit in them)"""
    n_orgs: int
    """companies in this split's world (each has a founder and a headquarters city)"""
    n_countries: int = 4
    """fictional countries the cities belong to"""
    n_paragraphs: int = 10
    """paragraphs per task: 2 gold + distractors (HotpotQA's distractor setting)"""
    bridge_fraction: float = 0.6
    """share of bridge questions; the rest are comparisons"""


SPLITS: dict[str, GeneratorConfig] = {
    "train": GeneratorConfig(n_questions=200, n_people=60, n_cities=24, n_orgs=40),
    "dev": GeneratorConfig(n_questions=60, n_people=24, n_cities=12, n_orgs=16),
}


@dataclass
class Person:
    name: str
    born: int
    city: "City"
    occupation: str
    pronoun: str
    award: str


@dataclass
class City:
    name: str
    country: str
    founded: int
    population: int
    landmark: str


@dataclass
class Org:
    name: str
    founded: int
    founder: Person
    hq: City
    industry: str
    employees: int


@dataclass
class World:
    people: list[Person]
    cities: list[City]
    orgs: list[Org]


# ---------------------------------------------------------------------------------------- names


def _word(rng: random.Random, syllables: int) -> str:
    parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)]
    return ("".join(parts) + rng.choice(_CODAS)).capitalize()


def _name_pool(rng: random.Random, n: int, make: Callable[[random.Random], str],
               taken: set[str]) -> list[str]:
    """`n` distinct names not in `taken` (which is updated, so pools never overlap)."""
    names: list[str] = []
    while len(names) < n:
        name = make(rng)
        # Reject names that share a word with an existing name, so a surname alone (used in
        # the paragraphs) still identifies one entity and BM25 cannot confuse two entities.
        words = set(name.split()) - set(_COMPANY_SUFFIX)
        if name in taken or words & taken:
            continue
        taken.add(name)
        taken.update(words)
        names.append(name)
    return names


def _person_name(rng: random.Random) -> str:
    return f"{_word(rng, rng.randint(1, 2))} {_word(rng, rng.randint(2, 3))}"


def _city_name(rng: random.Random) -> str:
    return _word(rng, rng.randint(2, 3))


def _org_name(rng: random.Random) -> str:
    return f"{_word(rng, 2)} {rng.choice(_COMPANY_SUFFIX)}"


# ---------------------------------------------------------------------------------------- world


def _build_world(rng: random.Random, cfg: GeneratorConfig, names: dict[str, list[str]]) -> World:
    countries = names["countries"]
    cities = [
        City(name=n, country=rng.choice(countries), founded=rng.randrange(900, 1850),
             population=rng.randrange(20, 2000) * 1000 + rng.randrange(1000),
             landmark=f"{names['landmarks'][i]} {rng.choice(_RIVER_WORDS)}")
        for i, n in enumerate(names["cities"])
    ]
    people = [
        Person(name=n, born=rng.randrange(1900, 1990), city=rng.choice(cities),
               occupation=rng.choice(_OCCUPATIONS), pronoun=rng.choice(["He", "She"]),
               award=f"{names['awards'][i]} Prize")
        for i, n in enumerate(names["people"])
    ]
    orgs = []
    for n in names["orgs"]:
        founder = rng.choice(people)
        orgs.append(Org(name=n, founded=rng.randrange(founder.born + 20, min(founder.born + 60, 2021)),
                        founder=founder, hq=rng.choice(cities), industry=rng.choice(_INDUSTRIES),
                        employees=rng.randrange(2, 900) * 10))
    return World(people=people, cities=cities, orgs=orgs)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _surname(p: Person) -> str:
    return p.name.split()[-1]


def person_paragraph(p: Person) -> Paragraph:
    return Paragraph(p.name, (
        f"{p.name} (born {p.born}) is {_article(p.occupation)} {p.occupation}.",
        f"{_surname(p)} was born in {p.city.name}.",
        f"{p.pronoun} received the {p.award} for {p.pronoun.lower() == 'he' and 'his' or 'her'} work.",
    ))


def city_paragraph(c: City) -> Paragraph:
    return Paragraph(c.name, (
        f"{c.name} is a city in {c.country}.",
        f"It was founded in {c.founded}.",
        f"Its population was {c.population:,} at the last census.",
        f"The city lies beside the {c.landmark}.",
    ))


def org_paragraph(o: Org) -> Paragraph:
    return Paragraph(o.name, (
        f"{o.name} is {_article(o.industry)} {o.industry} company founded in {o.founded}.",
        f"It was founded by {o.founder.name}.",
        f"The company is headquartered in {o.hq.name}.",
        f"It employs about {o.employees:,} people.",
    ))


# ------------------------------------------------------------------------------------ questions
# A question maker returns (question, answer, kind, supporting facts) or None if the sampled
# entities do not make a well-posed question (e.g. a tie in a comparison).

Made = tuple[str, str, str, list[tuple[str, int]]]


def _bridge(rng: random.Random, w: World) -> Made:
    o, p = rng.choice(w.orgs), rng.choice(w.people)
    variant = rng.randrange(6)
    if variant == 0:
        return (f"In which city was the founder of {o.name} born?", o.founder.city.name, "bridge",
                [(o.name, 1), (o.founder.name, 1)])
    if variant == 1:
        return (f"In what year was the founder of {o.name} born?", str(o.founder.born), "bridge",
                [(o.name, 1), (o.founder.name, 0)])
    if variant == 2:
        return (f"What is the population of the city where {o.name} is headquartered?",
                f"{o.hq.population:,}", "bridge", [(o.name, 2), (o.hq.name, 2)])
    if variant == 3:
        return (f"In which country is the headquarters of {o.name}?", o.hq.country, "bridge",
                [(o.name, 2), (o.hq.name, 0)])
    if variant == 4:
        return (f"In what year was the birthplace of {p.name} founded?", str(p.city.founded),
                "bridge", [(p.name, 1), (p.city.name, 1)])
    return (f"In which country was {p.name} born?", p.city.country, "bridge",
            [(p.name, 1), (p.city.name, 0)])


def _comparison(rng: random.Random, w: World) -> Made | None:
    # yes/no variants (4, 5) get half weight: HotpotQA has few of them, and a weak policy that
    # always says "no" should not collect much reward.
    variant = rng.choices(range(6), weights=[2, 2, 2, 2, 1, 1])[0]
    if variant == 0:
        a, b = rng.sample(w.people, 2)
        if a.born == b.born:
            return None
        first = a if a.born < b.born else b
        return (f"Who was born first, {a.name} or {b.name}?", first.name, "comparison",
                [(a.name, 0), (b.name, 0)])
    if variant == 1:
        a, b = rng.sample(w.orgs, 2)
        if a.founded == b.founded:
            return None
        older = a if a.founded < b.founded else b
        return (f"Which company was founded earlier, {a.name} or {b.name}?", older.name,
                "comparison", [(a.name, 0), (b.name, 0)])
    if variant == 2:
        a, b = rng.sample(w.cities, 2)
        if a.population == b.population:
            return None
        larger = a if a.population > b.population else b
        return (f"Which city has the larger population, {a.name} or {b.name}?", larger.name,
                "comparison", [(a.name, 2), (b.name, 2)])
    if variant == 3:
        a, b = rng.sample(w.cities, 2)
        if a.founded == b.founded:
            return None
        older = a if a.founded < b.founded else b
        return (f"Which city is older, {a.name} or {b.name}?", older.name, "comparison",
                [(a.name, 1), (b.name, 1)])
    if variant == 4:
        a = rng.choice(w.people)
        # Ask "same city?" about a same-city pair half of the time, so yes and no both occur.
        same = [p for p in w.people if p is not a and p.city is a.city]
        b = rng.choice(same) if same and rng.random() < 0.5 else rng.choice(
            [p for p in w.people if p is not a])
        return (f"Were {a.name} and {b.name} born in the same city?",
                "yes" if a.city is b.city else "no", "comparison", [(a.name, 1), (b.name, 1)])
    a = rng.choice(w.orgs)
    same = [o for o in w.orgs if o is not a and o.hq is a.hq]
    b = rng.choice(same) if same and rng.random() < 0.5 else rng.choice(
        [o for o in w.orgs if o is not a])
    return (f"Are {a.name} and {b.name} headquartered in the same city?",
            "yes" if a.hq is b.hq else "no", "comparison", [(a.name, 2), (b.name, 2)])


def _paragraphs(w: World) -> dict[str, Paragraph]:
    paras = [person_paragraph(p) for p in w.people] + [city_paragraph(c) for c in w.cities]
    paras += [org_paragraph(o) for o in w.orgs]
    return {p.title: p for p in paras}


def _questions(rng: random.Random, w: World, cfg: GeneratorConfig, split: str,
               seed: int) -> list[RagTask]:
    by_title = _paragraphs(w)
    titles = sorted(by_title)
    tasks: list[RagTask] = []
    seen: set[str] = set()
    attempts = 0
    while len(tasks) < cfg.n_questions:
        attempts += 1
        if attempts > 100 * cfg.n_questions:
            raise RuntimeError(f"world too small for {cfg.n_questions} distinct questions")
        made = _bridge(rng, w) if rng.random() < cfg.bridge_fraction else _comparison(rng, w)
        if made is None or made[0] in seen:
            continue
        question, answer, kind, facts = made
        if kind == "bridge" and answer in by_title[facts[0][0]].text:
            continue  # a shortcut: e.g. the founder was born in the company's own HQ city
        seen.add(question)
        gold = list(dict.fromkeys(t for t, _ in facts))
        others = [t for t in titles if t not in gold]
        chosen = gold + rng.sample(others, cfg.n_paragraphs - len(gold))
        rng.shuffle(chosen)
        tasks.append(RagTask(
            task_id=f"gen-s{seed}-{split}-{len(tasks):04d}", question=question, answer=answer,
            kind=kind, paragraphs=[by_title[t] for t in chosen], supporting_facts=facts,
            level="hard" if kind == "bridge" else "medium", source="generated",
        ))
    return tasks


def generate_world(seed: int = 0, split: str = "train") -> World:
    """The split's world of entities; names are drawn from one pool per seed, train first."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
    rng = random.Random(f"rag-names-{seed}")
    taken: set[str] = set()
    countries = _name_pool(rng, SPLITS["train"].n_countries, lambda r: _word(r, 2) + "ia", taken)
    pools: dict[str, dict[str, list[str]]] = {}
    for name, cfg in SPLITS.items():  # fixed order, so each split's names never depend on `split`
        pools[name] = {
            "countries": countries,  # countries are shared: they are answers, not entities
            "people": _name_pool(rng, cfg.n_people, _person_name, taken),
            "cities": _name_pool(rng, cfg.n_cities, _city_name, taken),
            "orgs": _name_pool(rng, cfg.n_orgs, _org_name, taken),
            "landmarks": _name_pool(rng, cfg.n_cities, lambda r: _word(r, 2), taken),
            "awards": _name_pool(rng, cfg.n_people, lambda r: _word(r, 2), taken),
        }
    world_rng = random.Random(f"rag-world-{seed}-{split}")
    return _build_world(world_rng, SPLITS[split], pools[split])


def generate_tasks(seed: int = 0, split: str = "train") -> list[RagTask]:
    """Deterministic multi-hop questions over a fictional world (~200 train, ~60 dev).

    Each task has 10 paragraphs (2 gold + 8 distractors from the same world); all tasks of a
    call share one corpus (the world's paragraphs that appear in them) for the open setting.
    """
    world = generate_world(seed, split)
    rng = random.Random(f"rag-questions-{seed}-{split}")
    tasks = _questions(rng, world, SPLITS[split], split, seed)
    attach_corpus(tasks)
    return tasks
