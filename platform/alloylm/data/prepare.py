"""Data preparation on Ray Data: the run's tokenizer, then every data set read, cleaned,
deduplicated, tokenized (actor pool) and written as parquet shards with a manifest of counts.

Per data set: one Ray Data pass reads and cleans (tasks: normalisation, length filters, content
hash, MinHash signature) into the object store; the driver decides the duplicates from hashes and
signatures only; a second pass drops them and tokenizes (an actor pool sized to the work), then
the shards are written from that result.

Artifacts: `<run>/tokenizer/` and `<run>/data/<name>/` (`shards/*.parquet`, `problems.jsonl`,
`resolved_config.yaml`, `manifest.json` written last; text data sets also keep their cleaned,
deduplicated documents in `documents/*.parquet`). An artifact whose fingerprint matches is
reused, not rebuilt.

A `generate` data set is prepared after the text data set it reads: its teacher writes items from
that data set's documents (`alloylm.generate`), which then go through the same pipeline; the
manifest adds the generation's counts, and `generated.jsonl` keeps every item with its source chunk.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from alloylm import storage
from alloylm import artifact as lifecycle
from alloylm.artifact import fingerprint
from alloylm.layout import RunLayout
from alloylm.config import DataPrepConfig, RunConfig
from alloylm.errors import DataPreparationError as _DataPreparationError
from alloylm.timing import PhaseClock
from alloylm.data import clean, minhash
from alloylm.corpus import BUILTIN_FORMATS
from alloylm.data.sources import SourceError, read_dataset, visible_files
from alloylm.data.tokenize import (
    BackendTokenizerState,
    PackTokenBlocks,
    RenderChats,
    RenderPreferences,
    benchmark_rows,
    blocks_table,
)

log = logging.getLogger("alloylm.data")
MAX_PROBLEMS_SHOWN = 10
# Tokenizer batches per packing task: fewer, larger tasks cost less scheduling and fewer blocks.
BATCHES_PER_TOKENIZER_TASK = 8
# A data set manifest's `breakdown`: where its `seconds` went, in this order (a phase that did not
# run is absent).
DATA_PHASES = {
    "generate": "a generated data set: preparing its source and running the teacher (or resuming it)",
    "read_clean": "Ray Data pass 1: reading the sources, normalising, length filters, content hashes, MinHash signatures",
    "dedup": "on the driver: exact and near duplicates from the hashes and signatures",
    "tokenize": "Ray Data pass 2: dropping the duplicates, tokenizing and packing (text: each full shard of blocks and of kept documents written as its rows arrive) or rendering chats (actor pool)",
    "write_shards": "the parquet shards, every one but the last full (text: the last, partial shards of the blocks and of the kept documents, `documents/`, which generated data sets read; the others are written during tokenize)",
    "tails": "text: the per-batch leftovers packed together on the driver",
    "finish": "problems.jsonl, the generated items, listing the shards",
}


# A data set that cannot be prepared (no usable record, unreadable source); defined with the
# other errors so that alloylm.generate can raise it without importing this module.
DataPreparationError = _DataPreparationError


def content_fingerprint(manifest: dict) -> str:
    """What identifies a prepared data set's content for what is trained or scored on it: its
    fingerprint, and for a generated one the digest of the items the teacher gave."""
    digest = manifest.get("generated_digest")
    return fingerprint("dataset-content", manifest["fingerprint"], digest) if digest else manifest["fingerprint"]


def tokenizer_uri(config: RunConfig) -> str:
    return RunLayout.of(config).tokenizer


def dataset_uri(config: RunConfig, name: str) -> str:
    return RunLayout.of(config).dataset(name)


# Signatures already taken in this call (`_signatures_once`): the current and the earlier formula
# of a fingerprint list every source once, not once each (an S3 source of many objects is slow to list).
_SIGNATURES: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("alloylm_source_signatures", default=None)


@contextlib.contextmanager
def _signatures_once() -> Iterator[None]:
    token = _SIGNATURES.set({})
    try:
        yield
    finally:
        _SIGNATURES.reset(token)


def _source_signature(source: str, every_file: bool = False) -> Any:
    """What identifies a source's current content, for the fingerprint: of a folder, the files read
    (`every_file`: all of them, hidden ones too, as fingerprints made before 2026-12-05 took)."""
    cache = _SIGNATURES.get()
    if cache is None:
        signature = _take_signature(source)
    else:
        if source not in cache:
            cache[source] = _take_signature(source)
        signature = cache[source]
    if every_file or source.startswith(("builtin:", "hf:")):
        return signature
    # What is read, not what is there: a git checkout's .git/ or a notebook's checkpoints change
    # without any document changing.
    shown = set(visible_files(source, [entry[0] for entry in signature]))
    return [entry for entry in signature if entry[0] in shown] or _nothing_there(source)


def _nothing_there(source: str):
    raise SourceError(f"no such file or folder, or nothing in it: {source}")


def _take_signature(source: str) -> Any:
    if source.startswith("builtin:"):
        return source
    if source.startswith("hf:"):
        folder = os.path.expanduser(source[3:])
        state = os.path.join(folder, "state.json")
        if os.path.isfile(state):
            with open(state, encoding="utf-8") as f:
                return [source, json.load(f).get("_fingerprint")]
        if os.path.isfile(os.path.join(folder, "dataset_dict.json")):
            # a DatasetDict saved with save_to_disk: each split keeps its own state.json
            splits = {}
            for name in sorted(os.listdir(folder)):
                if os.path.isfile(os.path.join(folder, name, "state.json")):
                    with open(os.path.join(folder, name, "state.json"), encoding="utf-8") as f:
                        splits[name] = json.load(f).get("_fingerprint")
            return [source, splits]
        return source  # a Hub id: its name
    try:
        listing = storage.file_signatures(source)
    except storage.StorageError as exc:
        raise SourceError(str(exc)) from None
    return listing or _nothing_there(source)


def check_sources(config: RunConfig, names: list[str] | None = None) -> None:
    """A SourceError for the first source of the data sets `names` (default: all) that lists
    nothing: `alloylm data` calls it before it starts a Ray cluster, so a mistyped path fails in
    a second or two, not after the cluster's start-up."""
    from alloylm.data.sources import expand_files

    for name in names or list(config.datasets):
        if name in config.datasets:  # an unknown name is prepare_all's error, with the known ones
            for source in config.datasets[name].sources:
                if not source.startswith(("builtin:", "hf:")):
                    expand_files(source)  # one listing, no per-file metadata (the fingerprint reads that later)


def _prompt_signature(config: RunConfig, name: str) -> str | None:
    """The text of a generated data set's prompt file: an edited prompt is a changed input."""
    spec = config.datasets[name].generate
    if spec is None or spec.prompt_file is None:
        return None
    try:
        return storage.read_text(spec.prompt_file)
    except storage.StorageError as exc:
        raise DataPreparationError(f"datasets.{name}.generate.prompt_file: {exc}") from None


# The `data:` settings a format's output does not depend on: only text documents are filtered by
# length, near-deduplicated and packed into blocks, and a benchmark keeps every item (no exact dedup).
# Every format reads `batch_size` (task boundaries) and `rows_per_shard` (the shard files).
_TEXT_ONLY = {"block_size", "tail", "min_chars", "max_chars", "near_dedup"}
_PREP_UNUSED = {"chat": _TEXT_ONLY, "preference": _TEXT_ONLY, "benchmark": _TEXT_ONLY | {"exact_dedup"}}
_PREP_NEVER = {"tokenizer_actors", "cpus_per_tokenizer_actor"}  # how fast, not what


def dataset_fingerprint(
    config: RunConfig, name: str, tokenizer_fingerprint: str, *, legacy: bool = False, near_family: bool = True
) -> str:
    """What a prepared data set is made from: its config, the `data:` settings its format uses,
    its sources' content, the tokenizer. `legacy`: the fingerprint as made before 2026-12-05, which
    hashed every `data:` setting into every format; a data set prepared then and unchanged since is
    still up to date (`_reusable`), so no existing run prepares or retrains anything for the change.
    `near_family=False` leaves the MinHash family out: only the tokenizer's earlier formula, which
    took these fingerprints of the data sets it read, wants them as they were then."""
    dataset = config.datasets[name]
    unused = set() if legacy else _PREP_UNUSED.get(dataset.format, set())
    prep = config.data.model_dump(mode="json", exclude=_PREP_NEVER | unused)
    if near_family and dataset.format == "text" and prep["near_dedup"]["enabled"]:
        # Near-duplicates found with another MinHash family are another data set (minhash.FAMILY);
        # this applies to the earlier formula too, so no data set made with the old family is reused.
        prep["near_dedup"]["family"] = minhash.FAMILY
    if dataset.generate is not None:
        from alloylm.generate.config import TRANSPORT_FIELDS

        upstream = dataset_fingerprint(config, dataset.generate.from_, tokenizer_fingerprint, legacy=legacy, near_family=near_family)
        # Where the teacher is and how hard it is driven change no answer (as for the batch ids).
        answers = _dataset_fields(dataset, exclude={"generate": {"teacher": set(TRANSPORT_FIELDS)}})
        return fingerprint("dataset", answers, prep, upstream, _prompt_signature(config, name), tokenizer_fingerprint)
    builtin, sources = _source_parts(config, dataset, every_file=legacy)
    return fingerprint("dataset", _dataset_fields(dataset), prep, builtin, sources, tokenizer_fingerprint)


def _source_parts(config: RunConfig, dataset, every_file: bool = False) -> tuple[dict | None, list]:
    """The built-in world's settings (where a source is built in) and each source's signature."""
    builtin = config.builtin.model_dump(mode="json") if any(s.startswith("builtin:") for s in dataset.sources) else None
    if builtin is not None and (builtin["short_answer_per_fact"] == 1 or "builtin:biomaterials-benchmark" not in dataset.sources):
        # Only the benchmark reads it: more short-answer items must not retrain every model, and
        # at its default the fingerprints stay those of runs made before the option existed.
        del builtin["short_answer_per_fact"]
    if builtin is not None and builtin["holdout"] == "fact":
        del builtin["holdout"]  # the default: fingerprints stay those of runs made before the option existed
    return builtin, [_source_signature(s, every_file) for s in dataset.sources]


def _tokenizer_input(config: RunConfig, name: str) -> str:
    """What the tokenizer reads of data set `name`: its records as read (`_tokenizer_training_texts`),
    before any `data:` setting cleans, filters or packs them."""
    dataset = config.datasets[name]
    return fingerprint("tokenizer-input", _dataset_fields(dataset), *_source_parts(config, dataset))


def _reusable(uri: str, config: RunConfig, fingerprints: Callable[[RunConfig, bool], str]) -> tuple[str, dict | None]:
    """The artifact's fingerprint, and the manifest of the one at `uri` if it is up to date: under
    its fingerprint by the current formula, or made before that formula (2026-12-05) and unchanged
    since in anything the current formula takes. `fingerprints(config, earlier)` gives the one by
    the current formula, or (`earlier`) by the one before. An artifact made before keeps its fingerprint (so do the fingerprints of everything
    made from it): its earlier-formula fingerprint is taken with the `data:` settings it was made
    with (its `resolved_config.yaml`), so that a `data:` setting its format does not use may have
    changed since."""
    with _signatures_once():
        fp = fingerprints(config, False)
        manifest = lifecycle.up_to_date(uri, fp)
        if manifest is not None:
            return fp, manifest
        manifest = storage.read_manifest(uri)
        if manifest is None:
            return fp, None
        then = config.model_copy(update={"data": _data_settings_made_with(uri) or config.data})
        same = fingerprints(then, False) == fp and manifest.get("fingerprint") == fingerprints(then, True)
    return fp, (manifest if same else None)


def _data_settings_made_with(uri: str) -> DataPrepConfig | None:
    """The `data:` settings of the run config an artifact recorded (None where it cannot be read)."""
    import yaml

    try:
        text = storage.read_text(storage.join(uri, "resolved_config.yaml"))  # a storage outage is raised
    except storage.StorageNotFoundError:
        return None
    try:
        return DataPrepConfig.model_validate(yaml.safe_load(text)["data"])
    except Exception:  # unreadable or of another version: judged by the current settings
        return None


def _dataset_fields(dataset, **dump) -> dict:
    """A data set's config as its fingerprint takes it: `hf_revision` only when set, so that the
    fingerprints of data sets made before the option existed stay the same."""
    fields = dataset.model_dump(mode="json", by_alias=True, **dump)
    if fields.get("hf_revision") is None:
        fields.pop("hf_revision", None)
    return fields


def _write_local_dir_to(local_dir: str, uri: str) -> None:
    if storage.is_remote(uri):
        storage.upload_dir(local_dir, uri)
    else:
        for root, _, files in os.walk(local_dir):
            for file in files:
                src = os.path.join(root, file)
                dst = os.path.join(uri, os.path.relpath(src, local_dir))
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                # shutil.move renames where it can and copies across file systems (storage on
                # another disk, tmpfs or NFS than the temporary folder), where os.replace fails (EXDEV).
                shutil.move(src, dst)


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def _tokenizer_datasets(config: RunConfig) -> list[str]:
    """The data sets whose text trains the tokenizer: those named, or every text and chat data set
    that is read rather than generated (generation needs the tokenizer first)."""
    named = config.tokenizer.train.datasets
    if named:
        generated = [n for n in named if config.datasets[n].generate is not None]
        if generated:
            raise DataPreparationError(
                f"tokenizer.train.datasets: {', '.join(generated)} is generated, and generation needs the tokenizer "
                "first; train it on the data sets generation reads"
            )
        return list(named)
    return [n for n, d in config.datasets.items() if d.format in ("text", "chat") and d.generate is None]


def _tokenizer_training_texts(config: RunConfig, limit: int):
    for name in _tokenizer_datasets(config):
        ds = read_dataset(config, name).filter(expr="drop_reason == ''").limit(limit)
        for batch in ds.iter_batches(batch_size=1024, batch_format="numpy"):
            for record in batch["record"]:
                parsed = json.loads(record)
                if "text" in parsed:
                    yield parsed["text"]
                else:
                    for key in ("messages", "prompt", "chosen", "rejected"):
                        for message in parsed.get(key, []):
                            yield message["content"]


def prepare_tokenizer(config: RunConfig) -> dict:
    """Train (or fetch) the run's tokenizer into `<run>/tokenizer/`; returns its manifest."""
    from alloylm.models.loading import check_tokenizer_folder, load_tokenizer, model_source_id
    from alloylm.models.tokenizer import train_tokenizer

    uri = tokenizer_uri(config)
    spec = config.tokenizer
    if spec.train:
        chosen = _tokenizer_datasets(config)  # raises on a generated data set, before any work
        names = spec.train.datasets or sorted(chosen)
        if not names:
            raise DataPreparationError("tokenizer.train: the run has no text or chat data set to train a tokenizer on")
    settings = spec.model_dump(mode="json", by_alias=True)

    def fingerprints(config: RunConfig, earlier: bool) -> str:
        if not spec.train:
            return fingerprint("tokenizer", settings, [model_source_id(spec.from_)])
        if earlier:
            # The tokenizer reads the records before any cleaning: its earlier formula stays what it
            # was, without the MinHash family (a tokenizer made then is still the same tokenizer).
            earlier_inputs = [dataset_fingerprint(config, n, "", legacy=True, near_family=False) for n in names]
            return fingerprint("tokenizer", settings, earlier_inputs)
        return fingerprint("tokenizer", settings, [_tokenizer_input(config, n) for n in names])

    fp, manifest = _reusable(uri, config, fingerprints)
    if manifest:
        try:
            check_tokenizer_folder(uri)  # one listing: every step that tokenizes starts here
        except storage.CorruptFileError as exc:
            raise storage.CorruptFileError(f"{exc}; its manifest says the tokenizer is complete: delete {uri} to rebuild it") from None
        log.info("tokenizer: up to date (%s)", uri)
        return manifest
    started = time.monotonic()
    with lifecycle.begin(uri, fp, config) as artifact:
        if spec.train:
            import ray.data

            # Which documents train it (the first `max_documents` of each data set) must not depend
            # on which read task finished first: in input order, as every data set is prepared.
            ray.data.DataContext.get_current().execution_options.preserve_order = True
            log.info("tokenizer: training byte-level BPE (vocab %d) on %s", spec.train.vocab_size, ", ".join(names))
            tokenizer = train_tokenizer(
                _tokenizer_training_texts(config, spec.train.max_documents),
                vocab_size=spec.train.vocab_size,
                min_frequency=spec.train.min_frequency,
            )
        else:
            log.info("tokenizer: taking the tokenizer of %s", spec.from_)
            tokenizer = load_tokenizer(spec.from_, trust_remote_code=config.trust_remote_code)
        tokenizer.model_max_length = spec.model_max_length
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.save_pretrained(tmp)
            _write_local_dir_to(tmp, artifact.staging_uri)
        return artifact.commit(
            {
                "kind": "tokenizer",
                "vocab_size": len(tokenizer),
                "eos_token": tokenizer.eos_token,
                "has_chat_template": bool(tokenizer.chat_template),
                "seconds": round(time.monotonic() - started, 3),
            }
        )


# ---------------------------------------------------------------------------------------------
# One data set
# ---------------------------------------------------------------------------------------------


def _clean_batch(
    batch: dict[str, np.ndarray], fmt: str, min_chars: int, max_chars: int, exact: bool, near: dict | None
) -> pa.Table:
    """Ray Data UDF: normalise records, set length drop reasons, add the content hash (if `exact`:
    only exact dedup reads it) and the MinHash signature (if `near`)."""
    records, reasons, hashes, details = [], [], [], []
    signed_rows, signed_texts = [], []
    rows = zip(batch["record"], batch["drop_reason"], batch["origin"], batch["detail"])
    for row, (record_json, reason, origin, detail) in enumerate(rows):
        if reason:
            records.append(record_json)
            hashes.append("")
        else:
            parsed = json.loads(record_json)
            record = clean.normalise_record(parsed, fmt)
            reason = clean.drop_reason(record, fmt, min_chars=min_chars, max_chars=max_chars)
            # The reader wrote `record_json` with clean.record_json: where normalising changed
            # nothing (most records), it is already this record's JSON.
            records.append(record_json if record == parsed else clean.record_json(record))
            hashes.append(clean.content_hash(record) if exact else "")
            if reason:
                detail = f"{origin}: {reason.replace('_', ' ')} ({len(record.get('text', ''))} characters)"
            elif near:
                signed_rows.append(row)
                signed_texts.append(record["text"])
        reasons.append(reason)
        details.append(detail)
    table = {"id": batch["id"], "origin": batch["origin"], "detail": details}
    table.update(record=records, drop_reason=reasons, content_hash=hashes)
    out = pa.table({k: pa.array(list(v), pa.string()) for k, v in table.items()})
    if near:
        # One batched MinHash call for the whole block; a fixed-size list column (null where the
        # record is dropped) lets the driver read all signatures as one numpy matrix.
        num_perm = near["num_perm"]
        values = np.zeros((len(records), num_perm), dtype=np.uint32)
        values[signed_rows] = minhash.signatures(signed_texts, num_perm, near["shingle_chars"])
        unsigned = np.ones(len(records), dtype=bool)
        unsigned[signed_rows] = False
        signatures = pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), num_perm, mask=pa.array(unsigned))
        out = out.append_column("signature", signatures)
    return out


def _row_key(id_: str, origin: str) -> str:
    """What names one row in dedup: its id and where it came from. A source's own ids may repeat
    (files each numbering from 1, a chunked corpus repeating its document's id), and so may an
    origin (every row of a built-in source); the pair does not. The separator sorts below every
    printable character, so keys sort as their ids do."""
    return f"{id_}\x1f{origin}"


def _drop_duplicates(batch: pa.Table, duplicates: dict[str, str], columns: tuple[str, ...] = ("id", "record")) -> pa.Table:
    """Ray Data UDF: keep rows without a drop reason that are not a duplicate (by `_row_key`)."""
    keys = map(_row_key, batch.column("id").to_pylist(), batch.column("origin").to_pylist())
    keep = [not reason and key not in duplicates for key, reason in zip(keys, batch.column("drop_reason").to_pylist())]
    return batch.filter(pa.array(keep)).select(list(columns))


def _refused_renders(rendered) -> list[dict]:
    """The problems of the records the chat template refused (`RenderChats`), read on the driver."""
    refused = []
    # The materialized blocks as they are (a column selection would be one more execution).
    for batch in rendered.iter_batches(batch_size=None, batch_format="pyarrow"):
        failed = batch.filter(pc.not_equal(batch.column("render_error"), "")).select(["id", "origin", "render_error"])
        for row in failed.to_pylist():
            where = f"{row['origin']}: " if row["origin"] else ""
            refused.append({"id": row["id"], "origin": row["origin"], "reason": "chat_template", "detail": f"{where}record {row['id']!r}: {row['render_error']}"})
    return refused


def _rendered_rows(batch: pa.Table) -> pa.Table:
    """Ray Data UDF: the rows the chat template rendered, without the columns that told them apart."""
    return batch.filter(pc.equal(batch.column("render_error"), "")).drop_columns(["origin", "render_error"])


def _find_duplicates(annotated, exact: bool, near: dict | None) -> tuple[dict[str, tuple[str, str]], Counter, list[dict]]:
    """Scan the annotated rows on the driver: duplicates (`_row_key` -> (reason, id of the one kept)),
    counts, problems."""
    columns = ["id", "origin", "drop_reason", "detail", "content_hash"] + (["signature"] if near else [])
    reasons: Counter = Counter()
    problems: list[dict] = []
    kept_keys: list[str] = []
    kept_hashes: list[str] = []
    kept_signatures: list[np.ndarray] = []
    for batch in annotated.select_columns(columns).iter_batches(batch_size=None, batch_format="pyarrow"):
        is_kept = pc.equal(batch.column("drop_reason"), "")
        for row in batch.filter(pc.invert(is_kept)).select(["id", "origin", "drop_reason", "detail"]).to_pylist():
            reasons[row["drop_reason"]] += 1
            problems.append({"id": row["id"], "origin": row["origin"], "reason": row["drop_reason"], "detail": row["detail"]})
        kept = batch.filter(is_kept)
        kept_keys += map(_row_key, kept.column("id").to_pylist(), kept.column("origin").to_pylist())
        kept_hashes += kept.column("content_hash").to_pylist()
        if near:
            flat = kept.column("signature").combine_chunks().flatten()
            kept_signatures.append(np.asarray(flat, dtype=np.uint32).reshape(-1, near["num_perm"]))
    duplicates: dict[str, tuple[str, str]] = {}
    if exact:
        first: dict[str, str] = {}
        for key, digest in sorted(zip(kept_keys, kept_hashes)):
            if digest in first and first[digest] != key:  # the same key twice (identical parquet rows in
                # two batches of one file) would drop both copies: kept, not deduplicated
                duplicates[key] = ("exact_duplicate", first[digest])
            else:
                first[digest] = key
    if near and kept_keys:
        signatures = np.concatenate(kept_signatures)
        remaining = np.array([key not in duplicates for key in kept_keys], dtype=bool)
        keys = [key for key, keep in zip(kept_keys, remaining) if keep]
        for key, of in minhash.near_duplicates(keys, signatures[remaining], near["threshold"]).items():
            duplicates[key] = ("near_duplicate", of)
    for key, (reason, of) in sorted(duplicates.items()):
        reasons[reason] += 1
        (id_, origin), (of_id, of_origin) = key.split("\x1f", 1), of.split("\x1f", 1)
        where = "" if of_origin == of_id else f" ({of_origin})"  # a file's id is its path
        problems.append({"id": id_, "origin": origin, "reason": reason, "detail": f"duplicate of {of_id}{where}"})
    return duplicates, reasons, problems


def _tokenizer_udf(prep: DataPrepConfig, cls: type, arguments: dict[str, Any], tasks: int) -> dict[str, Any]:
    """map_batches arguments that run the tokenizer UDF `cls(**arguments)` over `tasks` tasks.

    More tasks than `data.tokenizer_actors`: an actor pool of fractional CPUs, no more actors than
    leave the pipeline's map tasks one CPU (`_tokenizer_pool_size`). As many tasks as actors or
    fewer (a small data set, every one of the quickstart's): plain tasks of `cpus_per_tokenizer_actor`
    CPUs, as many at once, which build `cls` once per worker process (`tokenize.run_built`) instead
    of starting an actor process for one or two batches. Plain tasks too, as many at once as the
    pool would have actors, where those actors would be as many as the cluster's CPUs (2 on the
    local 2-CPU cluster): each actor is a process started for the pass, 1-1.5 CPU-seconds of
    worker start, Ray Data's imports and the tokenizer before its first batch, and with every CPU
    tokenizing that is wall time (the data benchmark's 50 MB on 2 CPUs, a pass of 16-18
    CPU-seconds: 58-65% of an actor's main-thread samples under py-spy were its imports at start),
    where the job's worker processes are up already and keep what they built. The same UDF over the same batches: the same blocks either way.
    """
    import ray
    import ray.data
    from ray import cloudpickle

    from alloylm.data.tokenize import run_built

    if tasks > prep.tokenizer_actors:
        size, cpus = _tokenizer_pool_size(prep, tasks)
        if size < cpus:
            return {"fn": cls, "fn_constructor_kwargs": arguments, "compute": ray.data.ActorPoolStrategy(size=size), "num_cpus": prep.cpus_per_tokenizer_actor}
        tasks = size  # plain tasks, `size` at once
    pickled = cloudpickle.dumps(arguments)  # once: hashed for the key, and what the tasks fetch
    # A UDF handed no tokenizer loads it from `tokenizer_uri`: the tokenizer artifact's version
    # (fingerprint, creation time) goes into the key too, so one rebuilt there is built again.
    version = storage.read_manifest(arguments["tokenizer_uri"]) or {} if "tokenizer_uri" in arguments else {}
    stamp = json.dumps([cls.__module__, cls.__qualname__, version.get("fingerprint"), version.get("created_at")]).encode()
    key = hashlib.sha256(stamp + pickled).hexdigest()
    return {
        "fn": run_built,
        "fn_kwargs": {"cls": cls, "key": key, "arguments": ray.put(pickled)},
        "num_cpus": prep.cpus_per_tokenizer_actor,
        # `concurrency=` for tasks is deprecated since Ray 2.51 (a warning per data set)
        "compute": ray.data.TaskPoolStrategy(size=max(1, tasks)),
    }


def _tokenizer_pool_size(prep: DataPrepConfig, tasks: int) -> tuple[int, float]:
    """(tokenizer actors for the pool, the cluster's CPUs now): fractional CPUs, and no more actors
    than the step has tasks to give them, since each actor costs a process start."""
    import ray

    size = max(1, min(prep.tokenizer_actors, tasks))
    # The pool's actors hold their CPUs for the whole pass, and the map tasks that feed them need a
    # whole CPU: actors that leave less than one free stall the pass forever (3 actors of 0.5 CPU on
    # 2 CPUs did). Capped to what the cluster has now; at least one actor.
    cpus = ray.cluster_resources().get("CPU", 0)
    room = max(1, int((cpus - 1) // prep.cpus_per_tokenizer_actor))
    if size > room:
        log.warning(
            "data.tokenizer_actors: %d actors of %g CPU (data.cpus_per_tokenizer_actor) would leave the pipeline's tasks "
            "less than one CPU of this cluster's %g; using %d",
            size, prep.cpus_per_tokenizer_actor, cpus, room,
        )
        size = room
    return size, cpus


def _write_shards(ds, uri: str, rows_per_shard: int) -> None:
    fs, path = storage.arrow_filesystem(uri)
    # Exact blocks of rows_per_shard rows first: every shard but the last is full, however many
    # blocks the steps before produced.
    ds = ds.repartition(target_num_rows_per_block=rows_per_shard, strict=True)
    ds.write_parquet(path, filesystem=fs, min_rows_per_file=rows_per_shard, max_rows_per_file=rows_per_shard)


def _write_table(table: pa.Table, uri: str) -> None:
    fs, path = storage.arrow_filesystem(uri)
    pq.write_table(table, path, filesystem=fs)


class _ShardWriter:
    """Tables in arrival order into `part-NNNNNN.parquet` files of exactly `rows_per_shard` rows under
    `uri` (the last one, written by `close`, may be shorter): the same files whatever the batches."""

    def __init__(self, uri: str, rows_per_shard: int) -> None:
        self.uri, self.rows_per_shard = uri, rows_per_shard
        self.fs, self.path = storage.arrow_filesystem(uri)
        if not storage.is_remote(uri):
            os.makedirs(self.path, exist_ok=True)
        self.pending: list[pa.Table] = []
        self.held = self.written = self.shards = 0

    def _write(self, table: pa.Table) -> None:
        name = f"part-{self.shards:06d}.parquet"
        storage.retrying("write", storage.join(self.uri, name), lambda: pq.write_table(table, f"{self.path}/{name}", filesystem=self.fs))
        self.shards += 1
        self.written += table.num_rows

    def add(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.held += table.num_rows
        while self.held >= self.rows_per_shard:
            joined = pa.concat_tables(self.pending)
            self._write(joined.slice(0, self.rows_per_shard))
            rest = joined.slice(self.rows_per_shard)
            self.pending, self.held = [rest], rest.num_rows

    def close(self) -> int:
        """Write what is held as the last shard; returns the rows written in all."""
        if self.held:
            self._write(pa.concat_tables(self.pending))
            self.pending, self.held = [], 0
        return self.written


def _stream_shards(packed, blocks: _ShardWriter, documents: _ShardWriter) -> list[np.ndarray]:
    """Consume the packing's output as it comes, in order: its full blocks into `blocks`, the
    documents it tokenized into `documents` (`PackTokenBlocks(documents=True)`); returns the
    per-batch tails in order. The caller closes the writers (their last, partial shards).

    Written here rather than with Ray Data's `write_parquet`: that is a second execution over
    materialized blocks, started after the last block is tokenized (a filter, a repartition and
    the write tasks: 2-3 s on the benchmark's 50 MB), where this writes each shard while the next
    blocks are tokenized. A block is 4 bytes a token, little beside the tokenizing that made it;
    the files are the same: full shards, then `tail.parquet`, in input order. The kept documents
    come back with their blocks for the same reason: their own Ray Data write read every kept
    record a second time beside the tokenizing (1.3 s of the quickstart's 1.9 s `domain-text`)."""
    tails: list[np.ndarray] = []
    for batch in packed.iter_batches(batch_size=None, batch_format="pyarrow"):
        is_document = pc.is_valid(batch.column("document_id"))
        documents.add(batch.filter(is_document).select(["document_id", "document_text"]).rename_columns(["id", "text"]))
        batch = batch.filter(pc.invert(is_document))
        is_tail = batch.column("is_tail")
        tails += [np.asarray(ids, dtype=np.int32) for ids in batch.filter(is_tail).column("input_ids").to_pylist()]
        blocks.add(batch.filter(pc.invert(is_tail)).select(["input_ids"]))
    return tails


def _prepare_text(
    config: RunConfig, kept, kept_count: int, shards_uri: str, tok_uri: str, tokenizer, clock: PhaseClock, documents_uri: str
) -> dict[str, int]:
    """Tokenize and pack `kept` into `shards_uri`, and write the kept documents (id, text) to
    `documents_uri` as they come back from the tokenizer."""
    prep = config.data
    # Blocks of whole batches of batch_size consecutive kept documents, whatever blocks reading and
    # dedup produced, so the packing (and every block) depends only on the input. Several batches
    # per block (one actor task each) keep the number of tasks, and of blocks after, small.
    rows_per_task = prep.batch_size * BATCHES_PER_TOKENIZER_TASK
    groups = kept.repartition(target_num_rows_per_block=rows_per_task, strict=True)
    arguments = {
        "tokenizer_uri": tok_uri,
        "block_size": prep.block_size,
        "trust_remote_code": config.trust_remote_code,
        "backend": BackendTokenizerState.of(tokenizer),
        "documents": True,
    }
    packed = groups.map_batches(
        batch_size=prep.batch_size,
        batch_format="numpy",
        **_tokenizer_udf(prep, PackTokenBlocks, arguments, math.ceil(kept_count / rows_per_task)),
    )
    blocks, documents = _ShardWriter(shards_uri, prep.rows_per_shard), _ShardWriter(documents_uri, prep.rows_per_shard)
    tails = _stream_shards(packed, blocks, documents)
    clock.lap("tokenize")  # every full shard written as its rows came
    full_blocks = blocks.close()
    documents.close()
    clock.lap("write_shards")  # the last, partial shards
    # Per-batch tails are packed together here, so only the run's final partial block is left over.
    flat = np.concatenate(tails) if tails else np.zeros(0, np.int32)
    width = prep.block_size
    tail_blocks = flat[: (flat.size // width) * width].reshape(-1, width)
    rest = flat[tail_blocks.size :]
    counts = {"blocks": full_blocks + len(tail_blocks), "tokens_dropped_tail": 0, "tail_padded_tokens": 0}
    table = blocks_table(tail_blocks, np.zeros(0, np.int32)).select(["input_ids"])
    if rest.size and prep.tail == "pad":
        # A tokenizer without a pad token (GPT-2's, Llama's) pads with its end of text: the mask
        # keeps the padding out of the loss either way.
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise DataPreparationError("data.tail: pad needs a tokenizer with a pad or end-of-text token; this one has neither (use data.tail: drop)")
        padded = np.full(width, pad, dtype=np.int32)
        padded[: rest.size] = rest
        mask = np.zeros(width, dtype=np.int8)
        mask[: rest.size] = 1
        table = blocks_table(np.vstack([tail_blocks, padded[None]]), np.zeros(0, np.int32)).select(["input_ids"])
        counts.update(blocks=counts["blocks"] + 1, tail_padded_tokens=int(width - rest.size))
        masks = pa.array([[1] * width] * len(tail_blocks) + [mask.tolist()], pa.list_(pa.int8()))
        _write_table(table.append_column("attention_mask", masks), storage.join(shards_uri, "tail.parquet"))
    else:
        counts["tokens_dropped_tail"] = int(rest.size)
        if len(tail_blocks):
            _write_table(table, storage.join(shards_uri, "tail.parquet"))
    counts["tokens_out"] = counts["blocks"] * width - counts["tail_padded_tokens"]
    clock.lap("tails")
    return counts


def _column_batches(ds, column: str):
    """One materialized dataset column, block by block, as Arrow arrays (one light execution)."""
    for batch in ds.select_columns([column]).iter_batches(batch_size=None, batch_format="pyarrow"):
        yield batch.column(column)


def _prepare_rendered(
    config: RunConfig, name: str, kept, kept_count: int, kept_blocks: int, shards_uri: str, tok_uri: str, tokenizer, fmt: str, clock: PhaseClock
) -> tuple[dict[str, int], list[dict]]:
    """Render (chats, preference pairs) or type (benchmark items) the kept records into `shards_uri`:
    (counts, the problems of records the chat template refused)."""
    prep = config.data
    if fmt == "benchmark":
        rendered = kept.map_batches(benchmark_rows, batch_format="numpy", batch_size=prep.batch_size)
    else:
        arguments = {"tokenizer_uri": tok_uri, "trust_remote_code": config.trust_remote_code, "tokenizer": tokenizer}
        rendered = kept.map_batches(
            batch_size=prep.batch_size,
            batch_format="numpy",
            # An input block is never split across actors: at most one task per block.
            **_tokenizer_udf(prep, RenderChats if fmt == "chat" else RenderPreferences, arguments, min(math.ceil(kept_count / prep.batch_size), kept_blocks)),
        )
    rendered = rendered.materialize()
    renamed = 0
    if fmt == "benchmark":
        rendered, renamed = _unique_item_ids(name, rendered)
    refused = [] if fmt == "benchmark" else _refused_renders(rendered)
    if len(refused) == kept_count:
        shown = "; ".join(p["detail"] for p in refused[:MAX_PROBLEMS_SHOWN])
        raise DataPreparationError(f"data set {name!r}: the chat template refused all of its {kept_count} kept records: {shown}")
    if refused:  # rare: one more pass, over the rendered rows
        rendered = rendered.map_batches(_rendered_rows, batch_format="pyarrow", batch_size=None).materialize()
    written = rendered
    if fmt != "benchmark" and not refused:  # the columns that told refusals apart are left out as the shards are written
        written = rendered.select_columns([c for c in rendered.columns() if c not in ("origin", "render_error")])
    clock.lap("tokenize")
    _write_shards(written, shards_uri, prep.rows_per_shard)
    clock.lap("write_shards")
    counts = {"records_out": rendered.count()}
    # Sums and tallies on the driver: Dataset.sum() would start a hash-aggregation (actors, seconds).
    if fmt != "benchmark":
        counts["tokens_out"] = int(sum(pc.sum(column).as_py() or 0 for column in _column_batches(rendered, "num_tokens")))
    else:
        counts["by_split"] = dict(Counter(split for column in _column_batches(rendered, "split") for split in column.to_pylist()))
        if renamed:
            counts["ids_renamed"] = renamed
    return counts, refused


def _unique_item_ids(name: str, items):
    """Benchmark items (a small, materialized data set) whose id repeats an earlier item's get
    `<id>#2`, `#3`, ... in data set order: (the items, how many were renamed). Ids repeat where two
    files each number from 1, or where a generated benchmark's documents shared an id; the
    evaluation names items by id and refuses a repeat, which it found only after training."""
    import ray.data

    ids = [i for column in _column_batches(items, "id") for i in column.to_pylist()]
    if len(set(ids)) == len(ids):
        return items, 0
    taken, seen, unique = set(ids), Counter(), []
    for item_id in ids:
        seen[item_id] += 1
        new, count = item_id, seen[item_id]
        while count > 1 and new in taken:
            new, count = f"{item_id}#{count}", count + 1
        taken.add(new)
        unique.append(new)
    renamed = sum(a != b for a, b in zip(ids, unique))
    log.warning("data %s: %d benchmark item(s) repeated an earlier item's id; renamed <id>#2, #3, ...", name, renamed)
    table = pa.concat_tables([batch for batch in items.iter_batches(batch_size=None, batch_format="pyarrow")])
    table = table.set_column(table.schema.get_field_index("id"), "id", pa.array(unique, pa.string()))
    return ray.data.from_arrow(table), renamed


def _chat_renderer(config: RunConfig):
    """Chats read into a text data set, as text: the run's chat template, without the BOS it writes
    (packing joins documents with EOS and adds no BOS to a plain document either)."""
    tokenizer = _load_run_tokenizer(tokenizer_uri(config), config.trust_remote_code)
    if not tokenizer.chat_template:
        return None
    bos = tokenizer.bos_token or ""

    def render(messages: list[dict]) -> str:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        return text[len(bos):] if bos and text.startswith(bos) else text

    return render


def _load_run_tokenizer(tok_uri: str, trust_remote_code: bool):
    from alloylm.models.loading import load_tokenizer

    return load_tokenizer(tok_uri, trust_remote_code=trust_remote_code)


@contextlib.contextmanager
def _without_op_reservation() -> Iterator[None]:
    """Datasets created inside run without Ray Data's per-operator resource reservation (a Dataset
    keeps the DataContext it was created under; what derives from it shares it).

    A file source is a path list (`from_items`) then one fused read-and-clean map: the reservation
    splits the CPUs between the two, the list holds its half until the map has taken every path,
    and the map runs one task at a time on 2 CPUs. Measured with the benchmark's 50 MB on 2 cores
    (`benchmarks/data_prep.py`, same cluster, alternating): pass 1 took 1.1 s without against
    1.8-2.9 s with it; with MinHash 4.3-4.5 s against 5.8-6.3 s. Pass 2 (its map and the actor
    pool) runs under the same context: measured 0.3-1 s faster too. Ray's other backpressure
    (object-store limits, the actors' fixed CPUs) still applies."""
    import ray.data

    context = ray.data.DataContext.get_current()
    before = context.op_resource_reservation_enabled
    context.op_resource_reservation_enabled = False
    try:
        yield
    finally:
        context.op_resource_reservation_enabled = before


def prepare_dataset(config: RunConfig, name: str, tokenizer_manifest: dict) -> dict:
    """Prepare data set `name` into `<run>/data/<name>/`; returns its manifest (reused if up to date).

    A generated data set prepares the text data set it reads first, then runs (or resumes) its
    generation, then goes through the same pipeline as every other.
    """
    import ray.data

    dataset = config.datasets[name]
    if dataset.generate is not None:
        problems = dataset.generation_problems(name, config.datasets)
        if problems:
            raise DataPreparationError("; ".join(problems))
    uri = dataset_uri(config, name)
    tokenizer_fp = tokenizer_manifest["fingerprint"]
    fp, manifest = _reusable(uri, config, lambda c, earlier: dataset_fingerprint(c, name, tokenizer_fp, legacy=earlier))
    if manifest:
        log.info("data %s: up to date (%s)", name, uri)
        return manifest
    # Same input, same shards: blocks come out in input order, so packing is reproducible.
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    clock = PhaseClock()
    fmt, prep = dataset.format, config.data
    near = None
    if fmt == "text" and prep.near_dedup.enabled:
        near = prep.near_dedup.model_dump(include={"threshold", "num_perm", "shingle_chars"})
    exact = prep.exact_dedup and fmt != "benchmark"
    generation = None
    if dataset.generate is None:
        log.info("data %s: reading %s (%s)", name, ", ".join(dataset.sources), fmt)
        reads_chats = fmt == "text" and any(
            BUILTIN_FORMATS.get(source.removeprefix("builtin:")) == "chat" for source in dataset.sources if source.startswith("builtin:")
        )
        with _without_op_reservation():
            raw = read_dataset(config, name, _chat_renderer(config) if reads_chats else None)
    with lifecycle.begin(uri, fp, config) as artifact:
        if dataset.generate is not None:
            from alloylm.generate.run import generate_items

            source = dataset.generate.from_
            source_manifest = prepare_dataset(config, source, tokenizer_manifest)
            generation = generate_items(config, name, dataset_uri(config, source), source_manifest)
            with _without_op_reservation():
                raw = read_dataset(config, name)
            clock.lap("generate")
        # batch_size=None: one task per block the source produced. A row count here would make
        # Ray bundle that many *source* rows (files, for file sources) into one task.
        annotated = raw.map_batches(
            _clean_batch,
            fn_kwargs={"fmt": fmt, "min_chars": prep.min_chars, "max_chars": prep.max_chars, "exact": exact, "near": near},
            batch_format="numpy",
            batch_size=None,
        ).materialize()
        clock.lap("read_clean")
        documents_in = annotated.count()
        duplicates, dropped, problems = _find_duplicates(annotated, exact, near)
        clock.lap("dedup")
        kept_count = documents_in - sum(dropped.values())
        if kept_count == 0:
            shown = "; ".join(p["detail"] for p in problems[:MAX_PROBLEMS_SHOWN])
            raise DataPreparationError(
                f"data set {name!r}: none of its {documents_in} records is usable "
                f"(dropped: {dict(dropped)}){': ' + shown if shown else ''}"
            )
        # Chats and pairs keep their origin: a record the chat template refuses is named by it.
        columns = ("id", "origin", "record") if fmt in ("chat", "preference") else ("id", "record")
        kept = annotated.map_batches(
            _drop_duplicates, fn_kwargs={"duplicates": duplicates, "columns": columns}, batch_format="pyarrow", batch_size=None
        )
        shards_uri = storage.join(artifact.staging_uri, "shards")
        tok_uri = tokenizer_uri(config)
        # Loaded once here and handed to the actors (see alloylm.data.tokenize).
        tokenizer = None if fmt == "benchmark" else _load_run_tokenizer(tok_uri, config.trust_remote_code)
        if fmt == "text":
            counts = _prepare_text(
                config, kept, kept_count, shards_uri, tok_uri, tokenizer, clock, storage.join(artifact.staging_uri, "documents")
            )
        else:
            counts, refused = _prepare_rendered(config, name, kept, kept_count, annotated.num_blocks(), shards_uri, tok_uri, tokenizer, fmt, clock)
            problems += refused
            dropped.update(p["reason"] for p in refused)
            kept_count -= len(refused)
        extra: dict[str, Any] = {}
        if fmt == "text":
            listed = storage.list_files(storage.join(artifact.staging_uri, "documents"))
            extra["documents"] = [f"documents/{os.path.basename(f)}" for f in listed if f.endswith(".parquet")]
        if generation is not None:
            problems = generation.problems + problems
            counts["generation"] = generation.counts
            teacher = dataset.generate.teacher
            extra.update(generated_from=dataset.generate.from_, task=dataset.generate.task,
                         teacher={"model": teacher.model, "base_url": teacher.base_url})
            items = storage.read_text(generation.items_uri)
            storage.write_text(storage.join(artifact.staging_uri, "generated.jsonl"), items)
            # The answers themselves: the fingerprint above is of what was asked, and asking again
            # (batches deleted) may answer otherwise; what trains or scores on it follows this too.
            extra["generated_digest"] = hashlib.sha256(items.encode("utf-8")).hexdigest()[:16]
        storage.write_text(storage.join(artifact.staging_uri, "problems.jsonl"), "".join(json.dumps(p) + "\n" for p in problems))
        shards = sorted(os.path.basename(f) for f in storage.list_files(shards_uri) if f.endswith(".parquet"))
        clock.lap("finish")  # problems.jsonl, generated.jsonl, the listing; the commit below is not counted
        for problem in problems[:MAX_PROBLEMS_SHOWN]:
            log.warning("data %s: skipped %s: %s", name, problem["reason"], problem["detail"])
        if len(problems) > MAX_PROBLEMS_SHOWN:
            log.warning("data %s: %d more skipped records are listed in %s/problems.jsonl", name, len(problems) - MAX_PROBLEMS_SHOWN, uri)
        manifest = artifact.commit(
            {
                "kind": "dataset",
                "name": name,
                "format": fmt,
                "fingerprint": fp,
                "tokenizer_fingerprint": tokenizer_manifest["fingerprint"],
                "sources": list(dataset.sources),
                "block_size": prep.block_size if fmt == "text" else None,
                "counts": {"documents_in": documents_in, "documents_kept": kept_count, "dropped": dict(sorted(dropped.items())), **counts},
                "shards": [f"shards/{s}" for s in shards],
                **extra,
                # Where the data set's time went, phase by phase (DATA_PHASES), and their sum.
                "seconds": round(sum(clock.seconds.values()), 3),
                "breakdown": clock.rounded(),
            }
        )
    c = manifest["counts"]
    log.info(
        "data %s: %d in, %d kept, dropped %s, %s tokens out -> %s (%.1f s: %s)",
        name, c["documents_in"], c["documents_kept"], c["dropped"] or "none", c.get("tokens_out", "-"), uri,
        manifest["seconds"], " ".join(f"{k} {v:.1f}" for k, v in manifest["breakdown"].items()),
    )
    return manifest


def prepare_all(config: RunConfig, names: list[str] | None = None) -> dict[str, dict]:
    """The tokenizer, then every data set of the run (or `names`); returns the manifests by name."""
    unknown = [n for n in names or [] if n not in config.datasets]
    if unknown:
        raise DataPreparationError(f"unknown data set(s) {', '.join(unknown)}; known: {', '.join(sorted(config.datasets))}")
    tokenizer_manifest = prepare_tokenizer(config)
    wanted = names or list(config.datasets)
    # Generated data sets after the data sets they read (prepare_dataset would also do it first).
    order = sorted(wanted, key=lambda n: config.datasets[n].generate is not None)
    manifests = {name: prepare_dataset(config, name, tokenizer_manifest) for name in order}
    return {name: manifests[name] for name in wanted}
