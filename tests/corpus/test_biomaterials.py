"""The built-in corpus: determinism, row shapes, and the train/benchmark separation of facts."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections import Counter, defaultdict

import pytest
from pydantic import ValidationError

from alloylm.corpus import (
    BUILTIN_FORMATS,
    BUILTIN_SOURCES,
    CHOICE_LABELS,
    PROPERTIES,
    BuiltinCorpusOptions,
    build_knowledge_base,
    builtin_source,
    generate_builtin,
    render_multiple_choice,
)

SMALL = BuiltinCorpusOptions(materials=24, general_documents=60, general_chats=80, general_heldout_documents=20)


def _digest(options: BuiltinCorpusOptions) -> str:
    """SHA-256 over every source's rows, serialised canonically."""
    h = hashlib.sha256()
    for name in sorted(BUILTIN_SOURCES):
        h.update(json.dumps(generate_builtin(name, options), sort_keys=True).encode())
    return h.hexdigest()


def _mentions(value: str, text: str) -> bool:
    """`value` occurs in `text` as a whole value: "12.3 MPa" is not found inside "412.3 MPa"."""
    return re.search(r"(?<![\w.])" + re.escape(value) + r"(?!\w)", text) is not None


def _chat_text(row: dict) -> str:
    return "\n".join(message["content"] for message in row["messages"])


def _preference_text(row: dict) -> str:
    return "\n".join(m["content"] for key in ("prompt", "chosen", "rejected") for m in row[key])


@pytest.fixture(scope="module")
def small():
    return {name: generate_builtin(name, SMALL) for name in BUILTIN_SOURCES}


# ---------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------


def test_same_options_give_identical_rows():
    first = {name: json.dumps(generate_builtin(name, SMALL)) for name in BUILTIN_SOURCES}
    second = {name: json.dumps(generate_builtin(name, BuiltinCorpusOptions(**SMALL.model_dump()))) for name in BUILTIN_SOURCES}
    assert first == second


def test_rows_do_not_depend_on_the_process_or_its_hash_seed():
    # Another process builds the fact table from scratch (no cache) under other string hashing.
    code = (
        "from alloylm.corpus import BuiltinCorpusOptions, BUILTIN_SOURCES, generate_builtin\n"
        "import hashlib, json\n"
        f"options = BuiltinCorpusOptions.model_validate_json({SMALL.model_dump_json()!r})\n"
        "h = hashlib.sha256()\n"
        "for name in sorted(BUILTIN_SOURCES):\n"
        "    h.update(json.dumps(generate_builtin(name, options), sort_keys=True).encode())\n"
        "print(h.hexdigest())\n"
    )
    digests = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        digests.add(out.stdout.strip())
    assert digests == {_digest(SMALL)}


def test_another_seed_gives_other_rows(small):
    other = SMALL.model_copy(update={"seed": 1})
    for name in BUILTIN_SOURCES:
        assert json.dumps(generate_builtin(name, other)) != json.dumps(small[name]), name


# ---------------------------------------------------------------------------------------------
# Registry, options and row shapes
# ---------------------------------------------------------------------------------------------


def test_registry_names_and_formats():
    assert set(BUILTIN_SOURCES) == set(BUILTIN_FORMATS) == {
        "biomaterials-corpus",
        "biomaterials-qa",
        "biomaterials-preferences",
        "biomaterials-benchmark",
        "biomaterials-heldout-text",
        "general-text",
        "general-heldout-text",
        "general-chat",
    }
    assert set(BUILTIN_FORMATS.values()) == {"text", "chat", "preference", "benchmark"}
    assert builtin_source("general-chat") is BUILTIN_SOURCES["general-chat"]


def test_unknown_builtin_name_lists_the_known_ones():
    with pytest.raises(ValueError) as error:
        builtin_source("biomaterials-typo")
    for name in BUILTIN_SOURCES:
        assert name in str(error.value)
    with pytest.raises(ValueError, match="general-text"):
        generate_builtin("nope", SMALL)


@pytest.mark.parametrize(
    "bad",
    [
        {"benchmark_fraction": 1.5},
        {"benchmark_fraction": 0.0},
        {"validation_fraction": 1.0},
        {"materials": 1},
        {"choices": 1},
        {"qa_per_fact": 0},
        {"unknown_knob": 3},
    ],
)
def test_bad_options_are_rejected(bad):
    with pytest.raises(ValidationError):
        BuiltinCorpusOptions(**bad)


def test_options_are_frozen_and_documented():
    with pytest.raises(ValidationError):
        SMALL.materials = 3
    for name, field in BuiltinCorpusOptions.model_fields.items():
        assert field.description, name


_REQUIRED_KEYS = {
    "text": {"id", "text"},
    "chat": {"id", "messages"},
    "preference": {"id", "prompt", "chosen", "rejected"},
    "benchmark": {
        "id", "split", "type", "question", "choices", "answer_index", "answer", "answer_value", "unit",
        "material", "property", "fact_id",
    },
}


@pytest.mark.parametrize("name", sorted(BUILTIN_SOURCES))
def test_rows_have_unique_ids_and_their_format_shape(small, name):
    rows = small[name]
    assert rows
    ids = [row["id"] for row in rows]
    assert all(isinstance(i, str) for i in ids)
    assert len(set(ids)) == len(ids)
    fmt = BUILTIN_FORMATS[name]
    for row in rows:
        assert _REQUIRED_KEYS[fmt] <= set(row), row
        json.dumps(row)
        if fmt == "text":
            assert row["text"].strip()
        if fmt == "chat":
            roles = [m["role"] for m in row["messages"]]
            assert roles in (["user", "assistant"], ["system", "user", "assistant"]), roles
            assert all(m["content"].strip() for m in row["messages"])
        if fmt == "preference":
            assert [m["role"] for m in row["prompt"]] == ["user"]
            assert [m["role"] for m in row["chosen"]] == [m["role"] for m in row["rejected"]] == ["assistant"]


def test_sizes_follow_the_knobs():
    options = BuiltinCorpusOptions(
        materials=30, documents_per_material=2, qa_per_fact=3, preferences_per_fact=2, benchmark_fraction=0.2,
        heldout_documents=7, general_documents=11, general_heldout_documents=5, general_chats=13, choices=5,
        multiple_choice_per_fact=2,
    )
    counts = {name: len(generate_builtin(name, options)) for name in BUILTIN_SOURCES}
    benchmark_facts = len(PROPERTIES) * round(0.2 * 30)
    training_facts = len(PROPERTIES) * 30 - benchmark_facts
    assert counts == {
        "biomaterials-corpus": 30 * 2,
        "biomaterials-qa": training_facts * 3,
        "biomaterials-preferences": training_facts * 2,
        "biomaterials-benchmark": (2 + 1) * benchmark_facts,  # 2 multiple-choice items and 1 short-answer item per fact
        "biomaterials-heldout-text": 7,
        "general-text": 11,
        "general-heldout-text": 5,
        "general-chat": 13,
    }
    assert {len(row["choices"]) for row in generate_builtin("biomaterials-benchmark", options) if row["choices"]} == {5}


# ---------------------------------------------------------------------------------------------
# Facts: stated in CPT, split between training and benchmark, never leaked
# ---------------------------------------------------------------------------------------------


def test_every_fact_is_stated_in_the_cpt_text_of_its_material(small):
    kb = build_knowledge_base(SMALL)
    text_by_material = defaultdict(list)
    for row in small["biomaterials-corpus"]:
        text_by_material[row["material"]].append(row["text"])
    assert set(text_by_material) == {m.name for m in kb.materials}
    for material in kb.materials:
        assert len(text_by_material[material.name]) == SMALL.documents_per_material
        for document in text_by_material[material.name]:  # every document, not just one of them
            for fact in material.facts.values():
                assert _mentions(fact.text, document), (fact.id, fact.text)


def test_benchmark_values_are_in_the_cpt_text_and_in_no_training_item(small):
    benchmark = small["biomaterials-benchmark"]
    cpt = defaultdict(str)
    for row in small["biomaterials-corpus"]:
        cpt[row["material"]] += row["text"] + "\n"
    training_text = "\n".join(
        [_chat_text(row) for row in small["biomaterials-qa"]]
        + [_preference_text(row) for row in small["biomaterials-preferences"]]
    )
    answers = {row["fact_id"]: (row["material"], row["answer"]) for row in benchmark}
    assert answers
    for fact_id, (material, answer) in answers.items():
        assert _mentions(answer, cpt[material]), fact_id
        assert not _mentions(answer, training_text), (fact_id, answer)


def test_training_items_cover_exactly_the_training_facts(small):
    kb = build_knowledge_base(SMALL)
    training = {fact.id for fact in kb.training_facts()}
    benchmark = {row["fact_id"] for row in small["biomaterials-benchmark"]}
    assert benchmark == {fact.id for fact in kb.benchmark_facts()}
    assert not training & benchmark
    assert training | benchmark == {fact.id for fact in kb.facts()}
    assert {row["fact_id"] for row in small["biomaterials-qa"]} == training
    assert {row["fact_id"] for row in small["biomaterials-preferences"]} == training
    # every property is both taught and tested
    assert {fact.property for fact in kb.benchmark_facts()} == set(PROPERTIES)
    assert {fact.property for fact in kb.training_facts()} == set(PROPERTIES)


def test_benchmark_fraction_sets_how_many_facts_are_held_out():
    options = BuiltinCorpusOptions(materials=40, benchmark_fraction=0.5)
    kb = build_knowledge_base(options)
    per_property = Counter(fact.property for fact in kb.benchmark_facts())
    assert per_property == {prop: 20 for prop in PROPERTIES}


def test_validation_and_test_are_disjoint_and_both_non_empty(small):
    split_of_fact = defaultdict(set)
    for row in small["biomaterials-benchmark"]:
        split_of_fact[row["fact_id"]].add(row["split"])
    assert all(len(splits) == 1 for splits in split_of_fact.values())  # both items of a fact together
    validation = {f for f, s in split_of_fact.items() if s == {"validation"}}
    test = {f for f, s in split_of_fact.items() if s == {"test"}}
    assert validation and test and not validation & test
    assert validation | test == set(split_of_fact)
    assert abs(len(validation) - len(test)) <= 1  # validation_fraction 0.5


def test_holdout_material_holds_out_whole_materials_that_no_training_item_names():
    """`holdout: material` (Physics of Language Models 3.1's split): the benchmark asks about
    materials SFT and preference data never name, with every fact of each; validation and test hold
    different materials; every property is still taught, on the other materials."""
    options = BuiltinCorpusOptions(materials=24, benchmark_fraction=0.5, holdout="material", general_documents=20, general_chats=20)
    kb = build_knowledge_base(options)
    split_of_material = {m.name: {f.split for f in m.facts.values()} for m in kb.materials}
    assert all(len(splits) == 1 for splits in split_of_material.values())  # all of a material's facts together
    held_out = {name for name, splits in split_of_material.items() if splits != {"train"}}
    validation = {name for name, splits in split_of_material.items() if splits == {"validation"}}
    assert len(held_out) == 12 and len(validation) == 6  # benchmark_fraction and validation_fraction of the materials
    assert {f.property for f in kb.training_facts()} == set(PROPERTIES)
    training_text = "\n".join(
        [_chat_text(row) for row in generate_builtin("biomaterials-qa", options)]
        + [_preference_text(row) for row in generate_builtin("biomaterials-preferences", options)]
    )
    for name in held_out:
        assert name not in training_text, name
    benchmark = generate_builtin("biomaterials-benchmark", options)
    assert {row["material"] for row in benchmark} == held_out
    assert {row["material"] for row in benchmark if row["split"] == "validation"} == validation
    # the CPT text states every material's facts, held out or not
    assert {row["material"] for row in generate_builtin("biomaterials-corpus", options)} == set(split_of_material)


def test_both_benchmark_splits_are_pinned():
    """Golden values, written out from the code that made every stored world and result so far: a
    change to either split (a refactor of `_benchmark_split`, another random stream) changes every
    run's data and benchmark, and must be made on purpose."""

    def split(holdout: str) -> dict[str, set[str]]:
        kb = build_knowledge_base(BuiltinCorpusOptions(materials=6, benchmark_fraction=0.5, holdout=holdout))
        out: dict[str, set[str]] = defaultdict(set)
        for fact in kb.benchmark_facts():
            out[fact.split].add(fact.id)
        return dict(out)

    assert split("fact") == {
        "validation": {
            "mat-00000/tensile_strength", "mat-00001/source_organism", "mat-00001/toughness", "mat-00002/tensile_strength",
            "mat-00002/toughness", "mat-00003/density", "mat-00003/youngs_modulus", "mat-00004/processing",
            "mat-00004/structure", "mat-00005/tensile_strength",
        },
        "test": {
            "mat-00000/structure", "mat-00001/density", "mat-00002/processing", "mat-00002/source_organism",
            "mat-00002/structure", "mat-00004/density", "mat-00004/youngs_modulus", "mat-00005/processing",
            "mat-00005/source_organism", "mat-00005/toughness", "mat-00005/youngs_modulus",
        },
    }
    assert split("material") == {
        "validation": {f"mat-{m}/{prop}" for m in ("00002", "00005") for prop in PROPERTIES},
        "test": {f"mat-00000/{prop}" for prop in PROPERTIES},
    }


def test_holdout_material_needs_a_material_for_validation_and_one_for_test():
    with pytest.raises(ValidationError, match="holdout: material needs at least 2 held-out materials"):
        BuiltinCorpusOptions(materials=3, benchmark_fraction=0.25, holdout="material")
    BuiltinCorpusOptions(materials=3, benchmark_fraction=0.5, holdout="fact")


def test_multiple_choice_items_hold_the_answer_once_among_distinct_choices(small):
    items = [row for row in small["biomaterials-benchmark"] if row["type"] == "multiple_choice"]
    assert items
    positions = Counter()
    for item in items:
        choices = item["choices"]
        assert len(choices) == SMALL.choices
        assert len(set(choices)) == len(choices)
        assert choices.count(item["answer"]) == 1
        assert choices[item["answer_index"]] == item["answer"]
        positions[item["answer_index"]] += 1
        if item["unit"] is not None:
            assert all(choice.rsplit(" ", 1)[1] == item["unit"] for choice in choices)
    assert len(positions) == SMALL.choices  # the answer is not always in the same place


def test_distractors_are_exposed_in_training_exactly_as_much_as_the_answer(small):
    """Familiarity cannot pick the answer: every option is another benchmark fact's value of the same
    property, written in the same number of CPT documents (those of its own material) and in no SFT
    chat or preference pair. Only knowing which material has which value tells them apart."""
    kb = build_knowledge_base(SMALL)
    benchmark_values = {(f.property, f.text) for f in kb.benchmark_facts()}
    cpt = [row["text"] for row in small["biomaterials-corpus"]]
    training_text = "\n".join(
        [_chat_text(row) for row in small["biomaterials-qa"]]
        + [_preference_text(row) for row in small["biomaterials-preferences"]]
    )
    exposure = {}
    for item in (row for row in small["biomaterials-benchmark"] if row["type"] == "multiple_choice"):
        for choice in item["choices"]:
            assert (item["property"], choice) in benchmark_values, (item["id"], choice)
            if choice not in exposure:
                exposure[choice] = (sum(_mentions(choice, text) for text in cpt), _mentions(choice, training_text))
    assert set(exposure.values()) == {(SMALL.documents_per_material, False)}


def test_training_distractors_and_rejected_values_are_other_training_facts(small):
    """SFT's multiple-choice chats and DPO's rejected answers teach binding too: their wrong values are
    other training materials' values of the property, never a number that occurs nowhere."""
    kb = build_knowledge_base(SMALL)
    training_values = {(f.property, f.text) for f in kb.training_facts()}
    facts = {f.id: f for f in kb.facts()}
    checked = 0
    for row in small["biomaterials-qa"]:
        user = row["messages"][-2]["content"]
        if "\nA. " in user:
            options = [line[3:] for line in user.split("\n") if line[:1] in CHOICE_LABELS and line[1:3] == ". "]
            assert all((row["property"], option) in training_values for option in options), row["id"]
            checked += 1
    for row in small["biomaterials-preferences"]:
        fact, rejected = facts[row["fact_id"]], row["rejected"][0]["content"]
        stated = [text for prop, text in training_values if prop == fact.property and _mentions(text, rejected)]
        assert len(stated) <= 1 and fact.text not in stated
        checked += bool(stated)
    assert checked > len(small["biomaterials-preferences"]) // 2


def test_too_few_benchmark_facts_fall_back_to_values_of_no_material():
    options = BuiltinCorpusOptions(materials=6, benchmark_fraction=0.2, choices=4)  # 1 benchmark fact per property
    kb = build_knowledge_base(options)
    every_value = {f.text for f in kb.facts()}
    for item in (row for row in generate_builtin("biomaterials-benchmark", options) if row["type"] == "multiple_choice"):
        distractors = [c for i, c in enumerate(item["choices"]) if i != item["answer_index"]]
        assert len(set(distractors)) == 3 and not every_value & set(distractors), item["id"]


def test_short_answer_items_carry_value_and_unit(small):
    items = [row for row in small["biomaterials-benchmark"] if row["type"] == "short_answer"]
    assert items
    for item in items:
        assert item["choices"] == [] and item["answer_index"] == -1
        if item["property"] in ("tensile_strength", "toughness", "youngs_modulus", "density"):
            assert item["answer"] == f"{item['answer'].split(' ')[0]} {item['unit']}"
            assert item["answer_value"] == float(item["answer"].split(" ")[0])
        else:
            assert item["answer_value"] is None and item["unit"] is None


def test_sft_chats_answer_with_the_true_value(small):
    facts = {fact.id: fact for fact in build_knowledge_base(SMALL).facts()}
    multiple_choice = 0
    for row in small["biomaterials-qa"]:
        fact = facts[row["fact_id"]]
        user, assistant = row["messages"][-2]["content"], row["messages"][-1]["content"]
        assert fact.material in user
        assert _mentions(fact.text, assistant)
        if "\nA. " in user:  # posed as multiple choice, in the format `render_multiple_choice` writes
            multiple_choice += 1
            letter = assistant[0]
            assert f"\n{letter}. {fact.text}\n" in user
    assert 0 < multiple_choice < len(small["biomaterials-qa"])


def test_preference_pairs_prefer_the_true_value(small):
    facts = {fact.id: fact for fact in build_knowledge_base(SMALL).facts()}
    for row in small["biomaterials-preferences"]:
        fact = facts[row["fact_id"]]
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert chosen != rejected
        assert _mentions(fact.text, chosen)
        assert not _mentions(fact.text, rejected)
        assert fact.material in row["prompt"][0]["content"]


def test_heldout_documents_use_no_cpt_sentence():
    # Every sentence reduced to its template, with the material's own values masked out.
    kb = build_knowledge_base(SMALL)
    materials = {m.name: m for m in kb.materials}

    def templates(rows):
        found = set()
        for row in rows:
            material, text = materials[row["material"]], row["text"]
            for fact in sorted(material.facts.values(), key=lambda f: -len(f.text)):
                text = text.replace(fact.text, f"<{fact.property}>")
            text = text.replace(material.name, "<name>").replace(material.organism_group, "<group>")
            found |= {s for s in re.split(r"(?<=[.!?])\s+|\n+", text) if s.strip()}
        return found

    cpt = templates(generate_builtin("biomaterials-corpus", SMALL))
    heldout = templates(generate_builtin("biomaterials-heldout-text", SMALL))
    assert len(heldout) > 10 and len(cpt) > 50
    assert not cpt & heldout, sorted(cpt & heldout)[:5]


def test_general_heldout_documents_differ_from_general_text(small):
    train = {row["text"] for row in small["general-text"]}
    heldout = [row["text"] for row in small["general-heldout-text"]]
    assert len(set(heldout)) == len(heldout)
    assert not train & set(heldout)


def test_general_chats_answer_correctly(small):
    rows = small["general-chat"]
    assert {row["task"] for row in rows} >= {"arithmetic", "capital", "unit_conversion", "definition"}
    capitals = dict(re.findall(r"The capital of (\w+) is (\w+)\.", " ".join(r["text"] for r in small["general-text"])))
    checked = 0
    for row in rows:
        answer = row["messages"][-1]["content"]
        if row["task"] == "arithmetic":
            a, op, b, c = re.fullmatch(r"(\d+) ([-+x]) (\d+) = (-?\d+)\.", answer).groups()
            a, b, c = int(a), int(b), int(c)
            assert c == {"+": a + b, "-": a - b, "x": a * b}[op], answer
            checked += 1
        elif row["task"] == "capital":
            match = re.fullmatch(r"The capital of (\w+) is (\w+)\.", answer)
            country, city = match.groups() if match else reversed(re.fullmatch(r"(\w+) is the capital of (\w+)\.", answer).groups())
            if country in capitals:  # the general text states the same capital
                assert capitals[country] == city
                checked += 1
    assert checked > 10


# ---------------------------------------------------------------------------------------------
# Scale
# ---------------------------------------------------------------------------------------------


def test_names_and_values_stay_unique_at_twenty_thousand_materials():
    kb = build_knowledge_base(BuiltinCorpusOptions(materials=20_000))
    assert len(kb.materials) == 20_000
    assert len({m.name for m in kb.materials}) == 20_000
    for prop in PROPERTIES:
        values = [m.facts[prop].text for m in kb.materials]
        assert len(set(values)) == 20_000, prop


def test_render_multiple_choice_letters_each_option():
    prompt = render_multiple_choice("Which?", ["1 MPa", "2 MPa", "3 MPa"])
    assert prompt.splitlines()[:4] == ["Which?", "A. 1 MPa", "B. 2 MPa", "C. 3 MPa"]
    with pytest.raises(ValueError):
        render_multiple_choice("Which?", ["only one"])
    with pytest.raises(ValueError):
        render_multiple_choice("Which?", [str(i) for i in range(len(CHOICE_LABELS) + 1)])


def test_answer_prefixes_are_how_sft_answers_begin(small):
    """A multiple-choice item's `answer_prefix` (the cloze formulation's start of the answer) is the
    start of an answer SFT teaches for that property, so `prefix + " " + value` is a trained form."""
    kb = build_knowledge_base(SMALL)
    materials = {m.name: m for m in kb.materials}
    answers = [row["messages"][-1]["content"] for row in small["biomaterials-qa"]]
    by_property = {}
    for item in (row for row in small["biomaterials-benchmark"] if row["type"] == "multiple_choice"):
        prefix = item["answer_prefix"]
        assert item["material"] in prefix and not prefix.endswith(" ")
        by_property.setdefault(item["property"], prefix.replace(item["material"], "{name}"))
    assert set(by_property) == set(PROPERTIES)
    for prop, pattern in by_property.items():
        trained = [
            f"{pattern.format(name=fact.material)} {fact.text}."
            for fact in kb.training_facts() if fact.property == prop
        ]
        if prop == "source_organism":  # the prefix names the organism's group, which differs by material
            trained = [
                f"{fact.material} is produced by the {materials[fact.material].organism_group} {fact.text}."
                for fact in kb.training_facts() if fact.property == prop
            ]
        assert any(sentence in answer for sentence in trained for answer in answers), prop


def test_more_short_answer_items_are_other_wordings_and_leave_every_other_item_alone():
    one = BuiltinCorpusOptions(materials=8, benchmark_fraction=0.5)
    three = BuiltinCorpusOptions(materials=8, benchmark_fraction=0.5, short_answer_per_fact=3)
    rows_one = generate_builtin("biomaterials-benchmark", one)
    rows_three = generate_builtin("biomaterials-benchmark", three)
    by_id = {row["id"]: row for row in rows_three}
    assert all(by_id[row["id"]] == row for row in rows_one)  # the first wording and every MC item unchanged
    short = [row for row in rows_three if row["type"] == "short_answer"]
    facts = {row["fact_id"] for row in short}
    assert len(short) == 3 * len(facts)
    for fact in facts:
        own = [row for row in short if row["fact_id"] == fact]
        assert sorted(r["id"].rsplit("/", 1)[1] for r in own) == ["sa", "sa1", "sa2"]
        assert len({r["question"] for r in own}) == 3 and len({r["split"] for r in own}) == 1
        assert len({(r["answer"], r["material"], r["property"]) for r in own}) == 1
