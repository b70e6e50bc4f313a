"""PDF papers as a text source: extraction on PDFs made here with reportlab (two columns, running
header and footer, hyphenated line breaks, a reference list), and a folder of papers with a corrupt
and a text-less PDF prepared on a real local Ray cluster."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pypdf
import pytest
from reportlab.lib.pagesizes import A4
from reportlab.pdfgen import canvas

from alloylm import storage
from alloylm.config import validate_config
from alloylm.data.pdf import PdfExtractionError, extract_pdf_text
from alloylm.data.prepare import prepare_all

HEADER = "Journal of Imaginary Materials 12 (2031) 100-131"
COLUMN_CHARS = 50
LINES_PER_COLUMN = 34
LONG_WORDS = ("hierarchical", "mineralisation", "microstructural", "toughening", "viscoelastic")


def _paragraph(index: int) -> str:
    """A paragraph that starts with its own marker word and is full of words a hyphenator splits."""
    sentences = [f"Marker{index:02d} opens this paragraph about sample {index}."]
    for k in range(5):
        word = LONG_WORDS[(index + k) % len(LONG_WORDS)]
        sentences.append(
            f"The {word} response of specimen {index}-{k} reached {10 + (index * 7 + k) % 50} MPa "
            f"while its brick-and-mortar layers stayed intact under {k + 2} loading cycles, unlike "
            f"{LONG_WORDS[(index + 2 * k + 1) % len(LONG_WORDS)]} controls."
        )
    return " ".join(sentences)


def _wrap(text: str, width: int, splits: list[tuple[str, str, str]]) -> list[str]:
    """Greedy wrap to `width` characters, hyphenating like a typesetter: a long word that does not
    fit is split with a hyphen, a hyphenated one at its own hyphen. Each split is added to `splits`
    as (kind, head, tail), kind `word` or `compound`."""
    lines, current = [], ""
    for word in text.split():
        candidate = f"{current} {word}".strip()
        if len(candidate) <= width:
            current = candidate
            continue
        room = width - len(current) - 1
        head, kind = "", ""
        if "-" in word and word.index("-") + 1 <= room:
            cut = word[:room].rindex("-") + 1
            head, word, kind = word[:cut], word[cut:], "compound"
        elif word.strip(".,").isalpha() and len(word) >= 8 and room >= 4:
            cut = min(room - 1, len(word) - 3)
            head, word, kind = word[:cut] + "-", word[cut:], "word"
        if head:
            lines.append(f"{current} {head}".strip())
            splits.append((kind, head, word))
        else:
            lines.append(current)
        current = word
    if current:
        lines.append(current)
    return lines


def make_paper(paragraphs: int = 14, references: bool = True) -> tuple[bytes, list[tuple[str, str, str]]]:
    """A two-column paper of several pages: (PDF bytes, the line-break splits the layout made)."""
    splits: list[tuple[str, str, str]] = []
    lines: list[str] = []
    for index in range(paragraphs):
        if index % 5 == 0:
            lines += ["", f"{index // 5 + 1} Results part {index // 5 + 1}"]
        lines += [""] + _wrap(_paragraph(index), COLUMN_CHARS, splits)
    if references:
        lines += ["", "References"]
        for k in range(1, 7):
            lines.append(f"[{k}] A. Author{k}, B. Writer, J. Imag. Mater. {k} (2030) {k}-{k + 9}.")
    columns = [lines[i : i + LINES_PER_COLUMN] for i in range(0, len(lines), LINES_PER_COLUMN)]
    pages = [columns[i : i + 2] for i in range(0, len(columns), 2)]
    width, height = A4
    buffer = io.BytesIO()
    pdf = canvas.Canvas(buffer, pagesize=A4)
    for number, page in enumerate(pages, start=1):
        pdf.setFont("Helvetica", 8)
        pdf.drawString(50, height - 40, HEADER)
        pdf.setFont("Helvetica", 9)
        top = height - 80
        if number == 1:
            pdf.setFont("Helvetica-Bold", 14)
            pdf.drawString(50, top, "Graded Toughness of Invented Shell Materials")
            pdf.setFont("Helvetica", 9)
            top -= 30
        for column, column_lines in enumerate(page):
            for row, line in enumerate(column_lines):
                pdf.drawString(50 + column * 265, top - 13 * row, line)
        pdf.setFont("Helvetica", 8)
        pdf.drawString(width / 2 - 20, 30, f"Page {number} of {len(pages)}")
        pdf.showPage()
    pdf.save()
    return buffer.getvalue(), splits


def make_blank_pdf() -> bytes:
    """A PDF with a drawing and no text layer (what a scan looks like to a text extractor)."""
    buffer = io.BytesIO()
    pdf = canvas.Canvas(buffer, pagesize=A4)
    pdf.rect(100, 100, 300, 300, fill=1)
    pdf.showPage()
    pdf.save()
    return buffer.getvalue()


CORRUPT_PDF = b"%PDF-1.7\n1 0 obj << /Type /Catalog /Pages 2 0 R >>\n" + bytes(range(256)) * 4 + b"\n%%EOF"


@pytest.fixture(scope="module")
def paper() -> tuple[bytes, list[tuple[str, str, str]]]:
    return make_paper()


def test_columns_are_read_in_order_with_the_title_first(paper):
    data, _ = paper
    text = extract_pdf_text(data, "paper.pdf").text
    markers = [int(m) for m in re.findall(r"Marker(\d\d)", text)]
    assert markers == list(range(14))
    assert text.startswith("Graded Toughness of Invented Shell Materials")
    # The layout really is two columns side by side: pypdf's layout mode reads across them.
    reader = pypdf.PdfReader(io.BytesIO(data))
    across = "".join(page.extract_text(extraction_mode="layout") for page in reader.pages)
    assert [int(m) for m in re.findall(r"Marker(\d\d)", across)] != list(range(14))


def test_running_header_and_page_numbers_are_removed(paper):
    data, _ = paper
    result = extract_pdf_text(data, "paper.pdf")
    assert result.pages >= 3
    assert "Imaginary Materials" not in result.text
    assert not re.search(r"Page \d+ of \d+", result.text)
    assert result.running_lines_removed == 2 * result.pages


def test_hyphenated_line_breaks_are_joined_and_compounds_keep_their_hyphen(paper):
    data, splits = paper
    text = extract_pdf_text(data, "paper.pdf").text
    words = [(head, tail) for kind, head, tail in splits if kind == "word"]
    compounds = [(head, tail) for kind, head, tail in splits if kind == "compound"]
    assert words and compounds, "the layout should have split both plain words and hyphenated ones"
    for head, tail in words:
        assert head[:-1] + tail in text, head[:-1] + tail
        assert head + tail not in text and f"{head} " not in text
    for head, tail in compounds:
        assert head + tail in text, head + tail
    assert text.count("brick-and-mortar") == 14 * 5
    assert all(f"specimen {i}-{k} reached" in text for i in range(14) for k in range(5))
    # Wrapped lines became paragraphs again: the title, three headings and fourteen paragraphs.
    paragraphs = text.split("\n\n")
    assert paragraphs[:3] == ["Graded Toughness of Invented Shell Materials", "1 Results part 1", _paragraph(0)]
    assert [p for p in paragraphs if p.startswith("Marker")] == [_paragraph(i) for i in range(14)]
    assert len(paragraphs) == 1 + 3 + 14


def test_the_hyphen_decision_counts_whole_words_as_the_regex_definition_does():
    """Counted once per text (a regex scan per line break was quadratic in a book), with the same
    answer as the definition: `head-tail` found more often than `headtail`, whole words, any case."""
    import re

    from alloylm.data.pdf import _WordCounts

    body = (
        "A well-known brick-and-mortar design. Well-Known again; wellknown once. Co-operate, co-operate, cooperate.\n"
        "Pre-stressed pre-stressed prestressed prestressed. Sub-micron x-sub-micron. Non-linear-ity, nonlinear.\n"
        "re-entrant Re-Entrant reentrant_x bio-inspired bio-inspired2 bioinspired"
    )
    counts = _WordCounts(body)
    pairs = [("well", "known"), ("brick", "and"), ("and", "mortar"), ("co", "operate"), ("pre", "stressed"), ("sub", "micron"),
             ("non", "linear"), ("linear", "ity"), ("re", "entrant"), ("bio", "inspired"), ("Well", "Known"), ("mortar", "design")]
    for head, tail in pairs:
        hyphenated = len(re.findall(rf"\b{re.escape(head)}-{re.escape(tail)}\b", body, re.IGNORECASE))
        joined = len(re.findall(rf"\b{re.escape(head + tail)}\b", body, re.IGNORECASE))
        assert counts.keeps_hyphen(head, tail) == (hyphenated > joined), (head, tail, hyphenated, joined)
    assert counts.keeps_hyphen("well", "known") and not counts.keeps_hyphen("pre", "stressed") and counts.keeps_hyphen("and", "mortar")


def test_reference_list_is_dropped(paper):
    data, _ = paper
    result = extract_pdf_text(data, "paper.pdf")
    assert result.references_dropped
    assert "J. Imag. Mater." not in result.text and "References" not in result.text
    assert "Marker13" in result.text and result.text.rstrip().endswith("controls.")
    kept = extract_pdf_text(make_paper(paragraphs=3, references=False)[0], "short.pdf")
    assert not kept.references_dropped and "Marker02" in kept.text


def test_unusable_pdfs_raise_with_a_reason():
    with pytest.raises(PdfExtractionError) as corrupt:
        extract_pdf_text(CORRUPT_PDF, "corrupt.pdf")
    assert corrupt.value.reason == "unreadable_pdf" and "corrupt.pdf" in str(corrupt.value)
    with pytest.raises(PdfExtractionError) as blank:
        extract_pdf_text(make_blank_pdf(), "scan.pdf")
    assert blank.value.reason == "no_text_pdf"


def test_folder_of_papers_is_prepared_and_failures_are_counted_per_file(ray_cluster, tmp_path):
    from alloylm.models.tokenizer import train_tokenizer

    papers = tmp_path / "papers"
    papers.mkdir()
    (papers / "paper.pdf").write_bytes(make_paper()[0])
    (papers / "short.pdf").write_bytes(make_paper(paragraphs=3, references=False)[0])
    (papers / "corrupt.pdf").write_bytes(CORRUPT_PDF)
    (papers / "scan.pdf").write_bytes(make_blank_pdf())
    (papers / "notes.md").write_text("# Notes\n\nNacre tablets slide past one another before they break.\n")
    tokenizer_dir = tmp_path / "tokenizer"
    train_tokenizer([_paragraph(i) for i in range(20)], vocab_size=400).save_pretrained(str(tokenizer_dir))
    config = validate_config(
        {
            "experiment": "pdf",
            "storage": str(tmp_path / "runs"),
            "tokenizer": {"from": str(tokenizer_dir)},
            "datasets": {"papers": {"source": str(papers), "format": "text"}},
            "data": {"block_size": 32, "tokenizer_actors": 1},
        }
    )
    manifest = prepare_all(config)["papers"]
    counts = manifest["counts"]
    assert counts["dropped"] == {"unreadable_pdf": 1, "no_text_pdf": 1}
    assert counts["documents_kept"] == 3 and counts["blocks"] > 0
    uri = storage.join(config.run_uri, "data", "papers")
    problems = [json.loads(line) for line in storage.read_text(storage.join(uri, "problems.jsonl")).splitlines()]
    assert {p["reason"]: Path(p["id"]).name for p in problems} == {"unreadable_pdf": "corrupt.pdf", "no_text_pdf": "scan.pdf"}
    # The cleaned documents are kept with the data set, for generation (and for reading what was extracted).
    documents = {
        Path(row["id"]).name: row["text"]
        for file in manifest["documents"]
        for row in pq.read_table(storage.join(uri, file)).to_pylist()
    }
    assert sorted(documents) == ["notes.md", "paper.pdf", "short.pdf"]
    assert "Marker13" in documents["paper.pdf"] and "Imaginary Materials" not in documents["paper.pdf"]
    assert "J. Imag. Mater." not in documents["paper.pdf"]
