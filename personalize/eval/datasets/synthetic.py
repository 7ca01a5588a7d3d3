"""``synthetic_dataset``: a small SYNTHETIC movielens-like dataset with planted per-user tastes, for tests, demos
and smoke runs (never real data; its ``Dataset`` says ``synthetic=True``).

It follows ``build_movielens_rating``'s split rule, so it reuses the rating helpers of ``movielens``.
"""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime, timedelta

from personalize.errors import InvalidInputError
from personalize.eval.datasets.lamp import Dataset, Query, _check_split
from personalize.eval.datasets.movielens import QUERIES_PER_SPLIT, _Rating, _rating_queries, movie_text
from personalize.tasks.registry import get_task

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
