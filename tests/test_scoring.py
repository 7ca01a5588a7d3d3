"""Label scoring by likelihood equals the log-probability computed one full sequence at a time."""

import pytest
import torch

from personalize.serving.modeling import load_model
from personalize.serving.scoring import candidate_log_likelihoods


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


def test_the_median_label_minimises_expected_absolute_error_where_argmax_does_not():
    import math

    import numpy as np

    from personalize.serving.scoring import median_label

    probs = {"1": 0.15, "2": 0.1, "3": 0.1, "4": 0.2, "5": 0.45}
    scores = {label: math.log(p) + 3.0 for label, p in probs.items()}  # unnormalised log-likelihoods
    assert max(scores, key=scores.get) == "5"
    assert median_label(scores) == "4"  # cumulative 0.15, 0.25, 0.35, 0.55: the first to reach half
    expected_error = {c: sum(p * abs(int(c) - int(y)) for y, p in probs.items()) for c in probs}
    assert min(expected_error, key=expected_error.get) == median_label(scores)  # 1.2 against argmax's 1.3
    assert median_label({"10": 0.0, "2": np.log(3.0)}) == "2"  # numeric order, not string order
    assert median_label({"3": 0.0}) == "3"
    with pytest.raises(ValueError, match="numeric labels"):
        median_label({"[1]": 0.0, "[2]": 0.0})
