"""The built-in prompts of each generation task, and filling a template with a chunk.

A template names its slots `{chunk}`, `{n}` and `{choices}`; every other brace is kept as written,
so a template can show the teacher the JSON it must answer with.
"""

from __future__ import annotations

import re

SYSTEM_PROMPT = (
    "You write training data for language models from scientific text. You reply with JSON only, "
    "in exactly the shape you are asked for, and nothing else."
)

_SELF_CONTAINED = (
    "- Every question must make sense on its own, without the excerpt: name the material, organism, "
    "method or quantity it is about, and never refer to \"the excerpt\", \"the passage\" or \"the text\".\n"
    "- The questions must differ from one another."
)

_EXCERPT = "Here is an excerpt from a scientific paper:\n\n<excerpt>\n{chunk}\n</excerpt>\n\n"

QA_PROMPT = (
    _EXCERPT
    + "Write {n} question-answer pair(s) about the facts, methods and results in this excerpt.\n"
    + _SELF_CONTAINED
    + "\n- Every answer must be correct according to the excerpt, complete, and one to four sentences long.\n\n"
    + 'Reply with JSON only, in exactly this shape:\n{"items": [{"question": "...", "answer": "..."}]}'
)

PREFERENCE_PROMPT = (
    _EXCERPT
    + "Write {n} question(s) about the facts, methods and results in this excerpt, each with two answers.\n"
    + _SELF_CONTAINED
    + "\n- `chosen` is correct according to the excerpt, complete, and one to four sentences long.\n"
    + "- `rejected` reads just as fluently and is as long, but is wrong: a wrong number or unit, a wrong "
    + "mechanism, or a claim the excerpt does not support.\n\n"
    + 'Reply with JSON only, in exactly this shape:\n{"items": [{"question": "...", "chosen": "...", "rejected": "..."}]}'
)

SHORT_ANSWER_PROMPT = (
    _EXCERPT
    + "Write {n} exam question(s) that test whether a reader remembers specific facts stated in this excerpt.\n"
    + _SELF_CONTAINED
    + "\n- Every answer is short and stated in the excerpt: a number with its unit, a name, or a few words.\n\n"
    + 'Reply with JSON only, in exactly this shape:\n{"items": [{"question": "...", "answer": "..."}]}'
)

MULTIPLE_CHOICE_PROMPT = (
    _EXCERPT
    + "Write {n} multiple-choice exam question(s) that test whether a reader remembers specific facts stated "
    + "in this excerpt, each with {choices} options.\n"
    + _SELF_CONTAINED
    + "\n- Exactly one option is correct according to the excerpt; the others are plausible but wrong, and "
    + "all options differ.\n- `answer_index` is the position of the correct option, counting from 0.\n\n"
    + 'Reply with JSON only, in exactly this shape:\n{"items": [{"question": "...", "choices": ["...", "..."], "answer_index": 0}]}'
)

_SLOT = re.compile(r"\{(chunk|n|choices)\}")


def builtin_prompt(task: str, question_type: str = "short_answer") -> str:
    """The built-in user prompt template of `task` (and, for benchmarks, of `question_type`)."""
    if task == "qa":
        return QA_PROMPT
    if task == "preference":
        return PREFERENCE_PROMPT
    if task == "benchmark":
        return MULTIPLE_CHOICE_PROMPT if question_type == "multiple_choice" else SHORT_ANSWER_PROMPT
    raise ValueError(f"unknown generation task {task!r}; known: qa, preference, benchmark")


def render_prompt(template: str, *, chunk: str, n: int, choices: int) -> str:
    """`template` with its slots filled, in one pass (a chunk that contains "{n}" stays as it is)."""
    values = {"chunk": chunk, "n": str(n), "choices": str(choices)}
    return _SLOT.sub(lambda match: values[match.group(1)], template)
