"""LLM judge: open questions answered by the variant, graded 1-10 on the paper's criteria (reasoning
depth, creativity, clarity, quantitative precision) by a judge model behind any OpenAI-compatible
`/chat/completions` endpoint.

Every judge prompt and raw answer is kept. A grade that cannot be parsed is counted and reported,
never turned into a 0. An endpoint that is down, times out or refuses is retried a bounded number
of times; then the variant's judge score is missing, with the reason, and the other suites stand.
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass

from alloylm.corpus import PROPERTY_LABELS
from alloylm.evaluate.benchmark import BenchmarkItem
from alloylm.evaluate.config import JudgeConfig
from alloylm.evaluate.prepared import EvaluationInputError, read_records_file
from alloylm.evaluate.scorer import PLAIN_STOP, CausalLMScorer

SUITE = "judge"
GRADE_RANGE = (1.0, 10.0)
# Room for the grades and a short justification; a judge that writes more is cut, not failed.
_JUDGE_MAX_TOKENS = 512

CRITERIA_DESCRIPTIONS = {
    "reasoning_depth": "how far the answer reasons: mechanisms, causes and trade-offs rather than bare statements",
    "creativity": "original ideas, non-obvious connections and inventive proposals",
    "clarity": "how well organised, precise and easy to follow the answer is",
    "quantitative_precision": "numbers with units where they matter, and whether they agree with the reference facts",
}

_SYSTEM_PROMPT = (
    "You are an expert reviewer in biological materials science. You grade an assistant's answer to a "
    "question on each criterion below, from 1 (very poor) to 10 (excellent):\n{criteria}\n"
    "Reference facts, when given, come from the source documents; use them to check the answer's numbers. "
    "Reply with a JSON object only, with exactly these keys and integer grades, for example: {example}"
)


class JudgeUnavailable(Exception):
    """The judge endpoint could not be reached or refused the request (after the retries allowed)."""


class GradeParseError(ValueError):
    """A judge answer from which no complete, in-range set of grades could be read."""


@dataclass(frozen=True)
class JudgeQuestion:
    """An open question for the variant, with optional reference facts for the judge."""

    id: str
    question: str
    split: str
    reference: str | None = None


# ------------------------------------------------------------------------------ questions

_ONE_MATERIAL = (
    "Explain how the hierarchical structure and the processing of {a} could account for its mechanical "
    "properties, then propose a bioinspired synthetic material that borrows its design. Be quantitative where you can.",
)
_TWO_MATERIALS = (
    "Compare {a} and {b} for a lightweight, damage-tolerant structural part. Which would you choose, and why? "
    "Support your reasoning with their properties, with numbers and units.",
    "Imagine a composite that combines {a} and {b}. Reason about what stiffness, strength and density it might "
    "reach, state your assumptions, and say what could go wrong.",
)


def _label(prop: str | None) -> str:
    return PROPERTY_LABELS.get(prop or "", (prop or "fact").replace("_", " "))


def questions_from_benchmark(items: Sequence[BenchmarkItem], *, split: str, count: int, seed: int) -> list[JudgeQuestion]:
    """Open questions about the materials of `split`'s benchmark items, with their facts as reference.

    Built from the scored split only, so validation and test questions never share a material.
    """
    facts: dict[str, dict[str, str]] = {}
    for item in items:
        if item.split == split and item.material:
            facts.setdefault(item.material, {})[_label(item.property)] = item.answer
    materials = sorted(facts)
    rng = random.Random(f"{seed}:judge:{split}")
    rng.shuffle(materials)
    questions: list[JudgeQuestion] = []
    k = 0
    while materials and len(questions) < count and k < 4 * count:
        a = materials[k % len(materials)]
        b = materials[(k + 1) % len(materials)]
        k += 1
        if len(materials) > 1 and k % 3 != 0:
            text = rng.choice(_TWO_MATERIALS).format(a=a, b=b)
            about = [a, b]
        else:
            text = _ONE_MATERIAL[0].format(a=a)
            about = [a]
        if any(q.question == text for q in questions):
            continue
        reference = "\n".join(f"{m}: " + "; ".join(f"{p}: {v}" for p, v in sorted(facts[m].items())) for m in about)
        questions.append(JudgeQuestion(id=f"judge/{split}/{len(questions)}", question=text, split=split, reference=reference))
    if not questions:
        # A benchmark without material names (a user's own): ask its questions openly.
        for item in [i for i in items if i.split == split][:count]:
            questions.append(
                JudgeQuestion(
                    id=f"judge/{item.id}",
                    question=f"{item.question} Explain your reasoning.",
                    split=split,
                    reference=f"Expected answer: {item.answer}",
                )
            )
    return questions


def load_judge_questions(uri: str) -> list[JudgeQuestion]:
    """The questions of a JSONL file of {id, question, split, reference?}; a bad line is named."""
    questions, problems, seen = [], [], set()
    for where, row in read_records_file(uri):
        try:
            if "__unparsed__" in row:
                raise ValueError(row["__unparsed__"])
            for key in ("id", "question", "split"):
                if not isinstance(row.get(key), str) or not row[key].strip():
                    raise ValueError(f"{key} must be a non-empty string")
            if row["split"] not in ("validation", "test"):
                raise ValueError(f"split must be validation or test, got {row['split']!r}")
            if row.get("reference") is not None and not isinstance(row["reference"], str):
                raise ValueError("reference must be a string")
            if row["id"] in seen:
                raise ValueError(f"id {row['id']!r} repeats")
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
            continue
        seen.add(row["id"])
        questions.append(JudgeQuestion(row["id"], row["question"], row["split"], row.get("reference")))
    if problems:
        raise EvaluationInputError(f"judge questions {uri}: {len(problems)} malformed line(s):\n  " + "\n  ".join(problems[:20]))
    return questions


# ------------------------------------------------------------------------------ prompt and grades


def judge_messages(question: JudgeQuestion, answer: str, criteria: Sequence[str]) -> list[dict[str, str]]:
    """The chat the judge is sent: the rubric, then the question, the reference facts and the answer."""
    listed = "\n".join(f"- {c}: {CRITERIA_DESCRIPTIONS.get(c, c.replace('_', ' '))}" for c in criteria)
    example = json.dumps({c: 7 for c in criteria})
    user = f"Question:\n{question.question}\n\n"
    if question.reference:
        user += f"Reference facts:\n{question.reference}\n\n"
    user += f"Answer to grade:\n{answer if answer.strip() else '(empty answer)'}"
    return [
        {"role": "system", "content": _SYSTEM_PROMPT.format(criteria=listed, example=example)},
        {"role": "user", "content": user},
    ]


def _key(text: str) -> str:
    return re.sub(r"[\s-]+", "_", text.strip().lower())


def _grade_value(criterion: str, value: object) -> float:
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:/\s*10)?\s*", value)
        if not match:
            raise GradeParseError(f"{criterion}: {value!r} is not a number")
        value = float(match.group(1))
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise GradeParseError(f"{criterion}: {value!r} is not a number")
    low, high = GRADE_RANGE
    if not low <= float(value) <= high:
        raise GradeParseError(f"{criterion}: {value} is outside {low:g}-{high:g}")
    return float(value)


def _json_objects(text: str) -> list[dict]:
    decoder = json.JSONDecoder()
    found = []
    for start in [m.start() for m in re.finditer(r"\{", text)]:
        try:
            obj, _ = decoder.raw_decode(text, start)
        except ValueError:
            continue
        if isinstance(obj, dict):
            found.append(obj)
    return found


def parse_grades(text: str, criteria: Sequence[str]) -> dict[str, float]:
    """The grade of every criterion in a judge's answer: a JSON object, or `criterion: n` lines.

    Raises GradeParseError (with the reason) when a criterion is absent or a grade is not 1-10.
    """
    if not isinstance(text, str) or not text.strip():
        raise GradeParseError("empty answer")
    problem = None
    for obj in _json_objects(text):
        grades = {_key(k): v for k, v in obj.items() if isinstance(k, str)}
        missing = [c for c in criteria if c not in grades]
        if missing:
            problem = f"JSON object without {', '.join(missing)}"
            continue
        return {c: _grade_value(c, grades[c]) for c in criteria}
    # Free text: "Reasoning depth: 7/10", "**clarity** = 8".
    found: dict[str, float] = {}
    for criterion in criteria:
        label = r"[\s_-]*".join(map(re.escape, criterion.split("_")))
        match = re.search(rf"{label}\W{{0,6}}?[:=\-]\s*\**\s*(\d+(?:\.\d+)?)", text, flags=re.IGNORECASE)
        if match:
            found[criterion] = _grade_value(criterion, float(match.group(1)))
    missing = [c for c in criteria if c not in found]
    if missing:
        raise GradeParseError(problem or f"no grade for {', '.join(missing)}")
    return found


# ------------------------------------------------------------------------------ the endpoint


class JudgeClient:
    """POSTs chats to `<base_url>/chat/completions`, with bounded retries and timeouts."""

    _RETRYABLE_STATUS = {408, 409, 425, 429}

    def __init__(self, config: JudgeConfig, *, seed: int = 0) -> None:
        if not config.base_url or not config.model:
            raise ValueError("the judge needs base_url and model")
        self.config = config
        self.seed = seed
        self.url = config.base_url.rstrip("/") + "/chat/completions"

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.config.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def complete(self, messages: list[dict[str, str]]) -> tuple[str | None, str]:
        """(the judge's answer text or None if the response is malformed, the raw response body)."""
        body = json.dumps(
            {
                "model": self.config.model,
                "messages": messages,
                "temperature": self.config.temperature,
                "seed": self.seed,
                "max_tokens": _JUDGE_MAX_TOKENS,
            }
        ).encode("utf-8")
        attempts = self.config.max_retries + 1
        last = "no attempt made"
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.config.retry_backoff_s * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=body, headers=self._headers(), method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.config.timeout_s) as response:
                    raw = response.read().decode("utf-8", errors="replace")
            except urllib.error.HTTPError as exc:
                detail = exc.read().decode("utf-8", errors="replace")[:300]
                last = f"HTTP {exc.code} {exc.reason}: {detail}".strip()
                if exc.code in self._RETRYABLE_STATUS or exc.code >= 500:
                    continue
                raise JudgeUnavailable(f"judge endpoint {self.url} refused the request: {last}") from None
            except (urllib.error.URLError, TimeoutError, socket.timeout, ConnectionError, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                last = f"{type(reason).__name__}: {reason}"
                continue
            return _completion_text(raw), raw
        raise JudgeUnavailable(f"judge endpoint {self.url} failed {attempts} time(s); last error: {last}")


def _completion_text(raw: str) -> str | None:
    try:
        content = json.loads(raw)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else None


# ------------------------------------------------------------------------------ the suite


def summarise_grades(details: Sequence[dict], criteria: Sequence[str]) -> dict:
    """Mean grade per criterion and overall over the parsed grades; unparseable ones counted apart."""
    graded = [d["grades"] for d in details if d.get("grades")]
    metrics: dict = {c: (sum(g[c] for g in graded) / len(graded) if graded else None) for c in criteria}
    metrics["overall"] = sum(metrics[c] for c in criteria) / len(criteria) if graded else None
    metrics.update(items=len(details), graded=len(graded), unparseable=sum(1 for d in details if d.get("parse_error")))
    return metrics


def run_judge(
    scorer: CausalLMScorer, questions: Sequence[JudgeQuestion], config: JudgeConfig, *, seed: int
) -> tuple[dict, list[dict], str | None]:
    """Answer each question with the variant and have the judge grade it.

    Returns (metrics, details, reason): `reason` is None when the judge score stands, else why it is
    missing (endpoint unavailable, or no grade could be parsed at all).
    """
    if not questions:
        return summarise_grades([], config.criteria), [], "no judge questions for this split"
    chat = scorer.uses_chat("auto")
    prompts = [scorer.prompt(q.question, chat=chat) for q in questions]
    # A plain answer ends before the next question the model invents (not at a blank line, as a
    # short answer does: the judge grades answers that may run to paragraphs).
    stop = () if chat else tuple(s for s in PLAIN_STOP if s.strip())
    answers = scorer.generate(prompts, chat=chat, max_new_tokens=config.answer_max_new_tokens, seed=seed, stop=stop)
    client = JudgeClient(config, seed=seed)
    details: list[dict] = []
    for question, answer in zip(questions, answers):
        messages = judge_messages(question, answer, config.criteria)
        detail = {
            "id": question.id,
            "question": question.question,
            "reference": question.reference,
            "answer": answer,
            "judge_model": config.model,
            "judge_prompt": messages,
        }
        try:
            text, raw = client.complete(messages)
        except JudgeUnavailable as exc:
            details.append({**detail, "error": str(exc)})
            return summarise_grades(details[:-1], config.criteria), details, str(exc)
        detail["judge_raw"] = text if text is not None else raw
        try:
            if text is None:
                raise GradeParseError("the response is not an OpenAI chat completion (no choices[0].message.content)")
            detail["grades"] = parse_grades(text, config.criteria)
        except GradeParseError as exc:
            detail["parse_error"] = str(exc)
        details.append(detail)
    metrics = summarise_grades(details, config.criteria)
    if not metrics["graded"]:
        return metrics, details, f"none of the {len(details)} judge answers could be parsed into grades"
    return metrics, details, None
