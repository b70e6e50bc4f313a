"""Cutting documents into the chunks a teacher is asked about, and holding documents out.

Chunks end at paragraph ends, or inside a long paragraph at sentence ends, so a question never
depends on text the teacher did not see. Which documents are held out is a seeded draw over their
ids, the same for every data set that reads them, so held-out benchmark questions and training
items never come from the same document.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class Chunk:
    """A piece of one document; its id is `<document id>#<index in the document>`."""

    id: str
    document_id: str
    text: str


def _unit_hash(*parts: object) -> float:
    """A number in [0, 1) fixed by `parts`: the same on every machine and every run."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _split_long(paragraph: str, max_chars: int) -> list[str]:
    """A paragraph longer than max_chars, cut at sentence ends (at spaces for an endless sentence)."""
    pieces: list[str] = []
    for sentence in _SENTENCE_BREAK.split(paragraph):
        while len(sentence) > max_chars:
            cut = sentence.rfind(" ", 0, max_chars)
            cut = cut if cut > 0 else max_chars
            pieces.append(sentence[:cut].strip())
            sentence = sentence[cut:].strip()
        if sentence:
            pieces.append(sentence)
    out: list[str] = []
    for piece in pieces:
        if out and len(out[-1]) + 1 + len(piece) <= max_chars:
            out[-1] = f"{out[-1]} {piece}"
        else:
            out.append(piece)
    return out


def split_document(text: str, max_chars: int) -> list[str]:
    """`text` as consecutive chunks of at most max_chars characters, joined paragraphs where they fit."""
    pieces: list[str] = []
    for paragraph in _PARAGRAPH_BREAK.split(text):
        paragraph = paragraph.strip()
        if paragraph:
            pieces += [paragraph] if len(paragraph) <= max_chars else _split_long(paragraph, max_chars)
    chunks: list[str] = []
    for piece in pieces:
        if chunks and len(chunks[-1]) + 2 + len(piece) <= max_chars:
            chunks[-1] = f"{chunks[-1]}\n\n{piece}"
        else:
            chunks.append(piece)
    return chunks


def document_chunks(document_id: str, text: str, max_chars: int, min_chars: int) -> tuple[list[Chunk], int]:
    """(chunks of at least min_chars, how many shorter ones were left out) of one document."""
    chunks, short = [], 0
    for index, piece in enumerate(split_document(text, max_chars)):
        if len(piece) < min_chars:
            short += 1
        else:
            chunks.append(Chunk(f"{document_id}#{index}", document_id, piece))
    return chunks, short


def heldout_documents(document_ids: list[str], fraction: float, seed: int) -> set[str]:
    """The held-out documents: round(fraction * n) of them by a seeded hash of their ids; at least one
    when fraction > 0 and n >= 2, and never all of them."""
    ids = sorted(set(document_ids))
    if fraction <= 0 or len(ids) < 2:
        return set()
    count = min(len(ids) - 1, max(1, round(fraction * len(ids))))
    return set(sorted(ids, key=lambda d: _unit_hash(seed, "heldout", d))[:count])


def benchmark_split(document_id: str, validation_fraction: float, seed: int) -> str:
    """The benchmark split of a held-out document's questions: validation or test."""
    return "validation" if _unit_hash(seed, "split", document_id) < validation_fraction else "test"


def sample_chunks(chunks: list[Chunk], max_chunks: int | None, seed: int) -> list[Chunk]:
    """At most max_chunks of `chunks`, drawn by a seeded hash of their ids, in their original order."""
    if max_chunks is None or len(chunks) <= max_chunks:
        return list(chunks)
    chosen = set(sorted(range(len(chunks)), key=lambda i: _unit_hash(seed, "sample", chunks[i].id))[:max_chunks])
    return [chunk for i, chunk in enumerate(chunks) if i in chosen]
