"""Reading a prepared data set inside a training worker."""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.parquet as pq

from alloylm import storage


def read_prepared_table(data_uri: str, columns: list[str]) -> pa.Table:
    """All shards of a prepared data set (local or s3://) as one Arrow table with `columns`."""
    files = [f for f in storage.list_files(storage.join(data_uri, "shards")) if f.endswith(".parquet")]
    if not files:
        raise ValueError(f"no parquet shards under {data_uri}/shards")
    tables = []
    for uri in files:
        fs, path = storage.arrow_filesystem(uri)
        table = pq.read_table(path, filesystem=fs)
        missing = [c for c in columns if c not in table.column_names]
        if missing:
            raise ValueError(f"{uri}: the data has no column(s) {', '.join(missing)} (columns: {', '.join(table.column_names)})")
        tables.append(table.select(columns))
    return pa.concat_tables(tables)


def steps_for(rows: int, stage, world_size: int) -> int:
    """Optimizer steps for the stage's epochs over `rows` rows shared by `world_size` workers."""
    training = stage.training
    if training.max_steps:
        return training.max_steps
    per_step = training.batch_size * world_size * training.gradient_accumulation_steps
    return max(1, math.ceil(training.epochs * rows / per_step))
