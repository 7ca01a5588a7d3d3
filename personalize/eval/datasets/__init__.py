"""Evaluation datasets in the LaMP format: the LaMP files and types, and one module per dataset builder.

``lamp`` holds ``Query``, ``Dataset``, ``read_lamp`` and ``write_lamp``; ``movielens`` (``movielens-rating``,
LaMP-3's stand-in) and ``reuters`` (``reuters-lead`` for LaMP-4, ``reuters-authorship`` for LaMP-1) build our tasks
from the real per-user data in ../shared/data (LAMP.md section 5); ``synthetic`` plants per-user tastes for tests;
``loading`` picks the source of a task's split. Everything is deterministic: the same input gives byte-identical
files. This module only re-exports, so ``from personalize.eval.datasets import X`` works for every public name.
"""

from __future__ import annotations

from personalize.eval.datasets.lamp import SPLITS, Dataset, Query, read_lamp, write_lamp
from personalize.eval.datasets.loading import BUILDERS, load_dataset
from personalize.eval.datasets.movielens import (
    NO_GENRES,
    QUERIES_PER_SPLIT,
    build_movielens_rating,
    movie_text,
    rating_score,
)
from personalize.eval.datasets.reuters import (
    AUTHORSHIP_INPUT_TEMPLATE,
    AUTHORSHIP_PASSAGE_WORDS,
    REUTERS_QUERIES_PER_SPLIT,
    build_reuters_authorship,
    build_reuters_lead,
    first_sentence,
    first_words,
    normalize_article,
    split_lead,
)
from personalize.eval.datasets.synthetic import SYNTHETIC_GENRES, synthetic_dataset

__all__ = [
    "AUTHORSHIP_INPUT_TEMPLATE",
    "AUTHORSHIP_PASSAGE_WORDS",
    "BUILDERS",
    "NO_GENRES",
    "QUERIES_PER_SPLIT",
    "REUTERS_QUERIES_PER_SPLIT",
    "SPLITS",
    "SYNTHETIC_GENRES",
    "Dataset",
    "Query",
    "build_movielens_rating",
    "build_reuters_authorship",
    "build_reuters_lead",
    "first_sentence",
    "first_words",
    "load_dataset",
    "movie_text",
    "normalize_article",
    "rating_score",
    "read_lamp",
    "split_lead",
    "synthetic_dataset",
    "write_lamp",
]
