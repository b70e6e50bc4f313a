"""The comparison with intervals and noise marks, and the best variant on validation, from results
that `score_model` makes with fake scorers (no model, no Ray)."""

from __future__ import annotations

import pytest

from alloylm.evaluate.benchmark import BenchmarkItem
from alloylm.evaluate.comparison import best_variant, build_comparison, comparison_markdown
from alloylm.evaluate.config import EvalConfig
from alloylm.evaluate.runner import EvalData, score_model
from alloylm.evaluate.scorer import LogLikelihood


class _Scorer:
    """Chat-form fake: prefers the option shown first, unless it knows the item's answer text."""

    def __init__(self, known: set[str]):
        self.known = known

    def uses_chat(self, prompt):
        return True

    def prompt(self, text, *, chat):
        return text

    def encode_pair(self, context, continuation, *, chat):
        return context, continuation

    def loglikelihood(self, pairs):
        out = []
        for _context, continuation in pairs:
            label, _, text = continuation.partition(". ")
            out.append(LogLikelihood(2.0 if text in self.known else (0.0 if label == "A" else -1.0), 1, False))
        return out


def _items(count: int, split: str = "validation") -> list[BenchmarkItem]:
    items = []
    for k in range(count):
        choices = tuple(f"v{k}-{j}" for j in range(4))
        items.append(
            BenchmarkItem(
                id=f"i{k}", split=split, type="multiple_choice", question=f"q{k}", answer=choices[k % 4],
                choices=choices, answer_index=k % 4, fact_id=f"f{k}",
            )
        )
    return items


CONFIG = EvalConfig.model_validate(
    {
        "variants": ["instruct", "good", "same"],
        "split": "validation",
        "suites": {
            "short_answer": {"enabled": False},
            "domain_perplexity": {"enabled": False},
            "general_perplexity": {"enabled": False},
        },
    }
)


def _results(split: str = "validation") -> dict[str, dict]:
    items = _items(60, split)
    data = EvalData(split=split, multiple_choice=items)
    knows_most = {item.answer for item in items[:54]}
    scorers = {"instruct": _Scorer(set()), "good": _Scorer(knows_most), "same": _Scorer(set())}
    return {name: score_model(CONFIG, name, data, variant=name, scorer=scorer)[0] for name, scorer in scorers.items()}


def test_results_carry_intervals_and_the_score_says_what_it_is():
    results = _results()["good"]
    suite = results["suites"]["multiple_choice"]
    assert suite["metrics"]["accuracy_circular"] == pytest.approx(54 / 60)
    interval = suite["intervals"]["accuracy_circular"]
    assert interval["low"] < 54 / 60 < interval["high"]
    assert results["score"] == pytest.approx(suite["metrics"]["mean_prob_correct"])  # the default objective
    assert "mean_prob_correct" in results["score_definition"]
    assert results["score_interval"]["low"] < results["score"] < results["score_interval"]["high"]


def test_comparison_marks_what_is_within_noise_of_the_reference():
    comparison = build_comparison(_results())
    assert comparison["reference"] == "instruct"
    assert [row["variant"] for row in comparison["rows"]] == ["instruct", "good", "same"]  # the config's order
    rows = {row["variant"]: row for row in comparison["rows"]}
    good = rows["good"]["differences"]["multiple_choice.accuracy_circular"]
    assert good["difference"] == pytest.approx(54 / 60) and not good["within_noise"]
    same = rows["same"]["differences"]["multiple_choice.accuracy"]
    assert same["difference"] == 0.0 and same["within_noise"]
    assert rows["instruct"]["differences"] == {}
    table = comparison_markdown(comparison)
    same_line = next(line for line in table.splitlines() if line.startswith("| same |"))
    good_line = next(line for line in table.splitlines() if line.startswith("| good |"))
    assert "≈" in same_line and "≈" not in good_line and "[" in good_line


def test_best_variant_is_chosen_on_validation_only():
    best = best_variant(build_comparison(_results()))
    assert best["variant"] == "good" and best["split"] == "validation" and best["within_noise"] == []
    assert best["interval"]["low"] < best["score"]
    with pytest.raises(ValueError, match="validation"):
        best_variant(build_comparison(_results("test")))


def test_every_rotation_column_is_shown_only_where_the_order_was_scored():
    lettered = build_comparison(_results())
    assert "multiple_choice.accuracy_circular" in [c["key"] for c in lettered["columns"]]
    cloze = _results()
    for result in cloze.values():  # as run_multiple_choice records a cloze run
        result["suites"]["multiple_choice"]["metrics"]["formulation"] = "cloze"
    comparison = build_comparison(cloze)
    keys = [c["key"] for c in comparison["columns"]]
    assert "multiple_choice.accuracy_circular" not in keys and "multiple_choice.accuracy" in keys
    assert "every rotation" not in comparison_markdown(comparison)
