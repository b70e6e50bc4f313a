"""The aggregate score the merge search maximises, and the best variant the comparison marks,
against hand calculations (no model, no Ray cluster).

A wrong sign, weight or scale here makes the search pick the worst merge without any test of the
pipeline noticing; each test below states the arithmetic it expects.
"""

from __future__ import annotations

import math

import pytest

from alloylm.evaluate.comparison import (
    aggregate_score,
    build_comparison,
    comparison_markdown,
    format_value,
    headline_value,
)
from alloylm.evaluate.config import EvalConfig

JUDGE_ON = {"enabled": True, "base_url": "http://judge:8000/v1", "model": "judge"}


ACCURACY = {"objective_metric": "accuracy"}  # these hand calculations weigh multiple-choice accuracy


def eval_config(**suites) -> EvalConfig:
    suites["multiple_choice"] = {**ACCURACY, **suites.get("multiple_choice", {})}
    return EvalConfig.model_validate({"variants": ["v"], "suites": suites})


def ok(**metrics) -> dict:
    return {"status": "ok", "metrics": metrics}


# ----------------------------------------------------------------------------- headline values


def test_multiple_choice_headline_is_the_configured_objective_metric():
    metrics = {"accuracy": 0.625, "accuracy_norm": 0.9, "mean_prob_correct": 0.4, "accuracy_circular": 0.25}
    assert headline_value("multiple_choice", metrics) == 0.4  # default: P(correct option), continuous
    assert headline_value("multiple_choice", metrics, {"objective_metric": "accuracy_circular"}) == 0.25
    assert headline_value("multiple_choice", {"accuracy": 0.5}) is None  # the default metric is missing


def test_accuracy_suites_use_plain_accuracy_as_is():
    assert headline_value("multiple_choice", {"accuracy": 0.625, "accuracy_norm": 0.9}, ACCURACY) == 0.625
    assert headline_value("short_answer", {"accuracy": 0.25, "exact_match": 0.1}) == 0.25
    value = headline_value("multiple_choice", {"accuracy": 1}, ACCURACY)
    assert value == 1.0 and isinstance(value, float)


@pytest.mark.parametrize("suite", ["domain_perplexity", "general_perplexity"])
def test_perplexity_is_two_to_the_minus_bits_per_byte(suite):
    # 2^-1 = 0.5, 2^-2 = 0.25, 2^-0.5 = 0.7071...; perplexity itself is not read.
    assert headline_value(suite, {"bits_per_byte": 1.0, "perplexity": 99.0}) == 0.5
    assert headline_value(suite, {"bits_per_byte": 2.0}) == 0.25
    assert headline_value(suite, {"bits_per_byte": 0.0}) == 1.0
    assert headline_value(suite, {"bits_per_byte": 0.5}) == pytest.approx(1 / math.sqrt(2), abs=1e-12)


def test_a_worse_perplexity_gives_a_lower_headline_value():
    better, worse = headline_value("domain_perplexity", {"bits_per_byte": 0.8}), headline_value("domain_perplexity", {"bits_per_byte": 1.6})
    assert 0 < worse < better < 1


def test_judge_overall_maps_one_to_ten_onto_zero_to_one():
    assert headline_value("judge", {"overall": 1.0}) == 0.0
    assert headline_value("judge", {"overall": 10.0}) == 1.0
    assert headline_value("judge", {"overall": 7.3}) == pytest.approx(0.7, abs=1e-12)
    assert headline_value("judge", {"overall": 5.5, "clarity": 10}) == pytest.approx(0.5, abs=1e-12)


@pytest.mark.parametrize(
    ("suite", "metrics"),
    [
        ("multiple_choice", {}),
        ("multiple_choice", {"accuracy_norm": 0.5}),
        ("short_answer", {"accuracy": float("nan")}),
        ("domain_perplexity", {"perplexity": 3.0}),
        ("general_perplexity", {"bits_per_byte": float("-inf")}),  # 2^inf
        ("judge", {}),
        ("judge", {"overall": float("nan")}),
    ],
)
def test_missing_or_non_finite_metrics_give_no_value(suite, metrics):
    assert headline_value(suite, metrics) is None


def test_an_unknown_suite_is_an_error_naming_it():
    with pytest.raises(ValueError, match="unknown suite 'bleu'"):
        headline_value("bleu", {"accuracy": 1.0})


# ----------------------------------------------------------------------------- aggregate score


def test_aggregate_score_is_the_weighted_mean_of_headline_values():
    config = eval_config(
        multiple_choice={"weight": 2.0},
        short_answer={"weight": 1.0},
        domain_perplexity={"weight": 1.0},
        general_perplexity={"weight": 0.0},
        judge=JUDGE_ON | {"weight": 1.0},
    )
    suites = {
        "multiple_choice": ok(accuracy=0.6, accuracy_norm=0.1),
        "short_answer": ok(accuracy=0.3),
        "domain_perplexity": ok(bits_per_byte=1.0, perplexity=2.0),
        "general_perplexity": {"status": "failed", "metrics": {}},  # weight 0: does not count
        "judge": ok(overall=7.3),
    }
    score, missing = aggregate_score(suites, config)
    # (2 * 0.6 + 1 * 0.3 + 1 * 2^-1 + 1 * (7.3 - 1) / 9) / (2 + 1 + 1 + 1) = 2.7 / 5
    assert score == pytest.approx(0.54, abs=1e-12)
    assert missing == []


def test_default_weights_score_the_benchmarks_only():
    # Perplexity weights default to 0 and the judge is off: the mean of the two accuracies.
    suites = {
        "multiple_choice": ok(accuracy=0.8),
        "short_answer": ok(accuracy=0.2),
        "domain_perplexity": ok(bits_per_byte=9.0),
        "general_perplexity": ok(bits_per_byte=9.0),
    }
    assert aggregate_score(suites, eval_config()) == (pytest.approx(0.5, abs=1e-12), [])


def test_a_worse_perplexity_lowers_the_score():
    config = eval_config(multiple_choice={"weight": 1.0}, short_answer={"enabled": False}, domain_perplexity={"weight": 1.0})
    good, _ = aggregate_score({"multiple_choice": ok(accuracy=0.5), "domain_perplexity": ok(bits_per_byte=1.0)}, config)
    bad, _ = aggregate_score({"multiple_choice": ok(accuracy=0.5), "domain_perplexity": ok(bits_per_byte=2.0)}, config)
    # (0.5 + 0.5) / 2 and (0.5 + 0.25) / 2
    assert good == pytest.approx(0.5, abs=1e-12)
    assert bad == pytest.approx(0.375, abs=1e-12)
    assert bad < good


def test_a_higher_accuracy_raises_the_score():
    config = eval_config(short_answer={"enabled": False})
    low, _ = aggregate_score({"multiple_choice": ok(accuracy=0.25)}, config)
    high, _ = aggregate_score({"multiple_choice": ok(accuracy=0.75)}, config)
    assert (low, high) == (0.25, 0.75)


def test_weights_shift_the_score_towards_the_heavier_suite():
    suites = {"multiple_choice": ok(accuracy=1.0), "short_answer": ok(accuracy=0.0)}
    assert aggregate_score(suites, eval_config(multiple_choice={"weight": 3.0}))[0] == pytest.approx(0.75, abs=1e-12)
    assert aggregate_score(suites, eval_config(short_answer={"weight": 3.0}))[0] == pytest.approx(0.25, abs=1e-12)


def test_zero_weight_and_disabled_suites_are_left_out_even_before_weighted_ones():
    # multiple_choice comes first in the suite order: skipping it must not end the loop.
    config = eval_config(multiple_choice={"weight": 0.0}, short_answer={"weight": 2.0}, domain_perplexity={"weight": 2.0})
    suites = {"short_answer": ok(accuracy=0.5), "domain_perplexity": ok(bits_per_byte=2.0)}
    # (2 * 0.5 + 2 * 0.25) / 4; multiple_choice has no result and weight 0: not missing.
    assert aggregate_score(suites, config) == (pytest.approx(0.375, abs=1e-12), [])
    disabled = eval_config(multiple_choice={"enabled": False, "weight": 5.0})
    assert aggregate_score({"short_answer": ok(accuracy=0.5)}, disabled) == (0.5, [])


def test_a_weighted_suite_without_a_value_leaves_no_score_and_is_named():
    config = eval_config(domain_perplexity={"weight": 1.0}, judge=JUDGE_ON)
    suites = {
        "multiple_choice": {"status": "failed", "metrics": {"accuracy": 0.9}},  # not ok: its metrics do not count
        "short_answer": ok(accuracy=0.4),
        "domain_perplexity": ok(perplexity=3.0),  # no bits_per_byte
        # judge: no result at all
    }
    score, missing = aggregate_score(suites, config)
    assert score is None
    assert missing == ["multiple_choice", "domain_perplexity", "judge"]


def test_a_suite_with_status_missing_or_no_metrics_is_missing():
    config = eval_config()
    score, missing = aggregate_score({"multiple_choice": {"status": "missing", "metrics": {"accuracy": 1.0}}, "short_answer": {"status": "ok"}}, config)
    assert (score, missing) == (None, ["multiple_choice", "short_answer"])
    assert aggregate_score({"multiple_choice": None, "short_answer": ok(accuracy=1.0)}, config) == (None, ["multiple_choice"])


def test_all_weights_zero_gives_no_score():
    config = eval_config(multiple_choice={"weight": 0.0}, short_answer={"weight": 0.0})
    assert aggregate_score({"multiple_choice": ok(accuracy=1.0), "short_answer": ok(accuracy=1.0)}, config) == (None, [])


# ----------------------------------------------------------------------------- best variant


def result(score, split="validation", status="ok", **suites) -> dict:
    return {"split": split, "status": status, "score": score, "model": f"/m/{score}", "suites": suites}


def test_best_is_the_highest_accuracy_and_score_but_the_lowest_perplexity():
    comparison = build_comparison(
        {
            "cpt": result(0.4, multiple_choice=ok(accuracy=0.4), domain_perplexity=ok(perplexity=3.0, bits_per_byte=0.9)),
            "merged": result(0.7, multiple_choice=ok(accuracy=0.7), domain_perplexity=ok(perplexity=5.0, bits_per_byte=1.2)),
            "sft": result(0.5, multiple_choice=ok(accuracy=0.5), domain_perplexity=ok(perplexity=4.0, bits_per_byte=1.0)),
        }
    )
    best = comparison["best"]
    assert best["score"] == ["merged"]
    assert best["multiple_choice.accuracy"] == ["merged"]
    assert best["domain_perplexity.perplexity"] == ["cpt"]
    assert best["domain_perplexity.bits_per_byte"] == ["cpt"]
    assert comparison["split"] == "validation"
    assert [r["variant"] for r in comparison["rows"]] == ["cpt", "merged", "sft"]
    assert comparison["rows"][1]["values"]["multiple_choice.accuracy"] == 0.7
    assert comparison["rows"][1]["model"] == "/m/0.7"
    assert comparison["rows"][1]["values"]["multiple_choice.accuracy_norm"] is None
    assert "multiple_choice.accuracy_norm" not in comparison["best"]
    keys = [c["key"] for c in comparison["columns"]]
    # Every column of a suite some variant has, in the fixed order, the score last.
    assert keys == [
        "multiple_choice.accuracy",
        "multiple_choice.accuracy_circular",
        "multiple_choice.mean_prob_correct",
        "multiple_choice.accuracy_norm",
        "domain_perplexity.perplexity",
        "domain_perplexity.bits_per_byte",
        "score",
    ]
    by_key = {c["key"]: c for c in comparison["columns"]}
    assert by_key["domain_perplexity.perplexity"]["higher_is_better"] is False
    assert by_key["score"]["higher_is_better"] is True and by_key["score"]["suite"] is None
    assert by_key["multiple_choice.accuracy"] == {
        "key": "multiple_choice.accuracy",
        "suite": "multiple_choice",
        "metric": "accuracy",
        "label": "MC accuracy",
        "higher_is_better": True,
    }


def test_a_tie_at_the_top_marks_every_tied_variant():
    comparison = build_comparison({n: result(s) for n, s in (("a", 0.6), ("b", 0.6), ("c", 0.1))})
    assert comparison["best"]["score"] == ["a", "b"]


def test_no_best_when_all_tie_or_only_one_variant_has_a_value():
    assert "score" not in build_comparison({"a": result(0.5), "b": result(0.5)})["best"]
    assert "score" not in build_comparison({"a": result(0.5), "b": result(None)})["best"]
    assert "score" not in build_comparison({"a": result(0.5)})["best"]


def test_values_of_failed_suites_and_non_finite_values_are_left_out():
    comparison = build_comparison(
        {
            "a": result(0.2, multiple_choice={"status": "failed", "reason": "boom", "metrics": {"accuracy": 1.0}}),
            "b": result(0.1, multiple_choice=ok(accuracy=0.3)),
            "c": result(0.3, multiple_choice=ok(accuracy=float("nan"))),
        }
    )
    values = {r["variant"]: r["values"]["multiple_choice.accuracy"] for r in comparison["rows"]}
    assert values == {"a": None, "b": 0.3, "c": None}
    assert "multiple_choice.accuracy" not in comparison["best"]  # only b has a value
    assert comparison["rows"][0]["missing"] == {"multiple_choice": "boom"}
    assert comparison["rows"][1]["missing"] == {}
    assert comparison["best"]["score"] == ["c"]


def test_a_failed_variant_names_its_error_and_suites_without_reason_their_status():
    comparison = build_comparison(
        {
            "broken": {"split": "test", "status": "failed", "error": "OSError: no weights", "score": None, "suites": {}},
            "partial": result(0.5, split="test", short_answer={"status": "missing", "metrics": {}}),
            "silent": {"split": "test", "status": "failed", "score": None, "suites": {}},
        }
    )
    missing = {r["variant"]: r["missing"] for r in comparison["rows"]}
    assert missing == {"broken": {"model": "OSError: no weights"}, "partial": {"short_answer": "missing"}, "silent": {"model": "failed"}}
    assert [r["status"] for r in comparison["rows"]] == ["failed", "ok", "failed"]


def test_results_of_different_splits_are_refused():
    with pytest.raises(ValueError, match="different splits.*test, validation"):
        build_comparison({"a": result(0.1, split="validation"), "b": result(0.2, split="test")})


def test_judge_criteria_become_columns_and_chance_is_kept():
    judged = result(
        0.5,
        multiple_choice=ok(accuracy=0.5, chance=0.25),
        judge=ok(overall=6.0, clarity=7.0, creativity=5.0),
    )
    judged["config"] = {"suites": {"judge": {"criteria": ["clarity", "creativity"]}}}
    other = result(0.4, multiple_choice=ok(accuracy=0.4, chance=0.25), judge=ok(overall=8.0, clarity=9.0, creativity=4.0))
    other["config"] = {"suites": {"judge": {"criteria": ["creativity", "quantitative_precision"]}}}
    comparison = build_comparison({"a": judged, "b": other})
    keys = [c["key"] for c in comparison["columns"]]
    assert keys == [
        "multiple_choice.accuracy",
        "multiple_choice.accuracy_circular",
        "multiple_choice.mean_prob_correct",
        "multiple_choice.accuracy_norm",
        "judge.overall",
        "judge.clarity",
        "judge.creativity",
        "judge.quantitative_precision",
        "score",
    ]
    labels = {c["key"]: c["label"] for c in comparison["columns"]}
    assert labels["judge.quantitative_precision"] == "Judge: quantitative precision"
    assert comparison["best"]["judge.overall"] == ["b"]
    assert comparison["best"]["judge.creativity"] == ["a"]
    assert comparison["chance"] == {"multiple_choice": 0.25}
    assert build_comparison({"a": result(0.1), "b": result(0.2)})["chance"] == {}
    assert build_comparison({})["split"] is None


# ----------------------------------------------------------------------------- the table


@pytest.mark.parametrize(
    ("key", "value", "text"),
    [
        ("score", None, "—"),
        ("score", float("inf"), "inf"),
        ("domain_perplexity.perplexity", float("inf"), "inf"),
        ("score", 0.12345, "0.123"),
        ("multiple_choice.accuracy", 0.5, "0.500"),
        ("domain_perplexity.bits_per_byte", 1.23456, "1.235"),
        ("domain_perplexity.perplexity", 12.3456, "12.35"),
        ("judge.overall", 7.0, "7.00"),
    ],
)
def test_cells_are_formatted_per_metric(key, value, text):
    assert format_value(key, value) == text


def test_markdown_bolds_the_best_and_lists_the_notes():
    comparison = build_comparison(
        {
            "a": result(0.25, split="test", multiple_choice=ok(accuracy=0.25, chance=0.25), domain_perplexity=ok(perplexity=3.0, bits_per_byte=1.0)),
            "b": result(0.75, split="test", multiple_choice=ok(accuracy=0.75, chance=0.25), domain_perplexity=ok(perplexity=4.0, bits_per_byte=1.5), judge={"status": "failed", "reason": "timeout"}),
        }
    )
    text = comparison_markdown(comparison, columns=["multiple_choice.accuracy", "domain_perplexity.perplexity", "score"])
    lines = text.splitlines()
    assert lines[0] == "| Variant | MC accuracy ↑ | Domain perplexity ↓ | Score (weighted) ↑ |"
    assert lines[1] == "|---|---|---|---|"
    assert lines[2] == "| a | 0.250 | **3.00** | 0.250 |"
    assert lines[3] == "| b | **0.750** | 4.00 | **0.750** |"
    assert lines[4] == ""
    assert lines[5:] == [
        "- Split: `test`. ↑ higher is better, ↓ lower is better; best in bold.",
        "- [low, high]: 95% interval (percentile bootstrap, 1000 resamples; benchmark items resampled by fact, text blocks and judged questions one by one).",
        "- ≈: the difference from `a` lies within noise (its paired-bootstrap 95% interval contains 0).",
        "- Multiple-choice chance level: 0.250.",
        "- b: judge missing — timeout",
    ]
    assert text.endswith("\n")
    everything = comparison_markdown(comparison).splitlines()[0]
    assert everything.count("|") == len(comparison["columns"]) + 2


def test_chance_is_taken_from_whichever_variant_reports_it():
    comparison = build_comparison(
        {"a": result(0.1, multiple_choice=ok(accuracy=0.1, chance=0.2)), "b": result(0.2, short_answer=ok(accuracy=0.2))}
    )
    assert comparison["chance"] == {"multiple_choice": 0.2}


def test_markdown_of_a_comparison_without_chance_or_missing_suites():
    # A comparison.json written before `chance` existed still renders.
    comparison = {"split": "test", "columns": [{"key": "score", "label": "Score (weighted)", "higher_is_better": True}], "rows": [{"variant": "a", "values": {"score": 0.5}, "missing": {}}], "best": {}}
    assert comparison_markdown(comparison).splitlines()[2:] == ["| a | 0.500 |", "", "- Split: `test`. ↑ higher is better, ↓ lower is better; best in bold."]


def test_lm_eval_retention_columns_one_per_task_metric_then_the_pooled_objective():
    """No Ray: results as the lm_eval suite writes them. Each task's numeric metrics become a
    'Retention' column in task order (booleans and other keys are not metrics), a metric lm-eval
    says is lower-is-better keeps that direction, and with several tasks the pooled objective
    (the suite's objective_metric) comes last; a variant without the suite adds nothing."""
    from alloylm.evaluate.comparison import Column, _lm_eval_columns

    metrics = {
        "tasks": ["t1", "t2"], "t1/acc": 0.5, "t1/acc_norm": 0.6, "t2/acc": 0.4, "t2/perplexity": 12.0,
        "t2/flag": True, "t3/acc": 0.9, "acc_norm": 0.55, "acc": 0.45, "items": 10,
        "higher_is_better": {"t2/perplexity": False},
    }
    with_suite = {"suites": {"lm_eval": {"metrics": metrics}}, "config": {"suites": {"lm_eval": {"objective_metric": "acc_norm"}}}}
    columns = _lm_eval_columns({"a": with_suite, "b": {"suites": {"multiple_choice": {"metrics": {"accuracy": 0.3}}}}})
    assert columns == [
        Column("lm_eval", "t1/acc", "Retention: t1 acc", True),
        Column("lm_eval", "t1/acc_norm", "Retention: t1 acc_norm", True),
        Column("lm_eval", "t2/acc", "Retention: t2 acc", True),
        Column("lm_eval", "t2/perplexity", "Retention: t2 perplexity", False),
        Column("lm_eval", "acc_norm", "Retention: acc_norm over all tasks", True),
    ]
    # One task: its own columns only (the pooled value would repeat them); no objective_metric: acc.
    single = {"suites": {"lm_eval": {"metrics": {"tasks": ["t1"], "t1/acc": 0.5, "acc": 0.5}}}}
    assert _lm_eval_columns({"a": single}) == [Column("lm_eval", "t1/acc", "Retention: t1 acc", True)]
    two = {"suites": {"lm_eval": {"metrics": {"tasks": ["t1", "t2"], "t1/acc": 0.5, "t2/acc": 0.4, "acc": 0.45}}}}
    assert _lm_eval_columns({"a": two})[-1] == Column("lm_eval", "acc", "Retention: acc over all tasks", True)
