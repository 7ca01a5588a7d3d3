"""Evaluation datasets in the LaMP format: read and write the official files, and build our real-data tasks.

A ``Dataset`` is a list of ``Query`` values (id, user, input, gold, profile as raw LaMP item dicts). ``write_lamp``
writes ``{split}_questions.json`` and ``{split}_outputs.json`` exactly as LaMP lays them out (../shared/LAMP.md
section 2); ``read_lamp`` reads them back (or the official LaMP files). The builders turn the real per-user data in
../shared/data into the three tasks of LAMP.md section 5, read in place and never copied:

- ``build_movielens_rating`` (stands in for LaMP-3), from ``movielens-small/``;
- ``build_reuters_lead`` (stands in for LaMP-4) and ``build_reuters_authorship`` (LaMP-1), from ``reuters-c50/``.

``synthetic_dataset`` makes a small movielens-like dataset with planted per-user tastes, for tests and smoke runs.

Everything is deterministic: the same input gives byte-identical files (no set iteration, no wall clock, per-query
random generators seeded from strings, which Python hashes with SHA-512 independently of ``PYTHONHASHSEED``).
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from personalize.data.checks import check_id, check_json, check_string
from personalize.data.ingest import lamp_item, lamp_user_id, load_json
from personalize.data.naming import MAX_USER_ID_CHARS
from personalize.errors import InvalidInputError, MalformedFileError
from personalize.tasks.registry import get_task

SPLITS = ("dev", "test")
QUERIES_PER_SPLIT = 3  # movielens-rating: the last 3 ratings are test queries, the 3 before them dev queries
REUTERS_QUERIES_PER_SPLIT = 5  # reuters-*: first 5 C50test articles (test), the next 5 (dev)
AUTHORSHIP_PASSAGE_WORDS = 60
AUTHORSHIP_INPUT_TEMPLATE = (
    "For an author who has written the articles in their profile, which passage did they write? Just answer with "
    '[1] or [2] without explanation. [1]: "{passage1}" [2]: "{passage2}"'
)
NO_GENRES = "(no genres listed)"


@dataclass
class Query:
    """One question: the user it belongs to, the model input, the gold output and the user's profile (raw dicts)."""

    id: str
    user_id: str
    input: str
    gold: str | None
    profile: list[dict[str, Any]]


@dataclass
class Dataset:
    task: str
    split: str
    queries: list[Query]
    synthetic: bool = False
    source: str = ""

    def users(self) -> dict[str, list[dict[str, Any]]]:
        """Per user id (first-seen order), the union of its queries' profile items by id, in first-seen order."""
        users: dict[str, dict[str, dict[str, Any]]] = {}
        for query in self.queries:
            items = users.setdefault(query.user_id, {})
            for raw in query.profile:
                items.setdefault(str(raw.get("id")), raw)
        return {user: list(items.values()) for user, items in users.items()}

    def __len__(self) -> int:
        return len(self.queries)


# --------------------------------------------------------------------------------------------- LaMP files


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, indent=None)


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(text.encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_lamp(dataset: Dataset, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``{split}_questions.json`` and ``{split}_outputs.json`` (LaMP layout); returns both paths.

    Questions keep the dataset's order and carry ``user_id`` (as LaMP's time-based files do). ``golds`` lists the
    queries that have a gold, in the same order. The task in the outputs file is the LaMP name (``LaMP_3``) for
    LaMP tasks and our task name otherwise.
    """
    out_dir = Path(out_dir)
    task = get_task(dataset.task)
    questions = [{"id": q.id, "input": q.input, "profile": q.profile, "user_id": q.user_id} for q in dataset.queries]
    outputs = {
        "task": task.lamp_name or task.name,
        "golds": [{"id": q.id, "output": q.gold} for q in dataset.queries if q.gold is not None],
    }
    questions_path = out_dir / f"{dataset.split}_questions.json"
    outputs_path = out_dir / f"{dataset.split}_outputs.json"
    _write_atomic(questions_path, _dumps(questions) + "\n")
    _write_atomic(outputs_path, _dumps(outputs) + "\n")
    return questions_path, outputs_path


def _load_json(path: Path) -> Any:
    return load_json(path)


def _split_name(path: Path) -> str:
    stem = path.stem
    for suffix in ("_questions", "_outputs"):
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def read_lamp(questions_path: str | Path, outputs_path: str | Path | None, task: str) -> Dataset:
    """Read LaMP files (official or written by ``write_lamp``) into a ``Dataset``.

    A question without ``user_id`` (LaMP's user-based splits) belongs to a user named by the question id. Profile
    items are kept as the raw dicts, after checking each one as ``personalize.data.ingest.lamp_item`` would store it.
    Without ``outputs_path`` every gold is ``None``; a question the outputs file does not mention also gets ``None``.
    The split is the questions file name without ``_questions`` (``dev_questions.json`` → ``dev``).
    Anything malformed raises ``MalformedFileError`` naming the file and the question.
    """
    questions_path = Path(questions_path)
    task_name = get_task(task).name
    raw_questions = _load_json(questions_path)
    if not isinstance(raw_questions, list):
        raise MalformedFileError(questions_path, "top level", "expected a JSON list of questions")
    queries: list[Query] = []
    seen: set[str] = set()
    for n, question in enumerate(raw_questions):
        where = f"question {n}"
        if not isinstance(question, dict):
            raise MalformedFileError(questions_path, where, "expected an object with 'id', 'input' and 'profile'")
        missing = [k for k in ("id", "input", "profile") if k not in question]
        if missing:
            raise MalformedFileError(questions_path, where, f"missing {', '.join(repr(k) for k in missing)}")
        try:
            qid = check_id(question["id"], "'id'", MAX_USER_ID_CHARS)
            check_string(question["input"], "'input'")
        except InvalidInputError as exc:
            raise MalformedFileError(questions_path, where, str(exc)) from None
        if qid in seen:
            raise MalformedFileError(questions_path, where, f"duplicate question id {qid!r}")
        seen.add(qid)
        profile = question["profile"]
        if not isinstance(profile, list):
            raise MalformedFileError(questions_path, where, "'profile' must be a list of items")
        try:
            user_id = lamp_user_id(question)
            for i, raw in enumerate(profile):
                if not isinstance(raw, dict):
                    raise InvalidInputError(f"profile item {i} must be an object")
                lamp_item(task_name, raw)
        except InvalidInputError as exc:
            raise MalformedFileError(questions_path, where, str(exc)) from None
        queries.append(Query(qid, user_id, question["input"], None, profile))

    if outputs_path is not None:
        outputs_path = Path(outputs_path)
        outputs = _load_json(outputs_path)
        if not isinstance(outputs, dict) or not isinstance(outputs.get("golds"), list):
            raise MalformedFileError(outputs_path, "top level", 'expected {"task": ..., "golds": [...]}')
        golds: dict[str, str] = {}
        for n, gold in enumerate(outputs["golds"]):
            where = f"gold {n}"
            if not isinstance(gold, dict) or "id" not in gold or "output" not in gold:
                raise MalformedFileError(outputs_path, where, "expected an object with 'id' and 'output'")
            if not isinstance(gold["output"], str | int | float) or isinstance(gold["output"], bool):
                raise MalformedFileError(outputs_path, where, "'output' must be a string")
            try:
                gid = check_id(gold["id"], "'id'", MAX_USER_ID_CHARS)
                check_json(gold["output"], "'output'")
            except InvalidInputError as exc:
                raise MalformedFileError(outputs_path, where, str(exc)) from None
            if gid in golds:
                raise MalformedFileError(outputs_path, where, f"duplicate gold id {gid!r}")
            golds[gid] = str(gold["output"])
        for query in queries:
            query.gold = golds.get(query.id)
    return Dataset(task_name, _split_name(questions_path), queries, source=str(questions_path))


# --------------------------------------------------------------------------------------------- helpers


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise InvalidInputError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return split


def _need_file(path: Path) -> Path:
    if not path.is_file():
        raise InvalidInputError(f"{path}: no such file")
    return path


def _need_dir(path: Path) -> Path:
    if not path.is_dir():
        raise InvalidInputError(f"{path}: no such folder")
    return path


def rating_score(rating: str | float | Decimal) -> int:
    """A half-star rating rounded half up to an integer and clipped to 1..5 (0.5 → 1, 3.5 → 4, 2.5 → 3)."""
    try:
        value = Decimal(str(rating).strip())
    except InvalidOperation:
        raise InvalidInputError(f"rating {rating!r} is not a number") from None
    if not value.is_finite():
        raise InvalidInputError(f"rating {rating!r} is not a finite number")
    return min(5, max(1, int(value.quantize(Decimal(1), rounding=ROUND_HALF_UP))))


def movie_text(title: str, genres: str) -> str:
    """``{title} ({genres joined by ", "})``; a movie with ``(no genres listed)`` (or none) is just its title."""
    names = [g.strip() for g in genres.split("|") if g.strip() and g.strip() != NO_GENRES]
    title = title.strip()
    return f"{title} ({', '.join(names)})" if names else title


def _utc_date(timestamp: int) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d")


@dataclass(frozen=True)
class _Rating:
    movie_id: str
    timestamp: int
    text: str
    score: int

    def item(self) -> dict[str, Any]:
        return {"id": self.movie_id, "text": self.text, "score": str(self.score), "date": _utc_date(self.timestamp)}


def _rating_queries(task_name: str, user_id: str, ratings: list[_Rating], split: str) -> list[Query]:
    """A user's queries for ``split`` from its ratings sorted by (timestamp, movieId); [] when too few ratings.

    The profile is every rating strictly earlier (in time) than the split's first query, so a rating that shares
    the first query's timestamp is left out even when it sorts before it.
    """
    n = len(ratings)
    offset = QUERIES_PER_SPLIT if split == "test" else 2 * QUERIES_PER_SPLIT
    start = n - offset
    if start < 1:
        return []
    chosen = ratings[start : start + QUERIES_PER_SPLIT]
    cutoff = chosen[0].timestamp
    profile = [r.item() for r in ratings[:start] if r.timestamp < cutoff]
    if not profile:
        return []
    template = get_task(task_name).input_template or "{text}"
    return [
        Query(f"{user_id}-{r.movie_id}", user_id, template.format(text=r.text), str(r.score), profile) for r in chosen
    ]


# --------------------------------------------------------------------------------------------- movielens


def _read_csv(path: Path, columns: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    _need_file(path)
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        lacking = [c for c in columns if c not in header]
        if lacking:
            raise MalformedFileError(path, "header", f"missing column(s) {', '.join(lacking)}")
        return [(reader.line_num, row) for row in reader]


def _movie_key(movie_id: str) -> tuple[int, str]:
    return (int(movie_id), movie_id) if movie_id.isdigit() else (-1, movie_id)


def _user_key(user_id: str) -> tuple[int, int, str]:
    return (0, int(user_id), user_id) if user_id.isdigit() else (1, 0, user_id)


def build_movielens_rating(folder: str | Path, split: str = "test") -> Dataset:
    """MovieLens rating prediction (LAMP.md section 5, stands in for LaMP-3) from ``ratings.csv`` and ``movies.csv``.

    Per user, ratings are sorted by (timestamp, movieId). ``test``: the last 3 ratings are the queries; ``dev``: the
    3 before them. A query's profile is every rating of the user strictly earlier than the split's first query
    (by timestamp). An item's text is ``{title} ({genres joined by ", "})``; a movie whose genres are
    ``(no genres listed)`` is just ``{title}`` (its title already ends with the year in parentheses). The score is
    the rating rounded half up and clipped to 1..5. Query ids are ``{userId}-{movieId}``, user ids ``{userId}``;
    profile items are ``{"id": movieId, "text", "score", "date": YYYY-MM-DD (UTC)}``. Users are in numeric order,
    a user's queries in time order. A user with too few ratings for the split (or an empty profile) is left out.
    """
    _check_split(split)
    folder = Path(folder)
    movies_path, ratings_path = folder / "movies.csv", folder / "ratings.csv"
    movies: dict[str, str] = {}
    for line, row in _read_csv(movies_path, ("movieId", "title", "genres")):
        movie_id = (row["movieId"] or "").strip()
        if not movie_id or row["title"] is None:
            raise MalformedFileError(movies_path, f"line {line}", "a row needs movieId and title")
        movies[movie_id] = movie_text(row["title"], row["genres"] or "")
    per_user: dict[str, list[_Rating]] = {}
    scores: dict[str, int] = {}
    for line, row in _read_csv(ratings_path, ("userId", "movieId", "rating", "timestamp")):
        try:
            user_id = (row["userId"] or "").strip()
            movie_id = (row["movieId"] or "").strip()
            if not user_id or not movie_id:
                raise InvalidInputError("a row needs userId and movieId")
            if movie_id not in movies:
                raise InvalidInputError(f"movie {movie_id} is not in movies.csv")
            timestamp = int((row["timestamp"] or "").strip())
            rating = row["rating"] or ""
            score = scores.get(rating)
            if score is None:
                score = scores[rating] = rating_score(rating)
        except (InvalidInputError, ValueError) as exc:
            raise MalformedFileError(ratings_path, f"line {line}", str(exc)) from None
        per_user.setdefault(user_id, []).append(_Rating(movie_id, timestamp, movies[movie_id], score))
    queries: list[Query] = []
    for user_id in sorted(per_user, key=_user_key):
        ratings = sorted(per_user[user_id], key=lambda r: (r.timestamp, _movie_key(r.movie_id)))
        queries.extend(_rating_queries("movielens-rating", user_id, ratings, split))
    return Dataset("movielens-rating", split, queries, source=f"MovieLens ml-latest-small at {folder}")


# --------------------------------------------------------------------------------------------- reuters

_LEAD_END = re.compile(r"[.!?](?=\s+[A-Z\"'])")


def normalize_article(text: str) -> str:
    """CRLF → LF, then every run of whitespace (newlines included) collapsed to one space, ends stripped."""
    return " ".join(text.replace("\r\n", "\n").split())


def first_sentence(text: str) -> str:
    """The text up to its first sentence end by the lead rule of ``split_lead`` (all of it when there is none)."""
    match = _LEAD_END.search(text)
    return (text[: match.end()] if match else text).strip()


def split_lead(text: str) -> tuple[str, str] | None:
    """(lead, body) of a normalized article, or ``None`` when it has no split point or nothing after it.

    The lead ends at the first ``.``, ``!`` or ``?`` followed by whitespace and an upper-case letter or a quote
    (``"`` or ``'``); it keeps that punctuation. The body is the rest. The rule is LAMP.md's, taken literally, so an
    abbreviation such as "U.S." before a capitalised word also ends the lead.
    """
    match = _LEAD_END.search(text)
    if match is None:
        return None
    lead, body = text[: match.end()].strip(), text[match.end() :].strip()
    if not lead or not body:
        return None
    return lead, body


@dataclass(frozen=True)
class _Article:
    author: str
    stem: str
    text: str
    lead: str
    body: str

    def item(self) -> dict[str, Any]:
        return {"id": self.stem, "title": self.lead, "text": self.body}


def _read_articles(folder: Path) -> dict[str, list[_Article]]:
    """Per author (sorted), the articles (file-name order) that have a lead and a body."""
    _need_dir(folder)
    authors: dict[str, list[_Article]] = {}
    for author_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        articles = []
        files = sorted((p for p in author_dir.iterdir() if p.is_file() and p.suffix == ".txt"), key=lambda p: p.name)
        for path in files:
            try:
                raw = path.read_bytes().decode("utf-8")
            except UnicodeDecodeError as exc:
                raise MalformedFileError(path, "encoding", f"not UTF-8 ({exc.reason})") from None
            text = normalize_article(raw)
            parts = split_lead(text)
            if parts is None:
                continue
            articles.append(_Article(author_dir.name, path.stem, text, *parts))
        authors[author_dir.name] = articles
    return authors


def _reuters_selection(folder: Path, split: str) -> tuple[dict[str, list[_Article]], dict[str, list[_Article]]]:
    """(profiles from C50train, each author's queries from C50test for ``split``), authors in name order."""
    _check_split(split)
    folder = Path(folder)
    train = _read_articles(folder / "C50train")
    test = _read_articles(folder / "C50test")
    start = 0 if split == "test" else REUTERS_QUERIES_PER_SPLIT
    chosen = {}
    for author in sorted(test):
        if author not in train or not train[author]:
            continue
        picked = test[author][start : start + REUTERS_QUERIES_PER_SPLIT]
        if picked:
            chosen[author] = picked
    return train, chosen


def build_reuters_lead(folder: str | Path, split: str = "test") -> Dataset:
    """Reuters C50 opening sentence (LAMP.md section 5, stands in for LaMP-4) from ``C50train`` and ``C50test``.

    Articles are normalized (``normalize_article``) and split into lead and body (``split_lead``). An article with
    no split point, or nothing after it, cannot give a (body → lead) pair: it is left out everywhere, both from
    profiles and from the query selection, which then counts only the usable articles. Profile: the author's
    ``C50train`` articles as ``{"id": file stem, "title": lead, "text": body}``. Queries: the author's first 5
    ``C50test`` articles in file-name order (plain string order, as ``sorted`` gives) for ``test``, the next 5 for
    ``dev``; input ``Write the opening sentence for the following news article: {body}``, gold the lead. Query ids
    are ``{author}-{file stem}``, user ids the author folder names, in sorted order.
    """
    train, chosen = _reuters_selection(Path(folder), split)
    template = get_task("reuters-lead").input_template or "{text}"
    queries = []
    for author, articles in chosen.items():
        profile = [a.item() for a in train[author]]
        for article in articles:
            queries.append(
                Query(f"{author}-{article.stem}", author, template.format(text=article.body), article.lead, profile)
            )
    return Dataset("reuters-lead", split, queries, source=f"Reuters C50 at {folder}")


def first_words(text: str, n: int = AUTHORSHIP_PASSAGE_WORDS) -> str:
    return " ".join(text.split()[:n])


def build_reuters_authorship(folder: str | Path, split: str = "test", seed: int = 0) -> Dataset:
    """Reuters C50 authorship choice (LAMP.md section 5, stands in for LaMP-1).

    Each query pairs one of the author's selected ``C50test`` articles (the same selection as ``build_reuters_lead``)
    with a distractor: a ``C50test`` article of another author (any of that author's usable test articles). Both are
    cut to their first 60 words of the normalized full text (lead included). The distractor (author uniformly among
    the others, then an article uniformly) and the order are drawn from ``random.Random`` seeded with
    ``f"reuters-authorship:{seed}:{query id}"``, so each query is stable on its own. The gold is ``[1]`` or ``[2]``,
    whichever holds the author's passage. Passages are inserted verbatim (inner quotes are not escaped). Profile as
    in ``build_reuters_lead``.
    """
    folder = Path(folder)
    train, chosen = _reuters_selection(folder, split)
    pool = {author: articles for author, articles in _read_articles(folder / "C50test").items() if articles}
    queries = []
    for author, articles in chosen.items():
        others = [a for a in sorted(pool) if a != author]
        if not others:
            raise InvalidInputError(f"{folder}: the authorship task needs test articles of at least two authors")
        profile = [a.item() for a in train[author]]
        for article in articles:
            qid = f"{author}-{article.stem}"
            rng = random.Random(f"reuters-authorship:{seed}:{qid}")
            other_author = rng.choice(others)
            distractor = rng.choice(pool[other_author])
            own, other = first_words(article.text), first_words(distractor.text)
            own_first = rng.random() < 0.5
            passage1, passage2 = (own, other) if own_first else (other, own)
            text = AUTHORSHIP_INPUT_TEMPLATE.format(passage1=passage1, passage2=passage2)
            queries.append(Query(qid, author, text, "[1]" if own_first else "[2]", profile))
    return Dataset("reuters-authorship", split, queries, source=f"Reuters C50 at {folder} (seed {seed})")


# --------------------------------------------------------------------------------------------- synthetic

SYNTHETIC_GENRES = ("Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi", "Thriller", "Western")


def synthetic_dataset(
    task: str = "movielens-rating",
    n_users: int = 20,
    seed: int = 0,
    split: str = "test",
    min_items: int = 8,
    max_items: int = 200,
) -> Dataset:
    """A SYNTHETIC movielens-like dataset with planted per-user tastes (not real data; ``synthetic=True``).

    A catalogue of made-up movies has one or two genres each. Each user loves two genres and hates two others:
    a movie with a loved genre and no hated one scores 5, with a hated genre and no loved one 1, anything else 3;
    then 10% of ratings move one step up or down (clipped to 1..5). Each user rates ``n + 3`` distinct movies on
    distinct, increasing days, with ``n`` drawn log-uniformly between ``min_items`` and ``max_items``; the split
    then follows ``build_movielens_rating`` (test: last 3, dev: the 3 before; profile: everything earlier), so the
    profile size is ``n`` in ``test`` and ``n - 3`` in ``dev`` (users with ``n <= 3`` have no dev queries). Query
    golds follow the same rule as the user's profile. Only rating tasks with ``text``/``score`` items are
    supported: ``movielens-rating`` and ``lamp-3``. Deterministic in all arguments.
    """
    name = get_task(task).name
    if name not in ("movielens-rating", "lamp-3"):
        raise InvalidInputError(f"synthetic_dataset makes rating data (movielens-rating, lamp-3), not {task!r}")
    _check_split(split)
    if n_users < 1 or min_items < 1 or max_items < min_items:
        raise InvalidInputError("need n_users >= 1 and 1 <= min_items <= max_items")
    rng = random.Random(f"synthetic:{seed}")
    n_movies = max(400, max_items + 2 * QUERIES_PER_SPLIT + 50)
    catalogue: list[tuple[str, str, frozenset[str]]] = []
    for k in range(n_movies):
        genres = rng.sample(SYNTHETIC_GENRES, rng.choice((1, 1, 2)))
        title = f"Film {k:04d} ({1950 + rng.randrange(70)})"
        catalogue.append((str(1000 + k), movie_text(title, "|".join(genres)), frozenset(genres)))
    start_day = datetime(2010, 1, 1, tzinfo=UTC)
    queries: list[Query] = []
    for u in range(n_users):
        user_id = f"synth-{u:03d}"
        urng = random.Random(f"synthetic:{seed}:{user_id}")
        shuffled = urng.sample(SYNTHETIC_GENRES, len(SYNTHETIC_GENRES))
        loves, hates = set(shuffled[:2]), set(shuffled[2:4])
        n = round(math.exp(urng.uniform(math.log(min_items), math.log(max_items))))
        n = min(max_items, max(min_items, n))
        picked = urng.sample(range(n_movies), n + QUERIES_PER_SPLIT)
        day = start_day + timedelta(days=urng.randrange(3000))
        ratings = []
        for index in picked:
            movie_id, text, movie_genres = catalogue[index]
            liked, disliked = bool(movie_genres & loves), bool(movie_genres & hates)
            score = 5 if liked and not disliked else 1 if disliked and not liked else 3
            if urng.random() < 0.1:
                score = min(5, max(1, score + urng.choice((-1, 1))))
            day += timedelta(days=1 + urng.randrange(5))
            ratings.append(_Rating(movie_id, int(day.timestamp()), text, score))
        queries.extend(_rating_queries(name, user_id, ratings, split))
    return Dataset(
        name, split, queries, synthetic=True, source=f"SYNTHETIC planted-taste ratings (seed {seed}, not real data)"
    )


BUILDERS: dict[str, Callable[..., Dataset]] = {
    "movielens-rating": build_movielens_rating,
    "reuters-lead": build_reuters_lead,
    "reuters-authorship": build_reuters_authorship,
}


def load_dataset(
    task: str, split: str, data: str | Path | None, synthetic_users: int | None = None
) -> tuple[Dataset, str]:
    """A task's split from LaMP files in ``data``, or built from raw data by the task's builder, or SYNTHETIC;
    returns it with the source to record."""
    if synthetic_users:
        return synthetic_dataset(n_users=synthetic_users, split=split), "SYNTHETIC"
    if data is None:
        raise InvalidInputError("give --data: a MovieLens/Reuters folder, or a folder with LaMP json files")
    data = Path(data)
    questions = data / f"{split}_questions.json"
    if questions.is_file():
        outputs = data / f"{split}_outputs.json"
        return read_lamp(questions, outputs if outputs.is_file() else None, task), str(data)
    if task in BUILDERS:
        return BUILDERS[task](data, split), str(data)
    raise InvalidInputError(f"{data} holds no {split}_questions.json and {task!r} has no builder")
