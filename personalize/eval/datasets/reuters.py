"""The Reuters C50 builders, ``reuters-lead`` (stands in for LaMP-4) and ``reuters-authorship`` (LaMP-1), from
``reuters-c50/`` in ../shared/data, read in place and never copied.

Both share how an article is read, normalized and split into lead and body, and which ``C50test`` articles a split
queries. Deterministic: per-query random generators are seeded from strings, which Python hashes with SHA-512
independently of ``PYTHONHASHSEED``.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from personalize.errors import InvalidInputError, MalformedFileError
from personalize.eval.datasets.lamp import Dataset, Query, _check_split
from personalize.tasks.registry import get_task

REUTERS_QUERIES_PER_SPLIT = 5  # reuters-*: first 5 C50test articles (test), the next 5 (dev)
AUTHORSHIP_PASSAGE_WORDS = 60
AUTHORSHIP_INPUT_TEMPLATE = (
    "For an author who has written the articles in their profile, which passage did they write? Just answer with "
    '[1] or [2] without explanation. [1]: "{passage1}" [2]: "{passage2}"'
)


def _need_dir(path: Path) -> Path:
    if not path.is_dir():
        raise InvalidInputError(f"{path}: no such folder")
    return path


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
