"""The official `openai` Python client, unchanged, against `personalize serve` on loopback: `user` is the user id,
`model` is personalize or personalize:<method>, streaming and not, the personalize field, and errors."""

from __future__ import annotations

import openai
import pytest
from conftest import movie_items
from http_server import server_settings, serving

from personalize import Personalizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ai(tmp_path_factory, tiny_model_dir):
    keys = [{"key": "tenant-key", "prefix": "t/"}]
    settings = server_settings(tmp_path_factory.mktemp("openai") / "home", tiny_model_dir, api_keys=keys)
    with Personalizer(settings) as p, serving(p) as url:
        p.add_items("t/alice", movie_items(5))
        yield p, openai.OpenAI(base_url=f"{url}/v1", api_key="tenant-key", max_retries=0, timeout=60)


def test_chat_completion_answers_the_user_with_the_method_asked(ai):
    p, client = ai
    completion = client.chat.completions.create(
        model="personalize:rag",
        user="t/alice",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "A film for tonight?"}],
        max_tokens=4,
        temperature=0,
    )
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 4
    details = completion.model_extra["personalize"]
    assert details["method"] == "rag" and details["user_id"] == "t/alice" and len(details["retrieved"]) == 4
    direct = p.generate("t/alice", "system: Be brief.\nA film for tonight?", "rag", max_new_tokens=4)
    assert choice.message.content == direct.text  # the same answer as in-process (greedy)


def test_streamed_chunks_add_up_to_the_answer_and_end_with_the_details(ai):
    p, client = ai
    kwargs = dict(model="personalize:none", user="t/alice", messages=[{"role": "user", "content": "Hello"}])
    whole = client.chat.completions.create(**kwargs, max_tokens=6).choices[0].message.content
    stream = client.chat.completions.create(**kwargs, max_tokens=6, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole and chunks[0].choices[0].delta.role == "assistant"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
    assert finals[0].model_extra["personalize"]["method"] == "none"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6


def test_models_lists_personalize_and_each_method(ai):
    _, client = ai
    ids = {m.id for m in client.models.list()}
    assert {"personalize", "personalize:rag", "personalize:peft", "personalize:rag+peft"} <= ids


def test_errors_reach_the_client_as_its_own_exceptions(ai):
    _, client = ai
    message = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="personalize", user="t/nobody", messages=message)
    assert unknown.value.body["code"] == "unknown_user"
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(model="personalize", user="other/alice", messages=message)
    with pytest.raises(openai.UnprocessableEntityError) as bad_model:
        client.chat.completions.create(model="gpt-4o", user="t/alice", messages=message)
    assert bad_model.value.body["field"] == "model"
    with pytest.raises(openai.UnprocessableEntityError) as no_user:
        client.chat.completions.create(model="personalize", messages=message)
    assert no_user.value.body["field"] == "user"
    with pytest.raises(openai.UnprocessableEntityError) as too_many:
        client.chat.completions.create(model="personalize", user="t/alice", messages=message, max_tokens=513)
    assert too_many.value.body["field"] == "max_tokens"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=str(client.base_url), api_key="nope", max_retries=0).models.list()
