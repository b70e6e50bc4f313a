"""Domain multiple choice, scored by the log-likelihood of each option (no generation, no parsing).

`plain` prompts are lm-evaluation-harness's cloze form (`Question: ...\\nAnswer:` then ` option`);
`chat` prompts ask in the format the SFT data teaches (lettered options in the user turn, the
answer `B. option`). Accuracy is reported raw and length-normalised (log-likelihood divided by the
option's length in characters, lm-eval's acc_norm), with the chance level of the items scored.

Order robustness (MMBench's CircularEval): with `circular`, every item is also asked with its
options rotated by 1..n-1 places, and `accuracy_circular` counts an item right only when every
rotation is. In the chat form the options are listed in the prompt and each continuation carries
its letter, so a rotation changes both and must be scored anew (n times the forward passes). In
the plain form the prompt is the question alone and each option is scored as a bare continuation:
the log-likelihoods do not depend on the order, so the rotations reuse them and only the tie-break
(the first of equal maxima) can change.

`mean_prob_correct` is the probability of the correct option under a softmax over the options'
log-likelihoods, averaged over the rotations scored and then over items: a continuous measure of
the same knowledge, which moves when accuracy does not (the merge search's default objective).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence

from alloylm.corpus import CHOICE_LABELS, render_multiple_choice
from alloylm.evaluate.benchmark import BenchmarkItem
from alloylm.evaluate.scorer import CausalLMScorer, LogLikelihood

SUITE = "multiple_choice"


def option_requests(
    item: BenchmarkItem, *, chat: bool, prompt: Callable[[str], str], formulation: str = "letters"
) -> list[tuple[str, str]]:
    """(context, continuation) for each option of `item`; `prompt` turns a user message into the context.

    `letters` (OLMES's multiple-choice formulation) lists the options and scores `B. option` in the
    chat form; `cloze` asks the question alone and scores each option as the continuation of the
    item's `answer_prefix` (or of the bare prompt), the form small models can answer in (OLMES,
    Gu et al. 2024, evaluates small models in cloze for this reason).
    """
    if formulation == "cloze":
        context = prompt(item.question)
        if item.answer_prefix:
            context = context + item.answer_prefix if chat else f"{context} {item.answer_prefix}"
            return [(context, f" {choice}") for choice in item.choices]
        return [(context, choice if chat else f" {choice}") for choice in item.choices]
    if chat:
        context = prompt(render_multiple_choice(item.question, item.choices))
        return [(context, f"{CHOICE_LABELS[i]}. {choice}") for i, choice in enumerate(item.choices)]
    context = prompt(item.question)
    return [(context, f" {choice}") for choice in item.choices]


def rotate_item(item: BenchmarkItem, shift: int) -> BenchmarkItem:
    """`item` with its options rotated left by `shift`: option i is shown at position (i - shift) mod n."""
    n = len(item.choices)
    shift %= n
    choices = item.choices[shift:] + item.choices[:shift]
    return BenchmarkItem(
        id=item.id,
        split=item.split,
        type=item.type,
        question=item.question,
        answer=item.answer,
        choices=choices,
        answer_index=(item.answer_index - shift) % n,
        answer_value=item.answer_value,
        unit=item.unit,
        material=item.material,
        property=item.property,
        fact_id=item.fact_id,
        answer_prefix=item.answer_prefix,
        metadata=item.metadata,
    )


def _argmax(values: Sequence[float]) -> int:
    # The first of equal maxima, as numpy.argmax (and so lm-eval) picks it.
    best = 0
    for i, value in enumerate(values):
        if value > values[best]:
            best = i
    return best


def _softmax_at(values: Sequence[float], index: int) -> float:
    top = max(values)
    if not math.isfinite(top):
        return 1.0 / len(values)
    weights = [math.exp(v - top) for v in values]
    return weights[index] / sum(weights)


def score_multiple_choice(
    items: Sequence[BenchmarkItem],
    loglikelihoods: Sequence[Sequence[LogLikelihood]],
    rotations: Sequence[Sequence[Sequence[LogLikelihood]]] | None = None,
) -> tuple[dict, list[dict]]:
    """Metrics and per-item details from each item's option log-likelihoods (one list per item).

    `loglikelihoods` are the options in the item's own order. `rotations` (optional) holds, per
    item, one list per rotation shift 0..n-1 of the options' log-likelihoods when shown rotated by
    that shift, each list in the item's own option order; without it the item counts as asked once
    (accuracy_circular equals accuracy).
    """
    if len(items) != len(loglikelihoods):
        raise ValueError(f"{len(items)} items but {len(loglikelihoods)} log-likelihood lists")
    if rotations is not None and len(rotations) != len(items):
        raise ValueError(f"{len(items)} items but {len(rotations)} rotation lists")
    details = []
    correct = correct_norm = correct_circular = 0
    chance = prob_total = 0.0
    positions: Counter[int] = Counter()
    for k, (item, options) in enumerate(zip(items, loglikelihoods)):
        n = len(item.choices)
        if len(options) != n:
            raise ValueError(f"item {item.id}: {n} choices but {len(options)} log-likelihoods")
        raw = [o.logprob for o in options]
        normalised = [o.logprob / max(1, len(choice)) for o, choice in zip(options, item.choices)]
        pick, pick_norm = _argmax(raw), _argmax(normalised)
        asked = [(0, raw)]
        if rotations is not None:
            if len(rotations[k]) != n or any(len(r) != n for r in rotations[k]):
                raise ValueError(f"item {item.id}: rotations must be {n} lists of {n} log-likelihoods")
            asked = [(shift, [o.logprob for o in rotation]) for shift, rotation in enumerate(rotations[k])]
        rotation_right = []
        probabilities = []
        for shift, values in asked:
            # As shown: position p holds option (p + shift) mod n; ties go to the first shown.
            shown = [values[(p + shift) % n] for p in range(n)]
            position = _argmax(shown)
            positions[position] += 1
            rotation_right.append((position + shift) % n == item.answer_index)
            probabilities.append(_softmax_at(values, item.answer_index))
        prob_correct = sum(probabilities) / len(probabilities)
        circular = all(rotation_right)
        correct += pick == item.answer_index
        correct_norm += pick_norm == item.answer_index
        correct_circular += circular
        prob_total += prob_correct
        chance += 1.0 / n
        details.append(
            {
                "id": item.id,
                "fact_id": item.fact_id,
                "question": item.question,
                "choices": list(item.choices),
                "answer_index": item.answer_index,
                "loglikelihoods": raw,
                "tokens": [o.tokens for o in options],
                "predicted": pick,
                "predicted_norm": pick_norm,
                "correct": pick == item.answer_index,
                "correct_norm": pick_norm == item.answer_index,
                "rotations_correct": [bool(r) for r in rotation_right],
                "correct_circular": circular,
                "prob_correct": prob_correct,
            }
        )
    n_items = len(items)
    asked_total = sum(positions.values())
    metrics = {
        "accuracy": correct / n_items if n_items else None,
        "accuracy_norm": correct_norm / n_items if n_items else None,
        "accuracy_circular": correct_circular / n_items if n_items else None,
        "mean_prob_correct": prob_total / n_items if n_items else None,
        "chance": chance / n_items if n_items else None,
        "items": n_items,
        "rotations": rotations is not None,
        # Share of answers given at each shown position, over every rotation asked: a model that
        # always says "A" shows here, whatever the answer key.
        "predicted_position_share": {
            CHOICE_LABELS[p]: positions[p] / asked_total for p in sorted(positions)
        } if asked_total else {},
    }
    return metrics, details


def run_multiple_choice(
    scorer: CausalLMScorer, items: Sequence[BenchmarkItem], *, prompt: str, circular: bool = True, formulation: str = "letters"
) -> tuple[dict, list[dict]]:
    """Score `items` with `scorer`; `prompt` is the suite's auto/chat/plain setting, `formulation`
    letters or cloze (`option_requests`).

    With `circular`, every rotation of the options is scored too (see the module docstring for
    what that costs in each prompt form).
    """
    chat = scorer.uses_chat(prompt)
    # Only lettered options in a chat prompt depend on the order; elsewhere a rotation changes no log-likelihood.
    rescored = circular and chat and formulation == "letters"
    pairs, spans = [], []
    for item in items:
        shifts = range(len(item.choices)) if rescored else (0,)
        for shift in shifts:
            requests = option_requests(
                rotate_item(item, shift), chat=chat, prompt=lambda text: scorer.prompt(text, chat=chat), formulation=formulation
            )
            spans.append((len(pairs), len(requests)))
            pairs.extend(scorer.encode_pair(context, continuation, chat=chat) for context, continuation in requests)
    flat = scorer.loglikelihood(pairs)
    per_item: list[list[list[LogLikelihood]]] = []
    cursor = 0
    for item in items:
        n = len(item.choices)
        shifts = range(n) if rescored else (0,)
        asked = []
        for shift in shifts:
            start, count = spans[cursor]
            cursor += 1
            shown = flat[start : start + count]
            # Back to the item's own option order: option i was shown at position (i - shift) mod n.
            asked.append([shown[(i - shift) % n] for i in range(n)])
        per_item.append(asked)
    given = [asked[0] for asked in per_item]
    if not circular:
        rotations = None
    elif rescored:
        rotations = per_item
    else:
        rotations = [[asked[0]] * len(item.choices) for item, asked in zip(items, per_item)]
    metrics, details = score_multiple_choice(items, given, rotations)
    metrics["prompt"] = "chat" if chat else "plain"
    metrics["formulation"] = formulation
    return metrics, details
