"""The domain benchmark's items: read from a prepared `benchmark` data set or a JSONL/parquet file,
checked item by item, and split into validation and test.

A malformed item stops evaluation before any model is scored, with the file and the item named:
a benchmark that silently drops items would change every variant's denominator.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from typing import Any

from alloylm.evaluate.prepared import EvaluationInputError, is_file_source, read_prepared_table, read_records_file

ITEM_TYPES = ("multiple_choice", "short_answer")
MAX_PROBLEMS_SHOWN = 20


@dataclass(frozen=True)
class BenchmarkItem:
    """One benchmark question with its answer (an option index, a text and maybe a number with a unit)."""

    id: str
    split: str
    type: str
    question: str
    answer: str
    choices: tuple[str, ...] = ()
    answer_index: int = -1
    answer_value: float | None = None
    unit: str | None = None
    material: str | None = None
    property: str | None = None
    fact_id: str | None = None
    # The start of the answer, written for the model in the cloze formulation (lm-eval's `gen_prefix`):
    # "The toughness of X is" puts each option where the trained answer format puts a value.
    answer_prefix: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "split": self.split,
            "type": self.type,
            "question": self.question,
            "choices": list(self.choices),
            "answer_index": self.answer_index,
            "answer": self.answer,
            "answer_value": self.answer_value,
            "unit": self.unit,
            "material": self.material,
            "property": self.property,
            "fact_id": self.fact_id,
            "answer_prefix": self.answer_prefix,
        }


def _optional_str(row: dict, key: str) -> str | None:
    value = row.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string, got {type(value).__name__}")
    return value or None


def parse_item(row: dict[str, Any]) -> BenchmarkItem:
    """One row -> a BenchmarkItem; a ValueError says what is wrong with it."""
    if "__unparsed__" in row:
        raise ValueError(row["__unparsed__"])
    if not isinstance(row, dict):
        raise ValueError(f"an item must be an object, got {type(row).__name__}")
    missing = [k for k in ("id", "split", "type", "question") if row.get(k) in (None, "")]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)}")
    type_, split = row["type"], row["split"]
    if type_ not in ITEM_TYPES:
        raise ValueError(f"type must be one of {', '.join(ITEM_TYPES)}, got {type_!r}")
    if split not in ("validation", "test"):
        raise ValueError(f"split must be validation or test, got {split!r}")
    if not isinstance(row["question"], str) or not row["question"].strip():
        raise ValueError("question must be a non-empty string")
    choices = row.get("choices") or []
    if not isinstance(choices, (list, tuple)) or not all(isinstance(c, str) and c.strip() for c in choices):
        raise ValueError("choices must be a list of non-empty strings")
    index = row.get("answer_index", -1)
    index = -1 if index is None else index
    if isinstance(index, float) and index.is_integer():
        index = int(index)
    if not isinstance(index, int) or isinstance(index, bool):
        raise ValueError(f"answer_index must be an integer, got {index!r}")
    answer = row.get("answer")
    if type_ == "multiple_choice":
        if len(choices) < 2:
            raise ValueError(f"a multiple-choice item needs at least 2 choices, got {len(choices)}")
        if len(set(choices)) != len(choices):
            raise ValueError("choices repeat")
        if not 0 <= index < len(choices):
            raise ValueError(f"answer_index {index} does not index its {len(choices)} choices")
        answer = answer or choices[index]
    if not isinstance(answer, str) or not answer.strip():
        raise ValueError("answer must be a non-empty string")
    value = row.get("answer_value")
    if value is not None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"answer_value must be a number, got {value!r}")
        value = None if math.isnan(value) else float(value)
        if value is not None and math.isinf(value):
            raise ValueError("answer_value must be finite")
    metadata = row.get("metadata") or {}
    if isinstance(metadata, str):
        try:
            metadata = json.loads(metadata)
        except ValueError:
            metadata = {"raw": metadata}
    return BenchmarkItem(
        id=str(row["id"]),
        split=split,
        type=type_,
        question=row["question"],
        answer=answer,
        choices=tuple(choices),
        answer_index=index,
        answer_value=value,
        unit=_optional_str(row, "unit"),
        material=_optional_str(row, "material"),
        property=_optional_str(row, "property"),
        fact_id=_optional_str(row, "fact_id"),
        answer_prefix=_optional_str(row, "answer_prefix"),
        metadata=metadata if isinstance(metadata, dict) else {"raw": metadata},
    )


def load_benchmark(uri: str) -> list[BenchmarkItem]:
    """Every item of the benchmark at `uri` (prepared data set folder, or .jsonl/.json/.parquet file).

    Raises EvaluationInputError naming the file and each malformed item (the first 20 of them).
    """
    if is_file_source(uri):
        rows = read_records_file(uri)
    else:
        table, manifest = read_prepared_table(uri)
        if manifest.get("format") not in (None, "benchmark"):
            raise EvaluationInputError(f"{uri} is a {manifest.get('format')!r} data set, not a benchmark")
        rows = [(f"{uri} row {i + 1}", row) for i, row in enumerate(table.to_pylist())]
    items: list[BenchmarkItem] = []
    problems: list[str] = []
    seen: dict[str, str] = {}
    for where, row in rows:
        label = f"{where} (id {row.get('id')!r})" if isinstance(row, dict) and row.get("id") is not None else where
        try:
            item = parse_item(row)
        except ValueError as exc:
            problems.append(f"{label}: {exc}")
            continue
        if item.id in seen:
            problems.append(f"{label}: id repeats the item at {seen[item.id]}")
            continue
        seen[item.id] = where
        items.append(item)
    if problems:
        shown = "\n  ".join(problems[:MAX_PROBLEMS_SHOWN])
        more = f"\n  ... and {len(problems) - MAX_PROBLEMS_SHOWN} more" if len(problems) > MAX_PROBLEMS_SHOWN else ""
        raise EvaluationInputError(f"benchmark {uri}: {len(problems)} malformed item(s):\n  {shown}{more}")
    if not items:
        raise EvaluationInputError(f"benchmark {uri} has no items")
    return items


def select_items(
    items: list[BenchmarkItem], *, split: str, type_: str, max_items: int | None, seed: int
) -> list[BenchmarkItem]:
    """The items of one split and type in file order; at most `max_items`, drawn with `seed`.

    Drawn rather than the first ones: the file is ordered by material, and the first items would
    all ask about the same few materials.
    """
    chosen = [item for item in items if item.split == split and item.type == type_]
    if max_items is None or len(chosen) <= max_items:
        return chosen
    keep = sorted(random.Random(f"{seed}:{split}:{type_}").sample(range(len(chosen)), max_items))
    return [chosen[i] for i in keep]
