"""Domain multiple choice, scored by the log-likelihood of each option (no generation, no parsing).

`plain` prompts are lm-evaluation-harness's cloze form (`Question: ...\\nAnswer:` then ` option`);
`chat` prompts ask in the format the SFT data teaches (lettered options in the user turn, the
answer `B. option`). Accuracy is reported raw and length-normalised (log-likelihood divided by the
option's length in characters, lm-eval's acc_norm), with the chance level of the items scored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from alloylm.corpus import CHOICE_LABELS, render_multiple_choice
from alloylm.evaluate.benchmark import BenchmarkItem
from alloylm.evaluate.scorer import CausalLMScorer, LogLikelihood

SUITE = "multiple_choice"


def option_requests(item: BenchmarkItem, *, chat: bool, prompt: Callable[[str], str]) -> list[tuple[str, str]]:
    """(context, continuation) for each option of `item`; `prompt` turns a user message into the context."""
    if chat:
        context = prompt(render_multiple_choice(item.question, item.choices))
        return [(context, f"{CHOICE_LABELS[i]}. {choice}") for i, choice in enumerate(item.choices)]
    context = prompt(item.question)
    return [(context, f" {choice}") for choice in item.choices]


def _argmax(values: Sequence[float]) -> int:
    # The first of equal maxima, as numpy.argmax (and so lm-eval) picks it.
    best = 0
    for i, value in enumerate(values):
        if value > values[best]:
            best = i
    return best


def score_multiple_choice(
    items: Sequence[BenchmarkItem], loglikelihoods: Sequence[Sequence[LogLikelihood]]
) -> tuple[dict, list[dict]]:
    """Metrics and per-item details from each item's option log-likelihoods (one list per item)."""
    if len(items) != len(loglikelihoods):
        raise ValueError(f"{len(items)} items but {len(loglikelihoods)} log-likelihood lists")
    details = []
    correct = correct_norm = 0
    chance = 0.0
    for item, options in zip(items, loglikelihoods):
        if len(options) != len(item.choices):
            raise ValueError(f"item {item.id}: {len(item.choices)} choices but {len(options)} log-likelihoods")
        raw = [o.logprob for o in options]
        normalised = [o.logprob / max(1, len(choice)) for o, choice in zip(options, item.choices)]
        pick, pick_norm = _argmax(raw), _argmax(normalised)
        correct += pick == item.answer_index
        correct_norm += pick_norm == item.answer_index
        chance += 1.0 / len(item.choices)
        details.append(
            {
                "id": item.id,
                "question": item.question,
                "choices": list(item.choices),
                "answer_index": item.answer_index,
                "loglikelihoods": raw,
                "tokens": [o.tokens for o in options],
                "predicted": pick,
                "predicted_norm": pick_norm,
                "correct": pick == item.answer_index,
                "correct_norm": pick_norm == item.answer_index,
            }
        )
    n = len(items)
    metrics = {
        "accuracy": correct / n if n else None,
        "accuracy_norm": correct_norm / n if n else None,
        "chance": chance / n if n else None,
        "items": n,
    }
    return metrics, details


def run_multiple_choice(scorer: CausalLMScorer, items: Sequence[BenchmarkItem], *, prompt: str) -> tuple[dict, list[dict]]:
    """Score `items` with `scorer`; `prompt` is the suite's auto/chat/plain setting."""
    chat = scorer.uses_chat(prompt)
    pairs, spans = [], []
    for item in items:
        requests = option_requests(item, chat=chat, prompt=lambda text: scorer.prompt(text, chat=chat))
        spans.append((len(pairs), len(requests)))
        pairs.extend(scorer.encode_pair(context, continuation, chat=chat) for context, continuation in requests)
    flat = scorer.loglikelihood(pairs)
    metrics, details = score_multiple_choice(items, [flat[start : start + count] for start, count in spans])
    metrics["prompt"] = "chat" if chat else "plain"
    return metrics, details
