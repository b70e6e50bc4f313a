"""The built-in benchmark at the quickstart's sizes: enough items to resolve differences, answer
positions balanced, and every benchmark fact stated in CPT text only."""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import yaml

from alloylm.corpus import BuiltinCorpusOptions, generate_builtin

REPO = Path(__file__).resolve().parents[2]


def _quickstart_options() -> BuiltinCorpusOptions:
    config = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text(encoding="utf-8"))
    return BuiltinCorpusOptions(**{**(config.get("builtin") or {}), "seed": config.get("seed", 0)})


@pytest.fixture(scope="module")
def benchmark():
    return generate_builtin("biomaterials-benchmark", _quickstart_options())


@pytest.mark.parametrize("split", ["validation", "test"])
def test_quickstart_has_at_least_100_multiple_choice_items_per_split(benchmark, split):
    items = [row for row in benchmark if row["type"] == "multiple_choice" and row["split"] == split]
    assert len(items) >= 100


@pytest.mark.parametrize("split", ["validation", "test"])
def test_answer_positions_are_balanced_within_one(benchmark, split):
    options = _quickstart_options()
    positions = Counter(row["answer_index"] for row in benchmark if row["type"] == "multiple_choice" and row["split"] == split)
    assert set(positions) == set(range(options.choices))
    assert max(positions.values()) - min(positions.values()) <= 1, positions


def test_items_of_one_fact_put_the_answer_in_different_places(benchmark):
    by_fact = defaultdict(list)
    for row in benchmark:
        if row["type"] == "multiple_choice":
            by_fact[row["fact_id"]].append(row)
    per_fact = _quickstart_options().multiple_choice_per_fact
    assert {len(rows) for rows in by_fact.values()} == {per_fact}
    for rows in by_fact.values():
        assert len({row["answer_index"] for row in rows}) == len(rows)
        assert len({tuple(row["choices"]) for row in rows}) == len(rows)  # distractors differ too
        assert len({row["split"] for row in rows}) == 1


@pytest.mark.parametrize("sizes", [dict(materials=7, multiple_choice_per_fact=5, choices=3), dict(materials=13, choices=4)])
def test_balance_holds_for_other_sizes(sizes):
    rows = generate_builtin("biomaterials-benchmark", BuiltinCorpusOptions(**sizes))
    for split in ("validation", "test"):
        positions = Counter(r["answer_index"] for r in rows if r["type"] == "multiple_choice" and r["split"] == split)
        assert max(positions.values()) - min(positions.values()) <= 1, (split, positions)


def test_the_same_options_give_the_same_items():
    options = _quickstart_options()
    assert generate_builtin("biomaterials-benchmark", options) == generate_builtin("biomaterials-benchmark", options)


def _mentions(value: str, text: str) -> bool:
    return re.search(r"(?<![\w.])" + re.escape(value) + r"(?!\w)", text) is not None


def test_benchmark_answers_are_in_the_cpt_text_and_nowhere_in_sft_or_preferences(benchmark):
    options = _quickstart_options()
    cpt = defaultdict(str)
    for row in generate_builtin("biomaterials-corpus", options):
        cpt[row["material"]] += row["text"] + "\n"
    training = "\n".join(
        [m["content"] for row in generate_builtin("biomaterials-qa", options) for m in row["messages"]]
        + [m["content"] for row in generate_builtin("biomaterials-preferences", options) for k in ("prompt", "chosen", "rejected") for m in row[k]]
    )
    answers = {(row["material"], row["answer"]) for row in benchmark}
    assert len(answers) == len({row["fact_id"] for row in benchmark})
    for material, answer in answers:
        assert _mentions(answer, cpt[material]), answer
        assert not _mentions(answer, training), answer
