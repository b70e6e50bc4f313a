"""The `lm_eval` suite: lm-evaluation-harness tasks run in process on each variant's model. Its
answers, scored in Ray tasks as `alloylm eval` runs them, are checked against AlloyLM's own
multiple-choice scoring (the exported task and the `plain` prompt are the same computation), and
its metrics against the comparison and the report.
Models are tiny Llamas built and trained in-process; the task is the one `export_lm_eval_task` writes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from alloylm.corpus import BuiltinCorpusOptions, generate_builtin
from alloylm.data.tokenize import pack_token_ids
from alloylm.evaluate import (
    EvalConfig,
    EvaluationInputError,
    build_comparison,
    comparison_markdown,
    evaluate_variants,
    export_lm_eval_task,
    load_eval_data,
    render_report,
    run_lm_eval,
)
from alloylm.evaluate.benchmark import parse_item
from alloylm.evaluate.intervals import metric_for, point_value, samples_from_details, suite_intervals
from alloylm.evaluate.multiple_choice import run_multiple_choice
from alloylm.evaluate.scorer import CausalLMScorer
from alloylm.models import build_model, load_model, load_tokenizer, save_model, train_tokenizer

pytest.importorskip("lm_eval", reason="lm-eval is not installed (it belongs in the dev extras: pip install lm_eval)")

OPTIONS = BuiltinCorpusOptions(materials=4, heldout_documents=8, general_heldout_documents=12, general_documents=40)
TASK = "alloylm_domain_mc"
OTHER_SUITES_OFF = {name: {"enabled": False} for name in ("multiple_choice", "short_answer", "domain_perplexity", "general_perplexity")}


@pytest.fixture(scope="module")
def items():
    return [parse_item(row) for row in generate_builtin("biomaterials-benchmark", OPTIONS)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny Llama as initialised and after 30 steps on the domain corpus (what the evaluate tests use)."""
    texts = [r["text"] for r in generate_builtin("biomaterials-corpus", OPTIONS)]
    tokenizer = train_tokenizer(texts + [r["text"] for r in generate_builtin("general-text", OPTIONS)], vocab_size=512, model_max_length=512)
    root = tmp_path_factory.mktemp("models")
    save_model(build_model("tiny-llama", tokenizer, seed=0), tokenizer, str(root / "untrained"))
    model = build_model("tiny-llama", tokenizer, seed=0)
    blocks, _ = pack_token_ids(tokenizer(texts, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id, 64)
    data = torch.tensor(blocks, dtype=torch.long)
    generator = torch.Generator().manual_seed(0)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(30):
        batch = data[torch.randint(len(data), (16,), generator=generator)]
        model(input_ids=batch, labels=batch).loss.backward()
        optimiser.step()
        optimiser.zero_grad()
    save_model(model.eval(), tokenizer, str(root / "trained"))
    return {"trained": str(root / "trained"), "untrained": str(root / "untrained")}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, items):
    """The exported domain task, and a task whose data set is on the Hub only (never in this cache)."""
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    export_lm_eval_task(items, str(folder))
    (folder / "hub_only.yaml").write_text(
        textwrap.dedent(
            """\
            task: alloylm_hub_only
            dataset_path: alloylm-tests/not-in-any-cache
            output_type: multiple_choice
            test_split: test
            doc_to_text: "{{question}}"
            doc_to_choice: "{{choices}}"
            doc_to_target: 0
            metric_list: [{metric: acc, aggregation: mean, higher_is_better: true}]
            """
        )
    )
    return str(folder)


def _config(task_dir: str, **lm_eval) -> EvalConfig:
    return EvalConfig.model_validate(
        {
            "variants": ["trained", "untrained"],
            "batch_size": 4,
            "suites": {**OTHER_SUITES_OFF, "lm_eval": {"tasks": [TASK], "include_path": task_dir, "weight": 1.0, **lm_eval}},
        }
    )


@pytest.fixture(scope="module")
def evaluated(ray_cluster, task_dir, models, tmp_path_factory):
    """Both variants evaluated on the exported task in Ray tasks, as `alloylm eval` does; returns the eval folder."""
    out = tmp_path_factory.mktemp("run") / "eval"
    summary = evaluate_variants(_config(task_dir), models, {}, str(out))
    assert summary["failed"] == {}
    return out


def _scored(out) -> dict[str, tuple[dict, list[dict]]]:
    """name -> (results.json, lm_eval.jsonl rows) as the Ray tasks wrote them."""
    return {
        name: (
            json.loads((out / name / "results.json").read_text(encoding="utf-8")),
            [json.loads(line) for line in (out / name / "lm_eval.jsonl").read_text(encoding="utf-8").splitlines()],
        )
        for name in ("trained", "untrained")
    }


# ----------------------------------------------------------------------------- config


def test_lm_eval_section_is_off_unless_given_tasks_and_checks_its_values():
    suites = EvalConfig.model_validate({"variants": ["a"]}).suites
    assert not suites.lm_eval.enabled and "lm_eval" not in suites.enabled()
    suite = EvalConfig.model_validate({"variants": ["a"], "suites": {"lm_eval": {"tasks": ["arc_easy"], "limit": 0.5}}}).suites.lm_eval
    assert suite.enabled and suite.weight == 0.0 and suite.objective_metric == "acc"
    assert (suite.limit_for(9), suite.limit_for(1)) == (5, 1)  # lm-eval's rule: ceil(docs * fraction)
    assert EvalConfig.model_validate({"variants": ["a"], "suites": {"lm_eval": {"tasks": ["t"], "limit": 3}}}).suites.lm_eval.limit_for(2) == 2
    for bad, message in [
        ({"enabled": True}, "needs `tasks`"),
        ({"tasks": ["t"], "limit": 1.5}, "whole number"),
        ({"tasks": ["t", "t"]}, "must not repeat"),
        ({"tasks": ["bad name"]}, "must match"),
        ({"tasks": ["t"], "num_fewshot": -1}, "greater than or equal"),
        ({"tasks": ["t"], "task": "t"}, "extra"),
    ]:
        with pytest.raises(ValueError, match=message):
            EvalConfig.model_validate({"variants": ["a"], "suites": {"lm_eval": bad}})


def test_unknown_tasks_and_a_missing_folder_are_config_problems_with_their_key(task_dir, tmp_path):
    def problems(**lm_eval):
        config = EvalConfig.model_validate({"variants": ["a"], "suites": {**OTHER_SUITES_OFF, "lm_eval": lm_eval}})
        return config.reference_problems({"a"}, {})

    assert problems(tasks=[TASK, "alloylm_hub_only"], include_path=task_dir) == []
    assert problems(tasks=[TASK, "arc_easy"], include_path=task_dir) == []  # an installed task, beside the folder's
    assert problems(tasks=[TASK, "no_such_task"], include_path=task_dir) == [
        f"evaluate.suites.lm_eval.tasks: 'no_such_task' not among lm-eval's installed tasks or those of {task_dir!r}"
    ]
    assert problems(tasks=[TASK], include_path=str(tmp_path / "nowhere")) == [
        f"evaluate.suites.lm_eval.include_path: {str(tmp_path / 'nowhere')!r} is not a folder"
    ]


def test_a_config_without_the_suite_never_imports_lm_eval():
    code = (
        "import sys\n"
        "from alloylm.evaluate import EvalConfig\n"
        "import alloylm.evaluate.runner, alloylm.evaluate.report\n"
        "config = EvalConfig.model_validate({'variants': ['sft']})\n"
        "assert config.reference_problems({'sft'}, {'domain-benchmark': 'benchmark', 'domain-heldout': 'text', 'general-heldout': 'text'}) == []\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'lm_eval'))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_unknown_or_offline_missing_tasks_fail_before_scoring_naming_the_task(task_dir):
    with pytest.raises(EvaluationInputError, match=r"evaluate\.suites\.lm_eval\.tasks: 'no_such_task' not among"):
        load_eval_data(EvalConfig.model_validate({"variants": ["a"], "suites": {**OTHER_SUITES_OFF, "lm_eval": {"tasks": ["no_such_task"], "include_path": task_dir}}}), {})
    with pytest.raises(EvaluationInputError) as info:
        load_eval_data(_config(task_dir, tasks=[TASK, "alloylm_hub_only"]), {})
    message = str(info.value)
    assert message.startswith("evaluate.suites.lm_eval.tasks: task 'alloylm_hub_only': its data is not available offline")
    assert "Traceback" not in message


# ----------------------------------------------------------------------------- intervals


def test_task_intervals_use_only_that_tasks_docs_and_non_mean_metrics_use_lm_evals_stderr():
    rows = [{"task": "a", "doc_id": i, "scores": {"acc": 1.0}} for i in range(6)]
    rows += [{"task": "b", "doc_id": i, "scores": {"acc": 0.0, "exact_match": float(i % 2)}} for i in range(4)]
    samples = samples_from_details("lm_eval", rows)
    metrics = {"a/acc": 1.0, "b/acc": 0.0, "b/exact_match": 0.5, "acc": 0.6, "b/perplexity": 12.0, "items": 10, "stderr": {"b/perplexity": 0.5}}
    intervals = suite_intervals("lm_eval", samples, metrics, seed=0)
    assert intervals["a/acc"] == {"low": 1.0, "high": 1.0} and intervals["b/acc"] == {"low": 0.0, "high": 0.0}
    assert point_value(samples, metric_for("lm_eval", "acc")) == pytest.approx(0.6) and 0.0 < intervals["acc"]["low"] < 0.6 < intervals["acc"]["high"] < 1.0
    assert point_value(samples, metric_for("lm_eval", "exact_match")) == pytest.approx(0.5)  # over task b's docs only
    assert intervals["b/perplexity"] == pytest.approx({"low": 12.0 - 1.96 * 0.5, "high": 12.0 + 1.96 * 0.5}, abs=1e-3)
    assert "items" not in intervals


# ----------------------------------------------------------------------------- agreement


def test_suite_answers_every_item_as_the_plain_multiple_choice_suite(evaluated, models, items):
    results, details = _scored(evaluated)["trained"]
    entry = results["suites"]["lm_eval"]
    assert entry["status"] == "ok", entry.get("reason")
    metrics = entry["metrics"]
    test_items = [i for i in items if i.split == "test" and i.type == "multiple_choice"]
    assert metrics["tasks"][TASK] == {"split": "test", "items": len(test_items), "num_fewshot": 0, "output_type": "multiple_choice"}

    scorer = CausalLMScorer(load_model(models["trained"]), load_tokenizer(models["trained"]), batch_size=4)
    ours, our_details = run_multiple_choice(scorer, test_items, prompt="plain", circular=False)
    harness = {row["id"]: row for row in details}
    assert sorted(harness) == sorted(d["id"] for d in our_details)
    for detail in our_details:
        row = harness[detail["id"]]
        assert row["predicted"] == detail["predicted"], detail["id"]
        assert row["scores"]["acc"] == float(detail["correct"]) and row["scores"]["acc_norm"] == float(detail["correct_norm"])
        assert row["loglikelihoods"] == pytest.approx(detail["loglikelihoods"], abs=1e-3)
    assert metrics[f"{TASK}/acc"] == pytest.approx(ours["accuracy"]) and metrics[f"{TASK}/acc_norm"] == pytest.approx(ours["accuracy_norm"])
    # The model is not at chance, or the agreement above would say little.
    assert len({row["predicted"] for row in details}) > 1

    # Intervals: the suite's bootstrap over docs, around the reported value; the weighted headline is the score.
    samples = samples_from_details("lm_eval", details)
    assert point_value(samples, metric_for("lm_eval", f"{TASK}/acc")) == pytest.approx(metrics[f"{TASK}/acc"])
    low, high = entry["intervals"][f"{TASK}/acc"]["low"], entry["intervals"][f"{TASK}/acc"]["high"]
    assert 0.0 <= low <= metrics[f"{TASK}/acc"] <= high <= 1.0 and low < high
    assert results["score"] == pytest.approx(metrics["acc"]) == pytest.approx(metrics[f"{TASK}/acc"])
    assert results["score_interval"]["low"] == pytest.approx(low) and results["score_interval"]["high"] == pytest.approx(high)


def test_limit_and_max_items_choose_the_first_docs(task_dir, items):
    data = load_eval_data(_config(task_dir, limit=0.5, max_items=3), {})
    assert [(d.task, d.index) for d in data.lm_eval] == [(TASK, 0), (TASK, 1), (TASK, 2)]
    assert data.sizes()["lm_eval"] == 3 and len(data.rung(0.4, seed=0).lm_eval) == 2
    assert data.fingerprints[data.sources["lm_eval"]] == load_eval_data(_config(task_dir, limit=0.5, max_items=3), {}).fingerprints[data.sources["lm_eval"]]
    assert data.fingerprints[data.sources["lm_eval"]] != load_eval_data(_config(task_dir, limit=2), {}).fingerprints[data.sources["lm_eval"]]


def test_a_validation_evaluation_never_scores_test_docs(task_dir, items, models, tmp_path):
    """lm-eval scores a task on its test split whenever it has one; the validation evaluation
    (which chooses the best variant and steers the merge search) takes the validation docs. A
    weighted task with a test split alone is refused there, naming it."""
    validation_ids = [i.id for i in items if i.split == "validation" and i.type == "multiple_choice"]
    test_ids = [i.id for i in items if i.split == "test" and i.type == "multiple_choice"]
    on_test = load_eval_data(_config(task_dir), {}, split="test")
    on_validation = load_eval_data(_config(task_dir), {}, split="validation")
    assert len(on_test.lm_eval) == len(test_ids) and len(on_validation.lm_eval) == len(validation_ids) != len(test_ids)
    source = on_test.sources["lm_eval"]
    assert on_test.fingerprints[source] != on_validation.fingerprints[source]
    scorer = CausalLMScorer(load_model(models["trained"]), load_tokenizer(models["trained"]), batch_size=4)
    metrics, details = run_lm_eval(scorer, on_validation.lm_eval, _config(task_dir).suites.lm_eval, split="validation")
    assert metrics["tasks"][TASK]["split"] == "validation" and metrics["tasks"][TASK]["items"] == len(validation_ids)
    assert sorted(row["id"] for row in details) == sorted(validation_ids)

    only_test = tmp_path / "only_test"
    export_lm_eval_task(items, str(only_test), task_name="alloylm_only_test", splits=("test",))
    weighted = EvalConfig.model_validate(
        {"variants": ["trained"], "suites": {**OTHER_SUITES_OFF, "lm_eval": {"tasks": ["alloylm_only_test"], "include_path": str(only_test), "weight": 0.5}}}
    )
    with pytest.raises(EvaluationInputError, match=r"alloylm_only_test have a test split and no validation split: with evaluate.suites.lm_eval.weight 0.5"):
        load_eval_data(weighted, {}, split="validation")
    unweighted = EvalConfig.model_validate(
        {"variants": ["trained"], "suites": {**OTHER_SUITES_OFF, "lm_eval": {"tasks": ["alloylm_only_test"], "include_path": str(only_test)}}}
    )
    assert len(load_eval_data(unweighted, {}, split="validation").lm_eval) == len(test_ids)  # a retention column only


# ----------------------------------------------------------------------------- comparison and report


def test_retention_columns_in_the_comparison_and_the_report(evaluated, tmp_path):
    results = {name: r for name, (r, _) in _scored(evaluated).items()}
    comparison = json.loads((evaluated / "comparison.json").read_text(encoding="utf-8"))
    assert comparison == json.loads(json.dumps(build_comparison(results)))
    columns = {c["key"]: c for c in comparison["columns"]}
    assert columns[f"lm_eval.{TASK}/acc"]["label"] == f"Retention: {TASK} acc" and columns[f"lm_eval.{TASK}/acc"]["higher_is_better"]
    assert f"lm_eval.{TASK}/acc_norm" in columns
    assert "lm_eval.acc" not in columns  # one task: its pooled value would repeat its column
    rows = {row["variant"]: row for row in comparison["rows"]}
    for name, result in results.items():
        metrics = result["suites"]["lm_eval"]["metrics"]
        assert rows[name]["values"][f"lm_eval.{TASK}/acc"] == metrics[f"{TASK}/acc"]
        assert rows[name]["intervals"][f"lm_eval.{TASK}/acc"] == result["suites"]["lm_eval"]["intervals"][f"{TASK}/acc"]
    # Paired with the reference (the first variant) on the same docs, as every other suite's column.
    difference = rows["untrained"]["differences"][f"lm_eval.{TASK}/acc"]
    assert difference["difference"] == pytest.approx(rows["untrained"]["values"][f"lm_eval.{TASK}/acc"] - rows["trained"]["values"][f"lm_eval.{TASK}/acc"])
    assert difference["low"] <= difference["difference"] <= difference["high"]

    table = (evaluated / "comparison.md").read_text(encoding="utf-8")
    assert table == comparison_markdown(comparison)
    assert f"Retention: {TASK} acc ↑" in table and f"{TASK} on test" in table

    render_report(str(evaluated), str(tmp_path / "report"))
    page = (tmp_path / "report" / "report.html").read_text(encoding="utf-8")
    assert f"Retention: {TASK} acc" in page and "General retention (lm-evaluation-harness tasks)" in page
    assert f"Retention: {TASK} acc" in (tmp_path / "report" / "report.md").read_text(encoding="utf-8")
