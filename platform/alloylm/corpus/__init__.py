"""The built-in corpus: a seeded, entirely fictional biological-materials world plus general text.

`BUILTIN_SOURCES` maps each `builtin:NAME` source to the function that generates its rows from a
`BuiltinCorpusOptions`; `BUILTIN_FORMATS` says which record format each one has.
"""

from __future__ import annotations

from collections.abc import Callable

from alloylm.corpus.biomaterials import (
    CHOICE_LABELS,
    MULTIPLE_CHOICE_INSTRUCTION,
    benchmark_items,
    corpus_documents,
    heldout_documents,
    preference_pairs,
    qa_chats,
    render_multiple_choice,
)
from alloylm.corpus.facts import PROPERTIES, PROPERTY_LABELS, Fact, KnowledgeBase, Material, build_knowledge_base
from alloylm.corpus.general import general_chats, general_heldout_text, general_text
from alloylm.corpus.options import BuiltinCorpusOptions

BUILTIN_SOURCES: dict[str, Callable[[BuiltinCorpusOptions], list[dict]]] = {
    "biomaterials-corpus": corpus_documents,
    "biomaterials-qa": qa_chats,
    "biomaterials-preferences": preference_pairs,
    "biomaterials-benchmark": benchmark_items,
    "biomaterials-heldout-text": heldout_documents,
    "general-text": general_text,
    "general-heldout-text": general_heldout_text,
    "general-chat": general_chats,
}

BUILTIN_FORMATS: dict[str, str] = {
    "biomaterials-corpus": "text",
    "biomaterials-qa": "chat",
    "biomaterials-preferences": "preference",
    "biomaterials-benchmark": "benchmark",
    "biomaterials-heldout-text": "text",
    "general-text": "text",
    "general-heldout-text": "text",
    "general-chat": "chat",
}


def builtin_source(name: str) -> Callable[[BuiltinCorpusOptions], list[dict]]:
    """The generator of the built-in source `name` (without the `builtin:` prefix)."""
    try:
        return BUILTIN_SOURCES[name]
    except KeyError:
        known = ", ".join(sorted(BUILTIN_SOURCES))
        raise ValueError(f"unknown built-in source {name!r}; known: {known}") from None


def generate_builtin(name: str, options: BuiltinCorpusOptions | None = None) -> list[dict]:
    """The rows of the built-in source `name` (default options when none are given)."""
    return builtin_source(name)(options if options is not None else BuiltinCorpusOptions())


__all__ = [
    "BUILTIN_FORMATS",
    "BUILTIN_SOURCES",
    "CHOICE_LABELS",
    "MULTIPLE_CHOICE_INSTRUCTION",
    "PROPERTIES",
    "PROPERTY_LABELS",
    "BuiltinCorpusOptions",
    "Fact",
    "KnowledgeBase",
    "Material",
    "build_knowledge_base",
    "builtin_source",
    "generate_builtin",
    "render_multiple_choice",
]
