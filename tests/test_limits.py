"""Limits that protect memory (issue 18, class 5): a size limit on items, and prompt building that tokenizes at most
an item's share of the budget, however large the item."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from personalize import Personalizer
from personalize.cli import app
from personalize.data.items import make_item
from personalize.errors import InvalidInputError
from personalize.retrieval import RetrievedItem
from personalize.tasks import prompting
from personalize.tasks.prompting import build_prompt, count_tokens, max_token_chars
from personalize.tasks.registry import get_task

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class CountingTokenizer:
    """The real tokenizer, recording how many characters each call is asked to tokenize."""

    def __init__(self, inner) -> None:  # noqa: ANN001
        self.inner = inner
        self.calls: list[int] = []

    def __call__(self, text, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN204
        self.calls.append(len(text))
        return self.inner(text, *args, **kwargs)

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self.inner, name)


def test_an_item_over_the_limit_is_refused_naming_the_setting(settings):
    with Personalizer(settings, max_item_chars=1000) as p:
        p.add_items("a", [{"id": "ok", "text": "x" * 1000}])  # exactly at the limit
        with pytest.raises(InvalidInputError, match=r"item 'big' has 1,001 characters.*PERSONALIZE_MAX_ITEM_CHARS"):
            p.add_items("a", [{"id": "new", "text": "fine"}, {"id": "big", "text": "x" * 1001}])
        lamp_like = {"id": "lamp", "text": "y" * 600, "fields": {"text": "y" * 600, "score": "5"}}
        with pytest.raises(InvalidInputError, match="1,210 characters"):  # text, fields (keys too) count together
            p.add_items("a", [lamp_like])
        assert [i.id for i in p.items("a")] == ["ok"]


def test_the_limit_applies_to_a_whole_import(home, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PERSONALIZE_HOME", str(home))
    monkeypatch.setenv("PERSONALIZE_MODEL", str(tiny_model_dir))
    monkeypatch.setenv("PERSONALIZE_MAX_ITEM_CHARS", "100")
    path = tmp_path / "items.jsonl"
    rows = [{"user_id": "a", "id": "1", "text": "short"}, {"user_id": "b", "id": "1", "text": "z" * 101}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = CliRunner()
    result = run.invoke(app, ["users", "import", str(path)], catch_exceptions=False)
    assert result.exit_code == 2 and "PERSONALIZE_MAX_ITEM_CHARS" in result.output and "Traceback" not in result.output
    assert "0 users" in run.invoke(app, ["users", "count"], catch_exceptions=False).output


def test_prompt_building_never_tokenizes_a_whole_huge_item(client, monkeypatch):
    counting = CountingTokenizer(client.model.tokenizer)
    loaded = dataclasses.replace(client.model, tokenizer=counting)
    task = get_task("lamp-3")
    huge_text = "word " * 400_000  # 2,000,000 characters
    huge = make_item("h", huge_text, {"text": huge_text, "score": "2"}, "2", task="lamp-3")
    small = make_item("s", "ok", {"text": "ok", "score": "4"}, "4", task="lamp-3")
    hits = [RetrievedItem("h", 1.0, huge), RetrievedItem("s", 0.5, small)]
    built = build_prompt(loaded, task, "review: fine", hits, token_budget=200, input_share=0.6, max_new_tokens=4)

    bound = (200 + 1) * max_token_chars(loaded)  # no share is larger than the whole budget
    assert counting.calls and max(counting.calls) <= bound + 200 < len(huge_text) // 100
    assert [h.id for h in built.used] == ["h", "s"]
    n_input = count_tokens(client.model, "review: fine")
    items_part = built.text[: -len(". review: fine")]
    assert (200 - n_input) // 2 - 10 < count_tokens(client.model, items_part) <= 200 - n_input + 5  # filled, not over

    monkeypatch.setattr(prompting, "max_token_chars", lambda _loaded: 10**9)  # no clipping: tokenize it all
    medium_text = huge_text[:50_000]
    medium = make_item("h", medium_text, {"text": medium_text, "score": "2"}, "2", task="lamp-3")
    unclipped = build_prompt(
        client.model, task, "review: fine", [RetrievedItem("h", 1.0, medium), hits[1]], 200, 0.6, 4
    )
    assert unclipped.text == built.text  # clipping by characters first changes nothing but the cost


def test_embedding_a_huge_item_gives_the_embedding_of_its_beginning(client, monkeypatch):
    embedder = client.embedder
    huge = "alpha beta gamma " * 100_000  # 1,700,000 characters; the model reads its first 256 tokens
    limit = embedder.max_chars()
    assert limit is not None and limit < 20_000
    clipped = embedder.embed([huge])[0]
    monkeypatch.setattr(embedder, "max_chars", lambda: None)  # the model's own truncation, on a shorter text
    assert np.allclose(clipped, embedder.embed([huge[:30_000]])[0], atol=1e-6)
