"""Checking a teacher's answer and turning it into records of the generated data set's format.

A teacher's answer is free text that should hold JSON. `parse_answer` finds the JSON, checks every
item against the task's shape and returns the good items with one `Malformed` entry (a reason
code and what was wrong) per answer or item that is not: a malformed answer is counted and
dropped, never written as data. `dedup_key` says when two items ask the same question.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from alloylm.evaluate.benchmark import parse_item

# Shortest question worth training on or asking: a few words.
MIN_QUESTION_CHARS = 10
MAX_ANSWER_SHOWN = 400
_THINKING = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_FENCE = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)```", re.DOTALL)
_REFERS_TO_SOURCE = re.compile(r"\b(the|this|that|above) (excerpt|passage)\b", re.IGNORECASE)
_NOT_WORD = re.compile(r"[\W_]+")


@dataclass(frozen=True)
class Malformed:
    """One answer or item that is not usable: its reason code and what was wrong."""

    reason: str
    detail: str


@dataclass(frozen=True)
class ChunkRequest:
    """What one request was about: the chunk, its document, and (benchmarks) the split its items go to."""

    chunk_id: str
    document_id: str
    split: str = ""


def _shown(text: str) -> str:
    return text if len(text) <= MAX_ANSWER_SHOWN else text[:MAX_ANSWER_SHOWN] + "..."


def find_json(content: str) -> tuple[Any, bool]:
    """(the first JSON object or list in `content`, whether it is only a part of a larger one that
    does not parse); code fences and <think> blocks skipped; ValueError if there is none.

    A part: an answer cut off at max_tokens, or with a trailing comma, fails to parse from its first
    bracket, and the first value that parses is then an item inside it. Such an answer is counted
    as malformed (its other items are lost), though the item found is kept.
    """
    text = _THINKING.sub("", content)
    fenced = _FENCE.findall(text)
    candidates = [*fenced, text]
    decoder = json.JSONDecoder()
    for candidate in candidates:
        failed: list[int] = []
        scalars: tuple[Any, bool] | None = None  # a list of no objects: prose such as a citation "[1]"
        for match in re.finditer(r"[\[{]", candidate):
            try:
                value, _ = decoder.raw_decode(candidate, match.start())
            except ValueError:
                failed.append(match.start())
                continue
            if isinstance(value, (dict, list)):
                # inside a bracket that failed: more brackets opened than closed since it (a count
                # that ignores strings; prose such as "[1]" before the JSON closes itself)
                inside = any(_open_brackets(candidate[q : match.start()]) > 0 for q in failed)
                if isinstance(value, list) and value and not any(isinstance(v, dict) for v in value):
                    scalars = scalars or (value, inside)  # the answer's JSON may come after it
                    continue
                return value, inside
        if scalars is not None:
            return scalars
    raise ValueError("no JSON object or list in the answer")


def _open_brackets(text: str) -> int:
    return text.count("{") + text.count("[") - text.count("}") - text.count("]")


def _item_list(value: Any) -> list[Any] | None:
    """The items of an answer: {"items": [...]}, a bare list, or one item object."""
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        if isinstance(value.get("items"), list):
            return value["items"]
        if "question" in value:
            return [value]
    return None


def _text_field(item: dict, key: str) -> str:
    if key not in item:
        raise _ItemProblem("missing_field", f"no {key!r} (keys: {', '.join(sorted(map(str, item))) or 'none'})")
    value = item[key]
    if not isinstance(value, str):
        raise _ItemProblem("missing_field", f"{key!r} is {type(value).__name__}, not a string")
    value = value.strip()
    if not value:
        raise _ItemProblem("empty_field", f"{key!r} is empty")
    return value


class _ItemProblem(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def _question(item: dict) -> str:
    question = _text_field(item, "question")
    if len(question) < MIN_QUESTION_CHARS:
        raise _ItemProblem("too_short", f"question {question!r} is shorter than {MIN_QUESTION_CHARS} characters")
    if _REFERS_TO_SOURCE.search(question):
        raise _ItemProblem("not_self_contained", f"question {question!r} refers to the excerpt it was written from")
    return question


def _answer_index(value: Any, count: int) -> int:
    """An option index: an integer, a digit string, or a letter A, B, ... (what teachers write)."""
    if isinstance(value, bool):
        raise _ItemProblem("bad_choices", f"answer_index {value!r} is not an index")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str):
        value = value.strip()
        if value.isdigit():
            value = int(value)
        elif len(value) == 1 and value.upper() in "ABCDEFGH":
            value = "ABCDEFGH".index(value.upper())
    if not isinstance(value, int) or not 0 <= value < count:
        raise _ItemProblem("bad_choices", f"answer_index {value!r} does not index the {count} choices")
    return value


def _record(task: str, item: dict, request: ChunkRequest, index: int, question_type: str, num_choices: int) -> dict:
    """One checked item -> the record written to the data set (raises _ItemProblem)."""
    provenance = {"id": f"{request.chunk_id}/{index}", "source_chunk": request.chunk_id, "source_document": request.document_id}
    question = _question(item)
    if task == "qa":
        answer = _text_field(item, "answer")
        return {**provenance, "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
    if task == "preference":
        chosen, rejected = _text_field(item, "chosen"), _text_field(item, "rejected")
        if _NOT_WORD.sub(" ", chosen).strip().casefold() == _NOT_WORD.sub(" ", rejected).strip().casefold():
            raise _ItemProblem("chosen_equals_rejected", "the chosen and rejected answers say the same")
        return {**provenance, "prompt": question, "chosen": chosen, "rejected": rejected}
    record: dict[str, Any] = {**provenance, "split": request.split, "question": question}
    if question_type == "multiple_choice":
        choices = item.get("choices")
        if not isinstance(choices, list) or not all(isinstance(c, str) and c.strip() for c in choices):
            raise _ItemProblem("bad_choices", "choices must be a list of non-empty strings")
        choices = [c.strip() for c in choices]
        if len(choices) != num_choices or len(set(choices)) != len(choices):
            raise _ItemProblem("bad_choices", f"expected {num_choices} different choices, got {len(choices)} ({len(set(choices))} different)")
        index = _answer_index(item.get("answer_index"), len(choices))
        record.update(type="multiple_choice", choices=choices, answer_index=index, answer=choices[index])
    else:
        record.update(type="short_answer", choices=[], answer_index=-1, answer=_text_field(item, "answer"))
    try:
        # The evaluation's own check: a generated benchmark item must load where benchmarks are read.
        parse_item(record)
    except ValueError as exc:
        raise _ItemProblem("bad_benchmark_item", str(exc)) from None
    return record


def parse_answer(
    content: str | None,
    finish_reason: str | None,
    *,
    task: str,
    request: ChunkRequest,
    items_wanted: int,
    question_type: str = "short_answer",
    num_choices: int = 4,
) -> tuple[list[dict], list[Malformed], int]:
    """(records, malformed entries, items beyond `items_wanted` left out) of one teacher answer."""
    if content is None or not content.strip():
        return [], [Malformed("empty_answer", "the answer has no text")], 0
    reason = "truncated" if finish_reason == "length" else "not_json"
    try:
        value, partial = find_json(content)
    except ValueError:
        what = "cut off at max_tokens before its JSON was complete" if reason == "truncated" else "no JSON in it"
        return [], [Malformed(reason, f"{what}: {_shown(content)!r}")], 0
    flagged = []  # the answer itself, when only a part of it could be read
    if partial:
        what = "cut off at max_tokens" if reason == "truncated" else "its JSON does not parse"
        flagged.append(Malformed(reason, f"{what}; only an item inside it was read: {_shown(content)!r}"))
    items = _item_list(value)
    if items is None:
        return [], [*flagged, Malformed("wrong_shape", f'expected {{"items": [...]}}, got {_shown(json.dumps(value))}')], 0
    if not items:
        return [], [*flagged, Malformed("no_items", "the answer lists no items")], 0
    records, malformed = [], flagged
    for index, item in enumerate(items[:items_wanted]):
        if not isinstance(item, dict):
            malformed.append(Malformed("wrong_shape", f"item {index} is {type(item).__name__}, not an object"))
            continue
        try:
            records.append(_record(task, item, request, index, question_type, num_choices))
        except _ItemProblem as exc:
            malformed.append(Malformed(exc.reason, f"item {index}: {exc}"))
    return records, malformed, max(0, len(items) - items_wanted)


def dedup_key(record: dict) -> str:
    """Two records with the same key ask the same question (case, spacing and punctuation aside)."""
    if "messages" in record:
        question = next(m["content"] for m in record["messages"] if m["role"] == "user")
    elif "prompt" in record:
        question = record["prompt"]
    else:
        question = record["question"]
    return _NOT_WORD.sub(" ", question).strip().casefold()
