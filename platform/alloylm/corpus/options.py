"""The knobs of the built-in corpus generator: seed and sizes, checked when the options are built."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

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
            "Fraction of the facts of each property (of the materials, with `holdout: material`) held out for the "
            "benchmark: stated in the CPT text, never in an SFT chat or a preference pair."
        ),
    )
    holdout: Literal["fact", "material"] = Field(
        "fact",
        description=(
            "What the benchmark holds out. `fact`: `benchmark_fraction` of the facts of each property, so a "
            "material's other facts are in SFT chats. `material`: `benchmark_fraction` of the materials with all "
            "their facts, so SFT never names a benchmark material and its answers cannot be recalled from SFT "
            "(the split of Physics of Language Models 3.1, which fine-tunes on half the individuals and asks "
            "about the other half); validation and test then hold different materials."
        ),
    )
    validation_fraction: float = Field(
        0.5,
        gt=0.0,
        lt=1.0,
        description="Fraction of the held-out facts (materials, with `holdout: material`) whose benchmark items go to `validation`; the rest go to `test`.",
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

    @model_validator(mode="after")
    def _two_held_out_materials(self) -> BuiltinCorpusOptions:
        if self.holdout == "material" and held_out_count(self.materials, self.benchmark_fraction) < 2:
            raise ValueError(
                f"holdout: material needs at least 2 held-out materials (one for validation, one for test); "
                f"benchmark_fraction {self.benchmark_fraction} of {self.materials} materials holds out "
                f"{held_out_count(self.materials, self.benchmark_fraction)}"
            )
        return self


def held_out_count(count: int, fraction: float) -> int:
    """`fraction` of `count`, rounded, but at least one and never all. The benchmark holds out this
    many of a property's facts (holdout: fact) or of the materials (holdout: material) with
    `benchmark_fraction`, and deals this many of the held-out ones to validation with
    `validation_fraction`."""
    return min(max(round(fraction * count), 1), count - 1)
