"""Text normalisation, length filters and content hashes for exact deduplication."""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from typing import Any

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_TRAILING_SPACE = re.compile(r"[ \t]+\n")
_BLANK_RUNS = re.compile(r"\n{3,}")


def normalise_text(text: str) -> str:
    """NFC, Unix newlines, no control characters, no trailing spaces, at most one blank line in a row."""
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\ufeff", "")
    text = _CONTROL.sub("", text)
    text = _TRAILING_SPACE.sub("\n", text)
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


def content_hash(record: dict[str, Any]) -> str:
    blob = json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()
