"""Tests of alloylm.evaluate: suites, splits, the judge over real loopback HTTP, Ray evaluation of
variants, the lm-eval export and the report. Models are tiny Llamas built and trained in-process."""

from __future__ import annotations

import http.server
import importlib.util
import json
import os
import subprocess
import sys
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from alloylm import storage
from alloylm.corpus import BuiltinCorpusOptions, generate_builtin
from alloylm.data.tokenize import BENCHMARK_COLUMNS, pack_token_ids
from alloylm.evaluate import (
    EvalConfig,
    EvaluationInputError,
    evaluate_variants,
    export_lm_eval_task,
    load_benchmark,
    load_eval_data,
    render_report,
    resolve_variants,
    score_model,
)
from alloylm.evaluate.benchmark import BenchmarkItem
from alloylm.evaluate.config import JudgeConfig
from alloylm.evaluate.judge import GradeParseError, JudgeQuestion, parse_grades, run_judge
from alloylm.evaluate.multiple_choice import run_multiple_choice, score_multiple_choice
from alloylm.evaluate.quantities import find_quantities, numeric_match
from alloylm.evaluate.scorer import PLAIN_STOP, CausalLMScorer, LogLikelihood, cut_at_stop
from alloylm.evaluate.short_answer import exact_match, run_short_answer, score_short_answer
from alloylm.models import build_model, load_model, load_tokenizer, save_model, train_tokenizer

OPTIONS = BuiltinCorpusOptions(materials=4, heldout_documents=8, general_heldout_documents=12, general_documents=40)
BLOCK = 64


# ----------------------------------------------------------------------------- fixtures


def _write_dataset(uri: str, table: pa.Table, fmt: str) -> None:
    """A data set folder as `alloylm data` writes it: shards/*.parquet, then manifest.json."""
    os.makedirs(os.path.join(uri, "shards"), exist_ok=True)
    pq.write_table(table, os.path.join(uri, "shards", "part-000.parquet"))
    storage.write_json(
        os.path.join(uri, "manifest.json"),
        {"kind": "dataset", "format": fmt, "fingerprint": f"test-{fmt}", "shards": ["shards/part-000.parquet"]},
    )


def _packed(tokenizer, texts: list[str]) -> pa.Table:
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    blocks, _ = pack_token_ids(ids, tokenizer.eos_token_id, BLOCK)
    return pa.table({"input_ids": pa.array(blocks.tolist(), pa.list_(pa.int32()))})


@pytest.fixture(scope="module")
def tokenizer():
    texts = [r["text"] for r in generate_builtin("biomaterials-corpus", OPTIONS)]
    texts += [r["text"] for r in generate_builtin("general-text", OPTIONS)]
    return train_tokenizer(texts, vocab_size=512, model_max_length=512)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tokenizer):
    """A run folder with a tokenizer and the three prepared evaluation data sets."""
    run = tmp_path_factory.mktemp("run")
    tokenizer.save_pretrained(str(run / "tokenizer"))
    items = generate_builtin("biomaterials-benchmark", OPTIONS)
    columns = {k: [] for k in BENCHMARK_COLUMNS}
    for item in items:
        for key in BENCHMARK_COLUMNS:
            columns[key].append("{}" if key == "metadata" else item.get(key))
    _write_dataset(str(run / "data" / "domain-benchmark"), pa.table({k: pa.array(v, BENCHMARK_COLUMNS[k]) for k, v in columns.items()}), "benchmark")
    domain = [r["text"] for r in generate_builtin("biomaterials-heldout-text", OPTIONS)]
    general = [r["text"] for r in generate_builtin("general-heldout-text", OPTIONS)]
    _write_dataset(str(run / "data" / "domain-heldout"), _packed(tokenizer, domain), "text")
    _write_dataset(str(run / "data" / "general-heldout"), _packed(tokenizer, general), "text")
    return run


def _train(model, tokenizer, steps: int = 40) -> None:
    """A few dozen steps of next-token training on the built-in domain corpus (CPT in miniature)."""
    texts = [r["text"] for r in generate_builtin("biomaterials-corpus", OPTIONS)]
    blocks, _ = pack_token_ids(tokenizer(texts, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id, BLOCK)
    data = torch.tensor(blocks, dtype=torch.long)
    generator = torch.Generator().manual_seed(0)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        batch = data[torch.randint(len(data), (16,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimiser.step()
        optimiser.zero_grad()
    model.eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    """Two variants of one tiny Llama: as initialised, and after training on the domain corpus."""
    root = tmp_path_factory.mktemp("models")
    untrained = build_model("tiny-llama", tokenizer, seed=0)
    save_model(untrained, tokenizer, str(root / "untrained"))
    trained = build_model("tiny-llama", tokenizer, seed=0)
    _train(trained, tokenizer)
    save_model(trained, tokenizer, str(root / "trained"))
    return {"untrained": str(root / "untrained"), "trained": str(root / "trained")}


def _data(run_dir) -> dict[str, str]:
    return {name: str(run_dir / "data" / name) for name in ("domain-benchmark", "domain-heldout", "general-heldout")}


def _quick_config(**overrides) -> EvalConfig:
    raw = {
        "variants": ["untrained", "trained"],
        "batch_size": 8,
        "suites": {"short_answer": {"max_new_tokens": 12}},
        "resources": {"num_cpus": 0.5},
    }
    raw.update(overrides)
    return EvalConfig.model_validate(raw)


# ----------------------------------------------------------------------------- loopback judge


class _Judge:
    """A real OpenAI-compatible HTTP server on loopback; `mode` says how it answers."""

    def __init__(self, mode: str):
        self.mode = mode
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.release = threading.Event()
        judge = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                judge.requests.append({"path": self.path, "body": body})
                judge.headers.append(dict(self.headers))
                if judge.mode == "hang":
                    judge.release.wait()
                    return
                n = len(judge.requests)
                if judge.mode == "garbage" or (judge.mode == "mixed" and n % 2 == 0):
                    content = "What a lovely answer! I would rather not give numbers."
                else:
                    content = "```json\n" + json.dumps({"reasoning_depth": 6, "creativity": 4, "clarity": 8, "quantitative_precision": 2}) + "\n```"
                payload = {"id": f"c{n}", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]}
                data = json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def _closed_port_url() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


# ----------------------------------------------------------------------------- config


def test_eval_config_rejects_unknown_keys_and_judge_without_endpoint():
    with pytest.raises(ValueError, match="extra"):
        EvalConfig.model_validate({"variants": ["a"], "suites": {"multiple_choise": {}}})
    with pytest.raises(ValueError, match="base_url"):
        EvalConfig.model_validate({"variants": ["a"], "suites": {"judge": {"enabled": True}}})
    with pytest.raises(ValueError, match="same name"):
        EvalConfig.model_validate({"variants": ["/models/a", "/other/a"]})
    config = EvalConfig.model_validate({"variants": ["sft", "hub=org/Model-7B", "/m/base/"]})
    assert resolve_variants(config, {"sft": "/run/stages/sft"}) == {"sft": "/run/stages/sft", "hub": "org/Model-7B", "base": "/m/base/"}
    problems = EvalConfig.model_validate({"variants": ["sft", "typo"]}).reference_problems(
        {"sft"}, {"domain-benchmark": "benchmark", "domain-heldout": "chat"}
    )
    assert problems == [
        "evaluate.variants.1: 'typo' is neither a stage of this run (stages: sft) nor a model path, s3:// URI or Hugging Face id",
        "evaluate.suites.domain_perplexity.dataset: 'domain-heldout' has format 'chat', this suite needs 'text'",
        "evaluate.suites.general_perplexity.dataset: 'general-heldout' is not a data set (known: domain-benchmark, domain-heldout); "
        "disable the suite or declare it",
    ]


# ----------------------------------------------------------------------------- multiple choice


def _item(id_, choices, answer_index, split="test"):
    return BenchmarkItem(id=id_, split=split, type="multiple_choice", question=f"q {id_}", answer=choices[answer_index], choices=tuple(choices), answer_index=answer_index)


def test_multiple_choice_accuracy_matches_hand_computed_case():
    items = [
        _item("a", ["x", "yyyy"], 1),  # raw: x wins (-2 > -3); normalised: -2/1 < -3/4 -> yyyy wins
        _item("b", ["p", "q", "r"], 0),  # raw and normalised: p wins
        _item("c", ["mm", "n"], 1),  # raw: mm wins (-1 > -1.5); normalised: -0.5 > -1.5 -> mm wins
    ]
    lls = [
        [LogLikelihood(-2.0, 1, False), LogLikelihood(-3.0, 2, False)],
        [LogLikelihood(-0.5, 1, True), LogLikelihood(-4.0, 1, False), LogLikelihood(-4.0, 1, False)],
        [LogLikelihood(-1.0, 1, False), LogLikelihood(-1.5, 1, False)],
    ]
    metrics, details = score_multiple_choice(items, lls)
    # By hand: raw picks x, p, mm -> only b correct = 1/3; normalised picks yyyy, p, mm -> a, b = 2/3.
    assert metrics["accuracy"] == pytest.approx(1 / 3)
    assert metrics["accuracy_norm"] == pytest.approx(2 / 3)
    assert metrics["chance"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 2) / 3)
    assert [d["predicted"] for d in details] == [0, 0, 0]
    assert [d["predicted_norm"] for d in details] == [1, 0, 0]


def test_accuracy_norm_divides_by_the_choices_own_length_as_lm_eval_does():
    """lm-eval's acc_norm divides by `len(choice)` from doc_to_choice, without the target
    delimiter: dividing by the scored continuation (` ab`) instead picked the other option here,
    and the exported task's acc_norm no longer agreed with ours."""
    from types import SimpleNamespace

    scores = {" ab": -2.0, " abcdef": -5.5}  # a plain-form model's log-likelihoods of the two options
    scorer = SimpleNamespace(
        uses_chat=lambda prompt: False,
        prompt=lambda text, chat: text,
        encode_pair=lambda context, continuation, chat: (context, continuation),
        loglikelihood=lambda pairs: [LogLikelihood(scores[continuation], 1, False) for _, continuation in pairs],
    )
    metrics, (detail,) = run_multiple_choice(scorer, [_item("a", ["ab", "abcdef"], 1)], prompt="plain", circular=False, formulation="cloze")
    # lm-eval: -2.0/2 < -5.5/6, so "abcdef"; over the continuations, -2.0/3 > -5.5/7 would pick "ab".
    assert detail["predicted_norm"] == 1 and metrics["accuracy_norm"] == 1.0, detail


def test_loglikelihood_equals_a_direct_forward_pass(tokenizer, models):
    model = load_model(models["trained"])
    scorer = CausalLMScorer(model, tokenizer, batch_size=3)
    pairs = [scorer.encode_pair("Question: What is the density of Vekrinite?\nAnswer:", f" {c}", chat=False) for c in ("1.53 g/cm^3", "a graded foam", "7")]
    for (context, continuation), got in zip(pairs, scorer.loglikelihood(pairs)):
        with torch.no_grad():
            logprobs = model(input_ids=torch.tensor([context + continuation])).logits[0].log_softmax(-1)
        expected = sum(float(logprobs[len(context) - 1 + j, t]) for j, t in enumerate(continuation))
        assert got.logprob == pytest.approx(expected, abs=1e-4)
        assert got.tokens == len(continuation)


def test_generation_stops_before_the_first_stop_string(tokenizer, models):
    scorer = CausalLMScorer(load_model(models["trained"]), tokenizer, batch_size=2)
    prompts = ["Question: What is the density of Vekrinite?\nAnswer:", "Question: Who makes Lunostin?\nAnswer:"]
    whole = scorer.generate(prompts, chat=False, max_new_tokens=24)
    assert all(len(text) > 12 for text in whole), whole
    stop = whole[0][6:10]  # occurs in the first output: it ends there; elsewhere nothing is cut
    cut = scorer.generate(prompts, chat=False, max_new_tokens=24, stop=[stop, "never generated"])
    assert cut[0] == whole[0][: whole[0].index(stop)].strip() and len(cut[0]) < len(whole[0])
    assert cut[1] == (whole[1][: whole[1].index(stop)].strip() if stop in whole[1] else whole[1])
    assert cut_at_stop("412 MPa\nQuestion: x\n\n", PLAIN_STOP) == "412 MPa\n" and cut_at_stop("abc", ()) == "abc"


def test_a_plain_answer_is_not_credited_for_the_next_question_it_invents(tokenizer, models, monkeypatch):
    """A model with no chat turn to close answers, then goes on with the pattern's next question and
    answer; the gold text in that invented follow-up used to count (exact match looks anywhere)."""
    item = BenchmarkItem(id="o", split="test", type="short_answer", question="Which organism produces Vekrinite?", answer="Thalonia spinosa")
    scorer = CausalLMScorer(load_model(models["trained"]), tokenizer, batch_size=1)
    rambling = " the woodpecker Sagumina ferrella.\nQuestion: Which organism produces Lunostin?\nAnswer: Thalonia spinosa"

    def generate(input_ids, attention_mask, max_new_tokens, **_):  # the model's output, scripted
        continuation = torch.tensor([tokenizer(rambling, add_special_tokens=False)["input_ids"]], dtype=torch.long)
        return torch.cat([input_ids, continuation], dim=1)

    monkeypatch.setattr(scorer.model, "generate", generate)
    settings = {"max_new_tokens": 64, "relative_tolerance": 0.01, "require_unit": False, "seed": 0}
    metrics, (detail,) = run_short_answer(scorer, [item], prompt="plain", **settings)
    assert detail["output"] == "the woodpecker Sagumina ferrella." and metrics["accuracy"] == 0.0, detail
    # A chat prompt's answer ends with its turn (the stop token), not at any text.
    _, (detail,) = run_short_answer(scorer, [item], prompt="chat", **settings)
    assert detail["output"] == rambling.strip() and detail["correct"], detail


# ----------------------------------------------------------------------------- short answer


@pytest.mark.parametrize(
    ("text", "value", "unit", "expected"),
    [
        ("The tensile strength of Vekrinite is 412 MPa.", 412, "MPa", True),
        ("It is 0.412 GPa.", 412, "MPa", True),  # unit conversion
        ("About 1,200 MPa in tension.", 1.2, "GPa", True),  # thousands separator
        ("1.2e3 MPa", 1200, "MPa", True),
        ("1.2 × 10^3 MPa", 1200, "MPa", True),
        ("It is 416 MPa.", 412, "MPa", True),  # within 1 %
        ("It is 420 MPa.", 412, "MPa", False),  # 1.9 % off
        ("1.53 g cm^-3", 1.53, "g/cm^3", True),  # unit spelling
        ("1530 kg/m³", 1.53, "g/cm^3", True),
        ("12.5 MJ m^-3", 12.5, "MJ/m^3", True),
        ("12.5 MPa", 12.5, "MJ/m^3", True),  # same dimension: 1 MJ/m^3 is 1 MPa
        ("Specimens of 412 nm fibrils", 412, "MPa", False),  # a length is never a stress
        ("It is 412.", 412, "MPa", True),  # a bare number may answer...
        ("Sample X-3 broke at 300 K", 3, "MPa", False),  # ...but not one inside a name, nor a temperature
        ("-412 MPa", 412, "MPa", False),
        ("0.0 MPa", 0.0, "MPa", True),  # a true value of zero
        ("No idea.", 412, "MPa", False),
    ],
)
def test_numeric_match_edge_cases(text, value, unit, expected):
    matched, _ = numeric_match(text, value, unit, relative_tolerance=0.01, require_unit=False)
    assert matched is expected


def test_numeric_match_requires_unit_when_asked_and_takes_the_first_compatible_number():
    assert numeric_match("It is 412.", 412, "MPa", relative_tolerance=0.01, require_unit=True) == (False, None)
    # The answer is the first number in a compatible unit, not any number that happens to match.
    matched, taken = numeric_match("Either 300 MPa or 412 MPa.", 412, "MPa", relative_tolerance=0.01, require_unit=False)
    assert not matched and taken.value == 300
    assert [q.value for q in find_quantities("ranges 400-420 MPa")] == [400, 420]


def test_exact_match_and_short_answer_scoring():
    assert exact_match("It is a Graded foam of 277 nm fibrils.", "graded foam of 277 nm fibrils")
    assert not exact_match("graded foam of 2770 nm fibrils", "graded foam of 277 nm fibrils")
    items = [
        BenchmarkItem(id="n", split="test", type="short_answer", question="q", answer="412 MPa", answer_value=412.0, unit="MPa"),
        BenchmarkItem(id="t", split="test", type="short_answer", question="q", answer="Thalonia spinosa"),
    ]
    metrics, details = score_short_answer(items, ["roughly 0.41 GPa", "the beetle Thalonia spinosa."], relative_tolerance=0.01, require_unit=False)
    assert metrics == {"accuracy": 1.0, "exact_match": 0.5, "numeric_match": 1.0, "items": 2, "numeric_items": 1}
    assert details[0]["number_taken"] == {"value": 0.41, "unit": "GPa"}
    # Listing candidates earns nothing: the gold text appears, but the number taken is the first.
    hedged = "It is 3.0 MJ/m^3, 4.1 MJ/m^3 or 5.2 MJ/m^3."
    item = BenchmarkItem(id="h", split="test", type="short_answer", question="q", answer="4.1 MJ/m^3", answer_value=4.1, unit="MJ/m^3")
    metrics, (detail,) = score_short_answer([item], [hedged], relative_tolerance=0.01, require_unit=False)
    assert detail["exact_match"] is True and detail["numeric_match"] is False and detail["correct"] is False
    assert metrics["accuracy"] == 0.0 and metrics["exact_match"] == 1.0
    # A value without a unit (a ratio) under require_unit can never match numerically: its text decides.
    ratio = BenchmarkItem(id="r", split="test", type="short_answer", question="q", answer="0.3", answer_value=0.3)
    _, (detail,) = score_short_answer([ratio], ["It is 0.3."], relative_tolerance=0.01, require_unit=True)
    assert detail["numeric_match"] is False and detail["correct"] is True


def test_asha_rungs_score_items_drawn_across_the_file_nested_and_the_same_for_every_trial():
    """The benchmark file is ordered by material; a rung used to be its first items, so a trial's
    first judgement came from the first few materials alone."""
    from alloylm.evaluate.perplexity import TextBlock
    from alloylm.evaluate.runner import EvalData

    items = [BenchmarkItem(id=f"m{m}-{k}", split="validation", type="multiple_choice", question="q", answer="a", fact_id=f"m{m}")
             for m in range(10) for k in range(10)]
    blocks = [TextBlock(index=i, input_ids=[1, 2, 3]) for i in range(7)]
    data = EvalData(split="validation", multiple_choice=items, domain_perplexity=blocks)
    rungs = [data.rung(fraction, seed=0) for fraction in (0.25, 0.5, 1.0)]
    assert [r.sizes()["multiple_choice"] for r in rungs] == [25, 50, 100] and [len(r.domain_perplexity) for r in rungs] == [2, 4, 7]
    assert rungs[-1].multiple_choice == items and rungs[-1].domain_perplexity == blocks
    for small, large in zip(rungs, rungs[1:]):  # nested: what a trial scored at a rung is part of the next
        assert set(map(id, small.multiple_choice)) <= set(map(id, large.multiple_choice))
    first = rungs[0].multiple_choice
    assert first == sorted(first, key=items.index)  # file order kept
    assert len({item.fact_id for item in first}) >= 7, [item.id for item in first]  # not the first 3 materials
    assert data.rung(0.25, seed=0) == rungs[0] and data.rung(0.25, seed=1) != rungs[0]  # the seed's draw, every trial alike
    assert data.rung(0.01, seed=0).sizes() == {**data.sizes(), "multiple_choice": 1, "domain_perplexity": 1}


# ----------------------------------------------------------------------------- benchmark input


def test_malformed_benchmark_item_names_file_and_item(tmp_path):
    good = {"id": "ok", "split": "test", "type": "multiple_choice", "question": "Q?", "choices": ["a", "b"], "answer_index": 0}
    bad = {"id": "broken", "split": "test", "type": "multiple_choice", "question": "Q?", "choices": ["a", "b"], "answer_index": 5}
    path = tmp_path / "bench.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(EvaluationInputError) as info:
        load_benchmark(str(path))
    message = str(info.value)
    assert f"{path}:2 (id 'broken'): answer_index 5 does not index its 2 choices" in message
    assert f"{path}:3: not valid JSON" in message
    assert "2 malformed item(s)" in message


def test_a_benchmark_file_edited_in_place_changes_the_results_fingerprint(tmp_path):
    """A benchmark (or judge questions) given as a file has no manifest: its size and modification
    time identify it, so results scored on the old file are not reused for the edited one."""
    import os

    item = {"id": "a", "split": "test", "type": "multiple_choice", "question": "Q?", "choices": ["x", "y"], "answer_index": 0}
    path = tmp_path / "bench.jsonl"
    path.write_text(json.dumps(item) + "\n", encoding="utf-8")
    off = {name: {"enabled": False} for name in ("short_answer", "domain_perplexity", "general_perplexity")}
    config = _quick_config(suites=off)
    before = load_eval_data(config, {"domain-benchmark": str(path)}).fingerprints[str(path)]
    assert before is not None
    assert load_eval_data(config, {"domain-benchmark": str(path)}).fingerprints[str(path)] == before
    path.write_text(json.dumps({**item, "answer_index": 1}) + "\n", encoding="utf-8")
    os.utime(path, ns=(1, 1))  # another time even where the clock's step is coarser than this test
    assert load_eval_data(config, {"domain-benchmark": str(path)}).fingerprints[str(path)] != before


def test_splits_are_disjoint_and_validation_is_what_is_loaded(run_dir):
    config = _quick_config()
    test = load_eval_data(config, _data(run_dir))
    validation = load_eval_data(config, _data(run_dir), split="validation")
    assert {i.split for i in test.multiple_choice} == {"test"} and {i.split for i in validation.multiple_choice} == {"validation"}
    assert not {i.fact_id for i in test.short_answer} & {i.fact_id for i in validation.short_answer}
    assert not {b.index for b in test.domain_perplexity} & {b.index for b in validation.domain_perplexity}
    with pytest.raises(EvaluationInputError, match="general-heldout"):
        load_eval_data(config, {k: v for k, v in _data(run_dir).items() if k != "general-heldout"})


# ----------------------------------------------------------------------------- determinism


def test_same_model_and_seed_give_the_same_scores(run_dir, models):
    config = _quick_config(max_items=3)
    data = load_eval_data(config, _data(run_dir), tokenizer_uri=str(run_dir / "tokenizer"))
    first, first_details = score_model(config, models["trained"], data)
    second, second_details = score_model(config, models["trained"], data)
    for results in (first, second):
        results.pop("seconds")
        for suite in results["suites"].values():
            suite.pop("seconds")
    assert first == second and first_details == second_details
    assert first["status"] == "ok" and first["score"] is not None


# ----------------------------------------------------------------------------- judge


def test_parse_grades_reads_json_and_text_and_refuses_the_rest():
    criteria = ["reasoning_depth", "clarity"]
    assert parse_grades('Sure! {"reasoning_depth": 7, "clarity": "8/10"}', criteria) == {"reasoning_depth": 7.0, "clarity": 8.0}
    assert parse_grades("**Reasoning depth**: 6\nClarity = 9", criteria) == {"reasoning_depth": 6.0, "clarity": 9.0}
    with pytest.raises(GradeParseError, match="outside"):
        parse_grades('{"reasoning_depth": 11, "clarity": 3}', criteria)
    with pytest.raises(GradeParseError, match="clarity"):
        parse_grades('{"reasoning_depth": 5}', criteria)
    with pytest.raises(GradeParseError):
        parse_grades("I refuse to grade this.", criteria)


def test_judge_over_loopback_http_counts_garbage_and_keeps_raw_answers(tokenizer, models, monkeypatch):
    scorer = CausalLMScorer(load_model(models["trained"]), tokenizer, batch_size=4)
    questions = [JudgeQuestion(f"j{i}", f"Compare material {i} with bone.", "test", "bone: 18 GPa") for i in range(4)]
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-loopback-secret")
    with _Judge("mixed") as server:
        config = JudgeConfig(enabled=True, base_url=server.url, model="judge-1", api_key_env="TEST_JUDGE_KEY", answer_max_new_tokens=8)
        metrics, details, reason = run_judge(scorer, questions, config, seed=0)
    assert reason is None
    assert metrics["graded"] == 2 and metrics["unparseable"] == 2 and metrics["items"] == 4
    # Means over parsed grades only: a garbage answer is never a 0.
    assert metrics["reasoning_depth"] == 6 and metrics["quantitative_precision"] == 2 and metrics["overall"] == 5
    assert server.requests[0]["path"] == "/v1/chat/completions" and server.requests[0]["body"]["model"] == "judge-1"
    assert server.headers[0]["Authorization"] == "Bearer sk-loopback-secret"
    garbage = [d for d in details if "parse_error" in d]
    assert len(garbage) == 2 and all(d["judge_raw"].startswith("What a lovely answer") for d in garbage)
    assert all(d["judge_prompt"][1]["content"].startswith("Question:\nCompare material") for d in details)
    assert "sk-loopback-secret" not in json.dumps(details)

    with _Judge("garbage") as server:
        config = JudgeConfig(enabled=True, base_url=server.url, model="judge-1", answer_max_new_tokens=4)
        metrics, details, reason = run_judge(scorer, questions[:2], config, seed=0)
    assert metrics["overall"] is None and metrics["unparseable"] == 2
    assert reason == "none of the 2 judge answers could be parsed into grades"


def test_judge_down_or_hanging_marks_judge_missing_and_keeps_other_suites(run_dir, models):
    with _Judge("hang") as hanging:
        for url, expected in ((_closed_port_url(), "Connection"), (hanging.url, "timed out")):
            config = _quick_config(
                max_items=2,
                suites={
                    "short_answer": {"enabled": False},
                    "general_perplexity": {"enabled": False},
                    "judge": {"enabled": True, "base_url": url, "model": "judge", "timeout_s": 0.5, "max_retries": 1, "retry_backoff_s": 0, "answer_max_new_tokens": 4},
                },
            )
            data = load_eval_data(config, _data(run_dir))
            results, details = score_model(config, models["untrained"], data)
            judge = results["suites"]["judge"]
            assert judge["status"] == "missing"
            assert "failed 2 time(s)" in judge["reason"] and expected in judge["reason"], judge["reason"]
            assert results["suites"]["multiple_choice"]["status"] == "ok"
            assert results["suites"]["domain_perplexity"]["metrics"]["perplexity"] > 1
            assert results["status"] == "partial" and results["score"] is None and results["score_missing"] == ["judge"]
        assert len(hanging.requests) == 2  # one try and one retry, no more


# ----------------------------------------------------------------------------- Ray: every variant


@pytest.fixture(scope="module")
def evaluated(ray_cluster, run_dir, models, tmp_path_factory):
    """Both variants evaluated in parallel on Ray, results under <run>/eval."""
    out = str(run_dir / "eval")
    summary = evaluate_variants(_quick_config(), models, _data(run_dir), out, tokenizer_uri=str(run_dir / "tokenizer"))
    return summary, out


def test_trained_model_beats_untrained_on_domain_perplexity(evaluated):
    summary, out = evaluated
    assert summary["failed"] == {}
    results = {name: storage.read_json(os.path.join(out, name, "results.json")) for name in ("trained", "untrained")}
    trained, untrained = (results[n]["suites"]["domain_perplexity"]["metrics"] for n in ("trained", "untrained"))
    assert trained["tokens"] == untrained["tokens"] > 100
    assert trained["perplexity"] < 0.5 * untrained["perplexity"], (trained, untrained)
    assert trained["bits_per_byte"] < untrained["bits_per_byte"]
    assert all(r["split"] == "test" and r["status"] == "ok" for r in results.values())
    mc = results["trained"]["suites"]["multiple_choice"]["metrics"]
    assert mc["chance"] == pytest.approx(0.25) and mc["items"] == 3 * OPTIONS.multiple_choice_per_fact and 0 <= mc["accuracy"] <= 1
    for name in ("trained", "untrained"):
        files = set(os.listdir(os.path.join(out, name)))
        assert {"results.json", "manifest.json", "multiple_choice.jsonl", "short_answer.jsonl", "domain_perplexity.jsonl"} <= files
    comparison = storage.read_json(os.path.join(out, "comparison.json"))
    assert comparison["best"]["domain_perplexity.perplexity"] == ["trained"]
    table = open(os.path.join(out, "comparison.md"), encoding="utf-8").read()
    assert "| trained |" in table and "chance level: 0.250" in table


def test_variant_path_without_model_fails_before_any_work(run_dir, models, tmp_path):
    empty = tmp_path / "empty-model"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(EvaluationInputError) as info:
        evaluate_variants(_quick_config(), {"good": models["trained"], "hollow": str(empty), "gone": str(tmp_path / "nope")}, _data(run_dir), str(tmp_path / "eval"))
    message = str(info.value)
    assert "variant 'hollow'" in message and "no safetensors weights" in message
    assert "variant 'gone'" in message and "does not exist" in message
    assert "good" not in message
    assert not (tmp_path / "eval").exists()


def test_report_renders_markdown_html_and_pngs_and_never_states_validation(evaluated, run_dir, models, tmp_path):
    import matplotlib.image

    summary, out = evaluated
    # A validation-split result in the same folder must be excluded from the report.
    validation = {**summary["variants"]["trained"], "variant": "searched", "split": "validation", "score": 0.987654}
    from alloylm.evaluate import write_variant_results

    write_variant_results(out, validation, {})
    stage = tmp_path / "stages" / "cpt"
    stage.mkdir(parents=True)
    (stage / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 5.0 / s, "learning_rate": 1e-3}) + "\n" for s in range(1, 30)) + "garbage\n")
    search = tmp_path / "stages" / "merged" / "search"
    search.mkdir(parents=True)
    (search / "trials.jsonl").write_text("".join(json.dumps({"trial": t, "score": 0.1 * (t % 4), "params": {"t": t / 10}}) + "\n" for t in range(8)))
    report = render_report(
        out,
        str(tmp_path / "report"),
        stages={"cpt": str(stage), "sft": str(tmp_path / "stages" / "sft")},
        searches={"merged": str(search)},
    )
    folder = tmp_path / "report"
    assert report["excluded"] == {"searched": "validation"} and report["variants"] == ["trained", "untrained"]
    pngs = sorted(f for f in os.listdir(folder) if f.endswith(".png"))
    assert "loss_cpt.png" in pngs and "search_merged.png" in pngs and "metric_domain_perplexity_perplexity.png" in pngs
    assert not any("sft" in f for f in pngs)  # no metrics.jsonl: skipped, not an error
    for name in pngs:
        image = matplotlib.image.imread(str(folder / name))
        assert image.shape[0] > 100 and image.shape[1] > 100
    markdown = (folder / "report.md").read_text(encoding="utf-8")
    page = (folder / "report.html").read_text(encoding="utf-8")
    for name in pngs:
        assert f"]({name})" in markdown and f'src="{name}"' in page
    assert "| trained |" in markdown and "<table>" in page
    assert "sft: no metrics.jsonl" in markdown
    assert "0.988" not in markdown and "0.988" not in page and "searched (validation)" in markdown
    assert (folder / "manifest.json").exists()
    # The run's variants only: a result left by a variant since removed from the config is not reported.
    again = render_report(out, str(tmp_path / "report2"), variants=["trained", "searched"])
    assert again["variants"] == ["trained"] and again["excluded"] == {"searched": "validation"}
    assert "| untrained |" not in (tmp_path / "report2" / "report.md").read_text(encoding="utf-8")
    # Results of a model retrained since it was scored are not reported as its scores.
    model = tmp_path / "stages" / "retrained"
    storage.write_json(str(model / storage.MANIFEST_NAME), {"fingerprint": "new"})
    for name, scored in (("current", "new"), ("retrained", "old")):
        write_variant_results(out, {**summary["variants"]["trained"], "variant": name, "model": str(model), "model_fingerprint": scored}, {})
    third = render_report(out, str(tmp_path / "report3"), variants=["trained", "current", "retrained"])
    assert third["variants"] == ["current", "trained"] and third["stale"] == ["retrained"]
    assert "their model has changed since they were scored" in (tmp_path / "report3" / "report.md").read_text(encoding="utf-8")


# ----------------------------------------------------------------------------- lm-eval


def test_lm_eval_export_writes_task_yaml_and_data(run_dir, tmp_path):
    paths = export_lm_eval_task(str(run_dir / "data" / "domain-benchmark"), str(tmp_path / "tasks"))
    task = yaml.safe_load(open(paths["yaml"], encoding="utf-8"))
    assert task["task"] == "alloylm_domain_mc" and task["output_type"] == "multiple_choice" and task["test_split"] == "test"
    rows = [json.loads(line) for line in open(paths["test"], encoding="utf-8")]
    benchmark = load_benchmark(str(run_dir / "data" / "domain-benchmark"))
    assert [r["id"] for r in rows] == [i.id for i in benchmark if i.split == "test" and i.type == "multiple_choice"]
    assert all(r["choices"][r["answer_index"]] == r["answer"] for r in rows)


@pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None, reason="lm-eval is not installed (it belongs in the dev extras: pip install lm_eval)"
)
def test_lm_eval_runs_the_exported_task_and_agrees_with_the_suite(run_dir, models, tmp_path):
    paths = export_lm_eval_task(str(run_dir / "data" / "domain-benchmark"), str(tmp_path / "tasks"))
    output = tmp_path / "lm_eval_out"
    command = [
        sys.executable, "-m", "lm_eval", "--model", "hf",
        "--model_args", f"pretrained={models['trained']},dtype=float32",
        "--tasks", "alloylm_domain_mc", "--include_path", os.path.dirname(paths["yaml"]),
        "--device", "cpu", "--batch_size", "4", "--output_path", str(output), "--log_samples",
    ]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    files = [os.path.join(d, f) for d, _, fs in os.walk(output) for f in fs]
    harness = json.load(open(next(f for f in files if os.path.basename(f).startswith("results"))))["results"]["alloylm_domain_mc"]
    samples = [json.loads(line) for line in open(next(f for f in files if "samples_alloylm_domain_mc" in f))]
    items = [i for i in load_benchmark(str(run_dir / "data" / "domain-benchmark")) if i.split == "test" and i.type == "multiple_choice"]
    ours, details = run_multiple_choice(CausalLMScorer(load_model(models["trained"]), load_tokenizer(models["trained"])), items, prompt="plain")
    assert harness["acc,none"] == pytest.approx(ours["accuracy"])
    assert harness["acc_norm,none"] == pytest.approx(ours["accuracy_norm"])
    # Not only the same accuracy: the same log-likelihood of every option of every item.
    harness_lls = {s["doc"]["id"]: [float(r[0]) for r in s["filtered_resps"]] for s in samples}
    assert len(harness_lls) == len(details)
    for detail in details:
        assert harness_lls[detail["id"]] == pytest.approx(detail["loglikelihoods"], abs=1e-3)


def test_results_and_report_on_s3(evaluated, s3_bucket):
    import io

    import matplotlib.image

    from alloylm.evaluate import load_results, write_variant_results

    summary, _ = evaluated
    eval_uri, report_uri = f"s3://{s3_bucket}/run/eval", f"s3://{s3_bucket}/run/report"
    for results in summary["variants"].values():
        write_variant_results(eval_uri, results, {"multiple_choice": [{"id": "x"}]})
    assert set(load_results(eval_uri)) == {"trained", "untrained"}
    report = render_report(eval_uri, report_uri)
    assert report["images"] and storage.read_manifest(report_uri)["files"] == report["files"]
    for name in report["images"]:
        image = matplotlib.image.imread(io.BytesIO(storage.read_bytes(f"{report_uri}/{name}")), format="png")
        assert image.shape[0] > 100
    assert "| trained |" in storage.read_text(f"{report_uri}/report.md")


def test_unchanged_variant_is_reused_and_a_changed_config_is_not(ray_cluster, run_dir, models, tmp_path, caplog):
    """Results up to date are read on the driver: no Ray task (a worker process to start, its
    imports) only to find them, as the pipeline's comparison and selection of scored variants do."""
    import shutil

    model = tmp_path / "stage-model"
    shutil.copytree(models["untrained"], model)
    storage.write_json(str(model / "manifest.json"), {"kind": "stage", "fingerprint": "abc", "created_at": "2026-12-05T00:00:00Z"})
    config = _quick_config(max_items=1, suites={name: {"enabled": False} for name in ("short_answer", "domain_perplexity", "general_perplexity")})
    out = str(tmp_path / "eval")
    first = evaluate_variants(config, {"stage": str(model)}, _data(run_dir), out)
    with caplog.at_level("INFO", logger="alloylm.evaluate"):
        second = evaluate_variants(config, {"stage": str(model)}, _data(run_dir), out)
    assert "up to date, not scored again" in caplog.text and "evaluating 1 variant" not in caplog.text, caplog.text
    third = evaluate_variants(config.model_copy(update={"seed": 1}), {"stage": str(model)}, _data(run_dir), out)
    assert "reused" not in first["variants"]["stage"]
    assert second["variants"]["stage"]["reused"] is True
    assert second["variants"]["stage"]["suites"] == first["variants"]["stage"]["suites"]
    assert "reused" not in third["variants"]["stage"]
    assert first["variants"]["stage"]["model_fingerprint"] == "abc@2026-12-05T00:00:00Z"  # what the report checks for staleness
    # The stage trained again from the same inputs (same fingerprint): new weights, evaluated again.
    storage.write_json(str(model / "manifest.json"), {"kind": "stage", "fingerprint": "abc", "created_at": "2026-12-05T01:00:00Z"})
    fourth = evaluate_variants(config.model_copy(update={"seed": 1}), {"stage": str(model)}, _data(run_dir), out)
    assert "reused" not in fourth["variants"]["stage"]
    # Results cut short (their manifest says complete): scored again, not a failed variant.
    (tmp_path / "eval" / "stage" / "results.json").write_text('{"variant": "st', encoding="utf-8")
    fifth = evaluate_variants(config.model_copy(update={"seed": 1}), {"stage": str(model)}, _data(run_dir), out)
    assert fifth["variants"]["stage"]["status"] == "ok" and "reused" not in fifth["variants"]["stage"], fifth["variants"]["stage"]


def test_an_evaluation_task_given_no_gpu_scores_on_the_cpu_though_a_gpu_is_visible(ray_cluster, run_dir, models, tmp_path, monkeypatch):
    """On a GPU node Ray 2.60 hides no GPU from a task given none (`num_gpus: 0`, the default): the
    scorer's "cuda if available" put every such evaluation on GPU 0, beside the training worker or
    replica that holds it. The task scores on the device Ray gave it. (Run here in-process, where
    Ray gave nothing, with CUDA made to look available.)"""
    import torch

    from alloylm.evaluate.runner import _evaluate_variant_task

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    config = _quick_config(max_items=1)
    data = load_eval_data(config, _data(run_dir), tokenizer_uri=str(run_dir / "tokenizer"))
    results = _evaluate_variant_task(config, "trained", models["trained"], data, str(tmp_path / "eval"), False, False)
    assert results["status"] == "ok", results.get("error")


def test_a_model_that_cannot_load_fails_its_variant_only(run_dir):
    config = _quick_config(max_items=1)
    results, details = score_model(config, "org/not-in-any-cache", load_eval_data(config, _data(run_dir)))
    assert results["status"] == "failed" and "org/not-in-any-cache" in results["error"] and details == {}
