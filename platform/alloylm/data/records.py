"""Turning one source row into AlloyLM's record shape for its format (text, chat, preference, benchmark).

Every reader (files, Hugging Face, built-in) calls `to_record`; a row that does not fit raises
`RecordError` with a reason code, which the pipeline counts instead of crashing.
"""

from __future__ import annotations

from typing import Any

from alloylm.config import ColumnMapping

BENCHMARK_KEYS = ("question", "type", "split")  # and `answer`, which a multiple-choice item may leave to its choices
_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant", "user": "user",
                 "assistant": "assistant", "system": "system"}


class RecordError(Exception):
    """A source row that cannot become a record; `reason` is the code counted in the manifest."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _column(row: dict[str, Any], name: str) -> Any:
    if name not in row:
        raise RecordError("missing_field", f"no column {name!r} (columns: {', '.join(sorted(row))})")
    return row[name]


def _text(row: dict[str, Any], name: str) -> str:
    """A column that holds one message's text: a string, never a null (which str() would make "None",
    or a pandas NaN "nan") or a number."""
    value = _column(row, name)
    if not isinstance(value, str):
        raise RecordError("missing_field", f"column {name!r} is {'empty (null)' if value is None else type(value).__name__}, not a string")
    return value


def _as_messages(value: Any, field: str, default_role: str) -> list[dict[str, str]]:
    """Accept a string (one message of `default_role`) or a list of {role, content} / ShareGPT {from, value}."""
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if hasattr(value, "tolist"):  # numpy arrays out of Arrow
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not value:
        raise RecordError("bad_messages", f"{field}: expected a string or a non-empty list of messages")
    messages = []
    for index, message in enumerate(value):
        if not isinstance(message, dict):
            raise RecordError("bad_messages", f"{field}[{index}]: expected a mapping with role and content")
        role = message.get("role", message.get("from"))
        content = message.get("content", message.get("value"))
        if role not in _ROLE_ALIASES or not isinstance(content, str):
            raise RecordError("bad_messages", f"{field}[{index}]: needs a known role and string content, got {message!r}")
        messages.append({"role": _ROLE_ALIASES[role], "content": content})
    return messages


def _chat(row: dict[str, Any], columns: ColumnMapping) -> dict[str, Any]:
    if columns.user is not None:
        messages = []
        if columns.system is not None and row.get(columns.system):
            messages.append({"role": "system", "content": str(row[columns.system])})
        messages.append({"role": "user", "content": _text(row, columns.user)})
        messages.append({"role": "assistant", "content": _text(row, columns.assistant)})
    else:
        field = columns.messages or "messages"
        messages = _as_messages(_column(row, field), field, "user")
    if not any(m["role"] == "assistant" for m in messages):
        raise RecordError("no_assistant_turn", "the chat has no assistant message to learn from")
    return {"messages": messages}


def _preference(row: dict[str, Any], columns: ColumnMapping) -> dict[str, Any]:
    prompt_field = columns.prompt or "prompt"
    chosen_field, rejected_field = columns.chosen or "chosen", columns.rejected or "rejected"
    chosen = _as_messages(_column(row, chosen_field), chosen_field, "assistant")
    rejected = _as_messages(_column(row, rejected_field), rejected_field, "assistant")
    if prompt_field in row and row[prompt_field] is not None:
        prompt = _as_messages(row[prompt_field], prompt_field, "user")
    elif len(chosen) > 1:
        prompt = chosen[:-1]
    else:
        raise RecordError("missing_field", f"no column {prompt_field!r} and the chosen answer carries no prompt")
    # Some data sets (e.g. orpo-dpo-mix) store whole conversations in chosen/rejected: keep the last turn.
    if len(chosen) > 1 and chosen[:-1] == prompt:
        chosen = chosen[-1:]
    if len(rejected) > 1 and rejected[:-1] == prompt:
        rejected = rejected[-1:]
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise RecordError("bad_messages", "chosen and rejected must end with an assistant message")
    if chosen == rejected:
        raise RecordError("chosen_equals_rejected", "chosen and rejected answers are identical")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _benchmark(row: dict[str, Any]) -> dict[str, Any]:
    for key in BENCHMARK_KEYS:
        _column(row, key)
    if row["type"] not in ("multiple_choice", "short_answer"):
        raise RecordError("bad_benchmark_item", f"type must be multiple_choice or short_answer, got {row['type']!r}")
    if row["split"] not in ("validation", "test"):
        raise RecordError("bad_benchmark_item", f"split must be validation or test, got {row['split']!r}")
    record = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in row.items()}
    # As the evaluator reads an item (`evaluate.benchmark.parse_item`): answer_index null is none
    # (-1), a whole float (pandas writes 1.0 into a column with gaps) is that integer, and a
    # multiple-choice item without `answer` has its indexed choice for one.
    index = record.get("answer_index")
    index = -1 if index is None else index
    if isinstance(index, float) and index.is_integer():
        index = int(index)
    if isinstance(index, bool) or not isinstance(index, int):
        raise RecordError("bad_benchmark_item", f"answer_index must be an integer, got {index!r}")
    record["answer_index"] = index
    choices = record.get("choices") or []
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise RecordError("bad_benchmark_item", f"choices must be a list of strings, got {choices!r}")
    record["choices"] = choices
    if record["type"] == "multiple_choice":
        if not 0 <= index < len(choices):
            raise RecordError("bad_benchmark_item", f"answer_index {index!r} does not index choices ({len(choices)})")
        if not isinstance(record.get("answer"), str) or not record["answer"].strip():
            record["answer"] = choices[index]
    elif "answer" not in record:
        raise RecordError("missing_field", f"no column 'answer' (columns: {', '.join(sorted(row))})")
    # The types the prepared table stores them as: a wrong one is this item's problem, named here,
    # not an Arrow error that stops the whole data set.
    for key in ("question", "answer"):
        if not isinstance(record.get(key), str):
            raise RecordError("bad_benchmark_item", f"{key} must be a string, got {record.get(key)!r}")
    for key in ("unit", "material", "property", "fact_id", "answer_prefix"):
        label = record.get(key)
        if isinstance(label, (int, float)) and not isinstance(label, bool):
            record[key] = str(label)  # a numbered fact or material
        elif label is not None and not isinstance(label, str):
            raise RecordError("bad_benchmark_item", f"{key} must be a string, got {label!r}")
    value = record.get("answer_value")
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise RecordError("bad_benchmark_item", f"answer_value must be a number or null, got {value!r}")
    return record


def to_record(row: dict[str, Any], fmt: str, columns: ColumnMapping) -> dict[str, Any]:
    """One source row -> the record of `fmt`; raises RecordError if the row does not fit."""
    if fmt == "text":
        value = _column(row, columns.text or "text")
        if not isinstance(value, str):
            raise RecordError("bad_text", f"column {columns.text or 'text'!r} is {type(value).__name__}, not a string")
        return {"text": value}
    if fmt == "chat":
        return _chat(row, columns)
    if fmt == "preference":
        return _preference(row, columns)
    if fmt == "benchmark":
        return _benchmark(row)
    raise ValueError(f"unknown format {fmt!r}")


def record_id(row: dict[str, Any], columns: ColumnMapping, fallback: str) -> str:
    if columns.id is not None and row.get(columns.id) is not None:
        return str(row[columns.id])
    if columns.id is None and isinstance(row.get("id"), (str, int)):
        return str(row["id"])
    return fallback
