"""Reading what evaluation scores: data sets prepared by `alloylm data`, or plain JSONL/parquet files.

This module owns the one error every bad evaluation input raises, `EvaluationInputError`, and
reading a prepared data set's parquet shards in their written order (complete artifacts only).
"""

from __future__ import annotations

import json
import posixpath

import pyarrow as pa
import pyarrow.parquet as pq

from alloylm import storage
from alloylm.errors import RunError


class EvaluationInputError(RunError):
    """An input evaluation cannot use (no model at a path, a malformed item, a missing data set).

    Raised before any model is scored; the message names the file and the item.
    """


def is_file_source(uri: str) -> bool:
    """Whether `uri` names a single data file (JSONL, JSON or parquet) rather than a prepared folder."""
    return uri.rstrip("/").lower().endswith((".jsonl", ".json", ".parquet"))


def read_prepared_table(uri: str, columns: list[str] | None = None) -> tuple[pa.Table, dict]:
    """The rows of the prepared data set at `uri` (its shards in manifest order) and its manifest."""
    try:
        manifest = storage.read_manifest(uri)
    except storage.StorageError as exc:
        raise EvaluationInputError(f"cannot read the data set at {uri}: {exc}") from None
    if manifest is None:
        found = storage.exists(uri)
        raise EvaluationInputError(
            f"{uri} is not a prepared data set: "
            + ("it has no manifest.json (an incomplete or interrupted preparation)" if found else "it does not exist")
            + "; run `alloylm data CONFIG` first"
        )
    shards = manifest.get("shards") or []
    if not shards:
        raise EvaluationInputError(f"{uri}: the manifest lists no shards")
    tables = []
    for shard in shards:
        shard_uri = storage.join(uri, *posixpath.normpath(shard).split("/"))
        fs, path = storage.arrow_filesystem(shard_uri)
        try:
            table = pq.read_table(path, filesystem=fs)
        except (OSError, pa.ArrowException) as exc:
            raise EvaluationInputError(f"cannot read shard {shard_uri}: {exc}") from None
        if columns is not None:
            missing = [c for c in columns if c not in table.column_names]
            if missing:
                raise EvaluationInputError(f"{shard_uri}: no column(s) {', '.join(missing)} (has {', '.join(table.column_names)})")
            table = table.select(columns)
        tables.append(table)
    return pa.concat_tables(tables, promote_options="default"), manifest


def read_records_file(uri: str) -> list[tuple[str, dict]]:
    """(where, row) for every row of a JSONL, JSON (a list) or parquet file; `where` is `file:line`."""
    try:
        if uri.lower().endswith(".parquet"):
            fs, path = storage.arrow_filesystem(uri)
            rows = pq.read_table(path, filesystem=fs).to_pylist()
            return [(f"{uri} row {i + 1}", row) for i, row in enumerate(rows)]
        text = storage.read_text(uri)
    except storage.StorageError as exc:
        raise EvaluationInputError(f"cannot read {uri}: {exc}") from None
    except (OSError, pa.ArrowException) as exc:
        raise EvaluationInputError(f"cannot read {uri}: {exc}") from None
    out: list[tuple[str, dict]] = []
    if uri.lower().endswith(".json"):
        try:
            rows = json.loads(text)
        except ValueError as exc:
            raise EvaluationInputError(f"{uri}: not valid JSON: {exc}") from None
        if not isinstance(rows, list):
            raise EvaluationInputError(f"{uri}: expected a JSON list of items, got {type(rows).__name__}")
        return [(f"{uri} item {i + 1}", row) for i, row in enumerate(rows)]
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{uri}:{number}"
        try:
            out.append((where, json.loads(line)))
        except ValueError as exc:
            out.append((where, {"__unparsed__": f"not valid JSON ({exc})"}))
    return out
