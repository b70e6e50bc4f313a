"""CircularEval: a fake scorer whose choice depends on the option order shows accuracy and
accuracy_circular apart, as computed by hand; the probability of the correct option is continuous."""

from __future__ import annotations

import math

import pytest

from alloylm.corpus import CHOICE_LABELS
from alloylm.evaluate.benchmark import BenchmarkItem
from alloylm.evaluate.multiple_choice import option_requests, rotate_item, run_multiple_choice
from alloylm.evaluate.scorer import LogLikelihood


class _FakeScorer:
    """Scores `(context, continuation)` strings without a model.

    chat: the option shown first (label A) gets log-likelihood 0, the others -1, unless the option
    text is in `known`, which then gets +1 whatever its position. plain: only `known` matters.
    """

    def __init__(self, known=(), chat=True):
        self.known = set(known)
        self.chat = chat
        self.calls = 0

    def uses_chat(self, prompt):
        return self.chat

    def prompt(self, text, *, chat):
        return text

    def encode_pair(self, context, continuation, *, chat):
        return context, continuation

    def loglikelihood(self, pairs):
        self.calls += len(pairs)
        out = []
        for _context, continuation in pairs:
            label, _, text = continuation.partition(". ") if self.chat else ("", "", continuation.strip())
            value = (0.0 if label == "A" else -1.0) if self.chat else -1.0
            if text in self.known:
                value = 1.0
            out.append(LogLikelihood(value, 1, False))
        return out


def _item(id_, choices, answer_index):
    return BenchmarkItem(
        id=id_, split="test", type="multiple_choice", question=f"q {id_}", answer=choices[answer_index],
        choices=tuple(choices), answer_index=answer_index, fact_id=f"fact-{id_}",
    )


ITEMS = [
    _item("a", ["w", "x", "y", "z"], 0),  # answer shown first: an A-picker is right once, not in rotation
    _item("b", ["w", "x", "y", "z"], 2),  # answer third: the A-picker is wrong
    _item("c", ["k1", "k2", "k3", "k4"], 1),  # the model knows k2: right in every rotation
    _item("d", ["m1", "m2", "m3", "m4"], 0),  # answer first, unknown
]


def test_rotation_moves_the_answer_with_its_option():
    rotated = rotate_item(ITEMS[1], 1)
    assert rotated.choices == ("x", "y", "z", "w") and rotated.answer_index == 1
    assert rotated.choices[rotated.answer_index] == ITEMS[1].answer


def test_position_bias_inflates_accuracy_but_not_circular_accuracy():
    scorer = _FakeScorer(known={"k2"})
    metrics, details = run_multiple_choice(scorer, ITEMS, prompt="chat", circular=True)
    # By hand, options in their own order: the A-picker is right on a and d (answer at A), the
    # known option wins c, b is wrong: accuracy 3/4. In every rotation only c stays right: 1/4.
    assert metrics["accuracy"] == pytest.approx(3 / 4)
    assert metrics["accuracy_circular"] == pytest.approx(1 / 4)
    assert [d["correct_circular"] for d in details] == [False, False, True, False]
    assert details[0]["rotations_correct"] == [True, False, False, False]
    assert scorer.calls == 4 * 4 * 4  # chat: every rotation scored anew
    # P(correct): an unknown item's answer is at A (e^0 against 3 e^-1) in one rotation, and e^-1 against e^0 + 3 e^-1 in
    # the other three; a known item has e^1 against 3 e^-1 (A's 0 when the answer is not first).
    e = math.e
    unknown = (1 / (1 + 3 / e) + 3 * (1 / e) / (1 + 3 / e)) / 4
    known = (e / (e + 3 / e) + 3 * e / (e + 1 + 2 / e)) / 4
    assert details[0]["prob_correct"] == pytest.approx(unknown)
    assert details[2]["prob_correct"] == pytest.approx(known)
    assert metrics["mean_prob_correct"] == pytest.approx((3 * unknown + known) / 4)
    assert metrics["predicted_position_share"]["A"] == pytest.approx(13 / 16)  # all but c's three non-A answers


def test_without_rotations_circular_equals_plain_accuracy():
    metrics, _ = run_multiple_choice(_FakeScorer(known={"k2"}), ITEMS, prompt="chat", circular=False)
    assert metrics["accuracy"] == metrics["accuracy_circular"] == pytest.approx(3 / 4)


def test_plain_prompts_reuse_the_loglikelihoods_and_only_ties_depend_on_order():
    # plain: each option is scored alone, so order cannot matter except for ties: all four options
    # of a, b, d tie at -1 and the first shown wins, so a and d are right unrotated but not circular.
    scorer = _FakeScorer(known={"k2"}, chat=False)
    metrics, _ = run_multiple_choice(scorer, ITEMS, prompt="plain", circular=True)
    assert scorer.calls == 4 * 4  # once per option, not per rotation
    assert metrics["accuracy"] == pytest.approx(3 / 4)
    assert metrics["accuracy_circular"] == pytest.approx(1 / 4)


def test_cloze_formulation_scores_each_option_after_the_answer_prefix_once():
    # cloze: the question alone (no options listed, no letters), each option the continuation of
    # the item's answer prefix; order cannot matter, so rotations reuse one pass per option.
    prefixed = [
        BenchmarkItem(
            id="p", split="test", type="multiple_choice", question="What is the toughness of X?", answer="9 MJ/m3",
            choices=("4 MJ/m3", "9 MJ/m3", "2 MJ/m3"), answer_index=1, answer_prefix="The toughness of X is",
        )
    ]
    requests = option_requests(prefixed[0], chat=True, prompt=lambda text: f"<user>{text}</user><assistant>", formulation="cloze")
    assert requests == [
        ("<user>What is the toughness of X?</user><assistant>The toughness of X is", f" {choice}") for choice in prefixed[0].choices
    ]
    plain = option_requests(prefixed[0], chat=False, prompt=lambda text: f"Question: {text}\nAnswer:", formulation="cloze")
    assert plain[0] == ("Question: What is the toughness of X?\nAnswer: The toughness of X is", " 4 MJ/m3")
    bare = option_requests(ITEMS[0], chat=True, prompt=lambda text: text, formulation="cloze")
    assert bare == [("q a", choice) for choice in ITEMS[0].choices]  # no prefix: the option starts the answer

    scorer = _FakeScorer(known={"9 MJ/m3"}, chat=False)
    metrics, details = run_multiple_choice(scorer, prefixed, prompt="chat", circular=True, formulation="cloze")
    assert scorer.calls == 3 and metrics["formulation"] == "cloze"
    assert metrics["accuracy"] == metrics["accuracy_circular"] == 1.0
