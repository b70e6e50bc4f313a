"""Domain short answer: the variant answers in its own words; the answer is matched exactly and, for a
numeric fact, numerically (relative tolerance, units converted: `0.412 GPa` is `412 MPa`).

"Exact" means the gold answer, normalised (case, punctuation, spacing, unicode), appears whole in
the normalised output: a chat model answers in a sentence, so whole-output equality would score
every variant 0. A numeric item counts as correct when its numeric match holds (the first number in
a compatible unit), so listing candidates earns nothing even when the gold text is among them.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

from alloylm.evaluate.benchmark import BenchmarkItem
from alloylm.evaluate.quantities import numeric_match
from alloylm.evaluate.scorer import PLAIN_STOP, CausalLMScorer

SUITE = "short_answer"

_PUNCTUATION = re.compile(r"[,;:!?()\[\]{}\"'`“”‘’]")
_SENTENCE_DOT = re.compile(r"\.(?=\s|$)")  # a full stop, not a decimal point


def normalise_answer(text: str) -> str:
    """Lower case, NFKC, punctuation and full stops to spaces, spaces collapsed."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = _PUNCTUATION.sub(" ", text)
    text = _SENTENCE_DOT.sub(" ", text)
    return " ".join(text.split())


def exact_match(output: str, answer: str) -> bool:
    """Whether the normalised `answer` appears whole (at word boundaries) in the normalised `output`."""
    gold = normalise_answer(answer)
    return bool(gold) and f" {gold} " in f" {normalise_answer(output)} "


def score_short_answer(
    items: Sequence[BenchmarkItem], outputs: Sequence[str], *, relative_tolerance: float, require_unit: bool
) -> tuple[dict, list[dict]]:
    """Metrics and per-item details of the generated `outputs` (one per item)."""
    if len(items) != len(outputs):
        raise ValueError(f"{len(items)} items but {len(outputs)} outputs")
    details = []
    exact_count = numeric_count = numeric_items = correct_count = 0
    for item, output in zip(items, outputs):
        exact = exact_match(output, item.answer)
        numeric, taken = None, None
        if item.answer_value is not None:
            numeric_items += 1
            numeric, quantity = numeric_match(
                output, item.answer_value, item.unit, relative_tolerance=relative_tolerance, require_unit=require_unit
            )
            numeric_count += numeric
            if quantity is not None:
                taken = {"value": quantity.value, "unit": quantity.unit_text}
        # An item with a value is right when the number taken (the first in a compatible unit) is:
        # the gold text appearing somewhere in the output, among other numbers, earns nothing.
        # (A value without a unit under require_unit can never match numerically: its text decides.)
        by_number = item.answer_value is not None and not (require_unit and item.unit is None)
        correct = bool(numeric) if by_number else exact
        exact_count += exact
        correct_count += correct
        details.append(
            {
                "id": item.id,
                "fact_id": item.fact_id,
                "question": item.question,
                "answer": item.answer,
                "answer_value": item.answer_value,
                "unit": item.unit,
                "output": output,
                "exact_match": exact,
                "numeric_match": numeric,
                "number_taken": taken,
                "correct": correct,
            }
        )
    n = len(items)
    metrics = {
        "accuracy": correct_count / n if n else None,
        "exact_match": exact_count / n if n else None,
        "numeric_match": numeric_count / numeric_items if numeric_items else None,
        "items": n,
        "numeric_items": numeric_items,
    }
    return metrics, details


def run_short_answer(
    scorer: CausalLMScorer,
    items: Sequence[BenchmarkItem],
    *,
    prompt: str,
    max_new_tokens: int,
    relative_tolerance: float,
    require_unit: bool,
    seed: int,
) -> tuple[dict, list[dict]]:
    """Generate an answer to each item with `scorer` and score it."""
    chat = scorer.uses_chat(prompt)
    prompts = [scorer.prompt(item.question, chat=chat) for item in items]
    stop = () if chat else PLAIN_STOP  # a chat answer ends with its turn
    outputs = scorer.generate(prompts, chat=chat, max_new_tokens=max_new_tokens, seed=seed, stop=stop)
    metrics, details = score_short_answer(items, outputs, relative_tolerance=relative_tolerance, require_unit=require_unit)
    for detail, text in zip(details, prompts):
        detail["prompt"] = text
    metrics["prompt"] = "chat" if chat else "plain"
    return metrics, details
