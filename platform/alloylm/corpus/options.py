"""The knobs of the built-in corpus generator: seed and sizes, checked when the options are built."""

from __future__ import annotations

from pydantic import Field

from alloylm.schema import SEED_MAX, ConfigModel


class BuiltinCorpusOptions(ConfigModel):
    """Seed and sizes of the generated corpus; the same options always give byte-identical rows."""

    seed: int = Field(0, ge=0, le=SEED_MAX, description="Seed of every random draw; another seed gives another knowledge base.")
    materials: int = Field(
        40,
        ge=2,
        le=100_000,
        description="Number of invented materials; each has 7 facts (4 numeric properties, structure, organism, processing).",
    )
    documents_per_material: int = Field(
        3, ge=1, le=50, description="Paper-like CPT documents per material; each one states all 7 of its facts."
    )
    qa_per_fact: int = Field(2, ge=1, le=20, description="Paraphrased SFT chats per training fact.")
    preferences_per_fact: int = Field(1, ge=1, le=20, description="Chosen/rejected pairs per training fact.")
    benchmark_fraction: float = Field(
        0.25,
        gt=0.0,
        lt=1.0,
        description=(
            "Fraction of the facts of each property held out for the benchmark: stated in the CPT text, "
            "never in an SFT chat or a preference pair."
        ),
    )
    validation_fraction: float = Field(
        0.5, gt=0.0, lt=1.0, description="Fraction of the held-out facts whose benchmark items go to `validation`; the rest go to `test`."
    )
    choices: int = Field(4, ge=2, le=8, description="Options per multiple-choice item (the answer and choices-1 distractors).")
    multiple_choice_per_fact: int = Field(
        3,
        ge=1,
        le=8,
        description=(
            "Multiple-choice benchmark items per benchmark fact, each with its own question wording, distractors "
            "and answer position (more items resolve smaller differences; intervals resample them by fact)."
        ),
    )
    short_answer_per_fact: int = Field(
        1,
        ge=1,
        le=5,
        description=(
            "Short-answer benchmark items per benchmark fact, each with a different question wording "
            "(more items resolve smaller differences; intervals resample them by fact)."
        ),
    )
    multiple_choice_chat_fraction: float = Field(
        0.25,
        ge=0.0,
        le=1.0,
        description="Fraction of SFT chats posed as multiple choice, so SFT teaches the benchmark's answer format.",
    )
    evasive_rejected_fraction: float = Field(
        0.25,
        ge=0.0,
        le=1.0,
        description="Fraction of preference pairs whose rejected answer evades the question instead of giving a wrong value.",
    )
    system_prompt_fraction: float = Field(
        0.3, ge=0.0, le=1.0, description="Fraction of chats (domain and general) that start with a system message."
    )
    heldout_documents: int = Field(
        20, ge=1, le=1_000_000, description="Documents in `biomaterials-heldout-text`, written with phrasings the CPT text never uses."
    )
    general_documents: int = Field(300, ge=1, le=10_000_000, description="Documents in `general-text`.")
    general_heldout_documents: int = Field(
        50, ge=1, le=1_000_000, description="Documents in `general-heldout-text`, none identical to a `general-text` document."
    )
    general_chats: int = Field(300, ge=1, le=10_000_000, description="Chats in `general-chat`.")
