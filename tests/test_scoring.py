"""Label scoring by likelihood equals the log-probability computed one full sequence at a time."""

import pytest
import torch

from personalize.modeling import load_model
from personalize.scoring import candidate_log_likelihoods


@pytest.fixture(scope="module")
def loaded(tiny_model_dir, tmp_path_factory):
    return load_model(str(tiny_model_dir), tmp_path_factory.mktemp("models"))


def _reference(loaded, prompt_ids, candidate):
    ids = loaded.tokenizer(candidate, add_special_tokens=False).input_ids
    with torch.no_grad():
        logp = torch.log_softmax(loaded.model(torch.tensor([prompt_ids + ids])).logits[0].float(), -1)
    return float(sum(logp[len(prompt_ids) - 1 + t, tid] for t, tid in enumerate(ids)))


@pytest.mark.parametrize("labels", [["1", "2", "3", "4", "5"], ["dark comedy", "comedy", "sci-fi", "true story"]])
def test_batched_label_scores_match_one_sequence_at_a_time(loaded, labels):
    prompt = loaded.tokenizer("what would this user answer", add_special_tokens=False).input_ids
    got = candidate_log_likelihoods(loaded, prompt, labels)
    want = [_reference(loaded, prompt, label) for label in labels]
    assert got == pytest.approx(want, abs=1e-4)
