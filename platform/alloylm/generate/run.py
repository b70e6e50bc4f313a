"""One generated data set's items: chunk the source documents, send the unfinished batches to the
teacher on Ray Data, then merge every finished batch into deduplicated, checked items.

Progress lives in `<run>/data/<name>.generation/batches/<batch id>.json`, one file per finished
batch. A batch id is a hash of everything its answers depend on (its chunks' ids and text, the
prompt, the teacher's model and sampling settings), so a rerun after a failure sends only the
batches without a file, and a changed prompt or corpus sends only what changed. Each chunk has
such a key too: a chunk answered in a batch of another grouping (another `batch_chunks`, a
`max_chunks` trial before the whole run) is taken from there, not sent again. The merged items
go to `<run>/data/<name>.generation/items.jsonl`, which data preparation then reads as the data
set's source.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow.parquet as pq

from alloylm import storage
from alloylm.artifact import fingerprint
from alloylm.config import GenerateConfig, RunConfig
from alloylm.errors import DataPreparationError
from alloylm.generate.chunks import Chunk, benchmark_split, document_chunks, heldout_documents, sample_chunks
from alloylm.generate.parse import dedup_key
from alloylm.generate.prompts import SYSTEM_PROMPT, builtin_prompt, render_prompt
from alloylm.generate.teacher import COUNTS, SendBatches, batch_counts, index_chunks, threads_per_actor

log = logging.getLogger("alloylm.generate")
MAX_FAILURES_SHOWN = 3


class TeacherGenerationError(DataPreparationError):
    """Generation that cannot finish: failed batches (kept progress named), no usable item, bad input."""


@dataclass(frozen=True)
class GenerationReport:
    """What a generation produced: counts for the manifest and one problem per dropped answer or item."""

    items_uri: str
    counts: dict[str, Any]
    problems: list[dict[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class _Batch:
    id: str
    chunks: list[Chunk]
    splits: list[str]
    # Per chunk: a hash of everything its answer depends on (as the batch id is for the batch), so
    # that a chunk answered in a batch of another grouping (another `batch_chunks`, or a `max_chunks`
    # trial before the whole run) is not sent again.
    keys: list[str]


def generation_uri(config: RunConfig, name: str) -> str:
    """Where generation keeps its progress for data set `name` (outside the artifact, kept on success)."""
    from alloylm.layout import RunLayout

    return RunLayout.of(config).generation(name)


def generated_items_uri(config: RunConfig, name: str) -> str:
    """The JSON lines file of the items last generated for data set `name`."""
    return storage.join(generation_uri(config, name), "items.jsonl")


def prompt_template(spec: GenerateConfig) -> str:
    """The user prompt template: `prompt`, the text of `prompt_file`, or the task's built-in one."""
    if spec.prompt is not None:
        return spec.prompt
    if spec.prompt_file is not None:
        try:
            template = storage.read_text(spec.prompt_file)
        except storage.StorageError as exc:
            raise TeacherGenerationError(f"generate.prompt_file: {exc}") from None
        if "{chunk}" not in template:
            raise TeacherGenerationError(f"generate.prompt_file {spec.prompt_file}: the template has no {{chunk}}, where the chunk's text goes")
        return template
    return builtin_prompt(spec.task, spec.question_type)


def read_documents(from_uri: str, manifest: dict) -> list[tuple[str, str]]:
    """(id, text) of every document a prepared text data set kept, in its written order."""
    files = manifest.get("documents")
    if files is None:
        raise TeacherGenerationError(
            f"{from_uri} keeps no documents/ (prepared by an older AlloyLM): remove that folder and run `alloylm data` again"
        )
    documents: list[tuple[str, str]] = []
    for relative in files:
        fs, path = storage.arrow_filesystem(storage.join(from_uri, *relative.split("/")))
        table = pq.read_table(path, filesystem=fs, columns=["id", "text"])
        documents += zip(table.column("id").to_pylist(), table.column("text").to_pylist())
    return documents


def _plan(spec: GenerateConfig, documents: list[tuple[str, str]], template: str) -> tuple[list[_Batch], dict[str, int]]:
    """The batches of chunks to send (held-out documents only for benchmarks, never for training data)."""
    heldout = heldout_documents([doc_id for doc_id, _ in documents], spec.heldout.fraction, spec.heldout.seed)
    chunks: list[Chunk] = []
    too_short = total = 0
    for doc_id, text in sorted(documents):
        if (doc_id in heldout) != (spec.task == "benchmark"):
            continue
        found, short = document_chunks(doc_id, text, spec.chunk_chars, spec.min_chunk_chars)
        chunks += found
        total += len(found) + short
        too_short += short
    chosen = sample_chunks(chunks, spec.max_chunks, spec.heldout.seed)
    teacher = spec.teacher
    # What an answer depends on; where the endpoint is, and how hard it is driven, does not count.
    answer_inputs = fingerprint(
        spec.task, template, spec.system_prompt or SYSTEM_PROMPT, teacher.model, teacher.temperature, teacher.max_tokens,
        teacher.extra_body, spec.items_per_chunk, spec.question_type, spec.num_choices,
    )
    by_document: dict[str, list[Chunk]] = {}
    for chunk in chosen:
        by_document.setdefault(chunk.document_id, []).append(chunk)
    batches = []
    # Batches never span documents: a new or changed paper changes only its own batches.
    for doc_id, doc_chunks in by_document.items():
        split = benchmark_split(doc_id, spec.heldout.validation_fraction, spec.heldout.seed) if spec.task == "benchmark" else ""
        for start in range(0, len(doc_chunks), spec.batch_chunks):
            group = doc_chunks[start : start + spec.batch_chunks]
            digest = hashlib.sha256(json.dumps([answer_inputs, split, [[c.id, c.text] for c in group]]).encode("utf-8"))
            keys = [hashlib.sha256(json.dumps([answer_inputs, split, c.id, c.text]).encode("utf-8")).hexdigest()[:24] for c in group]
            batches.append(_Batch(digest.hexdigest()[:24], group, [split] * len(group), keys))
    counts = {
        "documents": len(documents),
        "heldout_documents": len(heldout),
        "documents_used": len(by_document),
        "chunks": total,
        "chunks_too_short": too_short,
        "chunks_sent": len(chosen),
    }
    return batches, counts


def _requests_json(spec: GenerateConfig, batch: _Batch, template: str) -> str:
    system = spec.system_prompt or SYSTEM_PROMPT
    requests = []
    for chunk, split, key in zip(batch.chunks, batch.splits, batch.keys):
        prompt = render_prompt(template, chunk=chunk.text, n=spec.items_per_chunk, choices=spec.num_choices)
        requests.append(
            {
                "chunk_id": chunk.id,
                "chunk_key": key,
                "document_id": chunk.document_id,
                "split": split,
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": prompt}],
            }
        )
    return json.dumps(requests)


def _send(spec: GenerateConfig, pending: list[_Batch], template: str, batches_uri: str) -> list[dict]:
    """Send `pending` batches through a Ray Data actor pool; one status row per batch."""
    import ray.data

    teacher = spec.teacher
    api_key = None
    if teacher.api_key_env:
        api_key = os.environ.get(teacher.api_key_env)
        if not api_key:
            raise TeacherGenerationError(f"generate.teacher.api_key_env: environment variable {teacher.api_key_env} is not set")
    actors = min(teacher.actors, len(pending))
    rows = [{"batch_id": b.id, "requests": _requests_json(spec, b, template)} for b in pending]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    statuses = ds.map_batches(
        SendBatches,
        fn_constructor_kwargs={
            "teacher": teacher,
            # From the driver's environment; it travels to the actors in memory only.
            "api_key": api_key,
            "threads": threads_per_actor(teacher.max_concurrency, teacher.actors),
            "requests_per_second": teacher.requests_per_second / teacher.actors if teacher.requests_per_second else None,
            "task": spec.task,
            "items_wanted": spec.items_per_chunk,
            "question_type": spec.question_type,
            "num_choices": spec.num_choices,
            "batches_uri": batches_uri,
            "chunks_uri": chunks_uri(batches_uri),
        },
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=teacher.cpus_per_actor,
    )
    return statuses.take_all()


def chunks_uri(batches_uri: str) -> str:
    """The chunk index beside the batch files: `<name>.generation/chunks/<chunk key>.<batch id>`."""
    return batches_uri.rstrip("/").removesuffix("batches") + "chunks"


def _answered_chunks(batches_uri: str, wanted: set[str], finished: set[str], *, skip: set[str] = frozenset(),
                     ask_refused_again: bool = True) -> dict[str, dict]:
    """chunk key -> its answer ({"items", "malformed", "counts"}), for the chunks in `wanted` that
    the chunk index finds in a batch of `finished` (whose file is there: the index outlives a
    deleted `batches/`) not in `skip`. One listing of the index, then
    only the batch files that hold a wanted chunk are read. A chunk the endpoint refused
    (`rejected_request`) in another grouping is asked again: the endpoint may have changed."""
    holders: dict[str, str] = {}
    for uri in storage.list_files(chunks_uri(batches_uri)) if wanted else []:
        key, _, batch_id = os.path.basename(uri).partition(".")
        if key in wanted and batch_id in finished and batch_id not in skip:
            holders.setdefault(key, batch_id)
    found: dict[str, dict] = {}
    for batch_id in sorted(set(holders.values())):
        document = storage.read_json(storage.join(batches_uri, f"{batch_id}.json"))
        for chunk_id, key, counts in zip(document["chunks"], document.get("chunk_keys") or [], document.get("per_chunk") or []):
            if holders.get(key) != batch_id or key in found:
                continue
            malformed = [entry for entry in document["malformed"] if entry["chunk_id"] == chunk_id]
            if ask_refused_again and any(entry["reason"] == "rejected_request" for entry in malformed):
                continue
            found[key] = {
                "items": [item for item in document["items"] if item.get("source_chunk") == chunk_id],
                "malformed": malformed,
                "counts": counts,
            }
    return found


def _assembled(batch: _Batch, answers: dict[str, dict]) -> dict:
    """The finished-batch file of `batch`, from answers its chunks got in other batches."""
    parts = [answers[key] for key in batch.keys]
    per_chunk = [part["counts"] for part in parts]
    return {
        "batch_id": batch.id, "chunks": [chunk.id for chunk in batch.chunks], "chunk_keys": list(batch.keys),
        "per_chunk": per_chunk, "counts": batch_counts(per_chunk),
        "items": [item for part in parts for item in part["items"]],
        "malformed": [entry for part in parts for entry in part["malformed"]],
    }


def _with_earlier_answers(
    pending: list[_Batch], batches: list[_Batch], batches_uri: str, finished: set[str]
) -> tuple[list[_Batch], dict, list[_Batch]]:
    """What is left to send of the unfinished batches once chunks answered in an earlier grouping
    are taken out: (batches to send, the earlier answers, the unfinished batches that need them).
    A batch some of whose chunks were answered is sent as a batch of the rest, under an id of its own."""
    wanted = {key for batch in pending for key in batch.keys}
    answers = _answered_chunks(batches_uri, wanted, finished, skip={batch.id for batch in batches})
    to_send, assembled = [], []
    for batch in pending:
        rest = [i for i, key in enumerate(batch.keys) if key not in answers]
        if len(rest) == len(batch.chunks):
            to_send.append(batch)
            continue
        assembled.append(batch)
        if rest:
            digest = hashlib.sha256(json.dumps([batch.id, [batch.keys[i] for i in rest]]).encode("utf-8")).hexdigest()[:24]
            to_send.append(_Batch(digest, [batch.chunks[i] for i in rest], [batch.splits[i] for i in rest], [batch.keys[i] for i in rest]))
    return to_send, answers, assembled


def _merge(batches: list[_Batch], batches_uri: str) -> tuple[list[dict], dict[str, Any], list[dict]]:
    """Every finished batch, in batch order -> (unique items, counts, problems)."""
    items: list[dict] = []
    seen: dict[str, str] = {}
    malformed: Counter = Counter()
    totals: Counter = Counter()
    problems: list[dict] = []
    for batch in batches:
        document = storage.read_json(storage.join(batches_uri, f"{batch.id}.json"))
        totals.update(document["counts"])
        for entry in document["malformed"]:
            malformed[entry["reason"]] += 1
            problems.append({"id": entry["chunk_id"], "origin": "teacher", "reason": entry["reason"], "detail": entry["detail"]})
        for item in document["items"]:
            key = dedup_key(item)
            if key in seen:
                totals["duplicates"] += 1
                problems.append({"id": item["id"], "origin": "teacher", "reason": "duplicate_item", "detail": f"asks what {seen[key]} asks"})
                continue
            seen[key] = item["id"]
            items.append(item)
    counts = {key: int(totals[key]) for key in COUNTS if key != "items"}
    counts.update(items_generated=int(totals["items"]), duplicates=int(totals["duplicates"]), items=len(items),
                  malformed=dict(sorted(malformed.items())))
    return items, counts, problems


def generate_items(config: RunConfig, name: str, from_uri: str, from_manifest: dict) -> GenerationReport:
    """Generate (or resume generating) the items of data set `name` from the prepared text data set at
    `from_uri`; writes them to `generated_items_uri(config, name)`.

    Raises TeacherGenerationError when a batch failed (every finished batch is kept: run again to resume)
    or when no answer gave a usable item.
    """
    spec = config.datasets[name].generate
    started = time.monotonic()
    template = prompt_template(spec)
    documents = read_documents(from_uri, from_manifest)
    batches, counts = _plan(spec, documents, template)
    if not batches:
        which = "held-out" if spec.task == "benchmark" else "training (not held-out)"
        raise TeacherGenerationError(
            f"data set {name!r}: no {which} document of {spec.from_!r} has a chunk of at least "
            f"{spec.min_chunk_chars} characters to send ({counts['documents']} documents, {counts['heldout_documents']} held out)"
        )
    batches_uri = storage.join(generation_uri(config, name), "batches")
    finished = {os.path.basename(uri).removesuffix(".json") for uri in storage.list_files(batches_uri)}
    pending = [batch for batch in batches if batch.id not in finished]
    to_send, answers, assembled = _with_earlier_answers(pending, batches, batches_uri, finished)
    chunks_reused = len(answers)
    log.info(
        "generate %s: %d chunks in %d batches, %d already finished, %d chunk(s) answered in batches of another grouping; "
        "sending %d batch(es) to %s (%s)",
        name, counts["chunks_sent"], len(batches), len(batches) - len(pending), len(answers), len(to_send),
        spec.teacher.model, spec.teacher.base_url,
    )
    if to_send:
        failed = [status for status in _send(spec, to_send, template, batches_uri) if status["error"]]
        if failed:
            shown = "; ".join(f"batch {s['batch_id']}: {s['error']}" for s in failed[:MAX_FAILURES_SHOWN])
            done = {os.path.basename(uri).removesuffix(".json") for uri in storage.list_files(batches_uri)}
            raise TeacherGenerationError(
                f"data set {name!r}: {len(failed)} of {len(to_send)} batches failed ({shown}). The "
                f"{sum(batch.id in done for batch in batches)} finished ones of its {len(batches)}, and every answer "
                f"received, are kept in {batches_uri} and are not sent again: run again to resume"
            )
    if assembled:
        sent = {batch.id for batch in to_send} - {batch.id for batch in pending}  # the batches of the rest
        wanted = {key for batch in assembled for key in batch.keys if key not in answers}
        answers.update(_answered_chunks(batches_uri, wanted, sent, ask_refused_again=False))  # what this run was sent
        for batch in assembled:  # every chunk answered now: written as the batch, as the teacher's actors write one
            storage.write_json(storage.join(batches_uri, f"{batch.id}.json"), _assembled(batch, answers))
            index_chunks(chunks_uri(batches_uri), batch.id, batch.keys)
    items, merged, problems = _merge(batches, batches_uri)
    counts.update(merged, batches=len(batches), batches_reused=len(batches) - len(pending), chunks_reused=chunks_reused,
                  seconds=round(time.monotonic() - started, 3))
    if not items:
        first = "; ".join(f"{p['reason']}: {p['detail']}" for p in problems[:MAX_FAILURES_SHOWN])
        raise TeacherGenerationError(
            f"data set {name!r}: none of the teacher's {counts['answers']} answers gave a usable item "
            f"(malformed: {counts['malformed']}){': ' + first if first else ''}. The answers are kept in {batches_uri}; "
            "remove that folder to ask again"
        )
    items_uri = generated_items_uri(config, name)
    storage.write_text(items_uri, "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items))
    log.info("generate %s: %d items (%d duplicates, malformed %s, %d retries)", name, len(items), counts["duplicates"],
             counts["malformed"] or "none", counts["retries"])
    return GenerationReport(items_uri=items_uri, counts=counts, problems=problems)

