"""The aggregate score the merge search maximises, and the best variant the comparison marks,
against hand calculations (no model, no Ray cluster).

A wrong sign, weight or scale here makes the search pick the worst merge without any test of the
pipeline noticing; each test below states the arithmetic it expects.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from alloylm.evaluate.comparison import (
    aggregate_score,
    best_variant,
    build_comparison,
    comparison_markdown,
    comparison_notes,
    default_reference,
    format_cell,
    format_value,
    headline_metric,
    headline_value,
    _score_replicates,
    score_definition,
    score_interval,
)
from alloylm.evaluate.config import EvalConfig
from alloylm.evaluate.intervals import (
    CONFIDENCE,
    METHOD,
    RESAMPLES,
    Samples,
    joint_replicates,
    metric_for,
    paired_difference,
    percentile_interval,
    replicates,
)

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


def test_per_token_perplexity_on_another_tokenizers_tokens_is_not_ranked_bits_per_byte_is():
    """A model with its own tokenizer scores the text re-encoded into its tokens: fewer, longer
    tokens make per-token perplexity incomparable; it used to be ranked with the others."""
    comparison = build_comparison(
        {
            "sft": result(0.5, domain_perplexity=ok(perplexity=4.0, bits_per_byte=1.0, reencoded=False)),
            "hub-model": result(0.4, domain_perplexity=ok(perplexity=3.0, bits_per_byte=1.1, reencoded=True)),
            "cpt": result(0.3, domain_perplexity=ok(perplexity=5.0, bits_per_byte=1.2, reencoded=False)),
        }
    )
    assert comparison["best"]["domain_perplexity.perplexity"] == ["sft"]  # not hub-model's 3.0
    assert comparison["best"]["domain_perplexity.bits_per_byte"] == ["sft"]
    assert comparison["own_tokens"] == {"domain_perplexity.perplexity": ["hub-model"]}
    assert any("Domain perplexity of `hub-model`: per token of its own tokenizer" in n for n in comparison_notes(comparison))
    same = build_comparison({n: result(0.1, domain_perplexity=ok(perplexity=p, bits_per_byte=1.0)) for n, p in (("a", 2.0), ("b", 3.0))})
    assert same["own_tokens"] == {} and same["best"]["domain_perplexity.perplexity"] == ["a"]


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


# ----------------------------------------------------------------------------- intervals, differences, notes (hand-computed)

MC_ONLY = {
    "multiple_choice": {"enabled": True, "weight": 1.0},
    "short_answer": {"enabled": False},
    "domain_perplexity": {"enabled": False},
    "general_perplexity": {"enabled": False},
}


def samples(values, column="prob_correct", ids=None, **more) -> dict:
    return {"unit": "item", "ids": ids or [f"i{k}" for k in range(len(values))], "clusters": None, "columns": {column: list(values), **more}}


def scored(values, *, seed=0, suites=MC_ONLY, ids=None) -> dict:
    """A validation result whose multiple choice has per-item P(correct) `values` (the default objective)."""
    mean = sum(values) / len(values)
    return {
        "split": "validation", "status": "ok", "seed": seed, "score": mean, "config": {"suites": suites},
        "suites": {"multiple_choice": {"status": "ok", "metrics": {"mean_prob_correct": mean}, "samples": samples(values, ids=ids)}},
    }  # fmt: skip


def test_the_score_interval_weighs_each_suite_with_its_own_defaults():
    """mc disabled (weight 5 ignored); short answer with no keys: on, weight 1, accuracy 1.0;
    domain perplexity weight 3, 1 bit per byte -> 2^-1 = 0.5; judge and lm_eval absent: off.
    Every unit is the same, so every replicate is (1 * 1.0 + 3 * 0.5) / (1 + 3) = 0.625."""
    two_bits = 2 * math.log(2)
    result = {
        "config": {"suites": {"multiple_choice": {"enabled": False, "weight": 5.0}, "short_answer": {}, "domain_perplexity": {"weight": 3.0}, "general_perplexity": {"enabled": False}}},
        "suites": {
            "short_answer": {"status": "ok", "samples": samples([1.0] * 4, column="correct")},
            "domain_perplexity": {"status": "ok", "samples": {"unit": "block", "ids": ["b0", "b1", "b2"], "clusters": None, "columns": {"nll": [two_bits] * 3, "bytes": [2.0] * 3}}},
        },
    }
    interval = score_interval(result)
    assert interval == {"low": pytest.approx(0.625), "high": pytest.approx(0.625)}
    off = {"config": {"suites": {name: {"enabled": False} for name in MC_ONLY}}, "suites": result["suites"]}
    assert score_interval(off) is None  # no weighted suite: no interval


def test_the_score_interval_uses_the_configured_objective_and_skips_failed_suites():
    config = {**MC_ONLY, "multiple_choice": {"objective_metric": "accuracy"}}
    result = {"config": {"suites": config}, "suites": {"multiple_choice": {"status": "ok", "samples": samples([0.5] * 3, correct=[1.0] * 3)}}}
    assert score_interval(result) == {"low": 1.0, "high": 1.0}  # accuracy, not P(correct) 0.5
    result["suites"]["multiple_choice"]["status"] = "failed"  # its samples are not used
    assert score_interval(result) is None


def test_the_score_interval_resamples_with_the_results_seed_on_the_suites_stream():
    values = [0.1, 0.9, 0.3, 0.7, 0.5, 0.2, 0.8, 0.4]
    data, metric = Samples.from_json(samples(values)), metric_for("multiple_choice", "mean_prob_correct")
    expected = {seed: percentile_interval(replicates(data, metric, seed=seed, stream="multiple_choice")) for seed in (0, 7)}
    assert expected[0] != expected[7]
    assert score_interval(scored(values, seed=7)) == expected[7]
    for seed in (None, "7"):  # no integer seed: seed 0
        assert score_interval(scored(values, seed=seed)) == expected[0]


def test_the_score_resamples_suites_about_the_same_facts_together():
    """Multiple choice and short answer ask about the same facts: resampled each on its own, their
    combined score's interval came out about 1/sqrt(2) too narrow. With the same per-fact results in
    both, the score moves as one suite does; a suite of other units (perplexity) stays on its own."""
    facts = [f"f{k}" for k in range(12)]
    known = [1.0 if k % 3 else 0.0 for k in range(12)]

    def clustered(column):
        return {"unit": "item", "ids": [f"{column}{k}" for k in range(12)], "clusters": facts, "columns": {column: known}}

    both = {"multiple_choice": {"objective_metric": "accuracy"}, "short_answer": {},
            "domain_perplexity": {"enabled": False}, "general_perplexity": {"enabled": False}}
    result = {"seed": 3, "config": {"suites": both}, "suites": {
        "multiple_choice": {"status": "ok", "samples": clustered("correct")},
        "short_answer": {"status": "ok", "samples": clustered("correct")},
    }}  # fmt: skip
    alone = {"seed": 3, "config": {"suites": {**both, "short_answer": {"enabled": False}}}, "suites": {"multiple_choice": result["suites"]["multiple_choice"]}}
    one, joint = _score_replicates(alone), _score_replicates(result)
    assert np.std(joint) == pytest.approx(np.std(one), rel=0.15)  # independent halves: ~0.71 of it
    assert score_interval(result)["high"] - score_interval(result)["low"] > 0.8 * (score_interval(alone)["high"] - score_interval(alone)["low"])
    # Identical halves on the same draw: every replicate is the one suite's value on that draw.
    data = Samples.from_json(clustered("correct"))
    [same] = joint_replicates([(data, metric_for("short_answer", "accuracy"))], seed=3, stream="benchmark")
    assert np.allclose(joint, same)


def test_differences_from_the_reference_are_paired_and_signed():
    a, b = scored([0.5] * 4), scored([0.8] * 4)
    b["score_interval"] = {"low": 0.1, "high": 0.9}  # a stored interval is shown as is
    b["suites"]["multiple_choice"]["intervals"] = {"mean_prob_correct": {"low": 0.75, "high": 0.85}}
    comparison = build_comparison({"a": a, "b": b})
    row = comparison["rows"][1]
    assert row["intervals"]["score"] == {"low": 0.1, "high": 0.9}
    assert row["intervals"]["multiple_choice.mean_prob_correct"] == {"low": 0.75, "high": 0.85}
    assert row["intervals"]["multiple_choice.accuracy"] is None
    same = {"difference": pytest.approx(0.3), "low": pytest.approx(0.3), "high": pytest.approx(0.3), "within_noise": False}
    assert row["differences"]["score"] == same
    assert row["differences"]["multiple_choice.mean_prob_correct"] == same
    assert comparison["intervals"] == {"confidence": CONFIDENCE, "resamples": RESAMPLES, "method": METHOD}
    assert comparison["score_definition"] == "weighted mean of multiple_choice mean_prob_correct (weight 1)"
    assert comparison["lm_eval_splits"] == {}


def test_a_column_difference_is_the_paired_bootstrap_on_the_suites_stream():
    a, b = scored([0.1, 0.9, 0.3, 0.7, 0.5, 0.2]), scored([0.4, 0.8, 0.6, 0.9, 0.5, 0.3])
    expected = paired_difference(
        Samples.from_json(b["suites"]["multiple_choice"]["samples"]), Samples.from_json(a["suites"]["multiple_choice"]["samples"]),
        metric_for("multiple_choice", "mean_prob_correct"), seed=0, stream="multiple_choice",
    )  # fmt: skip
    row = build_comparison({"a": a, "b": b})["rows"][1]
    assert row["differences"]["multiple_choice.mean_prob_correct"] == expected


def _differences(a: dict, b: dict) -> dict:
    return build_comparison({"a": a, "b": b})["rows"][1]["differences"]


def test_differences_that_cannot_be_paired_are_none():
    other_items = scored([0.8] * 4, ids=["j0", "j1", "j2", "j3"])
    assert _differences(scored([0.5] * 4), other_items)["score"] is None  # other units
    reweighted = scored([0.8] * 4, suites={**MC_ONLY, "multiple_choice": {"enabled": True, "weight": 2.0}})
    assert _differences(scored([0.5] * 4), reweighted)["score"] is None  # other terms
    differences = _differences(scored([0.5] * 4, seed=0), scored([0.8] * 4, seed=1))  # other seeds
    assert differences["score"] is None and differences["multiple_choice.mean_prob_correct"] is None
    no_score = scored([0.5] * 4)
    no_score["score"] = None
    assert _differences(no_score, scored([0.8] * 4))["score"] is None  # the reference has no score
    unsampled = scored([0.5] * 4)
    del unsampled["suites"]["multiple_choice"]["samples"]
    differences = _differences(unsampled, scored([0.8] * 4))  # the reference has no samples
    assert differences["score"] is None and differences["multiple_choice.mean_prob_correct"] is None
    differences = _differences(scored([0.5] * 4), unsampled)  # the row has none
    assert differences["score"] is None and differences["multiple_choice.mean_prob_correct"] is None


def test_a_value_left_out_has_no_interval_even_when_one_is_stored():
    a = scored([0.5] * 4)
    a["score"] = None
    a["score_interval"] = {"low": 0.4, "high": 0.6}
    a["suites"]["multiple_choice"]["metrics"]["mean_prob_correct"] = float("nan")
    a["suites"]["multiple_choice"]["intervals"] = {"mean_prob_correct": {"low": 0.4, "high": 0.6}}
    row = build_comparison({"a": a})["rows"][0]
    assert row["intervals"]["score"] is None and row["intervals"]["multiple_choice.mean_prob_correct"] is None


def test_the_reference_is_instruct_wherever_it_is_else_the_first():
    assert default_reference(["base", "instruct"]) == "instruct"
    assert default_reference(["base", "sft"]) == "base"
    assert default_reference([]) is None
    assert build_comparison({"a": scored([0.5]), "b": scored([0.6])}, reference="b")["reference"] == "b"
    with pytest.raises(ValueError, match=r"^reference variant 'nope' is not among the results \(a, b\)$"):
        build_comparison({"a": scored([0.5]), "b": scored([0.6])}, reference="nope")


def test_a_plain_prompt_is_not_order_sensitive():
    lettered = build_comparison({"a": result(0.5, multiple_choice=ok(accuracy=0.5, accuracy_circular=0.4))})
    plain = build_comparison({"a": result(0.5, multiple_choice=ok(accuracy=0.5, accuracy_circular=0.4, prompt="plain"))})
    assert "multiple_choice.accuracy_circular" in [c["key"] for c in lettered["columns"]]
    assert "multiple_choice.accuracy_circular" not in [c["key"] for c in plain["columns"]]


def test_without_rotations_there_is_no_every_rotation_column_and_no_such_objective():
    """`circular: false` with letters in a chat prompt: accuracy_circular is plain accuracy, but the
    column kept its "every rotation" label, and the objective optimised plain accuracy silently."""
    unrotated = build_comparison({"a": result(0.5, multiple_choice=ok(accuracy=0.5, accuracy_circular=0.5, rotations=False))})
    assert "multiple_choice.accuracy_circular" not in [c["key"] for c in unrotated["columns"]]
    with pytest.raises(ValueError, match="accuracy_circular needs circular: true"):
        EvalConfig.model_validate({"variants": ["a"], "suites": {"multiple_choice": {"circular": False, "objective_metric": "accuracy_circular"}}})
    EvalConfig.model_validate({"variants": ["a"], "suites": {"multiple_choice": {"circular": False, "objective_metric": "accuracy"}}})


@pytest.mark.parametrize("criterion", ["graded", "overall", "items", "unparseable"])
def test_a_judge_criterion_cannot_take_the_name_of_a_judge_metric(criterion):
    """A criterion `graded` overwrote the count of graded answers with its mean, and the interval's denominator."""
    with pytest.raises(ValueError, match=f"criterion '{criterion}' is the name of one of the judge's own metrics"):
        EvalConfig.model_validate({"variants": ["a"], "suites": {"judge": {"criteria": ["accuracy", criterion]}}})


def test_a_config_object_without_the_setting_gets_the_default_metric():
    assert headline_metric("multiple_choice", object()) == "mean_prob_correct"
    assert headline_metric("lm_eval", object()) == "acc"


def test_best_variant_reports_the_leaders_row_and_what_is_within_noise():
    comparison = {
        "split": "validation",
        "score_definition": "weighted mean of x",
        "rows": [{"variant": "a", "intervals": {"score": {"low": 0.1, "high": 0.3}}}, {"variant": "b", "intervals": {"score": {"low": 0.6, "high": 0.8}}}],
        "score_leader": {"variant": "b", "score": 0.7, "differences": {"a": {"within_noise": True}, "c": None, "d": {"within_noise": False}}},
    }
    assert best_variant(comparison) == {
        "variant": "b", "score": 0.7, "interval": {"low": 0.6, "high": 0.8}, "split": "validation",
        "score_definition": "weighted mean of x", "within_noise": ["a", "c"],
    }  # fmt: skip
    with pytest.raises(ValueError, match=r"^the best variant is chosen on the validation split, this comparison is on 'test'$"):
        best_variant({**comparison, "split": "test"})
    with pytest.raises(ValueError, match=r"^no variant has a score to choose by$"):
        best_variant({**comparison, "score_leader": None})


def test_a_cell_shows_its_interval_in_the_cells_format():
    assert format_cell("multiple_choice.accuracy", 0.5, {"low": 0.25, "high": 0.75}) == "0.500 [0.250, 0.750]"
    assert format_cell("judge.overall", 7.0, {"low": 6.5, "high": 7.5}, {"within_noise": True}) == "7.00 [6.50, 7.50] ≈"


def test_the_score_definition_names_each_weighted_suite_its_metric_and_weight():
    """From a results.json config: keys left out take their defaults (on, weight 1; judge and
    lm_eval off); a disabled suite or weight 0 is left out whatever comes after it."""
    config = {
        "suites": {
            "multiple_choice": {"objective_metric": "accuracy", "weight": 2},
            "short_answer": {"enabled": False, "weight": 5},
            "domain_perplexity": {},
            "general_perplexity": {"weight": 0},
            "judge": {"enabled": True, "weight": 0.5},
        }
    }
    assert score_definition(config) == (
        "weighted mean of multiple_choice accuracy (weight 2), domain_perplexity 2^-bits_per_byte (weight 1), judge (overall - 1) / 9 (weight 0.5)"
    )
    assert score_definition({"suites": {name: {"enabled": False} for name in MC_ONLY}}) == "no weighted suite"
    assert score_definition(eval_config(short_answer={"enabled": False}, domain_perplexity={"weight": 0.5})) == (
        "weighted mean of multiple_choice accuracy (weight 1), domain_perplexity 2^-bits_per_byte (weight 0.5)"
    )  # an EvalConfig: general perplexity's weight defaults to 0


def test_lm_eval_splits_and_the_notes_under_the_table():
    lm_eval = {
        "status": "ok",
        "metrics": {"tasks": {"arc_easy": {"split": "test"}, "hellaswag": {"split": "validation"}, "odd": "n/a", "nosplit": {}}, "arc_easy/acc": 0.5},
    }
    later = {"status": "ok", "metrics": {"tasks": {"arc_easy": {"split": "train"}}, "arc_easy/acc": 0.6}}
    comparison = build_comparison({"a": result(0.5, lm_eval=lm_eval), "b": result(0.6, lm_eval=later, judge={"status": "failed", "reason": "no endpoint"})})
    assert comparison["lm_eval_splits"] == {"arc_easy": "test", "hellaswag": "validation"}  # the first result's split wins
    comparison = {**comparison, "intervals": {"confidence": 0.9, "method": "m"}, "chance": {"multiple_choice": 0.25}, "score_definition": "weighted mean of x"}
    retention = (
        "Retention: lm-evaluation-harness tasks run in process on each variant, each on its own evaluation split (arc_easy on test, hellaswag on validation); "
        "intervals by the same bootstrap over docs (lm-eval's stderr for metrics that are not a mean over docs)."
    )
    assert comparison_notes(comparison) == [
        "Split: `validation`. ↑ higher is better, ↓ lower is better; best in bold.",
        "[low, high]: 90% interval (m).",
        "≈: the difference from `a` lies within noise (its paired-bootstrap 90% interval contains 0).",
        "Multiple-choice chance level: 0.250.",
        retention,
        "Score: weighted mean of x.",
        "b: judge missing — no endpoint",
    ]
    bare = {**comparison, "intervals": None, "lm_eval_splits": {}, "chance": {}, "score_definition": None}
    assert comparison_notes(bare)[1:] == [
        "≈: the difference from `a` lies within noise (its paired-bootstrap 95% interval contains 0).",
        retention.replace(" (arc_easy on test, hellaswag on validation)", ""),
        "b: judge missing — no endpoint",
    ]
    no_lm_eval = {**bare, "columns": [c for c in comparison["columns"] if c["suite"] != "lm_eval"]}
    assert not any(note.startswith("Retention") for note in comparison_notes(no_lm_eval))


@pytest.mark.parametrize("entry", [".", "./", "..", "../", "/models/..", "validation", "best", "comparison.json", "s3://bucket/best.json"])
def test_a_variant_name_that_is_not_a_folder_of_its_own_under_eval_is_refused(entry):
    # "." or ".." would make eval/<name> eval/ itself or the run folder, which a commit replaces;
    # the others are what eval/ holds besides the variants (and `best` is serve's alias).
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="cannot name a folder under eval/"):
        EvalConfig.model_validate({"variants": [entry]})
    assert EvalConfig.model_validate({"variants": [f"mine={entry}"]}).variants == [f"mine={entry}"]
