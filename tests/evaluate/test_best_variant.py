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


# ----------------------------------------------------------------------------- merges between their parents

MERGE_CONFIG = CONFIG.model_copy(update={"variants": ["instruct", "dpo", "merged", "same"]})


def _merge_results() -> dict[str, dict]:
    """instruct knows no answer, dpo 54 of 60, the merge 40 of those 54, `same` none (as instruct).
    The fake picks option A when it does not know, and every 4th item's answer is A: instruct is
    right on 15 items, dpo on 55 (its 54 and item 56), the merge on 45 (its 40 and 40, 44, ..., 56)."""
    items = _items(60)
    data = EvalData(split="validation", multiple_choice=items)
    known = {"instruct": set(), "dpo": {i.answer for i in items[:54]}, "merged": {i.answer for i in items[:40]}, "same": set()}
    return {name: score_model(MERGE_CONFIG, name, data, variant=name, scorer=_Scorer(answers))[0] for name, answers in known.items()}


def test_a_merge_is_placed_between_its_parents_with_an_interval():
    """Issue 12's "the merge keeps >= 80% of dpo's gain over instruct" is this position, and whether
    a miss is outside noise is its interval: (45 - 15) / (55 - 15) = 0.75 of dpo's gain here."""
    results = _merge_results()
    comparison = build_comparison(results, parents={"merged": ["dpo", "instruct"]})
    merged = comparison["merges"]["merged"]
    assert (merged["start"], merged["end"]) == ("instruct", "dpo")  # the reference is the 0 end
    accuracy = merged["positions"]["multiple_choice.accuracy"]
    assert accuracy["position"] == pytest.approx(30 / 40)
    assert 0.5 < accuracy["low"] < 0.75 < accuracy["high"] < 1.0, accuracy
    # Without the reference among its parents, the first-named parent is the 1 end (a merge names its domain model first).
    other = build_comparison(results, reference="same", parents={"merged": ["instruct", "dpo"]})["merges"]["merged"]
    assert (other["start"], other["end"]) == ("dpo", "instruct")
    assert other["positions"]["multiple_choice.accuracy"]["position"] == pytest.approx(10 / 40)


def test_no_position_between_parents_that_do_not_differ_outside_noise():
    results = _merge_results()
    comparison = build_comparison(results, parents={"merged": ["same", "instruct"]})
    assert comparison["merges"]["merged"]["positions"]["multiple_choice.accuracy"] == {"position": None, "parents_within_noise": True}
    assert build_comparison(results)["merges"] == {}  # no parents given: no merges section
    assert build_comparison(results, parents={"merged": ["dpo", "gone"]})["merges"] == {}  # a parent not compared here


def test_the_merges_table_is_printed_under_the_comparison():
    comparison = build_comparison(_merge_results(), parents={"merged": ["dpo", "instruct"], "same": ["dpo", "instruct"]})
    table = comparison_markdown(comparison)
    lines = table.splitlines()
    assert "Where each merge sits between its parents:" in lines
    merged = next(line for line in lines if line.startswith("| merged | instruct → dpo | "))
    assert " 0.75 [" in merged
    assert next(line for line in lines if line.startswith("| same | instruct → dpo | 0.00 ["))  # at instruct
    assert any("share of parent 1's gain over parent 0 that the merge keeps" in line for line in lines)
    assert "Where each merge" not in comparison_markdown(build_comparison(_merge_results()))


def test_merge_parents_come_from_the_merge_models_manifests(tmp_path):
    from alloylm import storage
    from alloylm.evaluate.comparison import merge_parents

    models = {name: tmp_path / name for name in ("instruct", "dpo", "merged", "sft", "outside", "bare")}
    manifests = {
        "merged": {"stage_kind": "merge_search", "parents": [str(models["dpo"]), str(models["instruct"]) + "/"]},
        "sft": {"stage_kind": "sft", "parents": [str(models["dpo"]), str(models["instruct"])]},  # not a merge
        "outside": {"stage_kind": "merge", "parents": [str(models["dpo"]), str(tmp_path / "not-compared")]},
        "dpo": {"stage_kind": "dpo"},
    }
    for name, manifest in manifests.items():
        storage.write_json(str(models[name] / "manifest.json"), manifest)
    results = {name: {"model": str(path)} for name, path in models.items()} | {"hub": {"model": "org/some-model"}}
    assert merge_parents(results) == {"merged": ["dpo", "instruct"]}
    # A run copied elsewhere (local to S3): its manifests name the parents where they were made.
    copy = tmp_path / "copy" / "stages"
    storage.write_json(str(copy / "merged" / "manifest.json"), {"stage_kind": "merge", "parents": ["s3://b/run/stages/dpo", "s3://b/run/stages/instruct"]})
    moved = {name: {"model": str(copy / name)} for name in ("instruct", "dpo", "merged")}
    assert merge_parents(moved) == {"merged": ["dpo", "instruct"]}


def test_the_report_shows_where_each_merge_sits(tmp_path):
    """The report's HTML and Markdown carry the merges table; the parents come from the merge's manifest."""
    from alloylm import storage
    from alloylm.evaluate.report import render_report
    from alloylm.evaluate.runner import write_variant_results

    eval_uri = str(tmp_path / "eval")
    for name, result in _merge_results().items():
        model = tmp_path / "stages" / name
        manifest = {"stage_kind": "merge", "parents": [str(tmp_path / "stages" / "dpo"), str(tmp_path / "stages" / "instruct")]} if name == "merged" else {"stage_kind": "sft"}
        storage.write_json(str(model / "manifest.json"), manifest)
        write_variant_results(eval_uri, {**result, "split": "test", "model": str(model)}, {})
    render_report(eval_uri, str(tmp_path / "report"))
    page = storage.read_text(str(tmp_path / "report" / "report.html"))
    assert "<th>Merge</th><th>Parents (0 → 1)</th>" in page and "<td>instruct → dpo</td><td>0.75 [" in page
    assert "| merged | instruct → dpo | 0.75 [" in storage.read_text(str(tmp_path / "report" / "report.md"))
    comparison = storage.read_json(str(tmp_path / "report" / "comparison.json"))
    assert comparison["merges"]["merged"]["positions"]["multiple_choice.accuracy"]["position"] == pytest.approx(0.75)
