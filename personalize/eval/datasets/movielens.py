"""The ``movielens-rating`` builder (stands in for LaMP-3), from ``movielens-small/`` in ../shared/data.

Also the rating helpers the SYNTHETIC ratings (``synthetic``) and the baselines share: ``rating_score``,
``movie_text`` and the time split of one user's ratings into a profile and queries. Deterministic: the same files
give the same dataset.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from personalize.errors import InvalidInputError, MalformedFileError
from personalize.eval.datasets.lamp import Dataset, Query, _check_split
from personalize.tasks.registry import get_task

QUERIES_PER_SPLIT = 3  # movielens-rating: the last 3 ratings are test queries, the 3 before them dev queries
NO_GENRES = "(no genres listed)"


def _need_file(path: Path) -> Path:
    if not path.is_file():
        raise InvalidInputError(f"{path}: no such file")
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
