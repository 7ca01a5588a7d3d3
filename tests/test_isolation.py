"""One user's adapter never answers for another, even for user ids that look alike (issue 6, security)."""

import shutil
import unicodedata
from pathlib import Path

import pytest
import torch
from conftest import movie_items
from peft import PeftModel

from personalize import AdapterOwnershipError, Personalizer
from personalize.adapters.peft_utils import private_base_copy
from personalize.data.naming import user_key
from personalize.serving.scoring import candidate_log_likelihoods

# prefixes of each other, differing only in case, in unicode normal form, or holding path characters
LOOKALIKES = [
    "bob",
    "Bob",
    "bo",
    "bob/",
    "../bob",
    unicodedata.normalize("NFC", "b\u00f6b"),
    unicodedata.normalize("NFD", "b\u00f6b"),
]
PROMPT = "What score would this user give the following movie? movie: Film 3 (Drama, Horror)"
LABELS = ["1", "2", "3", "4", "5"]


def _own_scores(client, path: Path) -> list[float]:
    """The label log-likelihoods from a fresh PeftModel holding only this adapter: ground truth for serving."""
    model = PeftModel.from_pretrained(private_base_copy(client.model.model), str(path)).eval()
    prep = client.prepare(LOOKALIKES[0], PROMPT, method="none")
    with torch.no_grad():
        return candidate_log_likelihoods(client.model, prep.built.input_ids, LABELS, model=model)


def test_lookalike_users_are_served_only_by_their_own_adapter(settings):
    with Personalizer(settings.model_copy(update={"adapter_cache_size": 3})) as client:  # evictions too
        _check_lookalikes(client)


def _check_lookalikes(client) -> None:
    for n, user in enumerate(LOOKALIKES):  # different items per user, so every adapter is different
        items = movie_items(8, prefix=f"{n}-")
        client.add_items(user, [{**item, "output": str(1 + (i + n) % 5)} for i, item in enumerate(items)])
        client.train(user)
    adapters = {user: client.current_adapter(user) for user in LOOKALIKES}
    paths = {user: Path(a.path).resolve() for user, a in adapters.items()}
    assert len(set(paths.values())) == len(LOOKALIKES)
    root = client.adapter_store.root
    for user, path in paths.items():
        assert path.is_relative_to(root) and path.parent.name == user_key(user)

    served = {}
    for user in LOOKALIKES + list(reversed(LOOKALIKES)):  # hot-swapping back and forth through the LRU
        result = client.score_labels(user, PROMPT, LABELS, method="peft")
        assert result.method == "peft" and result.timings.extra["adapter_version"] == 1
        scores = [result.timings.extra["label_log_likelihoods"][label] for label in LABELS]
        served.setdefault(user, scores)
        assert scores == pytest.approx(served[user], abs=1e-5)
    for user in LOOKALIKES:
        assert served[user] == pytest.approx(_own_scores(client, paths[user]), abs=1e-4)
    distinct = {tuple(round(s, 3) for s in scores) for scores in served.values()}
    assert len(distinct) == len(LOOKALIKES)  # no two users were answered by the same adapter


def test_an_adapter_stamped_for_another_user_is_refused(client):
    for user in ("bob", "Bob"):
        client.add_items(user, [{**item, "output": "5"} for item in movie_items(6, prefix=user)])
        client.train(user)
    victim, intruder = Path(client.current_adapter("Bob").path), Path(client.current_adapter("bob").path)
    shutil.rmtree(victim)
    shutil.copytree(intruder, victim)  # e.g. a mistaken copy on a shared adapter store
    with pytest.raises(AdapterOwnershipError, match="trained for another user"):
        client.generate("Bob", PROMPT, method="peft", max_new_tokens=2)
    assert client.generate("bob", PROMPT, method="peft", max_new_tokens=2).method == "peft"
