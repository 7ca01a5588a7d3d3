"""generate() on a tiny random Llama: the result's fields, method choice, fallbacks and bad input."""

import pytest

from personalize import Personalizer, Settings
from personalize.errors import EmptyPromptError, InvalidInputError, UnknownUserError
from personalize.retrieval import RetrievedItem
from personalize.tasks.prompting import build_prompt, count_tokens
from personalize.tasks.registry import get_task

RATINGS = [
    {
        "id": str(i),
        "text": f"Film {i} (Sci-Fi)",
        "fields": {"text": f"Film {i} (Sci-Fi)", "score": "5"},
        "output": "5",
        "task": "movielens-rating",
        "timestamp": f"2020-01-{i + 1:02d}",
    }
    for i in range(6)
]
PROMPT = get_task("movielens-rating").input_template.format(text="Film 99 (Sci-Fi)")


def test_generate_rag_returns_text_items_scores_and_timings(client):
    client.add_items("alice", RATINGS)
    result = client.generate("alice", PROMPT, method="rag", k=3, max_new_tokens=5)
    assert result.method == "rag" and result.requested_method == "rag" and result.task == "movielens-rating"
    assert len(result.retrieved) == 3 and all(r.id in {i["id"] for i in RATINGS} for r in result.retrieved)
    assert result.retrieved[0].score >= result.retrieved[-1].score
    assert result.new_tokens == 5 and isinstance(result.text, str)
    assert result.timings.retrieval_s > 0 and result.timings.generation_s > 0
    assert result.timings.total_s >= result.timings.generation_s
    assert '5 is the score for "Film' in result.prompt and result.prompt.endswith(PROMPT)


def test_generate_none_uses_no_retrieval(client):
    client.add_items("alice", RATINGS)
    result = client.generate("alice", PROMPT, method="none", max_new_tokens=3)
    assert result.method == "none" and result.retrieved == [] and result.prompt == PROMPT


def test_auto_uses_rag_when_user_has_items_and_none_otherwise(client):
    client.add_items("alice", RATINGS)
    client.add_user("empty")
    assert client.generate("alice", PROMPT, max_new_tokens=2).method == "rag"
    result = client.generate("empty", PROMPT, max_new_tokens=2)
    assert result.method == "none" and "no items" in result.notes[0]


def test_rag_without_items_falls_back_to_none(client):
    client.add_user("empty")
    result = client.generate("empty", PROMPT, method="rag", max_new_tokens=2)
    assert result.method == "none" and result.requested_method == "rag"
    assert any("fell back" in n for n in result.notes)


def test_bad_input_gets_clear_errors(client):
    client.add_items("alice", RATINGS)
    with pytest.raises(UnknownUserError, match="unknown user 'ghost'"):
        client.generate("ghost", PROMPT)
    with pytest.raises(EmptyPromptError):
        client.generate("alice", "  \n ")
    with pytest.raises(InvalidInputError, match="limit"):
        client.generate("alice", "x" * (client.settings.max_prompt_chars + 1))
    with pytest.raises(InvalidInputError, match="unknown method"):
        client.generate("alice", PROMPT, method="telepathy")
    with pytest.raises(InvalidInputError):
        client.generate("../etc", PROMPT) if False else client.generate("", PROMPT)


def test_generation_is_deterministic(client):
    client.add_items("alice", RATINGS)
    a = client.generate("alice", PROMPT, method="rag", max_new_tokens=6)
    b = client.generate("alice", PROMPT, method="rag", max_new_tokens=6)
    assert a.text == b.text and a.retrieved == b.retrieved


def test_long_prompt_cuts_retrieved_context_first_then_prompt_from_the_left(tiny_chat_model_dir, home):
    settings = Settings(home=home, model=str(tiny_chat_model_dir), token_budget=2000, _env_file=None)
    with Personalizer(settings) as client:
        client.add_items("alice", RATINGS)
        assert client.model.uses_chat_template and client.model.context_length == 128
        words = " ".join(f"w{i}" for i in range(40))
        fits_alone = f"question {words} end"
        result = client.generate("alice", fits_alone, method="rag", k=6, max_new_tokens=8)
        assert result.truncated and result.prompt_tokens <= 120
        assert any("retrieved context cut" in n for n in result.notes)
        assert result.prompt.endswith(fits_alone)  # the prompt itself survived

        huge = "start " + " ".join(f"w{i}" for i in range(400)) + " final question"
        result = client.generate("alice", huge, method="rag", k=6, max_new_tokens=8)
        assert result.retrieved == [] and result.prompt_tokens <= 120
        assert any("prompt cut from the left" in n for n in result.notes)
        assert result.prompt.rstrip().endswith("final question") and "start" not in result.prompt


def test_items_share_the_budget_and_unused_budget_passes_on(client):
    loaded = client.model
    task = get_task("lamp-3")
    from personalize.data.items import make_item

    short = make_item("s", "ok", {"text": "ok", "score": "4"}, "4", task="lamp-3")
    long = make_item("l", "word " * 300, {"text": "word " * 300, "score": "2"}, "2", task="lamp-3")
    hits = [RetrievedItem("s", 1.0, short), RetrievedItem("l", 0.5, long)]
    built = build_prompt(loaded, task, "review: fine", hits, token_budget=100, input_share=0.6, max_new_tokens=4)
    items_part = built.text[: -len(". review: fine")]
    n_input = count_tokens(loaded, "review: fine")
    assert [h.id for h in built.used] == ["s", "l"]
    assert count_tokens(loaded, items_part) <= 100 - n_input + 5  # the join adds a few tokens
    assert count_tokens(loaded, items_part) > (100 - n_input) // 2  # the long item got the short one's leftovers


def _count_statements(client):
    """SQL statements run on the client's engine, recorded while the returned list is live."""
    from sqlalchemy import event

    statements: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany):  # noqa: ANN001
        statements.append(" ".join(statement.split()))

    event.listen(client.store.engine, "before_cursor_execute", record)
    return statements, lambda: event.remove(client.store.engine, "before_cursor_execute", record)


def _user_row_reads(statements: list[str]) -> int:
    """Statements that look a user up by id on its own (not joined into an item query)."""
    return sum(1 for s in statements if "FROM users WHERE users.external_id" in s)


@pytest.mark.parametrize("retriever", ["bm25", "dense"])
def test_one_generate_resolves_its_user_once_and_counts_its_sql_round_trips(client, retriever):
    """A request reads the user once (row, item counts and tasks, the newest adapter: one transaction) and
    retrieval fetches the hits' rows in one joined query; a regression to per-layer lookups fails here."""
    client.add_items("alice", RATINGS)
    client.generate("alice", PROMPT, method="rag", k=3, max_new_tokens=2, retriever=retriever)  # build the index
    statements, stop = _count_statements(client)
    try:
        result = client.generate("alice", PROMPT, method="rag", k=3, max_new_tokens=2, retriever=retriever)
        rag = list(statements)
        statements.clear()
        client.generate("alice", PROMPT, method="none", max_new_tokens=2)
        none = list(statements)
        statements.clear()
        client.generate("alice", PROMPT, method="auto", max_new_tokens=2)
        auto = list(statements)
    finally:
        stop()
    assert len(result.retrieved) == 3
    for run in (rag, none, auto):
        assert _user_row_reads(run) == 1, "\n".join(s[:150] for s in run)
    # none: the user row, its items grouped by task (one transaction)
    assert len(none) == 2, "\n".join(s[:150] for s in none)
    # auto: + the newest adapter (same transaction), the router's policy and, routed to rag, the hits
    assert len(auto) <= 5, "\n".join(s[:150] for s in auto)
    # rag: + the hits' rows (one join); bm25 gets the data version from the resolved user, so no extra read
    assert len(rag) == 3, "\n".join(s[:150] for s in rag)
