"""Dataset builders on tiny folders made here, the LaMP file format, determinism, and (if present) the real data."""

from __future__ import annotations

import csv
import json
import statistics
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import SHARED_DATA

from personalize.errors import InvalidInputError, MalformedFileError
from personalize.eval.datasets import (
    BUILDERS,
    Dataset,
    Query,
    build_movielens_rating,
    build_reuters_authorship,
    build_reuters_lead,
    movie_text,
    normalize_article,
    rating_score,
    read_lamp,
    split_lead,
    synthetic_dataset,
    write_lamp,
)
from personalize.eval.metrics import mae
from personalize.tasks.registry import get_task

DAY = 86400
T0 = 1_000_000_000  # 2001-09-09 UTC


# --------------------------------------------------------------------------------------------- movielens


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


@pytest.fixture
def movielens(tmp_path: Path) -> Path:
    folder = tmp_path / "ml"
    folder.mkdir()
    movies = [[i, f"Movie {i} (199{i % 10})", "Comedy|Drama" if i % 2 else "Action"] for i in range(1, 13)]
    movies.append([20, "Lock, Stock & Two Smoking Barrels (1998)", "Comedy|Crime|Thriller"])
    movies.append([21, "La cravate (1957)", "(no genres listed)"])
    _write_csv(folder / "movies.csv", ["movieId", "title", "genres"], movies)
    ratings = [
        # user 7: ten ratings; movie 5 shares the first test query's timestamp and sorts before it (5 < 20)
        [7, 1, 0.5, T0 + 1 * DAY],
        [7, 2, 1.5, T0 + 2 * DAY],
        [7, 3, 2.5, T0 + 3 * DAY],
        [7, 4, 3.5, T0 + 4 * DAY],
        [7, 6, 4.5, T0 + 5 * DAY],
        [7, 8, 5.0, T0 + 6 * DAY],
        [7, 9, 1.0, T0 + 7 * DAY],
        [7, 21, 3.0, T0 + 9 * DAY],  # written out of order on purpose
        [7, 20, 4.0, T0 + 8 * DAY],
        [7, 5, 2.0, T0 + 8 * DAY],
        # user 10: five ratings, enough for test (2 profile items), too few for dev
        [10, 1, 4.0, T0 + 1 * DAY],
        [10, 2, 4.0, T0 + 2 * DAY],
        [10, 3, 2.0, T0 + 3 * DAY],
        [10, 4, 3.0, T0 + 4 * DAY],
        [10, 11, 5.0, T0 + 5 * DAY],
        # user 2: three ratings, too few for any split (no profile)
        [2, 1, 4.0, T0],
        [2, 2, 4.0, T0 + DAY],
        [2, 3, 4.0, T0 + 2 * DAY],
    ]
    _write_csv(folder / "ratings.csv", ["userId", "movieId", "rating", "timestamp"], ratings)
    return folder


@pytest.mark.parametrize(
    ("rating", "score"),
    [("0.5", 1), ("1.0", 1), ("1.5", 2), ("2.5", 3), ("3.5", 4), ("4.0", 4), ("4.5", 5), ("5.0", 5), ("0", 1)],
)
def test_rating_score_rounds_half_up_and_clips(rating, score):
    assert rating_score(rating) == score


def test_movie_text():
    assert (
        movie_text("Toy Story (1995)", "Adventure|Animation|Children")
        == "Toy Story (1995) (Adventure, Animation, Children)"
    )
    assert movie_text("La cravate (1957)", "(no genres listed)") == "La cravate (1957)"


def test_movielens_test_split(movielens: Path):
    ds = build_movielens_rating(movielens, "test")
    assert (ds.task, ds.split, ds.synthetic) == ("movielens-rating", "test", False)
    assert [q.id for q in ds.queries] == ["7-5", "7-20", "7-21", "10-3", "10-4", "10-11"]
    assert [q.gold for q in ds.queries] == ["2", "4", "3", "2", "3", "5"]
    q = ds.queries[1]
    assert q.user_id == "7"
    template = get_task("movielens-rating").input_template
    assert q.input == template.format(text="Lock, Stock & Two Smoking Barrels (1998) (Comedy, Crime, Thriller)")
    assert ds.queries[2].input.endswith("movie: La cravate (1957)")
    # profile: every rating strictly before the first query (day 8); movie 5 is the query itself
    assert [item["id"] for item in q.profile] == ["1", "2", "3", "4", "6", "8", "9"]
    assert [item["score"] for item in q.profile] == ["1", "2", "3", "4", "5", "5", "1"]
    assert q.profile[0] == {
        "id": "1",
        "text": "Movie 1 (1991) (Comedy, Drama)",
        "score": "1",
        "date": datetime.fromtimestamp(T0 + DAY, UTC).strftime("%Y-%m-%d"),
    }
    assert list(ds.users()) == ["7", "10"]
    assert [i["id"] for i in ds.users()["10"]] == ["1", "2"]


def test_movielens_dev_split_and_ties(movielens: Path, tmp_path: Path):
    ds = build_movielens_rating(movielens, "dev")
    assert [q.id for q in ds.queries] == ["7-6", "7-8", "7-9"]  # the 3 before the test queries; user 10 too small
    assert [i["id"] for i in ds.queries[0].profile] == ["1", "2", "3", "4"]
    # a rating sharing the first query's timestamp (but sorting before it) is not in the profile
    ratings = (movielens / "ratings.csv").read_text().replace(f"7,4,3.5,{T0 + 4 * DAY}", f"7,4,3.5,{T0 + 5 * DAY}")
    (movielens / "ratings.csv").write_text(ratings)
    tied = build_movielens_rating(movielens, "dev")
    assert [q.id for q in tied.queries] == ["7-6", "7-8", "7-9"]
    assert [i["id"] for i in tied.queries[0].profile] == ["1", "2", "3"]


def test_movielens_errors(movielens: Path, tmp_path: Path):
    with pytest.raises(InvalidInputError, match="split"):
        build_movielens_rating(movielens, "train")
    with pytest.raises(InvalidInputError, match="no such file"):
        build_movielens_rating(tmp_path / "nowhere", "test")
    (movielens / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,1,four,5\n")
    with pytest.raises(MalformedFileError, match="line 2"):
        build_movielens_rating(movielens, "test")
    (movielens / "ratings.csv").write_text("userId,movieId,timestamp\n1,1,5\n")
    with pytest.raises(MalformedFileError, match="rating"):
        build_movielens_rating(movielens, "test")


# --------------------------------------------------------------------------------------------- LaMP files


def test_write_read_roundtrip_and_determinism(movielens: Path, tmp_path: Path):
    first = write_lamp(build_movielens_rating(movielens, "test"), tmp_path / "a")
    second = write_lamp(build_movielens_rating(movielens, "test"), tmp_path / "b")
    assert [p.name for p in first] == ["test_questions.json", "test_outputs.json"]
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["test_outputs.json", "test_questions.json"]
    questions = json.loads(first[0].read_text(encoding="utf-8"))
    assert list(questions[0]) == ["id", "input", "profile", "user_id"]
    outputs = json.loads(first[1].read_text(encoding="utf-8"))
    assert outputs["task"] == "movielens-rating"
    assert outputs["golds"][0] == {"id": "7-5", "output": "2"}
    back = read_lamp(*first, "movielens-rating")
    original = build_movielens_rating(movielens, "test")
    assert back.split == "test"
    assert back.queries == original.queries


def test_write_lamp_uses_the_lamp_name(tmp_path: Path):
    ds = Dataset("lamp-3", "dev", [Query("q1", "u1", "review: nice", "5", [{"id": "r1", "text": "ok", "score": "4"}])])
    _, outputs = write_lamp(ds, tmp_path)
    assert json.loads(outputs.read_text())["task"] == "LaMP_3"


def test_read_lamp_user_based_and_missing_golds(tmp_path: Path):
    qpath, opath = tmp_path / "dev_questions.json", tmp_path / "dev_outputs.json"
    qpath.write_text(
        json.dumps(
            [
                {"id": "110", "input": "review: a", "profile": [{"id": "1", "text": "x", "score": "3"}]},
                {
                    "id": "111",
                    "input": "review: b",
                    "profile": [{"id": "2", "text": "y", "score": 5, "date": "2020-01-02"}],
                },
                {"id": "112", "input": "review: c", "profile": [], "user_id": "u9"},
            ]
        )
    )
    opath.write_text(
        json.dumps({"task": "LaMP_3", "golds": [{"id": "110", "output": "4"}, {"id": "111", "output": 2}]})
    )
    ds = read_lamp(qpath, opath, "lamp_3")
    assert ds.task == "lamp-3" and ds.split == "dev"
    assert [(q.user_id, q.gold) for q in ds.queries] == [("110", "4"), ("111", "2"), ("u9", None)]
    assert ds.queries[1].profile == [{"id": "2", "text": "y", "score": 5, "date": "2020-01-02"}]
    assert [q.gold for q in read_lamp(qpath, None, "lamp-3").queries] == [None, None, None]


def test_users_union_by_id():
    a, b, c = {"id": "a", "text": "1"}, {"id": "b", "text": "2"}, {"id": "c", "text": "3"}
    ds = Dataset("generic", "test", [Query("1", "u", "?", None, [a, b]), Query("2", "u", "?", None, [b, c])])
    assert ds.users() == {"u": [a, b, c]}


@pytest.mark.parametrize(
    ("questions", "outputs", "match"),
    [
        ("not json", None, "not JSON"),
        ('{"id": "1"}', None, "expected a JSON list"),
        ('[{"id": "1", "input": "x"}]', None, "missing 'profile'"),
        ('[{"id": "1", "input": "x", "profile": ["text"]}]', None, "must be an object"),
        ('[{"id": "1", "input": "x", "profile": [{"text": "no id"}]}]', None, "id"),
        ('[{"id": "1", "input": "x", "profile": []}, {"id": "1", "input": "y", "profile": []}]', None, "duplicate"),
        ('[{"id": "1", "input": "x", "profile": []}]', '{"golds": {}}', "golds"),
        ('[{"id": "1", "input": "x", "profile": []}]', '{"golds": [{"id": "1"}]}', "'output'"),
    ],
)
def test_read_lamp_malformed(tmp_path: Path, questions: str, outputs: str | None, match: str):
    qpath = tmp_path / "test_questions.json"
    qpath.write_text(questions)
    opath = None
    if outputs is not None:
        opath = tmp_path / "test_outputs.json"
        opath.write_text(outputs)
    with pytest.raises(MalformedFileError, match=match):
        read_lamp(qpath, opath, "lamp-3")


# --------------------------------------------------------------------------------------------- reuters

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu"]


def _article(author: str, n: int) -> str:
    body = " ".join(f"{WORDS[(n + i) % len(WORDS)]}{i}" for i in range(70))
    return f"{author} reported item {n} on Monday.\r\n  The {body} ended.\r\nIt closed at 3.5 percent.  \r\n"


@pytest.fixture
def c50(tmp_path: Path) -> Path:
    root = tmp_path / "c50"
    for author in ("Carol", "Alice", "Bob"):
        for sub, count in (("C50train", 3), ("C50test", 12)):
            folder = root / sub / author
            folder.mkdir(parents=True)
            for n in range(count):
                # names that sort differently as strings and as numbers: 100newsML < 11newsML < 99newsML
                (folder / f"{[100, 11, 99, 12, 130, 14, 15, 16, 17, 18, 19, 20][n]}newsML.txt").write_bytes(
                    _article(author, n).encode()
                )
    # one test article of Alice has no split point: it is left out
    (root / "C50test" / "Alice" / "105newsML.txt").write_bytes(b"no sentence end here at all\r\n")
    return root


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Shares rose. Then they fell.", ("Shares rose.", "Then they fell.")),
        ('He said so! "Quote" follows.', ("He said so!", '"Quote" follows.')),
        ("Rates rose 3.5 percent in May. Banks", ("Rates rose 3.5 percent in May.", "Banks")),
        ("Is it? yes. No way", ("Is it? yes.", "No way")),
        ("U.S. Senators met. Then", ("U.S.", "Senators met. Then")),  # the literal rule, abbreviations included
        ("No end here", None),
        ("Only one sentence.", None),
    ],
)
def test_split_lead(text, expected):
    assert split_lead(text) == expected


def test_normalize_article():
    assert normalize_article("A  b\r\n\r\n c\td \n") == "A b c d"


def test_reuters_lead(c50: Path):
    test = build_reuters_lead(c50, "test")
    dev = build_reuters_lead(c50, "dev")
    assert list(test.users()) == ["Alice", "Bob", "Carol"]
    assert len(test.queries) == len(dev.queries) == 15
    # Alice's first 5 usable test articles in file-name (string) order; 105newsML has no split and is skipped
    assert [q.id for q in test.queries[:5]] == [f"Alice-{n}newsML" for n in (100, 11, 12, 130, 14)]
    assert [q.id for q in dev.queries[:5]] == [f"Alice-{n}newsML" for n in (15, 16, 17, 18, 19)]
    q = test.queries[0]
    assert q.gold == "Alice reported item 0 on Monday."
    assert q.input.startswith("Write the opening sentence for the following news article: The alpha0 beta1")
    assert q.input.endswith("ended. It closed at 3.5 percent.")
    assert "\r" not in q.input and "  " not in q.input
    assert len(q.profile) == 3
    full = normalize_article(_article("Alice", 0))
    lead = "Alice reported item 0 on Monday."
    assert q.profile[0] == {"id": "100newsML", "title": lead, "text": full[len(lead) + 1 :]}
    assert q.profile[0]["text"].startswith("The alpha0")


def test_reuters_authorship(c50: Path, tmp_path: Path):
    ds = build_reuters_authorship(c50, "test", seed=0)
    lead = build_reuters_lead(c50, "test")
    assert [q.id for q in ds.queries] == [q.id for q in lead.queries]
    assert {q.gold for q in ds.queries} <= {"[1]", "[2]"}
    assert len({q.gold for q in ds.queries}) == 2
    for q, lq in zip(ds.queries, lead.queries, strict=True):
        assert q.input.startswith("For an author who has written the articles in their profile, which passage")
        passages = q.input.split('[1]: "', 1)[1].rsplit('"', 1)[0].split('" [2]: "')
        assert len(passages) == 2 and all(len(p.split()) == 60 for p in passages)
        own = passages[0] if q.gold == "[1]" else passages[1]
        other = passages[1] if q.gold == "[1]" else passages[0]
        assert own.startswith(lq.gold)
        assert not other.startswith(q.user_id)
        assert q.profile == lq.profile
    again = build_reuters_authorship(c50, "test", seed=0)
    assert again.queries == ds.queries
    other_seed = build_reuters_authorship(c50, "test", seed=1)
    assert [q.input for q in other_seed.queries] != [q.input for q in ds.queries]
    a = write_lamp(ds, tmp_path / "a")
    b = write_lamp(again, tmp_path / "b")
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]


def test_builders_registry():
    assert set(BUILDERS) == {"movielens-rating", "reuters-lead", "reuters-authorship"}


# --------------------------------------------------------------------------------------------- synthetic


def test_synthetic_dataset_is_deterministic_and_marked(tmp_path: Path):
    ds = synthetic_dataset(n_users=30, seed=3)
    assert ds.synthetic and "SYNTHETIC" in ds.source
    assert ds == synthetic_dataset(n_users=30, seed=3)
    assert ds != synthetic_dataset(n_users=30, seed=4)
    a = write_lamp(ds, tmp_path / "a")
    b = write_lamp(synthetic_dataset(n_users=30, seed=3), tmp_path / "b")
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    counts = Counter(q.user_id for q in ds.queries)
    assert len(counts) == 30 and set(counts.values()) == {3}
    sizes = [len(ds.queries[i].profile) for i in range(0, len(ds.queries), 3)]
    assert min(sizes) >= 8 and max(sizes) <= 200
    assert min(sizes) < 25 and max(sizes) > 80  # log-uniform spread for the by-data-volume analysis
    assert {q.gold for q in ds.queries} <= {"1", "2", "3", "4", "5"}
    dev = synthetic_dataset(n_users=30, seed=3, split="dev")
    assert [len(dev.queries[i].profile) for i in range(0, len(dev.queries), 3)] == [s - 3 for s in sizes]


def test_synthetic_signal_is_learnable_from_the_profile():
    """Averaging the user's own scores of movies that share a genre beats the global mean by a wide margin."""
    ds = synthetic_dataset(n_users=40, seed=0, min_items=30, max_items=200)

    def genres(text: str) -> set[str]:
        return set(text[text.rfind("(") + 1 : -1].split(", "))

    global_mean = statistics.mean(int(i["score"]) for q in ds.queries for i in q.profile)
    personal, baseline, golds = [], [], []
    for q in ds.queries:
        target = genres(q.input.split("movie: ", 1)[1])
        near = [int(i["score"]) for i in q.profile if genres(i["text"]) & target]
        personal.append(str(statistics.mean(near) if near else global_mean))
        baseline.append(str(global_mean))
        golds.append(q.gold)
    assert mae(personal, golds) < 0.75 * mae(baseline, golds)


def test_synthetic_rejects_other_tasks():
    with pytest.raises(InvalidInputError):
        synthetic_dataset(task="reuters-lead")


# --------------------------------------------------------------------------------------------- real data

needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} is absent (real data not here)")


@pytest.fixture(scope="module")
def movielens_test() -> Dataset:
    return build_movielens_rating(SHARED_DATA / "movielens-small", "test")


@needs_shared
def test_real_movielens(movielens_test: Dataset):
    ds = movielens_test
    counts = Counter(q.user_id for q in ds.queries)
    assert len(counts) == 488 and set(counts.values()) == {3}
    timestamps: dict[tuple[str, str], int] = {}
    with (SHARED_DATA / "movielens-small" / "ratings.csv").open(newline="") as fh:
        for row in csv.DictReader(fh):
            timestamps[(row["userId"], row["movieId"])] = int(row["timestamp"])
    by_user: dict[str, list[Query]] = {}
    for q in ds.queries:
        by_user.setdefault(q.user_id, []).append(q)
    for user, queries in by_user.items():
        first = min(timestamps[(user, q.id.split("-", 1)[1])] for q in queries)
        profile = queries[0].profile
        assert profile and all(timestamps[(user, item["id"])] < first for item in profile)
        assert not {q.id.split("-", 1)[1] for q in queries} & {item["id"] for item in profile}
    sizes = [len(qs[0].profile) for qs in by_user.values()]
    assert min(sizes) >= 10 and max(sizes) > 2600


@needs_shared
def test_real_reuters():
    folder = SHARED_DATA / "reuters-c50"
    ids = {}
    for split in ("test", "dev"):
        lead = build_reuters_lead(folder, split)
        counts = Counter(q.user_id for q in lead.queries)
        assert len(counts) == 40 and set(counts.values()) == {5}
        assert all(len(q.profile) == 50 and q.gold for q in lead.queries)
        ids[split] = {q.id for q in lead.queries}
        authorship = build_reuters_authorship(folder, split)
        golds = Counter(q.gold for q in authorship.queries)
        assert set(golds) == {"[1]", "[2]"} and 0.4 <= golds["[1]"] / len(authorship.queries) <= 0.6
    assert not ids["test"] & ids["dev"]
