"""One source row -> one record: what a row must hold, and what a folder source reads."""

from __future__ import annotations

import json

import numpy as np
import pytest

from alloylm.data.config import ColumnMapping
from alloylm.data.records import RecordError, to_record
from alloylm.data.sources import expand_files
from alloylm.data.tokenize import benchmark_rows


@pytest.mark.parametrize("answer", [None, float("nan"), 42], ids=["null", "nan", "number"])
def test_a_question_answer_row_without_an_answer_text_is_dropped_not_trained_as_its_repr(answer):
    """str() made a null answer "None" (a pandas NaN "nan") and SFT learned to say it."""
    with pytest.raises(RecordError) as caught:
        to_record({"q": "What is nacre?", "a": answer}, "chat", ColumnMapping(user="q", assistant="a"))
    assert caught.value.reason == "missing_field" and "'a'" in str(caught.value)


def _item(**fields):
    return {"question": "Toughness of nacre?", "type": "short_answer", "answer": "4.1 MJ/m^3", "split": "test", **fields}


@pytest.mark.parametrize(
    "fields",
    [{"answer": 42}, {"answer_value": "42"}, {"answer_value": True},
     {"type": "multiple_choice", "choices": ["a", "b"], "answer_index": True},
     {"type": "multiple_choice", "choices": ["a", 2], "answer_index": 0}, {"material": ["nacre"]},
     {"answer_index": "A"}, {"choices": "abc"}],
    ids=["answer-number", "value-string", "value-bool", "index-bool", "choice-number", "material-list",
         "short-answer-index-letter", "short-answer-choices-string"],
)
def test_a_benchmark_item_of_the_wrong_type_is_named_not_an_arrow_error(fields):
    """Each stopped the whole data set inside a Ray task with an Arrow type error naming no item."""
    with pytest.raises(RecordError) as caught:
        to_record(_item(**fields), "benchmark", ColumnMapping())
    assert caught.value.reason == "bad_benchmark_item"


def test_a_benchmark_item_is_read_as_the_evaluator_reads_it():
    """Preparation refused what the evaluator takes: a multiple-choice item without `answer` (its
    indexed choice is the answer) and `answer_index: 1.0` (pandas writes whole numbers as floats
    into a column that has gaps); every such item was dropped from a `format: benchmark` data set."""
    from alloylm.evaluate.benchmark import parse_item

    for fields in ({"answer_index": 1.0, "answer": "calcite"}, {"answer_index": 1, "answer": None}, {"answer_index": 1.0, "answer": float("nan")}):
        item = {k: v for k, v in _item(type="multiple_choice", choices=["aragonite", "calcite"], **fields).items() if v is not None}
        record = to_record(item, "benchmark", ColumnMapping())
        assert (record["answer_index"], record["answer"]) == (1, "calcite"), fields
        table = benchmark_rows({"id": np.array(["i1"]), "record": np.array([json.dumps(record)])})
        evaluated = parse_item(table.to_pylist()[0])
        assert (evaluated.answer_index, evaluated.answer) == (1, "calcite")
    short = to_record({k: v for k, v in _item(answer_index=None).items()}, "benchmark", ColumnMapping())
    assert short["answer_index"] == -1 and short["choices"] == []


def test_a_numbered_fact_id_is_kept_as_text_and_an_items_own_metadata_is_kept():
    record = to_record(_item(fact_id=3, metadata={"source": "handbook"}, page=12), "benchmark", ColumnMapping())
    assert record["fact_id"] == "3"
    table = benchmark_rows({"id": np.array(["i1"]), "record": np.array([json.dumps(record)])})
    assert json.loads(table.column("metadata")[0].as_py()) == {"source": "handbook", "page": 12}
    assert table.column("fact_id")[0].as_py() == "3"


def test_a_folder_source_skips_hidden_folders_below_it_but_reads_a_hidden_folder_it_names(tmp_path):
    """A corpus folder under git: .git/description and the hook samples were read as documents."""
    root = tmp_path / ".corpus"
    (root / ".git" / "hooks").mkdir(parents=True)
    (root / ".git" / "description").write_text("Unnamed repository; edit this file to name it. " * 5)
    (root / ".git" / "hooks" / "pre-commit.sample").write_text("#!/bin/sh\n" * 50)
    (root / "notes" / ".ipynb_checkpoints").mkdir(parents=True)
    (root / "notes" / ".ipynb_checkpoints" / "a-checkpoint.txt").write_text("an old copy")
    (root / "notes" / "a.txt").write_text("Nacre is tough.")
    (root / "doc.txt").write_text("Silk is strong.")
    files, parquet = expand_files(str(root))
    assert sorted(f.rsplit("/", 1)[-1] for f in files) == ["a.txt", "doc.txt"] and parquet == []


def test_a_parquet_row_with_a_timestamp_column_is_read():
    """The fallback id hashes the whole row: a timestamp (or bytes) column made json fail inside the
    read task, with a traceback naming no file."""
    import datetime

    import pyarrow as pa

    from alloylm.data.sources import _table_rows

    table = pa.table({"text": ["Nacre is tough."], "created": [datetime.datetime(2024, 5, 1, 12, 0)], "raw": [b"\x00\x01"]})
    out = _table_rows(table, "text", ColumnMapping(), "corpus.parquet", has_paths=False)
    assert out["drop_reason"] == [""] and json.loads(out["record"][0]) == {"text": "Nacre is tough."}


def test_jsonl_lines_decode_one_by_one_and_a_byte_order_mark_is_not_a_bad_line(tmp_path):
    """A BOM cost the first record (malformed JSON), and one byte that is not UTF-8 cost the whole
    file as one `undecodable` row, reported by byte offset instead of line."""
    import pyarrow.fs

    from alloylm.data.sources import _files_rows

    def line(i):
        return json.dumps({"id": f"c{i}", "q": f"What is material {i}?", "a": "A composite.\u2028Tough."}).encode() + b"\r\n"

    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + line(1) + line(2))
    (tmp_path / "mixed.jsonl").write_bytes(line(1) + line(2) + line(3) + b'{"id": "c4", "q": "Caf\xe9?", "a": "x"}\n')
    [out] = _files_rows({"path": [str(tmp_path / "bom.jsonl"), str(tmp_path / "mixed.jsonl")]}, pyarrow.fs.LocalFileSystem(), "chat",
                        ColumnMapping(user="q", assistant="a"))
    rows = list(zip(out["id"], out["drop_reason"], out["detail"]))
    bad = f"{tmp_path}/mixed.jsonl:4"
    assert [(i, r) for i, r, _ in rows] == [("c1", ""), ("c2", ""), ("c1", ""), ("c2", ""), ("c3", ""), (bad, "undecodable")]
    assert rows[-1][2].startswith(f"{bad}: not UTF-8")
    assert json.loads(out["record"][0])["messages"][1]["content"] == "A composite.\u2028Tough."


def test_a_hidden_folder_above_the_source_does_not_hide_it(tmp_path, monkeypatch):
    """Given relative to a working directory under a hidden folder (~/.work/proj), a source lost every
    file: the filter looked at the whole absolute path."""
    project = tmp_path / ".work" / "proj"
    (project / "corpus" / ".git").mkdir(parents=True)
    (project / "corpus" / "doc.txt").write_text("Silk is strong.")
    (project / "corpus" / ".git" / "HEAD").write_text("ref: refs/heads/main")
    monkeypatch.chdir(project)
    for source in ("corpus", "./corpus", "corpus/*.txt", "corpus/**", str(project / "corpus")):
        files, _ = expand_files(source)
        assert [f.rsplit("/", 1)[-1] for f in files] == ["doc.txt"], source
    monkeypatch.chdir(project / "corpus")
    assert [f.rsplit("/", 1)[-1] for f in expand_files("*.txt")[0]] == ["doc.txt"]  # a glob with no folder: below the cwd


def test_identical_parquet_rows_are_told_apart_so_dedup_keeps_one():
    """A parquet read gives no row number, so identical rows got the same id and origin: dedup
    marked the kept copy a duplicate of itself and dropped both."""
    import pyarrow as pa

    from alloylm.data.sources import _table_rows

    table = pa.table({"text": ["Nacre is tough.", "Silk is strong.", "Nacre is tough."], "path": ["/d/a.parquet"] * 3})
    out = _table_rows(table, "text", ColumnMapping(), "/d", has_paths=True)
    assert len(set(zip(out["id"], out["origin"]))) == 3
    assert out["id"][0] != out["id"][2] and out["id"][2].startswith(out["id"][0])
