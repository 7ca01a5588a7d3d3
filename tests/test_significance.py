"""Intervals, paired tests, claims and the evidence-based router, on stored runs with planted answers (no model)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from typer.testing import CliRunner

from personalize.cli import app
from personalize.data.schema import EvalResult, EvalRun
from personalize.data.store import Store
from personalize.eval.calibration import calibrate_from_run
from personalize.eval.metrics import score
from personalize.eval.reports import build_report, compare_runs, export, export_dict, format_comparison, format_report
from personalize.eval.significance import (
    MetricFamily,
    correlation,
    gain_intervals,
    holm,
    metric_intervals,
    paired_pvalues,
    smallest_pvalue,
)
from personalize.serving.router import Router
from personalize.settings import StatsSettings

PERCENTILE = StatsSettings(ci_method="percentile")


@pytest.fixture
def store(tmp_path):
    return Store(f"sqlite:///{tmp_path / 'runs.db'}")


def store_run(store: Store, run_id: str, task: str, answers: dict[str, dict[str, list[tuple[str, str]]]], sizes=None):
    """A finished run whose answers are given: {method: {user: [(prediction, gold), ...]}}."""
    methods = list(answers)
    with store.session() as s:
        s.add(
            EvalRun(
                id=run_id,
                task=task,
                split="test",
                state="done",
                progress=1.0,
                config={"task": task, "split": "test", "methods": methods, "source": "planted"},
            )
        )
    with store.session() as s:
        for method, per_user in answers.items():
            for user, pairs in per_user.items():
                for q, (pred, gold) in enumerate(pairs):
                    s.add(
                        EvalResult(
                            run_id=run_id,
                            user_external_id=user,
                            query_id=f"{user}-{q}",
                            method=method,
                            profile_size=(sizes or {}).get(user, 10),
                            prediction=pred,
                            gold=gold,
                            timings={"total_s": 0.01},
                        )
                    )


def rating_run(n_users: int, better: dict[str, float], seed: int = 0, queries: int = 3):
    """Golds 1..5; ``none`` is off by 2; a method in ``better`` is exact on that share of queries, else off by 2."""
    rng = random.Random(seed)
    golds = {f"u{i:03d}": [rng.randint(1, 5) for _ in range(queries)] for i in range(n_users)}

    def off(g: int) -> str:
        return str(g + 2 if g <= 3 else g - 2)

    answers = {"none": {u: [(off(g), str(g)) for g in gs] for u, gs in golds.items()}}
    for method, share in better.items():
        answers[method] = {
            u: [(str(g) if rng.random() < share else off(g), str(g)) for g in gs] for u, gs in golds.items()
        }
    return answers


# --------------------------------------------------------------------------------------------- the statistics


def test_metric_family_equals_the_official_metrics_on_every_kind_of_task():
    rng = random.Random(3)
    for task, labels in (
        ("movielens-rating", ["1", "2", "3", "4", "5", "x"]),
        ("reuters-authorship", ["[1]", "[2]", "?"]),
    ):
        family = MetricFamily(task)
        users = [[(rng.choice(labels), rng.choice(labels[:-1])) for _ in range(rng.randint(1, 4))] for _ in range(12)]
        rows = np.array([family.rows([p for p, _ in u], [g for _, g in u]) for u in users])
        preds = [p for u in users for p, _ in u]
        golds = [g for u in users for _, g in u]
        assert family.point(rows) == pytest.approx(score(task, preds, golds), abs=1e-12)
    family = MetricFamily("reuters-lead")
    rows = np.array([family.rows(["the cat sat"], ["the cat sat on a mat"]), family.rows(["dog"], ["a dog ran"])])
    assert family.point(rows) == pytest.approx(
        score("reuters-lead", ["the cat sat", "dog"], ["the cat sat on a mat", "a dog ran"])
    )


def test_macro_f1_by_hand():
    # golds [1] [1] [2] [2], predictions [1] [2] [2] x:
    # [1]: tp 1, fp 0, fn 1 -> F1 2/3; [2]: tp 1, fp 1, fn 1 -> F1 1/2; macro (2/3 + 1/2) / 2 = 7/12; accuracy 1/2
    family = MetricFamily("reuters-authorship")
    rows = np.array([family.rows(["[1]", "[2]"], ["[1]", "[1]"]), family.rows(["[2]", "x"], ["[2]", "[2]"])])
    assert family.point(rows) == pytest.approx({"accuracy": 0.5, "f1": 7 / 12})


def test_percentile_interval_matches_the_binomial_by_hand():
    # 20 users, one query each, half exactly right and half off by 1: a resample's MAE is K/20 with K ~ Bin(20, 1/2),
    # whose 2.5% and 97.5% quantiles are 6 and 14 (P(K<=5)=0.021, P(K<=6)=0.058), so the interval is [0.30, 0.70]
    family = MetricFamily("movielens-rating")
    rows = np.array([family.rows(["3"], ["3"])] * 10 + [family.rows(["4"], ["3"])] * 10)
    mae = metric_intervals(rows, family, PERCENTILE)["mae"]
    assert mae.value == pytest.approx(0.5)
    assert (mae.low, mae.high) == pytest.approx((0.30, 0.70), abs=0.01)  # scipy interpolates between resamples
    identical = metric_intervals(np.array([family.rows(["3"], ["4"])] * 12), family, StatsSettings())["mae"]
    assert (identical.value, identical.low, identical.high) == (1.0, 1.0, 1.0)  # BCa undefined: percentile


def test_the_same_seed_gives_the_same_intervals_and_another_seed_moves_them():
    family = MetricFamily("movielens-rating")
    rng = np.random.default_rng(0)
    rows = np.array([family.rows([str(rng.integers(1, 6))], [str(rng.integers(1, 6))]) for _ in range(40)])
    a = metric_intervals(rows, family, StatsSettings(seed=7))
    b = metric_intervals(rows, family, StatsSettings(seed=7))
    c = metric_intervals(rows, family, StatsSettings(seed=8))
    assert a == b
    assert (a["mae"].low, a["mae"].high) != (c["mae"].low, c["mae"].high)


def test_a_planted_effect_is_detected_and_a_null_is_not():
    family = MetricFamily("movielens-rating")
    answers = rating_run(30, {"good": 0.9})
    rows = {m: np.array([family.rows(*zip(*per[u], strict=True)) for u in sorted(per)]) for m, per in answers.items()}
    gain = gain_intervals(rows["good"], rows["none"], family, StatsSettings())["mae"]
    assert gain.low > 0.5 and gain.value > 0.7  # MAE 2 -> about 0.2: a relative gain near 90%
    assert paired_pvalues(rows["good"], rows["none"], family, StatsSettings())["mae"] < 0.001
    null = gain_intervals(rows["none"], rows["none"].copy(), family, StatsSettings())["mae"]
    assert null.covers(0.0) and not null.excludes_zero()
    assert paired_pvalues(rows["none"], rows["none"].copy(), family, StatsSettings())["mae"] == 1.0


def test_too_few_users_get_no_interval_and_no_test():
    family = MetricFamily("movielens-rating")
    rows = np.array([family.rows(["3"], ["4"]), family.rows(["2"], ["4"])])
    assert metric_intervals(rows, family, StatsSettings())["mae"].low is None
    assert paired_pvalues(rows, rows[::-1], family, StatsSettings())["mae"] is None


def test_holm_and_the_smallest_reachable_pvalue():
    adjusted = holm([0.01, 0.04, None, 0.03])  # by hand: 3 x 0.01, then max(2 x 0.03, 0.03), then 0.04 -> 0.06
    assert adjusted[2] is None
    assert [adjusted[0], adjusted[1], adjusted[3]] == pytest.approx([0.03, 0.06, 0.06])
    assert smallest_pvalue(5) == 2 / 32 and smallest_pvalue(6) < 0.05


def test_correlation_uses_scipy_with_intervals():
    rng = np.random.default_rng(1)
    sizes = rng.integers(10, 1000, 60)
    rising = correlation(sizes, sizes / 1000 + rng.normal(0, 0.05, 60), StatsSettings())
    assert rising.spearman.value > 0.8 and rising.spearman.low > 0.5 and rising.spearman_p < 1e-6
    assert rising.pearson.low < rising.pearson.value < rising.pearson.high
    flat = correlation(sizes, rng.normal(0, 1, 60), StatsSettings())
    assert flat.spearman.covers(0.0)


# --------------------------------------------------------------------------------------------- reports


def test_report_carries_intervals_tests_and_the_claims(store, tmp_path):
    sizes = {f"u{i:03d}": 10 + 20 * i for i in range(40)}
    answers = rating_run(40, {"rag": 0.9, "peft": 0.3, "rag+peft": 0.9})
    answers["user-mean"] = answers["rag"]  # a baseline as good as rag: the model does not beat it
    store_run(store, "planted", "movielens-rating", answers, sizes)
    report = build_report(store, "planted")
    rag = report.row("rag")
    assert rag.intervals["mae"].ci_low < rag.metrics["mae"] < rag.intervals["mae"].ci_high
    assert rag.vs_none["mae"].significant and rag.vs_none["mae"].p_holm >= rag.vs_none["mae"].p_value
    assert (
        report.row("user-mean").baseline and report.baselines == ["user-mean"] and report.best_baseline == "user-mean"
    )
    verdicts = {c.claim: c.verdict for c in report.claims}
    assert verdicts["RAG beats none"] == "holds"
    assert verdicts["RAG beats PEFT"] == "holds"
    assert verdicts["RAG+PEFT is at least as good as RAG"] == "not significant"
    assert verdicts["The best model method beats the best baseline"] == "not significant"
    assert "PEFT's gain rises with profile size (Spearman, per-user gain over none)" in verdicts
    text = format_report(report)
    assert "no model" in text and "HOLDS" in text and "Holm" in text and "[" in text
    data = json.loads(export(report, tmp_path / "r.json").read_text())
    m = data["methods"]["rag"]
    assert set(m["metrics"]["mae"]) == {"value", "ci_low", "ci_high"}
    assert {"value", "ci_low", "ci_high", "p_value"} <= set(m["gain_vs_none"])
    assert m["gain_vs_none"]["metric"] == "mae" and "rmse" in m["gain_vs_none"]["by_metric"]
    assert "gain_vs_none" not in data["methods"]["user-mean"] and data["methods"]["user-mean"]["kind"] == "no model"
    assert data["baselines"] == ["user-mean"] and {c["verdict"] for c in data["claims"]} <= {
        "holds",
        "fails",
        "not significant",
        "not measured",
    }
    csv_text = export(report, tmp_path / "r.csv").read_text()
    assert "ci_low" in csv_text.splitlines()[0] and "no model" in csv_text


def test_identical_methods_under_two_names_are_not_flagged(store):
    answers = rating_run(30, {"rag": 0.5})
    answers["peft"] = answers["rag"]
    store_run(store, "null", "movielens-rating", answers)
    report = build_report(store, "null")
    c = next(c for c in report.comparisons if (c.candidate, c.reference, c.metric) == ("rag", "peft", "mae"))
    assert not c.significant and c.gain.ci_low <= 0 <= c.gain.ci_high and c.p_value == 1.0
    assert {x.claim: x.verdict for x in report.claims}["RAG beats PEFT"] == "not significant"


def test_a_run_with_too_few_users_says_so_instead_of_an_interval(store):
    store_run(store, "tiny", "movielens-rating", rating_run(4, {"rag": 0.9}))
    report = build_report(store, "tiny")
    assert any("too few users for an interval" in n for n in report.notes)
    assert report.row("rag").intervals["mae"].ci_low is None
    assert {c.claim: c.verdict for c in report.claims}["RAG beats none"] == "not measured"


def test_report_is_reproducible(store):
    store_run(store, "again", "movielens-rating", rating_run(25, {"rag": 0.6, "peft": 0.4}))
    assert export_dict(build_report(store, "again")) == export_dict(build_report(store, "again"))


# --------------------------------------------------------------------------------------------- the router


def test_router_moves_only_on_evidence_and_keeps_it(store):
    sizes = {f"u{i:03d}": 10 + i for i in range(80)}
    answers = rating_run(80, {"rag": 0.05, "peft": 0.0, "rag+peft": 0.0}, queries=3)
    # only the largest profiles get a real gain from peft
    big = [u for u, n in sizes.items() if n >= 70]
    for u in big:
        answers["peft"][u] = [(g, g) for _, g in answers["none"][u]]
    store_run(store, "evidence", "movielens-rating", answers, sizes)
    policy = calibrate_from_run(store, "evidence", tolerance=0.0, alpha=0.05)
    assert policy.bands[0].method == "none"  # rag's few lucky answers are not evidence
    assert policy.bands[-1].method == "peft" and policy.bands[-1].min_items >= 60
    chosen = policy.bands[-1].evidence
    assert chosen["moved"] and chosen["p_holm"] < 0.05 and chosen["ci_low"] > 0
    stayed = policy.bands[0].evidence
    assert not stayed["moved"] and "p_value" in stayed
    assert Router(store).policy("movielens-rating").bands[-1].evidence == chosen  # stored with the band


def test_router_chooses_among_the_peft_family_on_evidence(store):
    sizes = {f"u{i:03d}": 10 + i for i in range(80)}
    answers = rating_run(80, {"rag": 0.0, "peft": 0.0, "peft:ia3": 1.0, "rag+peft:prompt-tuning": 0.0}, queries=3)
    answers["peft:p-tuning"] = answers["peft:ia3"]  # as good as ia3 but costlier to serve: never chosen over it
    store_run(store, "family", "movielens-rating", answers, sizes)
    policy = calibrate_from_run(store, "family", tolerance=0.0, alpha=0.05)
    assert [b.method for b in policy.bands] == ["peft:ia3"]
    assert policy.bands[0].evidence["versus"] == "none" and policy.bands[0].evidence["p_holm"] < 0.05
    family = {"none", "rag", "peft", "peft:ia3", "peft:p-tuning", "rag+peft:prompt-tuning"}
    assert set(policy.bands[0].quality) == family
    router = Router(store)
    assert router.planned("movielens-rating", 40) == "peft:ia3"
    assert router.choose("movielens-rating", 40, has_adapter=True).method == "peft:ia3"
    fallback = router.choose("movielens-rating", 40, has_adapter=False)
    assert fallback.method == "none" and "peft:ia3 needs an adapter" in fallback.reason


def test_the_cost_order_ranks_adapter_methods_within_each_tier():
    from personalize.serving.router import cost_order, is_routable

    names = ["rag+peft:ia3", "peft:prefix-tuning", "peft:distill", "peft", "rag", "none", "peft:ia3", "rag+peft"]
    assert cost_order([*names, "zero-shot", "majority", "peft:nope"]) == [
        "none",
        "rag",
        "peft",  # LoRA: the fast decoder and mixed batches
        "peft:distill",  # the same serving, but a teacher to train
        "peft:ia3",  # the fast decoder too, but no peft mixed batch where it falls back
        "peft:prefix-tuning",  # likewise (one row at a time on the fallback), registered after ia3
        "rag+peft",
        "rag+peft:ia3",
    ]
    assert not is_routable("zero-shot") and not is_routable("peft:nope") and is_routable("rag+peft:p-tuning")


def test_a_band_with_an_unknown_method_is_refused(store):
    from personalize.errors import InvalidInputError
    from personalize.serving.router import Band, Policy

    with pytest.raises(InvalidInputError, match="unknown method 'peft:nope'"):
        Router(store).save(Policy("movielens-rating", [Band(1, "peft:nope")]))


def test_router_merges_buckets_too_small_to_be_significant(store):
    sizes = {f"u{i:03d}": 10 + i for i in range(12)}  # 4 buckets of 3 users: none can reach p < 0.05 alone
    answers = rating_run(12, {"peft": 1.0})
    store_run(store, "small", "movielens-rating", answers, sizes)
    policy = calibrate_from_run(store, "small", tolerance=0.0, alpha=0.05, stats=StatsSettings(min_users=6))
    assert [b.method for b in policy.bands] == ["peft"]
    assert policy.bands[0].evidence["n_users"] >= 6


def test_router_show_prints_the_evidence(store, tmp_path, monkeypatch):
    home = tmp_path / "cli-home"
    monkeypatch.setenv("PERSONALIZE_HOME", str(home))
    monkeypatch.setenv("PERSONALIZE_DATABASE_URL", store.url)
    store_run(store, "shown", "movielens-rating", rating_run(40, {"peft": 0.9}))
    runner = CliRunner()
    out = runner.invoke(app, ["router", "calibrate", "shown"])
    assert out.exit_code == 0, out.output
    out = runner.invoke(app, ["router", "show", "--task", "movielens-rating"])
    assert "moved: significant" in out.output and "p=" in out.output and "CI [" in out.output


def test_compare_runs_pairs_the_difference_over_users(store):
    store_run(store, "first", "movielens-rating", rating_run(30, {"rag": 0.2}))
    store_run(store, "second", "movielens-rating", rating_run(30, {"rag": 0.9}))  # same golds, better rag
    rows = {(r.method, r.metric): r for r in compare_runs(store, "first", "second")}
    rag = rows[("rag", "mae")]
    assert rag.difference.value == pytest.approx(rag.candidate - rag.baseline)
    assert rag.difference.ci_high < 0 < -rag.difference.ci_low  # MAE fell: the whole interval is below 0
    same = rows[("none", "mae")]
    assert (same.difference.value, same.difference.ci_low, same.difference.ci_high) == (0.0, 0.0, 0.0)
    assert same.same_predictions == 1.0
    assert "difference [95% CI]" in format_comparison(list(rows.values()), "first", "second", 0.01)


def test_average_gain_has_a_paired_interval(store):
    store_run(store, "avg", "movielens-rating", rating_run(30, {"rag": 0.9}))
    rag = build_report(store, "avg").row("rag")
    assert rag.average_gain_ci.ci_low < rag.average_gain < rag.average_gain_ci.ci_high
    assert rag.average_gain == pytest.approx(rag.average_gain_ci.value)
