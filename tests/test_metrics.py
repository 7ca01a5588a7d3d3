"""LaMP's metric rules on hand-computed examples, relative gains, and reading generated answers."""

from __future__ import annotations

import math

import pytest

from personalize.errors import InvalidInputError
from personalize.eval.metrics import (
    LOWER_IS_BETTER,
    accuracy,
    average_gain,
    macro_f1,
    mae,
    parse_prediction,
    relative_gain,
    rmse,
    rouge,
    score,
)


def test_accuracy_strips_and_compares_exactly():
    assert accuracy(["[1]", " [2] ", "2", "[1]"], ["[1]", "[2]", "[2]", "[2]"]) == pytest.approx(0.5)


def test_macro_f1_three_labels_by_hand():
    golds = ["a", "a", "b", "b", "c", "c"]
    preds = ["a", "b", "b", "b", "x", "a"]  # "x" is outside the label set: wrong
    # a: tp 1, fp 1, fn 1 -> 2/4 = 0.5; b: tp 2, fp 1, fn 0 -> 4/5 = 0.8; c: tp 0 -> 0
    assert macro_f1(preds, golds, ["a", "b", "c"]) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    # a label nobody uses (undefined F1) counts as 0 in the mean over the fixed list
    assert macro_f1(preds, golds, ["a", "b", "c", "d"]) == pytest.approx(1.3 / 4)
    assert accuracy(preds, golds) == pytest.approx(0.5)


def test_mae_rmse_with_non_numeric_predictions_by_hand():
    preds = ["4", "five", "2", " 3 ", "x", "4."]
    golds = ["5", "2", "2", "1", "3", "4"]
    # errors: 1; "five" vs 2 -> 5 (farther) -> 3; 0; 2; "x" vs 3 -> tie -> 5 -> 2; "4." is 4 -> 0
    assert mae(preds, golds) == pytest.approx(8 / 6)
    assert rmse(preds, golds) == pytest.approx(math.sqrt((1 + 9 + 0 + 4 + 4 + 0) / 6))
    # gold 4: 1 is farther than 5; gold 1: 5 is farther
    assert mae(["?"], ["4"]) == pytest.approx(3.0)
    assert mae(["nan"], ["1"]) == pytest.approx(4.0)
    assert mae(["3.5"], ["5"]) == pytest.approx(1.5)


def test_rouge_by_hand():
    # pair 1: 3 of 3 predicted words in a 6-word gold: P 1, R 1/2 -> F 2/3 (LCS also 3)
    # pair 2: unigrams overlap 2: P 2/3, R 1 -> F 0.8; LCS 1: P 1/3, R 1/2 -> F 0.4
    result = rouge(["the cat sat", "mat the on"], ["the cat sat on the mat", "the mat"])
    assert result["rouge-1"] == pytest.approx((2 / 3 + 0.8) / 2)
    assert result["rouge-l"] == pytest.approx((2 / 3 + 0.4) / 2)
    assert rouge(["Same words"], ["same words"]) == {"rouge-1": pytest.approx(1.0), "rouge-l": pytest.approx(1.0)}


def test_no_stemming():
    assert rouge(["running"], ["run"])["rouge-1"] == 0.0


def test_score_uses_the_tasks_metrics():
    assert list(score("movielens-rating", ["4", "x"], ["5", "2"])) == ["mae", "rmse"]
    assert score("movielens-rating", ["4", "x"], ["5", "2"])["mae"] == pytest.approx(2.0)
    cls = score("reuters-authorship", ["[1]", "[2]", "[1]", "oops"], ["[1]", "[2]", "[2]", "[1]"])
    # [1]: tp 1, fp 1, fn 1 -> 0.5; [2]: tp 1, fp 0, fn 1 -> 2/3
    assert cls == {"accuracy": pytest.approx(0.5), "f1": pytest.approx((0.5 + 2 / 3) / 2)}
    gen = score("reuters-lead", ["the cat sat"], ["the cat sat on the mat"])
    assert gen == {"rouge-1": pytest.approx(2 / 3), "rouge-l": pytest.approx(2 / 3)}
    assert set(score("lamp-2", ["comedy"], ["comedy"])) == {"accuracy", "f1"}
    assert score("lamp-2", ["comedy"], ["comedy"])["f1"] == pytest.approx(1 / 15)


def test_lengths_and_empty_lists():
    with pytest.raises(InvalidInputError):
        mae(["1"], ["1", "2"])
    assert math.isnan(accuracy([], []))
    assert math.isnan(rouge([], [])["rouge-1"])
    with pytest.raises(InvalidInputError):
        mae(["1"], ["n/a"])


def test_relative_gain():
    assert {"mae", "rmse"} == LOWER_IS_BETTER
    assert relative_gain(0.6, 0.5, "accuracy") == pytest.approx(0.2)
    assert relative_gain(0.3, 0.4, "mae") == pytest.approx(0.25)  # lower is better: a drop is a gain
    assert relative_gain(0.5, 0.4, "rmse") == pytest.approx(-0.25)
    assert relative_gain(0.301, 0.308, "mae") == pytest.approx(0.007 / 0.308)  # LaMP-3 PEFT vs non-personalized
    assert math.isnan(relative_gain(0.1, 0.0, "rouge-1"))
    assert average_gain({"mae": 0.3, "rmse": 0.5, "extra": 1.0}, {"mae": 0.4, "rmse": 0.5}) == pytest.approx(0.125)
    assert math.isnan(average_gain({"f1": 0.2}, {"f1": 0.0}))
    assert math.isnan(average_gain({}, {}))


@pytest.mark.parametrize(
    ("task", "text", "expected"),
    [
        ("movielens-rating", "4", "4"),
        ("movielens-rating", " 5\n", "5"),
        ("movielens-rating", "I would give it a 4", "4"),
        ("movielens-rating", "4 out of 5.", "4"),
        ("movielens-rating", "Score: 2/5", "2"),
        ("movielens-rating", "3.5", "3.5"),
        ("movielens-rating", "3 or 4", "3 or 4"),
        ("movielens-rating", "about 4.5 stars", "about 4.5 stars"),
        ("movielens-rating", "great movie!", "great movie!"),
        ("lamp-3", "The score is 1.", "1"),
        ("reuters-authorship", "[2]", "[2]"),
        ("reuters-authorship", "The answer is [1].", "[1]"),
        ("reuters-authorship", "Passage 2", "[2]"),
        ("reuters-authorship", "[1] and [2]", "[1] and [2]"),
        ("lamp-1", "neither", "neither"),
        ("lamp-2", "Dark Comedy", "dark comedy"),
        ("lamp-2", "It is a dark comedy.", "dark comedy"),
        ("lamp-2", "comedy, action", "comedy, action"),
        ("lamp-2", "sci-fi", "sci-fi"),
        ("reuters-lead", "\n  Shares rose on Monday. \nMore text", "Shares rose on Monday."),
        ("lamp-4", "", ""),
    ],
)
def test_parse_prediction(task, text, expected):
    assert parse_prediction(task, text) == expected


def test_parsed_non_answers_count_as_wrong():
    pred = parse_prediction("movielens-rating", "great movie!")
    assert mae([pred], ["2"]) == pytest.approx(3.0)
    assert accuracy([parse_prediction("reuters-authorship", "both")], ["[1]"]) == 0.0
