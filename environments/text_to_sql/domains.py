"""Six small relational worlds (schema + seeded rows + question metadata) built in code.

Each builder returns a `Domain`: DDL with foreign keys, rows drawn from a `random.Random`, and
the metadata the question templates need (which column names an entity, which columns are
categories or numbers, which foreign keys link a parent to its children). Some parents are
deliberately left without children so "which X have no Y" questions have answers.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

FIRST = ["Alice", "Bruno", "Chen", "Dana", "Elif", "Farah", "Gustav", "Hana", "Ivan", "Jamal",
         "Keiko", "Liam", "Maya", "Nikolai", "Olga", "Pedro", "Quinn", "Rosa", "Samir", "Tara",
         "Umar", "Vera", "Wei", "Ximena", "Yusuf", "Zoe", "Anika", "Boris", "Carmen", "Diego"]
LAST = ["Adams", "Bauer", "Costa", "Dubois", "Eriksen", "Fischer", "Garcia", "Hughes", "Ito",
        "Jensen", "Kowalski", "Lopez", "Moreau", "Nakamura", "Okafor", "Petrov", "Quint", "Rossi",
        "Silva", "Tanaka", "Ueda", "Varga", "Weber", "Xu", "Yilmaz", "Zhang", "Novak", "Haddad"]
CITIES = ["Springfield", "Riverton", "Lakeside", "Hillview", "Maplewood", "Brookfield",
          "Fairview", "Oakdale"]
COUNTRIES = ["France", "Japan", "Brazil", "Canada", "Germany", "Nigeria", "India", "Mexico"]
ADJ = ["Silent", "Golden", "Hidden", "Broken", "Endless", "Crimson", "Distant", "Frozen",
       "Lost", "Bright", "Wild", "Quiet", "Burning", "Secret", "Electric", "Velvet"]
NOUN = ["River", "Garden", "Empire", "Shadow", "Harbor", "Storm", "Mirror", "Forest", "Signal",
        "Island", "Horizon", "Lantern", "Echo", "Machine", "Valley", "Ocean"]


@dataclass
class Entity:
    """A table the questions talk about as a thing ("students")."""

    table: str
    singular: str
    plural: str
    name_col: str = "name"
    name_phrase: str = "name"
    key: str = "id"
    categorical: list[tuple[str, str]] = field(default_factory=list)
    """(column, phrase) pairs with few distinct values, for filters and GROUP BY."""
    numeric: list[tuple[str, str]] = field(default_factory=list)
    """(column, phrase) pairs for comparisons, aggregates and ORDER BY."""


@dataclass
class Relation:
    """A foreign key from `child.fk` to `parent.key`, phrased as "<parent> has <children>"."""

    parent: str
    child: str
    fk: str
    child_singular: str
    child_plural: str
    child_numeric: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Extra:
    """A hand-written (usually multi-join) template; `{v}` is filled from `values_sql`."""

    question: str
    sql: str
    values_sql: str | None = None


@dataclass
class Domain:
    db_id: str
    ddl: list[str]
    rows: dict[str, list[tuple]]
    entities: list[Entity]
    relations: list[Relation]
    extras: list[Extra] = field(default_factory=list)


def people(rng: random.Random, n: int) -> list[str]:
    """`n` distinct full names."""
    pool = [f"{f} {l}" for f in FIRST for l in LAST]
    return rng.sample(pool, n)


def titles(rng: random.Random, n: int, pattern: str = "The {a} {n}") -> list[str]:
    """`n` distinct two-word titles."""
    pool = [pattern.format(a=a, n=b) for a in ADJ for b in NOUN]
    return rng.sample(pool, n)


def _subset(rng: random.Random, ids: list, frac: float) -> list:
    # Children reference only part of the parents, so "parents without children" exist.
    return rng.sample(ids, max(1, int(len(ids) * frac)))


def school(rng: random.Random) -> Domain:
    depts = ["Mathematics", "Physics", "Chemistry", "Biology", "History", "Literature",
             "Computer Science", "Art"]
    buildings = ["North Hall", "South Hall", "Science Center", "Main Building"]
    d_rows = [(i + 1, d, rng.choice(buildings), rng.randrange(50, 400) * 1000)
              for i, d in enumerate(depts)]
    staffed = list(range(1, 8))  # Art has no teachers and no courses
    t_rows = [(i + 1, n, rng.choice(staffed), rng.randrange(40, 120) * 1000,
               rng.randrange(1995, 2024)) for i, n in enumerate(people(rng, 30))]
    s_rows = [(i + 1, n, rng.choice(CITIES), rng.randint(1, 4), round(rng.uniform(2.0, 4.0), 2))
              for i, n in enumerate(people(rng, 120))]
    subjects = ["Introduction to", "Advanced", "Topics in", "Seminar on", "Foundations of"]
    c_rows, seen = [], set()
    while len(c_rows) < 25:
        d = rng.choice(staffed)
        title = f"{rng.choice(subjects)} {depts[d - 1]}"
        if title in seen:
            continue
        seen.add(title)
        teacher = rng.choice([t[0] for t in t_rows if t[2] == d] or [1])
        c_rows.append((len(c_rows) + 1, title, d, teacher, rng.choice([2, 3, 4, 5])))
    active = _subset(rng, [s[0] for s in s_rows], 0.9)
    pairs = sorted({(rng.choice(active), rng.randrange(1, 26)) for _ in range(320)})
    e_rows = [(s, c, rng.choice(["Fall 2023", "Spring 2024", "Fall 2024"]), rng.randrange(40, 101))
              for s, c in pairs]
    return Domain(
        db_id="school",
        ddl=[
            "CREATE TABLE departments (id INTEGER PRIMARY KEY, name TEXT NOT NULL, building TEXT, budget INTEGER)",
            "CREATE TABLE teachers (id INTEGER PRIMARY KEY, name TEXT NOT NULL, department_id INTEGER REFERENCES departments(id), salary INTEGER, hire_year INTEGER)",
            "CREATE TABLE students (id INTEGER PRIMARY KEY, name TEXT NOT NULL, city TEXT, year_level INTEGER, gpa REAL)",
            "CREATE TABLE courses (id INTEGER PRIMARY KEY, title TEXT NOT NULL, department_id INTEGER REFERENCES departments(id), teacher_id INTEGER REFERENCES teachers(id), credits INTEGER)",
            "CREATE TABLE enrollments (student_id INTEGER REFERENCES students(id), course_id INTEGER REFERENCES courses(id), semester TEXT, grade INTEGER, PRIMARY KEY (student_id, course_id))",
        ],
        rows={"departments": d_rows, "teachers": t_rows, "students": s_rows, "courses": c_rows,
              "enrollments": e_rows},
        entities=[
            Entity("departments", "department", "departments", categorical=[("building", "building")],
                   numeric=[("budget", "budget")]),
            Entity("teachers", "teacher", "teachers", numeric=[("salary", "salary"), ("hire_year", "hire year")]),
            Entity("students", "student", "students", categorical=[("city", "city"), ("year_level", "year level")],
                   numeric=[("gpa", "GPA")]),
            Entity("courses", "course", "courses", name_col="title", name_phrase="title",
                   categorical=[("credits", "number of credits")]),
        ],
        relations=[
            Relation("departments", "teachers", "department_id", "teacher", "teachers", [("salary", "salary")]),
            Relation("departments", "courses", "department_id", "course", "courses", [("credits", "credits")]),
            Relation("teachers", "courses", "teacher_id", "course", "courses", [("credits", "credits")]),
            Relation("students", "enrollments", "student_id", "enrollment", "enrollments", [("grade", "grade")]),
            Relation("courses", "enrollments", "course_id", "enrolled student", "enrolled students", [("grade", "grade")]),
        ],
        extras=[
            Extra("List the names of students enrolled in the course '{v}'.",
                  "SELECT T1.name FROM students AS T1 JOIN enrollments AS T2 ON T1.id = T2.student_id JOIN courses AS T3 ON T2.course_id = T3.id WHERE T3.title = {v}",
                  "SELECT DISTINCT title FROM courses JOIN enrollments ON courses.id = enrollments.course_id"),
            Extra("What is the average grade in courses of the {v} department?",
                  "SELECT avg(T1.grade) FROM enrollments AS T1 JOIN courses AS T2 ON T1.course_id = T2.id JOIN departments AS T3 ON T2.department_id = T3.id WHERE T3.name = {v}",
                  "SELECT DISTINCT departments.name FROM departments JOIN courses ON departments.id = courses.department_id"),
            Extra("Which teachers teach a course with more than 4 credits? List their names.",
                  "SELECT DISTINCT T1.name FROM teachers AS T1 JOIN courses AS T2 ON T1.id = T2.teacher_id WHERE T2.credits > 4"),
            Extra("List the titles of courses taught by teachers hired after {v}.",
                  "SELECT T1.title FROM courses AS T1 JOIN teachers AS T2 ON T1.teacher_id = T2.id WHERE T2.hire_year > {v}",
                  "SELECT hire_year FROM teachers JOIN courses ON teachers.id = courses.teacher_id ORDER BY hire_year LIMIT 5"),
        ],
    )


def library(rng: random.Random) -> Domain:
    a_rows = [(i + 1, n, rng.choice(COUNTRIES), rng.randrange(1920, 1995))
              for i, n in enumerate(people(rng, 40))]
    br_rows = [(i + 1, f"{c} Library", c) for i, c in enumerate(CITIES[:5])]
    genres = ["Mystery", "Fantasy", "Romance", "History", "Science", "Poetry"]
    writing = _subset(rng, [a[0] for a in a_rows], 0.85)
    b_rows = [(i + 1, t, rng.choice(writing), rng.randint(1, 4), rng.choice(genres),
               rng.randrange(1950, 2024), rng.randrange(90, 800))
              for i, t in enumerate(titles(rng, 150))]
    m_rows = [(i + 1, n, rng.choice(CITIES), rng.randrange(2010, 2025))
              for i, n in enumerate(people(rng, 80))]
    borrowers = _subset(rng, [m[0] for m in m_rows], 0.8)
    l_rows = [(i + 1, rng.randrange(1, 151), rng.choice(borrowers), rng.randrange(2018, 2025),
               rng.randrange(1, 60)) for i in range(250)]
    return Domain(
        db_id="library",
        ddl=[
            "CREATE TABLE authors (id INTEGER PRIMARY KEY, name TEXT NOT NULL, country TEXT, birth_year INTEGER)",
            "CREATE TABLE branches (id INTEGER PRIMARY KEY, name TEXT NOT NULL, city TEXT)",
            "CREATE TABLE books (id INTEGER PRIMARY KEY, title TEXT NOT NULL, author_id INTEGER REFERENCES authors(id), branch_id INTEGER REFERENCES branches(id), genre TEXT, publish_year INTEGER, pages INTEGER)",
            "CREATE TABLE members (id INTEGER PRIMARY KEY, name TEXT NOT NULL, city TEXT, join_year INTEGER)",
            "CREATE TABLE loans (id INTEGER PRIMARY KEY, book_id INTEGER REFERENCES books(id), member_id INTEGER REFERENCES members(id), loan_year INTEGER, days_borrowed INTEGER)",
        ],
        rows={"authors": a_rows, "branches": br_rows, "books": b_rows, "members": m_rows,
              "loans": l_rows},
        entities=[
            Entity("authors", "author", "authors", categorical=[("country", "country")],
                   numeric=[("birth_year", "birth year")]),
            Entity("books", "book", "books", name_col="title", name_phrase="title",
                   categorical=[("genre", "genre")], numeric=[("pages", "number of pages"), ("publish_year", "publication year")]),
            Entity("members", "member", "members", categorical=[("city", "city")],
                   numeric=[("join_year", "join year")]),
        ],
        relations=[
            Relation("authors", "books", "author_id", "book", "books", [("pages", "number of pages")]),
            Relation("branches", "books", "branch_id", "book", "books", [("pages", "number of pages")]),
            Relation("members", "loans", "member_id", "loan", "loans", [("days_borrowed", "days borrowed")]),
            Relation("books", "loans", "book_id", "loan", "loans", [("days_borrowed", "days borrowed")]),
        ],
        extras=[
            Extra("List the titles of books written by authors from {v}.",
                  "SELECT T1.title FROM books AS T1 JOIN authors AS T2 ON T1.author_id = T2.id WHERE T2.country = {v}",
                  "SELECT DISTINCT country FROM authors JOIN books ON authors.id = books.author_id"),
            Extra("Which members borrowed a {v} book? List their names.",
                  "SELECT DISTINCT T1.name FROM members AS T1 JOIN loans AS T2 ON T1.id = T2.member_id JOIN books AS T3 ON T2.book_id = T3.id WHERE T3.genre = {v}",
                  "SELECT DISTINCT genre FROM books JOIN loans ON books.id = loans.book_id"),
            Extra("How many books does the branch in {v} hold?",
                  "SELECT count(*) FROM books AS T1 JOIN branches AS T2 ON T1.branch_id = T2.id WHERE T2.city = {v}",
                  "SELECT DISTINCT city FROM branches JOIN books ON branches.id = books.branch_id"),
        ],
    )


def shop(rng: random.Random) -> Domain:
    cats = ["Electronics", "Books", "Toys", "Kitchen", "Garden", "Sports", "Clothing", "Music"]
    c_rows = [(i + 1, c) for i, c in enumerate(cats)]
    levels = ["bronze", "silver", "gold", "platinum"]
    cu_rows = [(i + 1, n, rng.choice(CITIES), rng.choice(levels))
               for i, n in enumerate(people(rng, 80))]
    stocked = list(range(1, 8))  # Music has no products
    p_rows = [(i + 1, f"{t} {cats[c - 1].rstrip('s')}", c, round(rng.uniform(3, 500), 2),
               rng.randrange(0, 200))
              for i, (t, c) in enumerate((t, rng.choice(stocked)) for t in titles(rng, 60, "{a} {n}"))]
    buyers = _subset(rng, [c[0] for c in cu_rows], 0.8)
    statuses = ["pending", "shipped", "delivered", "cancelled"]
    o_rows = [(i + 1, rng.choice(buyers), rng.randrange(2020, 2025), rng.choice(statuses))
              for i in range(200)]
    pairs = sorted({(rng.randrange(1, 201), rng.randrange(1, 61)) for _ in range(420)})
    oi_rows = [(o, p, rng.randint(1, 5)) for o, p in pairs]
    return Domain(
        db_id="shop",
        ddl=[
            "CREATE TABLE categories (id INTEGER PRIMARY KEY, name TEXT NOT NULL)",
            "CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT NOT NULL, city TEXT, loyalty_level TEXT)",
            "CREATE TABLE products (id INTEGER PRIMARY KEY, name TEXT NOT NULL, category_id INTEGER REFERENCES categories(id), price REAL, stock INTEGER)",
            "CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER REFERENCES customers(id), order_year INTEGER, status TEXT)",
            "CREATE TABLE order_items (order_id INTEGER REFERENCES orders(id), product_id INTEGER REFERENCES products(id), quantity INTEGER, PRIMARY KEY (order_id, product_id))",
        ],
        rows={"categories": c_rows, "customers": cu_rows, "products": p_rows, "orders": o_rows,
              "order_items": oi_rows},
        entities=[
            Entity("customers", "customer", "customers",
                   categorical=[("city", "city"), ("loyalty_level", "loyalty level")]),
            Entity("products", "product", "products", numeric=[("price", "price"), ("stock", "stock")]),
            Entity("orders", "order", "orders", name_col="id", name_phrase="id",
                   categorical=[("status", "status"), ("order_year", "order year")]),
        ],
        relations=[
            Relation("categories", "products", "category_id", "product", "products", [("price", "price")]),
            Relation("customers", "orders", "customer_id", "order", "orders"),
            Relation("products", "order_items", "product_id", "order line", "order lines", [("quantity", "quantity")]),
        ],
        extras=[
            Extra("What is the total quantity ordered of products in the {v} category?",
                  "SELECT sum(T1.quantity) FROM order_items AS T1 JOIN products AS T2 ON T1.product_id = T2.id JOIN categories AS T3 ON T2.category_id = T3.id WHERE T3.name = {v}",
                  "SELECT DISTINCT categories.name FROM categories JOIN products ON categories.id = products.category_id JOIN order_items ON products.id = order_items.product_id"),
            Extra("List the names of customers with at least one {v} order.",
                  "SELECT DISTINCT T1.name FROM customers AS T1 JOIN orders AS T2 ON T1.id = T2.customer_id WHERE T2.status = {v}",
                  "SELECT DISTINCT status FROM orders"),
            Extra("Which products were never ordered? List their names.",
                  "SELECT name FROM products WHERE id NOT IN (SELECT product_id FROM order_items)"),
            Extra("How many products cost less than {v}?",
                  "SELECT count(*) FROM products WHERE price < {v}", "SELECT price FROM products"),
        ],
    )


def hospital(rng: random.Random) -> Domain:
    depts = ["Cardiology", "Neurology", "Pediatrics", "Oncology", "Orthopedics", "Radiology",
             "Dermatology"]
    d_rows = [(i + 1, d, rng.randint(1, 6)) for i, d in enumerate(depts)]
    specialties = ["surgeon", "physician", "consultant", "resident"]
    doc_rows = [(i + 1, n, rng.choice(specialties), rng.randint(1, 6), rng.randrange(1, 35))
                for i, n in enumerate(people(rng, 30))]
    p_rows = [(i + 1, n, rng.randrange(1, 95), rng.choice(["F", "M"]), rng.choice(CITIES))
              for i, n in enumerate(people(rng, 150))]
    seen_by = _subset(rng, [d[0] for d in doc_rows], 0.85)
    diagnoses = ["flu", "fracture", "migraine", "asthma", "diabetes", "checkup"]
    a_rows = [(i + 1, rng.choice(seen_by), rng.randrange(1, 151), rng.randrange(2019, 2025),
               round(rng.uniform(40, 900), 2), rng.choice(diagnoses)) for i in range(300)]
    return Domain(
        db_id="hospital",
        ddl=[
            "CREATE TABLE departments (id INTEGER PRIMARY KEY, name TEXT NOT NULL, floor INTEGER)",
            "CREATE TABLE doctors (id INTEGER PRIMARY KEY, name TEXT NOT NULL, specialty TEXT, department_id INTEGER REFERENCES departments(id), years_experience INTEGER)",
            "CREATE TABLE patients (id INTEGER PRIMARY KEY, name TEXT NOT NULL, age INTEGER, gender TEXT, city TEXT)",
            "CREATE TABLE appointments (id INTEGER PRIMARY KEY, doctor_id INTEGER REFERENCES doctors(id), patient_id INTEGER REFERENCES patients(id), visit_year INTEGER, cost REAL, diagnosis TEXT)",
        ],
        rows={"departments": d_rows, "doctors": doc_rows, "patients": p_rows,
              "appointments": a_rows},
        entities=[
            Entity("departments", "department", "departments", categorical=[("floor", "floor")]),
            Entity("doctors", "doctor", "doctors", categorical=[("specialty", "specialty")],
                   numeric=[("years_experience", "years of experience")]),
            Entity("patients", "patient", "patients", categorical=[("city", "city"), ("gender", "gender")],
                   numeric=[("age", "age")]),
        ],
        relations=[
            Relation("departments", "doctors", "department_id", "doctor", "doctors",
                     [("years_experience", "years of experience")]),
            Relation("doctors", "appointments", "doctor_id", "appointment", "appointments", [("cost", "cost")]),
            Relation("patients", "appointments", "patient_id", "appointment", "appointments", [("cost", "cost")]),
        ],
        extras=[
            Extra("List the names of patients diagnosed with {v}.",
                  "SELECT DISTINCT T1.name FROM patients AS T1 JOIN appointments AS T2 ON T1.id = T2.patient_id WHERE T2.diagnosis = {v}",
                  "SELECT DISTINCT diagnosis FROM appointments"),
            Extra("What is the total cost of appointments with doctors in the {v} department?",
                  "SELECT sum(T1.cost) FROM appointments AS T1 JOIN doctors AS T2 ON T1.doctor_id = T2.id JOIN departments AS T3 ON T2.department_id = T3.id WHERE T3.name = {v}",
                  "SELECT DISTINCT departments.name FROM departments JOIN doctors ON departments.id = doctors.department_id JOIN appointments ON doctors.id = appointments.doctor_id"),
            Extra("How many appointments were there in each visit year?",
                  "SELECT visit_year, count(*) FROM appointments GROUP BY visit_year"),
        ],
    )


def airline(rng: random.Random) -> Domain:
    ports = [("CDG", "Paris", "France"), ("HND", "Tokyo", "Japan"), ("GRU", "Sao Paulo", "Brazil"),
             ("YYZ", "Toronto", "Canada"), ("FRA", "Frankfurt", "Germany"), ("LOS", "Lagos", "Nigeria"),
             ("DEL", "Delhi", "India"), ("MEX", "Mexico City", "Mexico"), ("NRT", "Narita", "Japan"),
             ("MUC", "Munich", "Germany"), ("YVR", "Vancouver", "Canada"), ("LYS", "Lyon", "France"),
             ("BOM", "Mumbai", "India"), ("GIG", "Rio de Janeiro", "Brazil")]
    ap_rows = [(c, f"{city} International", city, country) for c, city, country in ports]
    models = [("A320", "Airbus", 180), ("A350", "Airbus", 320), ("B737", "Boeing", 170),
              ("B787", "Boeing", 290), ("E190", "Embraer", 100), ("CRJ9", "Bombardier", 90),
              ("A380", "Airbus", 520), ("B777", "Boeing", 350)]
    ac_rows = [(i + 1, m, mf, s) for i, (m, mf, s) in enumerate(models)]
    hubs = [p[0] for p in ports[:11]]  # the last three airports have no departures
    f_rows = []
    for i in range(60):
        o, d = rng.sample(hubs, 2)
        f_rows.append((i + 1, f"LL{100 + i}", o, d, rng.randint(1, 7), rng.randrange(300, 12000),
                       round(rng.uniform(80, 1500), 2)))
    pa_rows = [(i + 1, n, rng.choice(COUNTRIES), rng.randrange(18, 85))
               for i, n in enumerate(people(rng, 120))]
    flyers = _subset(rng, [p[0] for p in pa_rows], 0.8)
    classes = ["economy", "premium", "business", "first"]
    b_rows = [(i + 1, rng.randrange(1, 61), rng.choice(flyers), rng.choice(classes),
               round(rng.uniform(60, 3000), 2)) for i in range(250)]
    return Domain(
        db_id="airline",
        ddl=[
            "CREATE TABLE airports (code TEXT PRIMARY KEY, name TEXT NOT NULL, city TEXT, country TEXT)",
            "CREATE TABLE aircraft (id INTEGER PRIMARY KEY, model TEXT NOT NULL, manufacturer TEXT, seats INTEGER)",
            "CREATE TABLE flights (id INTEGER PRIMARY KEY, flight_number TEXT, origin TEXT REFERENCES airports(code), destination TEXT REFERENCES airports(code), aircraft_id INTEGER REFERENCES aircraft(id), distance INTEGER, price REAL)",
            "CREATE TABLE passengers (id INTEGER PRIMARY KEY, name TEXT NOT NULL, nationality TEXT, age INTEGER)",
            "CREATE TABLE bookings (id INTEGER PRIMARY KEY, flight_id INTEGER REFERENCES flights(id), passenger_id INTEGER REFERENCES passengers(id), seat_class TEXT, fare REAL)",
        ],
        rows={"airports": ap_rows, "aircraft": ac_rows, "flights": f_rows, "passengers": pa_rows,
              "bookings": b_rows},
        entities=[
            Entity("airports", "airport", "airports", key="code", categorical=[("country", "country")]),
            Entity("aircraft", "aircraft", "aircraft", name_col="model", name_phrase="model",
                   categorical=[("manufacturer", "manufacturer")], numeric=[("seats", "number of seats")]),
            Entity("flights", "flight", "flights", name_col="flight_number", name_phrase="flight number",
                   categorical=[("origin", "origin airport code")],
                   numeric=[("distance", "distance"), ("price", "price")]),
            Entity("passengers", "passenger", "passengers", categorical=[("nationality", "nationality")],
                   numeric=[("age", "age")]),
        ],
        relations=[
            Relation("airports", "flights", "origin", "departing flight", "departing flights",
                     [("distance", "distance")]),
            Relation("aircraft", "flights", "aircraft_id", "flight", "flights", [("distance", "distance")]),
            Relation("passengers", "bookings", "passenger_id", "booking", "bookings", [("fare", "fare")]),
        ],
        extras=[
            Extra("List the flight numbers of flights departing from {v}.",
                  "SELECT T1.flight_number FROM flights AS T1 JOIN airports AS T2 ON T1.origin = T2.code WHERE T2.city = {v}",
                  "SELECT DISTINCT city FROM airports JOIN flights ON airports.code = flights.origin"),
            Extra("Which passengers booked a {v} seat? List their names.",
                  "SELECT DISTINCT T1.name FROM passengers AS T1 JOIN bookings AS T2 ON T1.id = T2.passenger_id WHERE T2.seat_class = {v}",
                  "SELECT DISTINCT seat_class FROM bookings"),
            Extra("How many flights are operated with {v} aircraft?",
                  "SELECT count(*) FROM flights AS T1 JOIN aircraft AS T2 ON T1.aircraft_id = T2.id WHERE T2.manufacturer = {v}",
                  "SELECT DISTINCT manufacturer FROM aircraft JOIN flights ON aircraft.id = flights.aircraft_id"),
        ],
    )


def music(rng: random.Random) -> Domain:
    genres = ["rock", "jazz", "pop", "folk", "electronic", "hip hop"]
    ar_rows = [(i + 1, f"The {n.split()[1]} {rng.choice(NOUN)}s", rng.choice(COUNTRIES),
                rng.choice(genres), rng.randrange(1965, 2020))
               for i, n in enumerate(people(rng, 30))]
    recording = _subset(rng, [a[0] for a in ar_rows], 0.85)
    al_rows = [(i + 1, t, rng.choice(recording), rng.randrange(1970, 2025),
                rng.randrange(1, 500) * 1000) for i, t in enumerate(titles(rng, 70, "{a} {n}"))]
    s_rows = [(i + 1, f"{rng.choice(ADJ)} {rng.choice(NOUN)} {i + 1}", rng.randrange(1, 71),
               rng.randrange(120, 420), rng.randrange(100, 100000)) for i in range(250)]
    owners = people(rng, 6)
    pl_rows = [(i + 1, name, rng.choice(owners)) for i, name in enumerate(
        ["Morning Mix", "Road Trip", "Focus", "Party", "Chill", "Workout", "Rainy Day", "Classics",
         "Late Night", "Discover"])]
    pairs = sorted({(rng.randint(1, 8), rng.randrange(1, 251)) for _ in range(160)})
    return Domain(
        db_id="music",
        ddl=[
            "CREATE TABLE artists (id INTEGER PRIMARY KEY, name TEXT NOT NULL, country TEXT, genre TEXT, formed_year INTEGER)",
            "CREATE TABLE albums (id INTEGER PRIMARY KEY, title TEXT NOT NULL, artist_id INTEGER REFERENCES artists(id), release_year INTEGER, sales INTEGER)",
            "CREATE TABLE songs (id INTEGER PRIMARY KEY, title TEXT NOT NULL, album_id INTEGER REFERENCES albums(id), duration_sec INTEGER, plays INTEGER)",
            "CREATE TABLE playlists (id INTEGER PRIMARY KEY, name TEXT NOT NULL, owner TEXT)",
            "CREATE TABLE playlist_songs (playlist_id INTEGER REFERENCES playlists(id), song_id INTEGER REFERENCES songs(id), PRIMARY KEY (playlist_id, song_id))",
        ],
        rows={"artists": ar_rows, "albums": al_rows, "songs": s_rows, "playlists": pl_rows,
              "playlist_songs": pairs},
        entities=[
            Entity("artists", "artist", "artists", categorical=[("genre", "genre"), ("country", "country")],
                   numeric=[("formed_year", "formation year")]),
            Entity("albums", "album", "albums", name_col="title", name_phrase="title",
                   numeric=[("sales", "sales"), ("release_year", "release year")]),
            Entity("songs", "song", "songs", name_col="title", name_phrase="title",
                   numeric=[("duration_sec", "duration in seconds"), ("plays", "number of plays")]),
        ],
        relations=[
            Relation("artists", "albums", "artist_id", "album", "albums", [("sales", "sales")]),
            Relation("albums", "songs", "album_id", "song", "songs", [("plays", "number of plays")]),
            Relation("playlists", "playlist_songs", "playlist_id", "song entry", "song entries"),
        ],
        extras=[
            Extra("List the titles of songs on albums by {v}.",
                  "SELECT T1.title FROM songs AS T1 JOIN albums AS T2 ON T1.album_id = T2.id JOIN artists AS T3 ON T2.artist_id = T3.id WHERE T3.name = {v}",
                  "SELECT DISTINCT artists.name FROM artists JOIN albums ON artists.id = albums.artist_id JOIN songs ON albums.id = songs.album_id"),
            Extra("What is the total sales of albums by {v} artists?",
                  "SELECT sum(T1.sales) FROM albums AS T1 JOIN artists AS T2 ON T1.artist_id = T2.id WHERE T2.genre = {v}",
                  "SELECT DISTINCT genre FROM artists JOIN albums ON artists.id = albums.artist_id"),
            Extra("Which songs are in the playlist '{v}'? List their titles.",
                  "SELECT T1.title FROM songs AS T1 JOIN playlist_songs AS T2 ON T1.id = T2.song_id JOIN playlists AS T3 ON T2.playlist_id = T3.id WHERE T3.name = {v}",
                  "SELECT DISTINCT playlists.name FROM playlists JOIN playlist_songs ON playlists.id = playlist_songs.playlist_id"),
        ],
    )


BUILDERS = {"school": school, "library": library, "shop": shop, "hospital": hospital,
            "airline": airline, "music": music}
TRAIN_DBS = ("school", "library", "shop", "hospital")
DEV_DBS = ("airline", "music")
