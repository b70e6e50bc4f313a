"""Reading a data set's sources into one Ray Dataset of uniform rows.

Every row has `id`, `origin` (file:line, data set id or built-in name), `record` (the record of the
data set's format, as JSON text, so blocks of every source share one Arrow schema),
`drop_reason` ("" when kept) and `detail`. Unreadable input (binary files, undecodable bytes,
empty files, PDFs without text, malformed JSON lines, rows missing a field) becomes a row with a
drop reason, so it is counted and reported, never silently lost and never fatal.

A `generate` data set has no sources of its own: it reads the items its teacher produced
(`alloylm.generate`), which are JSON lines in the data set's format.
"""

from __future__ import annotations

import codecs
import contextlib
import io
import json
import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa

from alloylm import storage
from alloylm.errors import RunError
from alloylm.config import ColumnMapping, DatasetConfig, RunConfig
from alloylm.data.clean import content_hash, record_json
from alloylm.data.records import RecordError, record_id, to_record

ROW_SCHEMA = pa.schema(
    [("id", pa.string()), ("origin", pa.string()), ("record", pa.string()), ("drop_reason", pa.string()), ("detail", pa.string())]
)
JSON_LINES_SUFFIXES = (".jsonl", ".json", ".ndjson")
# A compressed file is read as what its name says under the suffix (corpus.jsonl.gz: JSON lines).
COMPRESSION_SUFFIXES = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd", ".xz": "xz"}
PARQUET_SUFFIXES = (".parquet",)
PDF_SUFFIXES = (".pdf",)
# Files read and decoded per Ray task (see _read_files).
FILES_PER_READ_TASK = 16


class SourceError(RunError):
    """A source that cannot be read at all (missing path, unreachable endpoint, unknown data set)."""


def _row(id_: str, origin: str, record: dict | None, reason: str = "", detail: str = "") -> dict[str, str]:
    return {
        "id": id_,
        "origin": origin,
        "record": "" if record is None else record_json(record),
        "drop_reason": reason,
        "detail": detail,
    }


def convert_row(row: dict[str, Any], fmt: str, columns: ColumnMapping, origin: str, fallback_id: str) -> dict[str, str]:
    """One source row -> a uniform row (kept, or dropped with the reason)."""
    try:
        record = to_record(row, fmt, columns)
    except RecordError as exc:
        return _row(fallback_id, origin, None, exc.reason, f"{origin}: {exc}")
    return _row(record_id(row, columns, fallback_id), origin, record)


# ---------------------------------------------------------------------------------------------
# Files: one text document per file, or JSON lines; decoded inside Ray tasks.
# ---------------------------------------------------------------------------------------------


def _decode_file(path: str, data: bytes) -> tuple[str | None, str, str]:
    """(text, drop_reason, detail) for a file's bytes."""
    if not data.strip():
        return None, "empty", f"{path}: empty file"
    if b"\x00" in data[:8192]:
        return None, "binary", f"{path}: binary file (NUL bytes)"
    try:
        return data.decode("utf-8-sig"), "", ""  # -sig: a byte-order mark is not text
    except UnicodeDecodeError as exc:
        return None, "undecodable", f"{path}: not UTF-8 at byte {exc.start}"


class _RangeReader(io.RawIOBase):
    """A file read by offset, each read retried while remote storage fails transiently
    (`storage.retrying`, reopening the file): Ray's read_binary_files retried its reads, which a
    data set's tasks now do themselves. Wrapped in a BufferedReader of READ_BUFFER_BYTES, so
    that a decompressor's small reads (64 KiB for Arrow's, 8 KiB for lzma) are not one S3 request
    each."""

    def __init__(self, fs, path: str, uri: str) -> None:
        super().__init__()
        self._fs, self._path, self._uri = fs, path, uri
        self._file = None
        self._offset = 0

    def readable(self) -> bool:
        return True

    def _read_at(self, size: int) -> bytes:
        try:
            if self._file is None:
                self._file = self._fs.open_input_file(self._path)
            return self._file.read_at(size, self._offset)
        except Exception:
            if self._file is not None:  # opened again on the next attempt
                with contextlib.suppress(Exception):
                    self._file.close()
                self._file = None
            raise

    def readinto(self, buffer) -> int:
        data = storage.retrying("read", self._uri, lambda: self._read_at(len(buffer)))
        buffer[: len(data)] = data
        self._offset += len(data)
        return len(data)

    def readall(self) -> bytes:
        """The rest of the file in READ_BUFFER_BYTES requests (io.RawIOBase's asks for 8 KiB at a time)."""
        chunks = []
        while chunk := self.read(READ_BUFFER_BYTES):
            chunks.append(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        super().close()


def _open_stream(fs, path: str, uri: str, compression: str | None):
    """A file as a stream of its (decompressed) bytes: the standard library's xz, Arrow's codecs
    for the others (zstd is not in Python 3.11's standard library). A read that fails on storage
    (after its retries) raises StorageError; one the codec refuses raises the codec's own error."""
    raw = io.BufferedReader(_RangeReader(fs, path, uri), buffer_size=READ_BUFFER_BYTES)
    if compression is None:
        return raw
    if compression == "xz":
        import lzma

        return lzma.LZMAFile(raw)
    return pa.CompressedInputStream(pa.PythonFile(raw, mode="r"), compression)


# A JSON-lines file is read in chunks of this many bytes and its rows leave the task in batches of
# this many rows, so that neither a large file nor its rows are ever held whole (a 10 GB shard was).
JSON_LINES_CHUNK_BYTES = 8 << 20
ROWS_PER_BATCH = 8192
READ_BUFFER_BYTES = 8 << 20  # one storage request per this many bytes of a file


def _json_line_row(path: str, number: int, chunk: bytes, fmt: str, columns: ColumnMapping) -> dict[str, str] | None:
    """Line `number` of a JSON-lines file as a uniform row (None for a blank line). Decoded line by
    line, in bytes: a byte that is not UTF-8 costs its line, named, not the file."""
    origin = f"{path}:{number}"
    try:
        line = chunk.decode("utf-8")
    except UnicodeDecodeError as exc:
        return _row(f"{path}:{number}", origin, None, "undecodable", f"{origin}: not UTF-8 at byte {exc.start} of the line")
    if not line.strip():
        return None
    try:
        parsed = json.loads(line)
    except json.JSONDecodeError as exc:
        return _row(f"{path}:{number}", origin, None, "malformed_json", f"{origin}: {exc.msg} (column {exc.colno})")
    except (ValueError, RecursionError) as exc:  # an integer of too many digits; nesting too deep
        return _row(f"{path}:{number}", origin, None, "malformed_json", f"{origin}: {type(exc).__name__}: {exc}")
    if not isinstance(parsed, dict):
        return _row(f"{path}:{number}", origin, None, "malformed_json", f"{origin}: not a JSON object")
    return convert_row(parsed, fmt, columns, origin, f"{path}:{number}")


def _json_lines_rows(path: str, stream, fmt: str, columns: ColumnMapping, chunk_bytes: int, may_be_array: bool = False):
    """The rows of one JSON-lines file, read from `stream` a chunk at a time. Only "\n" ends a line
    (a JSON string may hold U+2028, which str.splitlines splits at); a byte-order mark is not text.
    A file that is empty (whitespace) or binary (NUL bytes in its first 8 KiB) is one dropped row.
    `may_be_array` (a `.json` file): one that starts with `[` is a JSON array of records."""
    head = stream.read(max(chunk_bytes, 8192))
    if b"\x00" in head[:8192]:
        yield _row(path, path, None, "binary", f"{path}: binary file (NUL bytes)")
        return
    if may_be_array and head.removeprefix(codecs.BOM_UTF8).lstrip().startswith(b"["):
        yield from _json_array_rows(path, head + stream.read(), fmt, columns)
        return
    # The line being read, in pieces: a line longer than a chunk is joined once, when it ends.
    pieces, number, text_seen, block = [], 0, False, head.removeprefix(codecs.BOM_UTF8)
    while block:
        text_seen = text_seen or bool(block.strip())
        end = block.find(b"\n")
        if end < 0:
            pieces.append(block)
        else:
            *lines, last = block.split(b"\n")
            lines[0] = b"".join([*pieces, lines[0]])
            pieces = [last]
            for line in lines:
                number += 1
                row = _json_line_row(path, number, line, fmt, columns)
                if row is not None:
                    yield row
        block = stream.read(chunk_bytes)
    if not text_seen:
        yield _row(path, path, None, "empty", f"{path}: empty file")
        return
    row = _json_line_row(path, number + 1, b"".join(pieces), fmt, columns)  # the last line, without its "\n"
    if row is not None:
        yield row


def _json_array_rows(path: str, data: bytes, fmt: str, columns: ColumnMapping):
    """A `.json` file that holds one JSON array of records (as Alpaca's data and many exports are),
    read whole: each element a row, `path#index` its origin. A file that is not valid JSON is one
    dropped row naming where it breaks."""
    try:
        records = json.loads(data.removeprefix(codecs.BOM_UTF8).decode("utf-8"))
    except UnicodeDecodeError as exc:
        yield _row(path, path, None, "undecodable", f"{path}: not UTF-8 at byte {exc.start}")
        return
    except json.JSONDecodeError as exc:
        yield _row(path, path, None, "malformed_json", f"{path}:{exc.lineno}: {exc.msg} (column {exc.colno}; the file starts a JSON array)")
        return
    except (ValueError, RecursionError) as exc:
        yield _row(path, path, None, "malformed_json", f"{path}: {type(exc).__name__}: {exc} (the file starts a JSON array)")
        return
    if not records:
        yield _row(path, path, None, "empty", f"{path}: an empty JSON array")
        return
    for index, record in enumerate(records):
        origin = f"{path}#{index}"
        if isinstance(record, dict):
            yield convert_row(record, fmt, columns, origin, origin)
        else:
            yield _row(origin, origin, None, "malformed_json", f"{origin}: not a JSON object")


def _file_rows(path: str, fs, fmt: str, columns: ColumnMapping, chunk_bytes: int = JSON_LINES_CHUNK_BYTES, scheme: str = ""):
    """The uniform rows of one file (`path` on `fs`; `scheme`: its URI's, `s3://`, for storage's
    retries and messages): a JSON-lines file's lines (streamed), or one document. A storage
    failure raises StorageError; a compressed file the codec refuses is one dropped row (after the
    rows read before the break)."""
    kind = path.lower()
    suffix = next((s for s in COMPRESSION_SUFFIXES if kind.endswith(s)), None)
    codec = COMPRESSION_SUFFIXES[suffix] if suffix is not None else None
    kind = kind.removesuffix(suffix) if suffix is not None else kind
    try:
        with _open_stream(fs, path, scheme + path, codec) as stream:
            if kind.endswith(JSON_LINES_SUFFIXES):
                yield from _json_lines_rows(path, stream, fmt, columns, chunk_bytes, may_be_array=kind.endswith(".json"))
                return
            data = stream.read()
    except storage.StorageError:
        raise
    except Exception as exc:  # each codec raises its own types (OSError, LZMAError, EOFError, ArrowInvalid, ...)
        if codec is None:
            raise
        yield _row(path, path, None, "undecodable", f"{path}: not a whole {codec} file ({type(exc).__name__}: {exc})")
        return
    if kind.endswith(PDF_SUFFIXES):
        yield _pdf_row(path, data, fmt)
        return
    text, reason, detail = _decode_file(path, data)
    if text is None:
        yield _row(path, path, None, reason, detail)
    elif fmt == "text":
        yield _row(path, path, {"text": text})
    else:
        yield _row(path, path, None, "unsupported_file", f"{path}: a {fmt} data set needs .jsonl or .parquet files")


def _files_rows(batch: dict[str, Any], fs, fmt: str, columns: ColumnMapping, rows_per_batch: int = ROWS_PER_BATCH,
                chunk_bytes: int = JSON_LINES_CHUNK_BYTES, scheme: str = ""):
    """Ray Data UDF (a generator): a batch of file paths -> uniform rows, in batches of at most
    `rows_per_batch`. The path is the full one: two files may share a base name in different folders."""
    out: dict[str, list] = {name: [] for name in ROW_SCHEMA.names}
    yielded = False
    for path in batch["path"]:
        for row in _file_rows(str(path), fs, fmt, columns, chunk_bytes, scheme):
            for key, value in row.items():
                out[key].append(value)
            if len(out["id"]) >= rows_per_batch:
                yield out
                yielded, out = True, {name: [] for name in ROW_SCHEMA.names}
    if out["id"] or not yielded:
        yield out


def _pdf_row(path: str, data: bytes, fmt: str) -> dict[str, str]:
    """One PDF file -> one text document, or a row dropped with the reason it gave no text."""
    from alloylm.data.pdf import PdfExtractionError, extract_pdf_text

    if fmt != "text":
        return _row(path, path, None, "unsupported_file", f"{path}: a {fmt} data set needs .jsonl or .parquet files")
    if not data.strip():
        return _row(path, path, None, "empty", f"{path}: empty file")
    try:
        extracted = extract_pdf_text(data, path)
    except PdfExtractionError as exc:
        return _row(path, path, None, exc.reason, str(exc))
    return _row(path, path, {"text": extracted.text})


def _table_rows(batch: pa.Table, fmt: str, columns: ColumnMapping, origin: str, has_paths: bool) -> dict[str, list]:
    """Ray Data UDF: rows of a table source (parquet with its `path` column, Hugging Face) -> uniform rows."""
    out: dict[str, list] = {name: [] for name in ROW_SCHEMA.names}
    seen: dict[tuple[str, str], int] = {}
    for row in batch.to_pylist():
        where = row.pop("path") if has_paths else origin
        number = row.pop("__row", None)
        key = number if number is not None else content_hash(row)[:16]
        if number is None:
            # A parquet read gives no row number: identical rows would share the name that dedup goes
            # by (`prepare._row_key`); a repeat in the batch is told apart by its count.
            repeat = seen[(where, key)] = seen.get((where, key), -1) + 1
            key = f"{key}.{repeat}" if repeat else key
        converted = convert_row(row, fmt, columns, f"{where}#{key}", f"{os.path.basename(where)}#{key}")
        for name, value in converted.items():
            out[name].append(value)
    return out


def expand_files(source: str) -> tuple[list[str], list[str]]:
    """(files read as bytes, parquet files) for a folder, glob or file; SourceError if nothing is there."""
    try:
        if any(ch in source for ch in "*?["):
            files = storage.list_files(source)
        elif storage.exists(source):
            files = storage.list_files(source)
            if not files and not _is_dir(source):
                files = [storage.resolve(source)]
        else:
            files = []
    except storage.StorageError as exc:
        raise SourceError(str(exc)) from None
    files = visible_files(source, files)
    if not files:
        raise SourceError(f"no such file or folder, or nothing in it: {source}")
    parquet = [f for f in files if f.lower().endswith(PARQUET_SUFFIXES)]
    return [f for f in files if f not in set(parquet)], parquet


def visible_files(source: str, files: list[str]) -> list[str]:
    """`files` (listed at or below `source`) less hidden files and whatever is inside a hidden folder
    below the source (.git/, .ipynb_checkpoints/): they are not documents. Hidden folders above it
    (~/.corpus/, a checkout under ~/.work/) do not count."""
    magic = min((source.index(ch) for ch in "*?[" if ch in source), default=None)
    root = storage.resolve(source if magic is None else os.path.dirname(source[:magic]) or ".").rstrip("/") + "/"
    return [f for f in files if not any(part.startswith(".") for part in (f[len(root):] if f.startswith(root) else os.path.basename(f)).split("/"))]


def _is_dir(source: str) -> bool:
    fs, path = storage.fsspec_filesystem(source)
    return fs.isdir(path)


def _read_files(source: str, dataset: DatasetConfig):
    import ray.data

    fmt, columns = dataset.format, dataset.columns
    raw_files, parquet_files = expand_files(source)
    parts = []
    fs, _ = storage.arrow_filesystem(source)
    strip = (lambda f: f.split("://", 1)[1]) if storage.is_remote(source) else (lambda f: f)
    if raw_files:
        # One task per FILES_PER_READ_TASK files, which it reads and decodes itself (a JSON-lines
        # file streamed, its rows leaving in batches): Ray's read_binary_files held each file whole,
        # bytes and rows, and Ray's default of a few files per task spent more time scheduling
        # tasks than reading.
        paths = ray.data.from_items([{"path": strip(f)} for f in raw_files], override_num_blocks=math.ceil(len(raw_files) / FILES_PER_READ_TASK))
        scheme = source.split("://", 1)[0] + "://" if storage.is_remote(source) else ""
        parts.append(paths.map_batches(
            _files_rows, fn_kwargs={"fs": fs, "fmt": fmt, "columns": columns, "scheme": scheme}, batch_format="numpy", batch_size=None
        ))
    if parquet_files:
        table = ray.data.read_parquet([strip(f) for f in parquet_files], filesystem=fs, include_paths=True)
        parts.append(table.map_batches(_table_rows, fn_kwargs={"fmt": fmt, "columns": columns, "origin": source, "has_paths": True}, batch_format="pyarrow"))
    return parts


_HF_ROWS_PER_BLOCK, _HF_MAX_BLOCKS = 10_000, 512


def _read_huggingface(source: str, dataset: DatasetConfig):
    """`hf:ORG/NAME` through `datasets.load_dataset`, or `hf:/path` saved with `save_to_disk`."""
    import datasets
    import ray.data

    name = source.removeprefix("hf:")
    try:
        if os.path.isdir(os.path.expanduser(name)):
            loaded = datasets.load_from_disk(os.path.expanduser(name))
            if isinstance(loaded, datasets.DatasetDict):
                if dataset.hf_split not in loaded:
                    raise SourceError(f"{source}: no split {dataset.hf_split!r} (splits: {', '.join(loaded)})")
                loaded = loaded[dataset.hf_split]
        else:
            loaded = datasets.load_dataset(name, dataset.hf_config, split=dataset.hf_split, revision=dataset.hf_revision)
    except SourceError:
        raise
    except Exception as exc:  # datasets raises many types (hub, network, file-not-found)
        raise SourceError(f"{source}: cannot load Hugging Face data set: {type(exc).__name__}: {exc}") from None
    loaded = loaded.add_column("__row", np.arange(len(loaded), dtype=np.int64))  # a Python list of every row number before
    # In blocks, so that the rows are converted by as many tasks (Ray makes one block of a table).
    ds = ray.data.from_huggingface(loaded, override_num_blocks=max(1, min(len(loaded) // _HF_ROWS_PER_BLOCK, _HF_MAX_BLOCKS)))
    return [ds.map_batches(_table_rows, fn_kwargs={"fmt": dataset.format, "columns": dataset.columns, "origin": source, "has_paths": False}, batch_format="pyarrow")]


def _chat_as_text(row: dict[str, Any], render_chat: Callable[[list[dict]], str] | None) -> dict[str, Any]:
    """A built-in chat row as a text row: the chat rendered with `render_chat` (the run's chat template),
    or, before the tokenizer exists (to train it), its messages' contents one per line."""
    messages = row["messages"]
    text = render_chat(messages) if render_chat is not None else "\n".join(m["content"] for m in messages)
    return {"id": row["id"], "text": text}


def _read_builtin(source: str, dataset: DatasetConfig, config: RunConfig, render_chat: Callable[[list[dict]], str] | None = None):
    import ray.data

    from alloylm.corpus import BUILTIN_FORMATS, generate_builtin

    name = source.removeprefix("builtin:")
    generated = generate_builtin(name, config.builtin)
    if dataset.format == "text" and BUILTIN_FORMATS[name] == "chat":
        generated = [_chat_as_text(row, render_chat) for row in generated]
    rows = [convert_row(row, dataset.format, dataset.columns, f"builtin:{name}", str(row["id"])) for row in generated]
    blocks = max(1, min(64, len(rows) // 512))
    return [ray.data.from_items(rows, override_num_blocks=blocks)]


def read_dataset(config: RunConfig, name: str, render_chat: Callable[[list[dict]], str] | None = None):
    """All sources of data set `name` as one Ray Dataset of uniform rows (lazy).

    `render_chat` turns the chats of a chat built-in source read into a text data set into text
    (the run's chat template); without it their messages are joined, which is only fit for
    training the tokenizer.

    For a `generate` data set: the items its last generation wrote (`alloylm.generate`), which
    must have run first.
    """
    dataset = config.datasets[name]
    if dataset.generate is not None:
        from alloylm.generate.run import generated_items_uri

        items = generated_items_uri(config, name)
        if not storage.exists(items):
            raise SourceError(f"data set {name!r} is generated, and its items are not there yet ({items}): run its generation first")
        ds = _read_files(items, dataset)[0]
        return ds.limit(dataset.max_records) if dataset.max_records is not None else ds
    parts = []
    for source in dataset.sources:
        if source.startswith("builtin:"):
            parts += _read_builtin(source, dataset, config, render_chat)
        elif source.startswith("hf:"):
            parts += _read_huggingface(source, dataset)
        else:
            parts += _read_files(source, dataset)
    ds = parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])
    if dataset.max_records is not None:
        ds = ds.limit(dataset.max_records)
    return ds
