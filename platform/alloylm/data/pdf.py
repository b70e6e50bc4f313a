"""Text out of PDF papers: pypdf's per-page extraction, then the clean-up a paper needs before it is
training text (running headers and footers, page numbers, hyphenated line breaks, line-wrapped
paragraphs, the reference list).

`extract_pdf_text` takes a file's bytes and returns its text or raises `PdfExtractionError` with a
reason code, which data preparation counts per file instead of crashing. The clean-up itself,
`pages_to_text`, is a pure function of each page's lines.
"""

from __future__ import annotations

import io
import logging
import re
from collections import Counter
from dataclasses import dataclass, field

log = logging.getLogger("alloylm.data")

# Share of the page height, at the top and at the bottom, where running headers and footers live.
_MARGIN_ZONE = 0.09
# Without positions (a visitor that saw nothing), the first and last lines of a page stand in.
_ZONE_LINES = 2
# A line is a running header or footer when it repeats (digits ignored) in the margin of at
# least this share of pages; below two pages nothing can repeat.
_REPEAT_SHARE = 0.5
_LIGATURES = str.maketrans({"\ufb00": "ff", "\ufb01": "fi", "\ufb02": "fl", "\ufb03": "ffi", "\ufb04": "ffl", "\ufb05": "st", "\ufb06": "st"})
_PAGE_NUMBER = re.compile(r"^\s*(page\s*)?[-\u2013\u2014]?\s*\d{1,4}\s*[-\u2013\u2014]?\s*((of|/)\s*\d{1,4})?\s*$", re.IGNORECASE)
_REFERENCES_HEADING = re.compile(
    r"^\s*((\d+(\.\d+)*|[IVX]+)\.?\s+)?(references( and notes)?|bibliography|literature cited|works cited|cited literature)\s*:?\s*$",
    re.IGNORECASE,
)
_AFTER_REFERENCES_HEADING = re.compile(
    r"^\s*((\d+(\.\d+)*|[A-Z])\.?\s+)?(appendix|appendices|supplementary (material|information|data)|supporting information)\b.{0,60}$",
    re.IGNORECASE,
)
# The reference list is searched for only after this share of the lines: "References" early in
# a paper is a word in the text, not the list.
_REFERENCES_EARLIEST = 0.3
_HYPHEN_BREAK = re.compile(r"([A-Za-z\u00c0-\u024f]+)[-\u00ad]$")
_WORD_START = re.compile(r"^([a-z\u00df-\u024f][A-Za-z\u00c0-\u024f]*)")
# Longer than any word a hyphen breaks (the longest English words are about 45 letters).
_LONGEST_WORD = 200
_SENTENCE_END = re.compile(r"[.!?:][\"'\u201d)\]]*$")


class PdfExtractionError(Exception):
    """A PDF that yields no text; `reason` is the code counted in the data set's manifest."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class PdfPage:
    """One page's text lines in pypdf's order, and which of them sit in the top or bottom margin."""

    lines: list[str]
    margin_lines: frozenset[str] = field(default_factory=frozenset)  # keys (see `_line_key`) of margin lines


@dataclass(frozen=True)
class PdfText:
    """The text of one PDF and what the clean-up did to it."""

    text: str
    pages: int
    pages_failed: int
    running_lines_removed: int
    references_dropped: bool


def _line_key(line: str) -> str:
    """Lines compare equal across pages when they differ only in digits and spacing ("Page 3" / "Page 4")."""
    return re.sub(r"\d+", "#", re.sub(r"\s+", "", line)).casefold()


def _page_lines(page) -> PdfPage:
    """pypdf's text of one page in content-stream order, with the keys of lines drawn in its margins.

    Plain (not "layout") extraction on purpose: papers are written column by column into the
    content stream, so its order is the reading order, while layout mode interleaves the lines of
    two columns that share a height.
    """
    height = float(page.mediabox.height) or 1.0
    bottom = float(page.mediabox.bottom)
    fragments: list[tuple[float, str]] = []

    def visit(text: str, cm: list[float], tm: list[float], font: object, size: object) -> None:
        if text.strip():
            y = tm[4] * cm[1] + tm[5] * cm[3] + cm[5]  # the text origin's y on the page (tm x cm)
            fragments.append((y, text))

    text = page.extract_text(visitor_text=visit) or ""
    lines = [line.translate(_LIGATURES).strip() for line in text.splitlines()]
    margin: dict[int, list[str]] = {}
    for y, fragment in fragments:
        share = (y - bottom) / height
        if share > 1 - _MARGIN_ZONE or share < _MARGIN_ZONE:
            margin.setdefault(round(y), []).append(fragment)
    keys = set()
    for parts in margin.values():
        # One margin line may reach the visitor in several fragments, or several lines in one.
        joined = "".join(parts).translate(_LIGATURES)
        keys.add(_line_key(joined))
        keys.update(_line_key(part) for part in joined.splitlines())
    keys.discard("")
    return PdfPage([line for line in lines if line], frozenset(keys))


def _margin_indices(page: PdfPage) -> list[int]:
    """Indices of the lines of `page` that lie in its margins (by position, or first/last lines)."""
    if page.margin_lines:
        return [i for i, line in enumerate(page.lines) if _line_key(line) in page.margin_lines]
    count = len(page.lines)
    return sorted(set(range(min(_ZONE_LINES, count))) | set(range(max(0, count - _ZONE_LINES), count)))


def _strip_running_lines(pages: list[PdfPage]) -> tuple[list[list[str]], int]:
    """Each page's lines without running headers/footers and page numbers; and how many went."""
    zone_keys = [{_line_key(page.lines[i]) for i in _margin_indices(page)} for page in pages]
    seen_on = Counter(key for keys in zone_keys for key in keys)
    needed = max(2, round(_REPEAT_SHARE * len(pages)))
    running = {key for key, count in seen_on.items() if count >= needed}
    kept_pages, removed = [], 0
    for page in pages:
        margin = set(_margin_indices(page))
        kept = []
        for index, line in enumerate(page.lines):
            if index in margin and (_line_key(line) in running or _PAGE_NUMBER.match(line)):
                removed += 1
            else:
                kept.append(line)
        kept_pages.append(kept)
    return kept_pages, removed


def _drop_references(lines: list[str]) -> tuple[list[str], bool]:
    """The lines without the reference list: from its heading to the end or to an appendix."""
    start = None
    for index in range(len(lines) - 1, int(len(lines) * _REFERENCES_EARLIEST) - 1, -1):
        if _REFERENCES_HEADING.match(lines[index]):
            start = index
            break
    if start is None:
        return lines, False
    end = next((i for i in range(start + 1, len(lines)) if _AFTER_REFERENCES_HEADING.match(lines[i])), len(lines))
    return lines[:start] + lines[end:], True


def _headings(lines: list[str], full: int) -> list[bool]:
    """Which lines start a section ("2 Methods", "Abstract"): short, no closing punctuation, a capital
    or a number first, right after a sentence ended (or at the start), and not continued by the
    next line in lower case."""
    out: list[bool] = []
    for index, line in enumerate(lines):
        after_sentence = index == 0 or out[-1] or bool(_SENTENCE_END.search(lines[index - 1]))
        continued = index + 1 < len(lines) and lines[index + 1][:1].islower()
        # The first line may be a title as wide as the page; other headings are short.
        short = index == 0 or len(line) < 0.6 * full
        out.append(
            after_sentence
            and not continued
            and short
            and len(line.split()) <= 12
            and not _SENTENCE_END.search(line)
            and not line.endswith((",", ";", "-", "\u00ad"))
            and (line[:1].isupper() or line[:1].isdigit())
        )
    return out


def _join_lines(lines: list[str]) -> str:
    """Line-wrapped text -> paragraphs: hyphenated breaks joined, wrapped lines joined with a space,
    a paragraph ending at a short line that ends a sentence, and headings on their own."""
    lengths = sorted(len(line) for line in lines)
    full = lengths[int(0.8 * (len(lengths) - 1))] if lengths else 0
    headings = _headings(lines, full)
    counts = _WordCounts("\n".join(lines))
    paragraphs: list[str] = []
    current = ""
    for index, line in enumerate(lines):
        if headings[index]:
            if current:
                paragraphs.append(current)
            paragraphs.append(line)
            current = ""
            continue
        if not current:
            current = line
        else:
            # From near its end: a search of the whole paragraph at every line was quadratic in its length.
            broken = _HYPHEN_BREAK.search(current, max(0, len(current) - _LONGEST_WORD))
            start = _WORD_START.match(line)
            if broken and start:
                head, tail = broken.group(1), start.group(1)
                keep_hyphen = current.endswith("-") and counts.keeps_hyphen(head, tail)
                current = current[: broken.start()] + head + ("-" if keep_hyphen else "") + line
            elif current.endswith("-") and current[-2:-1].isalnum() and line[:1].isalnum():
                current += line  # a range or a name broken at its own hyphen: "10-" / "20", "COVID-" / "19"
            else:
                current = f"{current} {line}"
        last = index == len(lines) - 1
        short_sentence_end = len(line) < 0.75 * full and _SENTENCE_END.search(line)
        if last or headings[index + 1] or short_sentence_end:
            paragraphs.append(current)
            current = ""
    if current:
        paragraphs.append(current)
    return "\n\n".join(paragraphs)


class _WordCounts:
    """A text's words and hyphenated word pairs, counted once, case-insensitively. Each line break
    used to scan the whole text twice with a regex: quadratic in a book's length (thousands of
    breaks over megabytes)."""

    def __init__(self, body: str):
        self._words: Counter | None = None
        self._pairs: Counter | None = None
        self._body = body

    def keeps_hyphen(self, head: str, tail: str) -> bool:
        """Whether `head-` + `tail` at a line break is a hyphenated compound rather than a word
        split: the text has `head-tail` more often than `headtail` (whole words)."""
        if self._words is None:  # counted at the first break: most texts have none
            self._words = Counter(word.lower() for word in re.findall(r"\w+", self._body))
            # Every "a-b" of whole words, overlapping ("x-y-z" holds x-y and y-z).
            self._pairs = Counter((a.lower(), b.lower()) for a, b in re.findall(r"(?=\b(\w+)-(\w+)\b)", self._body))
        return self._pairs[(head.lower(), tail.lower())] > self._words[(head + tail).lower()]


def pages_to_text(pages: list[PdfPage]) -> tuple[str, int, bool]:
    """(text, running lines removed, whether a reference list was dropped) of a paper's pages."""
    kept_pages, removed = _strip_running_lines(pages)
    lines = [line for page in kept_pages for line in page]
    lines, dropped = _drop_references(lines)
    return _join_lines(lines), removed, dropped


def extract_pdf_text(data: bytes, name: str = "<pdf>") -> PdfText:
    """The cleaned text of the PDF in `data`; raises PdfExtractionError (with a reason) if it has none.

    A page pypdf cannot read is skipped and counted (`pages_failed`); the file fails only when no
    page gives text: `unreadable_pdf` (not a PDF, or broken), `encrypted_pdf` (needs a password) or
    `no_text_pdf` (no text layer, e.g. a scan: OCR is not done here).
    """
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise PdfExtractionError("encrypted_pdf", f"{name}: encrypted PDF (a password is needed)")
        count = len(reader.pages)
    except PdfExtractionError:
        raise
    except (PyPdfError, ValueError, KeyError, TypeError, OSError, RecursionError) as exc:
        # pypdf raises its own errors, and plain ones from deep inside on corrupt files.
        raise PdfExtractionError("unreadable_pdf", f"{name}: not a readable PDF ({type(exc).__name__}: {exc})") from None
    pages, failed = [], 0
    for number in range(count):
        try:
            pages.append(_page_lines(reader.pages[number]))
        except Exception as exc:  # one broken page (font, stream) must not lose the paper
            failed += 1
            log.warning("%s: page %d skipped: %s: %s", name, number + 1, type(exc).__name__, exc)
    if failed == count:
        raise PdfExtractionError("unreadable_pdf", f"{name}: none of its {count} pages could be read")
    text, removed, dropped = pages_to_text(pages)
    if not text.strip():
        raise PdfExtractionError("no_text_pdf", f"{name}: no text layer in its {count} pages (a scan? OCR is not done)")
    return PdfText(text=text, pages=count, pages_failed=failed, running_lines_removed=removed, references_dropped=dropped)
