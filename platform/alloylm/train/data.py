"""Reading a prepared data set inside a training worker."""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.parquet as pq

from alloylm import storage


def _shard_uris(data_uri: str) -> list[str]:
    files = [f for f in storage.list_files(storage.join(data_uri, "shards")) if f.endswith(".parquet")]
    if not files:
        raise ValueError(f"no parquet shards under {data_uri}/shards")
    return files


def _check_columns(uri: str, schema: pa.Schema, columns: list[str]) -> None:
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise ValueError(f"{uri}: the data has no column(s) {', '.join(missing)} (columns: {', '.join(schema.names)})")


def check_prepared_columns(data_uri: str, columns: list[str]) -> None:
    """Raise ValueError unless the prepared data set at `data_uri` has `columns`, reading only the
    footer of its first shard: one preparation wrote every shard with one schema, and the driver
    must not read a CPT corpus (terabytes at scale) to check a column name."""
    uri = _shard_uris(data_uri)[0]
    fs, path = storage.arrow_filesystem(uri)
    try:
        schema = pq.read_schema(path, filesystem=fs)
    except pa.ArrowInvalid as exc:  # not whole Parquet: name the shard, as read_prepared_table does
        raise ValueError(f"{uri}: {exc}") from None
    _check_columns(uri, schema, columns)


def read_prepared_table(data_uri: str, columns: list[str]) -> pa.Table:
    """All shards of a prepared data set (local or s3://) as one Arrow table with `columns` (only
    those are read)."""
    tables = []
    for uri in _shard_uris(data_uri):
        fs, path = storage.arrow_filesystem(uri)
        try:
            with fs.open_input_file(path) as source:
                shard = pq.ParquetFile(source)
                _check_columns(uri, shard.schema_arrow, columns)
                tables.append(shard.read(columns=columns))
        except pa.ArrowInvalid as exc:  # a shard that is not whole Parquet: name it
            raise ValueError(f"{uri}: {exc}") from None
    return pa.concat_tables(tables)


def steps_for(rows: int, stage, world_size: int) -> int:
    """Optimizer steps for the stage's epochs over `rows` rows shared by `world_size` workers."""
    training = stage.training
    if training.max_steps:
        return training.max_steps
    per_step = training.batch_size * world_size * training.gradient_accumulation_steps
    return max(1, math.ceil(training.epochs * rows / per_step))
