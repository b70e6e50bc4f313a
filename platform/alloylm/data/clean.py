"""Text normalisation, length filters and content hashes for exact deduplication."""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from typing import Any

# Control characters other than tab and newline (carriage returns become newlines first).
_CONTROL_CHARS = [*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F]
_DELETE_CONTROL = dict.fromkeys(_CONTROL_CHARS)
_CONTROL = re.compile("[" + "".join(re.escape(chr(c)) for c in _CONTROL_CHARS) + "]")
_TRAILING_SPACE = re.compile(r"[ \t]+\n")
_BLANK_RUNS = re.compile(r"\n{3,}")


def normalise_text(text: str) -> str:
    """NFC, Unix newlines, no control characters, no trailing spaces, at most one blank line in a row."""
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\ufeff", "")
    # str.translate and substring tests run in C; the regexes run only where they can match,
    # which keeps normalisation a small part of cleaning on text that is mostly clean already.
    if _CONTROL.search(text):  # a search is a tenth of a translate's cost on text without any
        text = text.translate(_DELETE_CONTROL)
    if " \n" in text or "\t\n" in text:
        text = _TRAILING_SPACE.sub("\n", text)
    if "\n\n\n" in text:
        text = _BLANK_RUNS.sub("\n\n", text)
    return text.strip()


def _normalise_messages(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{"role": m["role"], "content": normalise_text(m["content"])} for m in messages]


def normalise_record(record: dict[str, Any], fmt: str) -> dict[str, Any]:
    if fmt == "text":
        return {"text": normalise_text(record["text"])}
    if fmt == "chat":
        return {"messages": _normalise_messages(record["messages"])}
    if fmt == "preference":
        return {key: _normalise_messages(record[key]) for key in ("prompt", "chosen", "rejected")}
    return record


def drop_reason(record: dict[str, Any], fmt: str, *, min_chars: int, max_chars: int) -> str:
    """Why a normalised record is dropped ("" if kept)."""
    if fmt == "text":
        size = len(record["text"])
        if size == 0:
            return "empty"
        if size < min_chars:
            return "too_short"
        if size > max_chars:
            return "too_long"
    elif fmt in ("chat", "preference"):
        keys = ("messages",) if fmt == "chat" else ("prompt", "chosen", "rejected")
        if any(not m["content"] for key in keys for m in record[key] if m["role"] != "system"):
            return "empty_message"
    return ""


# Built once: json.dumps with non-default arguments builds a new encoder on every call, which
# costs as much as encoding a short record.
_CANONICAL_JSON = json.JSONEncoder(sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)  # str: a parquet row's timestamps, bytes
_RECORD_JSON = json.JSONEncoder(ensure_ascii=False)


def record_json(record: dict[str, Any]) -> str:
    """A record as the JSON text of the `record` column: `json.dumps(record, ensure_ascii=False)`."""
    return _RECORD_JSON.encode(record)


def content_hash(record: dict[str, Any]) -> str:
    return hashlib.sha1(_CANONICAL_JSON.encode(record).encode("utf-8")).hexdigest()
