"""Teacher-generated data sets on a real local Ray cluster.

Two teachers: a small OpenAI-shaped HTTP server in this process that answers well (and, on
purpose, once with garbage, once with a duplicate, once with a transient 503, and with 500s for one
chunk until told to stop), which tests the success path and resuming; and AlloyLM's own Serve app
with a tiny untrained model, whose answers are noise, which tests that malformed answers are
counted and never written as data.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from alloylm import storage
from alloylm.config import ConfigError, DatasetConfig, validate_config
from alloylm.evaluate.benchmark import load_benchmark
from alloylm.generate.chunks import heldout_documents, split_document
from alloylm.generate.parse import ChunkRequest, parse_answer
from alloylm.generate.prompts import render_prompt
from alloylm.generate.run import TeacherGenerationError, generation_uri
from alloylm.generate.teacher import RateLimiter, TeacherCallError, TeacherClient

API_KEY = "teacher-secret"
KEY_ENV = "ALLOYLM_TEST_TEACHER_KEY"
HELDOUT = {"fraction": 0.34, "seed": 0}
DOCUMENTS = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -------------------------------------------------------------------------------------------
# A teacher that answers well: http.server in a thread, OpenAI's chat/completions shape
# -------------------------------------------------------------------------------------------


class FakeTeacher:
    """What the fake teacher does and what it was asked (the handler reads and writes it)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.log: list[tuple[str, str]] = []  # (task, sample code) per request received
        self.failing = True  # chunks marked FLAKY get a 500 while this is set
        self.transient_seen: set[tuple[str, str]] = set()

    def requests(self, since: int = 0, task: str | None = None) -> list[tuple[str, str]]:
        with self.lock:
            return [entry for entry in self.log[since:] if task is None or entry[0] == task]


def _task_of(prompt: str) -> str:
    if '"chosen"' in prompt:
        return "preference"
    return "benchmark" if "exam question" in prompt else "qa"


def _answer(task: str, code: str, excerpt: str, n: int) -> str:
    if "GARBLED" in excerpt:
        return "Sure! Here are the questions you asked for: none, sorry."
    items = []
    for k in range(n):
        if task == "qa":
            question = "What modulus does nacre have?" if "DUPLICATE" in excerpt and k == 0 else f"What does sample {code} show in test {k}?"
            items.append({"question": question, "answer": f"Sample {code} shows value {k}."})
        elif task == "preference":
            rejected = f"Sample {code} is tough." if "SAMEPAIR" in excerpt and k == 0 else f"Sample {code} is brittle."
            items.append({"question": f"How tough is sample {code} in case {k}?", "chosen": f"Sample {code} is tough.", "rejected": rejected})
        else:
            items.append({"question": f"Which value was measured for sample {code} in item {k}?", "answer": f"{k} MPa"})
    text = json.dumps({"items": items})
    # Some teachers fence their JSON; the parser must accept it.
    return f"Here you are:\n```json\n{text}\n```" if code.endswith("1") else text


class _Handler(BaseHTTPRequestHandler):
    teacher: FakeTeacher

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, status: int, payload: dict, headers: dict | None = None) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if not self.path.endswith("/v1/chat/completions"):
            return self._send(404, {"error": {"message": "no such route"}})
        if self.headers.get("Authorization") != f"Bearer {API_KEY}":
            return self._send(401, {"error": {"message": "bad key"}})
        prompt = body["messages"][-1]["content"]
        excerpt = prompt.split("<excerpt>\n", 1)[1].split("\n</excerpt>", 1)[0]
        task, code = _task_of(prompt), re.search(r"sample (S\d+)", excerpt).group(1)
        teacher = self.teacher
        with teacher.lock:
            teacher.log.append((task, code))
            transient = "TRANSIENT" in excerpt and (task, code) not in teacher.transient_seen
            # a proxy's error page with status 200, once: not a chat completion
            proxy_page = "PROXYPAGE" in excerpt and (task, code) not in teacher.transient_seen
            teacher.transient_seen.add((task, code))
            failing = teacher.failing and "FLAKY" in excerpt
        if failing:
            return self._send(500, {"error": {"message": "teacher crashed"}})
        if "TOOLONG" in excerpt:  # as vLLM refuses a prompt plus max_tokens past max_model_len
            return self._send(400, {"error": {"message": "This model's maximum context length is 2048 tokens"}})
        if transient:
            return self._send(503, {"error": {"message": "busy"}}, {"Retry-After": "0"})
        if proxy_page:
            return self._send(200, {"html": "<html><body>Gateway busy, try again</body></html>"})
        n = int(re.search(r"Write (\d+)", prompt).group(1))
        content = _answer(task, code, excerpt, n)
        self._send(200, {
            "id": "chatcmpl-1", "object": "chat.completion", "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": len(content.split()), "total_tokens": 0},
        })


@pytest.fixture(scope="module")
def fake_teacher():
    teacher = FakeTeacher()
    handler = type("Handler", (_Handler,), {"teacher": teacher})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield teacher, f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


# -------------------------------------------------------------------------------------------
# A corpus whose special chunks land in training documents, whatever the temporary path
# -------------------------------------------------------------------------------------------


def _paragraph(code: str, marks: str = "") -> str:
    filler = " ".join(f"Layer {i} of sample {code} is {int(code[1:]) + i} micrometres thick." for i in range(5))
    return f"Notes on sample {code}. {marks} {filler}".replace("  ", " ")


def write_corpus(folder: Path) -> tuple[list[str], set[str], dict[str, str]]:
    """Six two-paragraph documents (one chunk per paragraph); returns (ids, held-out ids, marks by code)."""
    folder.mkdir(parents=True)
    paths = [str(folder / f"paper{d}.md") for d in range(DOCUMENTS)]
    heldout = heldout_documents(paths, HELDOUT["fraction"], HELDOUT["seed"])
    training = [p for p in paths if p not in heldout]
    index = {p: d for d, p in enumerate(paths)}
    marks = {
        f"S{index[training[0]]}0": "GARBLED",
        f"S{index[training[1]]}0": "DUPLICATE",
        f"S{index[training[2]]}1": "DUPLICATE",
        f"S{index[training[2]]}0": "TRANSIENT",
        f"S{index[training[1]]}1": "SAMEPAIR",
        f"S{index[training[3]]}1": "FLAKY",
    }
    assert len(heldout) == 2
    for path, d in index.items():
        paragraphs = [_paragraph(f"S{d}{p}", marks.get(f"S{d}{p}", "")) for p in range(2)]
        Path(path).write_text("\n\n".join(paragraphs) + "\n")
    return paths, heldout, marks


def _teacher(url: str, **extra) -> dict:
    return {"base_url": url, "model": "fake-teacher", "api_key_env": KEY_ENV, "max_concurrency": 4,
            "requests_per_second": 1000, "max_retries": 1, "retry_backoff_s": 0, "timeout_s": 30, **extra}


def generation_config(storage_uri: str, corpus: Path, tokenizer_dir: str, url: str, **teacher):
    common = {"from": "papers", "chunk_chars": 400, "min_chunk_chars": 100, "batch_chunks": 2, "heldout": HELDOUT,
              "items_per_chunk": 2, "teacher": {**_teacher(url), **teacher}}
    return validate_config(
        {
            "experiment": "gen",
            "storage": storage_uri,
            "tokenizer": {"from": tokenizer_dir},
            "datasets": {
                "papers": {"source": str(corpus), "format": "text"},
                "papers-qa": {"generate": {**common, "task": "qa"}},
                "papers-prefs": {"generate": {**common, "task": "preference"}},
                "papers-bench": {"generate": {**common, "task": "benchmark"}},
            },
            "data": {"block_size": 32, "tokenizer_actors": 1, "near_dedup": {"enabled": False}},
        }
    )


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    from alloylm.models.tokenizer import train_tokenizer

    path = tmp_path_factory.mktemp("gen-tokenizer")
    texts = [_paragraph(f"S{d}{p}", "GARBLED DUPLICATE") for d in range(10) for p in range(3)]
    train_tokenizer(texts * 3, vocab_size=600).save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def generated(ray_cluster, fake_teacher, tokenizer_dir, tmp_path_factory):
    """Run 1 fails on the FLAKY chunk's batch; run 2 (the teacher fixed) resumes; run 3 is a no-op."""
    from alloylm.data.prepare import prepare_all

    teacher, url = fake_teacher
    root = tmp_path_factory.mktemp("gen")
    paths, heldout, marks = write_corpus(root / "papers")
    config = generation_config(str(root / "runs"), root / "papers", tokenizer_dir, url)
    os.environ[KEY_ENV] = API_KEY
    try:
        with pytest.raises(TeacherGenerationError) as first:
            prepare_all(config)
        after_first = len(teacher.requests())
        batches_after_first = storage.list_files(storage.join(generation_uri(config, "papers-qa"), "batches"))
        qa_complete_after_first = storage.is_complete(storage.join(config.run_uri, "data", "papers-qa"))
        teacher.failing = False
        manifests = prepare_all(config)
        after_second = len(teacher.requests())
        again = prepare_all(config)
    finally:
        del os.environ[KEY_ENV]
    return {
        "config": config, "paths": paths, "heldout": heldout, "marks": marks, "teacher": teacher,
        "error": str(first.value), "after_first": after_first, "batches_after_first": batches_after_first,
        "qa_complete_after_first": qa_complete_after_first, "manifests": manifests, "after_second": after_second,
        "again": again,
    }


def _code(marks: dict[str, str], mark: str) -> list[str]:
    return sorted(code for code, m in marks.items() if m == mark)


def _rows(config, name: str) -> list[dict]:
    uri = storage.join(config.run_uri, "data", name)
    manifest = storage.read_manifest(uri)
    return [row for shard in manifest["shards"] for row in pq.read_table(storage.join(uri, shard)).to_pylist()]


def _generated(config, name: str) -> list[dict]:
    text = storage.read_text(storage.join(config.run_uri, "data", name, "generated.jsonl"))
    return [json.loads(line) for line in text.splitlines()]


# -------------------------------------------------------------------------------------------
# The success path, failure and resume
# -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_failed_batch_stops_the_run_and_keeps_finished_batches(generated):
    (flaky,) = _code(generated["marks"], "FLAKY")
    assert "1 of 4 batches failed" in generated["error"] and "HTTP 500" in generated["error"]
    assert "run again to resume" in generated["error"]
    assert len(generated["batches_after_first"]) == 3
    assert not generated["qa_complete_after_first"]
    first_qa = generated["teacher"].requests(0, "qa")[: generated["after_first"]]
    # 8 training chunks, the transient 503 retried once, the FLAKY chunk retried once then given up.
    assert len(first_qa) == 8 + 1 + 1
    assert first_qa.count(("qa", flaky)) == 2


@pytest.mark.slow
def test_rerun_sends_only_the_unfinished_batch(generated):
    (flaky,) = _code(generated["marks"], "FLAKY")
    resent = generated["teacher"].requests(generated["after_first"], "qa")
    sibling = flaky[:-1] + "0"  # the other chunk of the FLAKY document: same batch
    assert sorted(resent) == [("qa", sibling), ("qa", flaky)]
    counts = generated["manifests"]["papers-qa"]["counts"]["generation"]
    assert counts["batches"] == 4 and counts["batches_reused"] == 3


@pytest.mark.slow
def test_counts_and_problems_of_the_qa_data_set(generated):
    config = generated["config"]
    manifest = generated["manifests"]["papers-qa"]
    counts = manifest["counts"]["generation"]
    assert manifest["format"] == "chat" and manifest["teacher"]["model"] == "fake-teacher"
    assert counts["requests"] == 8 and counts["answers"] == 8 and counts["chunks_sent"] == 8
    assert counts["malformed"] == {"not_json": 1}
    assert counts["duplicates"] == 1 and counts["retries"] == 1
    assert counts["items_generated"] == 16 - 2 and counts["items"] == 16 - 2 - 1
    assert manifest["counts"]["documents_kept"] == counts["items"]
    problems = [json.loads(line) for line in storage.read_text(storage.join(config.run_uri, "data", "papers-qa", "problems.jsonl")).splitlines()]
    (garbled,) = _code(generated["marks"], "GARBLED")
    not_json = [p for p in problems if p["reason"] == "not_json"]
    assert len(not_json) == 1 and "Sure! Here are" in not_json[0]["detail"]
    assert not_json[0]["id"].endswith(f"paper{garbled[1]}.md#0")
    assert [p["reason"] for p in problems].count("duplicate_item") == 1


@pytest.mark.slow
def test_qa_items_are_chats_that_keep_their_source_chunk(generated):
    config = generated["config"]
    rows = _rows(config, "papers-qa")
    items = _generated(config, "papers-qa")
    assert len(rows) == len(items) == 13
    by_id = {item["id"]: item for item in items}
    for row in rows:
        item = by_id[row["id"]]
        chunk = item["source_chunk"]
        assert row["id"].startswith(chunk + "/") and chunk.startswith(item["source_document"] + "#")
        question, answer = row["messages"][0]["content"], row["messages"][1]["content"]
        assert row["messages"][0]["role"] == "user" and row["messages"][1]["role"] == "assistant"
        code = re.search(r"sample (S\d+)", question)
        # Each answer is about the chunk it was generated from (the fake teacher echoes its sample code).
        assert code is None or f"S{Path(item['source_document']).stem[5:]}{chunk[-1]}" == code.group(1)
        assert answer.startswith("Sample ") and row["num_tokens"] > 0
    assert not any("GARBLED" in json.dumps(item) or "Sure!" in json.dumps(item) for item in items)
    assert sum(row["messages"][0]["content"] == "What modulus does nacre have?" for row in rows) == 1


@pytest.mark.slow
def test_preference_pairs_drop_identical_answers(generated):
    config = generated["config"]
    counts = generated["manifests"]["papers-prefs"]["counts"]["generation"]
    assert counts["malformed"] == {"chosen_equals_rejected": 1, "not_json": 1}
    assert counts["items"] == 16 - 2 - 1 and counts["retries"] == 1
    rows = _rows(config, "papers-prefs")
    assert len(rows) == counts["items"]
    for row in rows:
        assert row["chosen"][0]["content"] != row["rejected"][0]["content"]
        assert row["prompt"][0]["role"] == "user" and row["prompt"][0]["content"].startswith("How tough is sample")


@pytest.mark.slow
def test_benchmark_questions_come_only_from_heldout_documents(generated):
    config, heldout = generated["config"], generated["heldout"]
    training_documents = {item["source_document"] for name in ("papers-qa", "papers-prefs") for item in _generated(config, name)}
    benchmark = _generated(config, "papers-bench")
    assert training_documents and not training_documents & heldout
    assert {item["source_document"] for item in benchmark} == heldout
    assert all(item["source_chunk"].split("#")[0] in heldout for item in benchmark)
    counts = generated["manifests"]["papers-bench"]["counts"]
    assert counts["generation"]["heldout_documents"] == 2 and counts["generation"]["chunks_sent"] == 4
    # The evaluation reads them as a benchmark; every item of one document is in one split.
    items = load_benchmark(storage.join(config.run_uri, "data", "papers-bench"))
    assert len(items) == 8 and all(item.type == "short_answer" and item.split in ("validation", "test") for item in items)
    assert all(item.metadata["source_chunk"].split("#")[0] == item.metadata["source_document"] for item in items)
    splits = {}
    for item in items:
        splits.setdefault(item.metadata["source_document"], set()).add(item.split)
    assert all(len(s) == 1 for s in splits.values())


@pytest.mark.slow
def test_a_finished_run_sends_nothing_again(generated):
    assert len(generated["teacher"].requests()) == generated["after_second"]
    assert generated["again"] == generated["manifests"]


def test_what_trains_on_a_generated_data_set_follows_its_answers(generated):
    """The data set's fingerprint is of what was asked: answers asked again (batches and data set
    deleted) came with the same one, and the stages trained on the old answers counted as up to date.
    The manifest's digest of the items now goes into what stages and results are fingerprinted with."""
    import hashlib

    from alloylm.data.prepare import content_fingerprint

    config = generated["config"]
    manifest = generated["manifests"]["papers-qa"]
    items = storage.read_text(storage.join(config.run_uri, "data", "papers-qa", "generated.jsonl"))
    assert manifest["generated_digest"] == hashlib.sha256(items.encode("utf-8")).hexdigest()[:16]
    other = {**manifest, "generated_digest": "0" * 16}
    assert content_fingerprint(other) != content_fingerprint(manifest) != manifest["fingerprint"]
    plain = generated["manifests"]["papers"]  # not generated: its fingerprint as it was
    assert "generated_digest" not in plain and content_fingerprint(plain) == plain["fingerprint"]


@pytest.mark.slow
def test_chunks_answered_in_another_grouping_are_not_sent_again(ray_cluster, fake_teacher, tokenizer_dir, tmp_path):
    """A `max_chunks` trial, then the whole run, then another `batch_chunks`: each chunk is asked
    once, but for one the endpoint refused (too long for it), which is asked again in another
    grouping. The batches regroup the chunks (a batch id hashes its chunks), so before, the whole
    run sent every chunk again and a new `batch_chunks` sent the whole corpus again. The items are
    those of a run from scratch, in the same order; a stray file among the batches is no batch."""
    from alloylm.data.prepare import prepare_all
    from alloylm.generate.run import generate_items

    teacher, url = fake_teacher
    corpus = tmp_path / "papers"
    corpus.mkdir()
    paths = [str(corpus / f"paper{d}.md") for d in range(4)]
    training = [p for p in paths if p not in heldout_documents(paths, HELDOUT["fraction"], HELDOUT["seed"])]
    for d, path in enumerate(paths):  # three paragraphs a document, one chunk each; one the endpoint refuses
        marks = ["TOOLONG" if path == training[0] and p == 1 else "" for p in range(3)]
        Path(path).write_text("\n\n".join(_paragraph(f"S{d}{p}", marks[p]) for p in range(3)) + "\n")

    def generate(storage_uri: str, **settings) -> tuple[int, dict, str]:
        config = generation_config(storage_uri, corpus, tokenizer_dir, url)
        spec = config.datasets["papers-qa"].generate.model_copy(update=settings)
        config.datasets["papers-qa"] = config.datasets["papers-qa"].model_copy(update={"generate": spec})
        (papers,) = prepare_all(config, ["papers"]).values()
        before = len(teacher.requests(0, "qa"))
        report = generate_items(config, "papers-qa", storage.join(config.run_uri, "data", "papers"), papers)
        return len(teacher.requests(0, "qa")) - before, report.counts, storage.read_text(report.items_uri)

    os.environ[KEY_ENV] = API_KEY
    try:
        runs = str(tmp_path / "runs")
        trial, trial_counts, _ = generate(runs, max_chunks=4)
        whole, whole_counts, _ = generate(runs)
        batches = storage.join(generation_uri(generation_config(runs, corpus, tokenizer_dir, url), "papers-qa"), "batches")
        storage.write_json(storage.join(batches, "0-notes.json"), {"by": "a user"})
        regrouped, regrouped_counts, items = generate(runs, batch_chunks=3)
        scratch, scratch_counts, scratch_items = generate(str(tmp_path / "scratch"), batch_chunks=3)
        storage.remove(batches)  # to ask again (docs/generation.md); the chunk index stays behind
        asked_again, _, _ = generate(runs, batch_chunks=2)
    finally:
        del os.environ[KEY_ENV]
    chunks = whole_counts["chunks_sent"]
    refused_in_trial = trial_counts["malformed"].get("rejected_request", 0)
    assert (trial, trial_counts["chunks_sent"], trial_counts["chunks_reused"]) == (4, 4, 0)
    # The trial's answers: in batches the whole run forms again (reused whole, a refusal too) or in
    # its other ones (a refusal asked again). Which, depends on the sample: it hashes the paths.
    assert chunks - 4 <= whole <= chunks - 4 + refused_in_trial and whole_counts["chunks_reused"] <= 4
    assert chunks == scratch == 9
    assert whole_counts["malformed"] == scratch_counts["malformed"] == {"rejected_request": 1}
    assert (regrouped, regrouped_counts["chunks_reused"]) == (1, chunks - 1)  # the refused chunk, asked again
    assert asked_again == chunks  # the index names no batch file that is gone
    assert items == scratch_items and items.count("\n") == 2 * (chunks - 1)  # 2 items a chunk; none for the refused one
    keys = ("requests", "answers", "items", "items_generated", "prompt_tokens", "completion_tokens")
    assert {k: regrouped_counts[k] for k in keys if k in regrouped_counts} == {k: scratch_counts[k] for k in keys if k in scratch_counts}


def test_rejected_request_is_not_retried(fake_teacher):
    _, url = fake_teacher
    from alloylm.config import TeacherConfig

    client = TeacherClient(TeacherConfig(**{**_teacher(url), "max_retries": 3}), "wrong-key", RateLimiter(None))
    with pytest.raises(TeacherCallError, match="HTTP 401.*not retried"):
        client.complete([{"role": "user", "content": "Write 1 about <excerpt>\nsample S1\n</excerpt>"}])
    unreachable = TeacherClient(TeacherConfig(**{**_teacher(f"http://127.0.0.1:{_free_port()}/v1"), "max_retries": 2}), None, RateLimiter(None))
    with pytest.raises(TeacherCallError, match="no answer after 2 retries"):
        unreachable.complete([{"role": "user", "content": "hello"}])


def test_a_chunk_the_endpoint_refuses_is_that_chunks_problem_unless_the_whole_batch_is_refused(fake_teacher, tmp_path):
    """A 400 for one chunk (too long for the teacher's context) failed its batch on every run, so the
    data set could never finish; now the chunk is counted as `rejected_request` and the batch is
    written. A batch whose every request is refused still fails (the endpoint or the settings)."""
    _, url = fake_teacher
    from alloylm.config import TeacherConfig
    from alloylm.generate.teacher import SendBatches

    def request(code, mark=""):
        text = f"Write 1 question about <excerpt>\n{_paragraph(code, mark)}\n</excerpt>"
        return {"chunk_id": f"doc#{code}", "document_id": "doc", "messages": [{"role": "user", "content": text}]}

    sender = SendBatches(TeacherConfig(**_teacher(url)), API_KEY, threads=2, requests_per_second=None, task="qa",
                         items_wanted=1, question_type="short_answer", num_choices=4, batches_uri=str(tmp_path))
    out = sender({"batch_id": ["mixed", "refused"], "requests": [json.dumps([request("S91"), request("S92", "TOOLONG")]),
                                                               json.dumps([request("S93", "TOOLONG"), request("S94", "TOOLONG")])]})
    assert out["error"][0] == "" and "every request of the batch was refused" in out["error"][1] and "HTTP 400" in out["error"][1]
    written = json.loads((tmp_path / "mixed.json").read_text())
    assert [m["reason"] for m in written["malformed"]] == ["rejected_request"] and written["malformed"][0]["chunk_id"] == "doc#S92"
    assert "maximum context length" in written["malformed"][0]["detail"] and len(written["items"]) == 1
    assert not (tmp_path / "refused.json").exists()
    # A 200 that is not a chat completion (a proxy's page) is asked again, like a 5xx: it used to be
    # counted as bad_response at once, and cached as a finished answer.
    out = sender({"batch_id": ["proxy"], "requests": [json.dumps([request("S96", "PROXYPAGE")])]})
    written = json.loads((tmp_path / "proxy.json").read_text())
    assert out["error"] == [""] and written["malformed"] == [] and len(written["items"]) == 1 and written["counts"]["retries"] == 1
    # A batch of one chunk (a document's last, or batch_chunks: 1) cannot tell a chunk from the endpoint: recorded.
    out = sender({"batch_id": ["single"], "requests": [json.dumps([request("S95", "TOOLONG")])]})
    assert out["error"] == [""] and json.loads((tmp_path / "single.json").read_text())["malformed"][0]["reason"] == "rejected_request"


# -------------------------------------------------------------------------------------------
# Our own Serve app as the teacher: a tiny untrained model answers noise
# -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def serve_teacher(ray_cluster, tokenizer_dir, tmp_path_factory):
    from ray import serve

    from alloylm.models import build_model, load_tokenizer, save_model
    from alloylm.serve import ServeConfig, serve_run

    tokenizer = load_tokenizer(tokenizer_dir)
    model_dir = str(tmp_path_factory.mktemp("teacher-model"))
    save_model(build_model("tiny-llama", tokenizer, seed=0), tokenizer, model_dir)
    port = _free_port()
    config = ServeConfig.model_validate(
        {
            "model": "tiny-teacher",
            "app_name": "teacher",
            "route_prefix": "/teacher",
            "port": port,
            "deployment": {"num_cpus": 0.25},
            "ingress": {"num_cpus": 0.1},
            "limits": {"max_prompt_tokens": 2048, "max_tokens": 64, "default_max_tokens": 32},
        }
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield serve_run(config, {"tiny-teacher": model_dir}, blocking=False), model_dir
    finally:
        serve.delete("teacher")
        serve.shutdown()


@pytest.mark.slow
def test_noise_from_our_serve_app_is_counted_and_never_written(serve_teacher, tokenizer_dir, tmp_path):
    from alloylm.data.prepare import prepare_all

    url, _ = serve_teacher
    corpus = tmp_path / "papers"
    corpus.mkdir()
    for d in range(3):
        (corpus / f"paper{d}.md").write_text("\n\n".join(_paragraph(f"S{d}{p}") for p in range(2)) + "\n")
    config = validate_config(
        {
            "experiment": "noise",
            "storage": str(tmp_path / "runs"),
            "tokenizer": {"from": tokenizer_dir},
            "datasets": {
                "papers": {"source": str(corpus), "format": "text"},
                "papers-qa": {
                    "generate": {
                        "from": "papers", "task": "qa", "chunk_chars": 400, "min_chunk_chars": 100, "max_chunks": 3,
                        "teacher": {"base_url": url, "model": "tiny-teacher", "max_tokens": 24, "temperature": 0, "max_retries": 0},
                    }
                },
            },
            "data": {"block_size": 32, "tokenizer_actors": 1, "near_dedup": {"enabled": False}},
        }
    )
    with pytest.raises(TeacherGenerationError, match="none of the teacher's 3 answers gave a usable item"):
        prepare_all(config)
    batches = [storage.read_json(f) for f in storage.list_files(storage.join(generation_uri(config, "papers-qa"), "batches"))]
    malformed = [entry for batch in batches for entry in batch["malformed"]]
    assert sum(batch["counts"]["requests"] for batch in batches) == 3
    assert sum(batch["counts"]["answers"] for batch in batches) == 3
    assert sum(batch["counts"]["completion_tokens"] for batch in batches) > 0  # the model did answer
    assert len(malformed) == 3 and {m["reason"] for m in malformed} <= {"not_json", "truncated", "wrong_shape", "no_items", "empty_answer"}
    assert all(batch["items"] == [] for batch in batches)
    assert not storage.exists(storage.join(generation_uri(config, "papers-qa"), "items.jsonl"))
    assert not storage.is_complete(storage.join(config.run_uri, "data", "papers-qa"))


# -------------------------------------------------------------------------------------------
# Units: config, prompts, parsing, chunking, rate limit
# -------------------------------------------------------------------------------------------


def _dataset(**generate) -> dict:
    return {"generate": {"from": "papers", "task": "qa", "teacher": {"base_url": "http://127.0.0.1:1/v1", "model": "m"}, **generate}}


def test_config_derives_the_format_and_checks_the_generate_block():
    assert DatasetConfig.model_validate(_dataset()).format == "chat"
    assert DatasetConfig.model_validate(_dataset(task="preference")).format == "preference"
    assert DatasetConfig.model_validate(_dataset(task="benchmark")).format == "benchmark"
    bad = {
        "give either `source` or `generate`": {**_dataset(), "source": "./x"},
        "must contain {chunk}": _dataset(prompt="Ask something."),
        "only apply to task `benchmark`": _dataset(question_type="multiple_choice"),
        "heldout.fraction must be above 0": _dataset(task="benchmark", heldout={"fraction": 0}),
        "does not match task": {**_dataset(), "format": "text"},
        "give `source`": {"format": "text"},
        "must not exceed max_concurrency": _dataset(teacher={"base_url": "http://h/v1", "model": "m", "actors": 3, "max_concurrency": 2}),
    }
    for message, raw in bad.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            DatasetConfig.model_validate(raw)
    with pytest.raises(ConfigError, match=r"datasets\.qa\.generate\.teacher: required key is missing"):
        validate_config({"experiment": "x", "tokenizer": {"train": {}}, "datasets": {"qa": {"generate": {"from": "p", "task": "qa"}}}})


def test_generation_problems_name_a_bad_source_and_disagreeing_heldout():
    datasets = {
        "papers": DatasetConfig.model_validate({"source": "./p", "format": "text"}),
        "chats": DatasetConfig.model_validate({"source": "./c.jsonl", "format": "chat"}),
        "qa": DatasetConfig.model_validate(_dataset(heldout={"fraction": 0.2})),
        "bench": DatasetConfig.model_validate(_dataset(task="benchmark", heldout={"fraction": 0.1})),
        "bad": DatasetConfig.model_validate({"generate": {**_dataset()["generate"], "from": "chats"}}),
    }
    assert "must be a `format: text` data set" in datasets["bad"].generation_problems("bad", datasets)[0]
    (problem,) = datasets["qa"].generation_problems("qa", datasets)
    assert "datasets.qa.generate.heldout" in problem and "bench" in problem
    assert datasets["papers"].generation_problems("papers", datasets) == []


def test_prompt_slots_are_filled_once():
    rendered = render_prompt('Chunk: {chunk} n={n} k={choices} {"items": []}', chunk="a {n} b", n=2, choices=4)
    assert rendered == 'Chunk: a {n} b n=2 k=4 {"items": []}'


def test_parse_answer_accepts_good_json_and_names_every_defect():
    request = ChunkRequest("doc#0", "doc", "test")

    def parse(content, task="qa", finish="stop", items_wanted=2, **kw):
        return parse_answer(content, finish, task=task, request=request, items_wanted=items_wanted, **kw)

    good = '<think>plan</think>```json\n{"items": [{"question": "What is nacre made of?", "answer": "Aragonite."}]}\n```'
    records, malformed, extra = parse(good)
    assert records == [{"id": "doc#0/0", "source_chunk": "doc#0", "source_document": "doc",
                        "messages": [{"role": "user", "content": "What is nacre made of?"}, {"role": "assistant", "content": "Aragonite."}]}]
    assert malformed == [] and extra == 0
    three = json.dumps([{"question": f"What is item number {i}?", "answer": "x"} for i in range(3)])
    assert [len(parse(three)[0]), parse(three)[2]] == [2, 1]
    reasons = {
        "not_json": parse("no json here"),
        "truncated": parse('{"items": [{"question": "What', finish="length"),
        "empty_answer": parse("  "),
        "wrong_shape": parse('{"questions": 3}'),
        "missing_field": parse('[{"question": "What is nacre made of?"}]'),
        "too_short": parse('[{"question": "Why?", "answer": "x"}]'),
        "not_self_contained": parse('[{"question": "What does the excerpt say?", "answer": "x"}]'),
        "chosen_equals_rejected": parse('[{"question": "Which is tougher?", "chosen": "Nacre.", "rejected": "nacre"}]', task="preference"),
        "bad_choices": parse('[{"question": "Which is tougher?", "choices": ["a", "b", "c", "d"], "answer_index": 7}]',
                             task="benchmark", question_type="multiple_choice"),
    }
    for reason, (records, malformed, _) in reasons.items():
        assert records == [] and [m.reason for m in malformed] == [reason], (reason, malformed)
    # A broken answer whose first item parses on its own: the item is read, the answer counted as malformed
    # (it used to pass as a whole one-item answer, the other items lost without a trace).
    items = [{"question": f"What is the toughness of material {i}?", "answer": f"{i} MJ/m^3"} for i in range(3)]
    whole = json.dumps({"items": items})
    for content, finish, reason in [(whole[:-2] + ",]}", "stop", "not_json"), (whole[: whole.index('"question"', 80)], "length", "truncated")]:
        records, malformed, _ = parse(content, finish=finish, items_wanted=3)
        assert [r["messages"][0]["content"] for r in records] == [items[0]["question"]], content
        assert [m.reason for m in malformed] == [reason], (content, malformed)
    # Prose with brackets before a whole answer is not a part of anything.
    records, malformed, _ = parse("Here they are [2 items]: " + json.dumps({"items": items[:2]}))
    assert len(records) == 2 and malformed == []
    # A citation before the answer is a JSON list that parses: the answer's JSON after it is taken
    # (the citation was, and every item was lost as wrong_shape).
    records, malformed, _ = parse("As stated in [1] and [2, 3], here: " + json.dumps({"items": items[:2]}))
    assert len(records) == 2 and malformed == []
    records, malformed, _ = parse('[{"question": "Which is tougher?", "choices": ["a", "b", "c", "d"], "answer_index": "C"}]',
                                  task="benchmark", question_type="multiple_choice")
    assert records[0]["answer"] == "c" and records[0]["split"] == "test" and records[0]["type"] == "multiple_choice"


def test_chunks_end_at_paragraphs_and_sentences():
    text = "\n\n".join(["Alpha beta gamma. " * 5, "Delta epsilon. " * 30, "Zeta."])
    chunks = split_document(text, max_chars=200)
    assert all(len(chunk) <= 200 for chunk in chunks)
    assert chunks[0] == ("Alpha beta gamma. " * 5).strip()
    assert all(chunk.endswith(".") for chunk in chunks)
    assert "".join(chunks).replace("\n\n", "").replace(" ", "") == text.replace("\n\n", "").replace(" ", "")


def test_rate_limiter_spaces_request_starts():
    slept: list[float] = []
    limiter = RateLimiter(4.0, clock=lambda: 100.0, sleep=slept.append)  # a clock that stands still
    for _ in range(3):
        limiter.wait()
    assert slept == [0.25, 0.5]


def test_where_the_teacher_is_and_how_hard_it_is_driven_do_not_change_the_data_sets_fingerprint(tmp_path):
    """Moving the teacher or tuning its rate limit after a generation made the data set (and every
    stage trained on it) stale; what changes its answers still does."""
    from alloylm.data.prepare import dataset_fingerprint

    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "paper.txt").write_text("Nacre is tough.")

    def fp(**teacher):
        config = generation_config(str(tmp_path / "runs"), tmp_path / "corpus", "/tok", teacher.pop("base_url", "http://127.0.0.1:9/v1"), **teacher)
        return dataset_fingerprint(config, "papers-qa", "tok")

    base = fp()
    for moved in ({"base_url": "http://10.0.0.7:8000/v1"}, {"max_concurrency": 16, "requests_per_second": 2.0},
                  {"max_retries": 9, "timeout_s": 30.0, "actors": 2, "cpus_per_actor": 0.25}):
        assert fp(**moved) == base, moved
    for changed in ({"temperature": 0.2}, {"model": "another"}, {"max_tokens": 64}):
        assert fp(**changed) != base, changed
