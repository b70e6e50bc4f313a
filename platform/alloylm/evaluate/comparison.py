"""The comparison of variants: one row per variant, one column per headline metric, the best marked,
and the aggregate `score` the merge search maximises.

Built from the variants' `results.json`; every value the table shows is one of theirs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from alloylm.evaluate.config import EvalConfig


@dataclass(frozen=True)
class Column:
    suite: str | None  # None: the aggregate score
    metric: str
    label: str
    higher_is_better: bool

    @property
    def key(self) -> str:
        return f"{self.suite}.{self.metric}" if self.suite else self.metric


_FIXED_COLUMNS = (
    Column("multiple_choice", "accuracy", "MC accuracy", True),
    Column("multiple_choice", "accuracy_norm", "MC accuracy (length-normalised)", True),
    Column("short_answer", "accuracy", "Short-answer accuracy", True),
    Column("short_answer", "exact_match", "Short-answer exact", True),
    Column("short_answer", "numeric_match", "Short-answer numeric", True),
    Column("domain_perplexity", "perplexity", "Domain perplexity", False),
    Column("domain_perplexity", "bits_per_byte", "Domain bits/byte", False),
    Column("general_perplexity", "perplexity", "General perplexity", False),
    Column("general_perplexity", "bits_per_byte", "General bits/byte", False),
    Column("judge", "overall", "Judge overall (1-10)", True),
)


def headline_value(suite: str, metrics: Mapping) -> float | None:
    """A suite's headline metric scaled to 0..1, higher better (what the aggregate score weighs).

    Accuracies as they are; perplexity as 2^-bits_per_byte (the geometric-mean probability of a
    byte); the judge's 1-10 overall as (overall - 1) / 9.
    """
    if suite in ("multiple_choice", "short_answer"):
        value = metrics.get("accuracy")
    elif suite in ("domain_perplexity", "general_perplexity"):
        bpb = metrics.get("bits_per_byte")
        value = None if bpb is None else 2.0 ** (-bpb)
    elif suite == "judge":
        overall = metrics.get("overall")
        value = None if overall is None else (overall - 1.0) / 9.0
    else:
        raise ValueError(f"unknown suite {suite!r}")
    return None if value is None or not math.isfinite(value) else float(value)


def aggregate_score(suites: Mapping[str, Mapping], config: EvalConfig) -> tuple[float | None, list[str]]:
    """(weighted mean of the headline values over the weighted suites, suites whose value is missing).

    The score is None when a weighted suite has no value: averaging over the rest would rank a
    variant whose judge failed against one whose judge ran, on different terms.
    """
    total = weights = 0.0
    missing = []
    for name, suite_config in config.suites.enabled().items():
        if suite_config.weight == 0:
            continue
        result = suites.get(name) or {}
        value = headline_value(name, result.get("metrics") or {}) if result.get("status") == "ok" else None
        if value is None:
            missing.append(name)
            continue
        total += suite_config.weight * value
        weights += suite_config.weight
    if missing or weights == 0:
        return None, missing
    return total / weights, missing


def _columns(results: Mapping[str, Mapping]) -> list[Column]:
    present = {suite for r in results.values() for suite in (r.get("suites") or {})}
    columns = [c for c in _FIXED_COLUMNS if c.suite in present]
    criteria: list[str] = []
    for r in results.values():
        for criterion in ((r.get("config") or {}).get("suites", {}).get("judge", {}) or {}).get("criteria", []):
            if criterion not in criteria:
                criteria.append(criterion)
    if "judge" in present:
        columns += [Column("judge", c, f"Judge: {c.replace('_', ' ')}", True) for c in criteria]
    columns.append(Column(None, "score", "Score (weighted)", True))
    return columns


def build_comparison(results: Mapping[str, Mapping]) -> dict:
    """The comparison table of variants' results (name -> results.json content); all on one split."""
    splits = sorted({r.get("split") for r in results.values() if r.get("split")})
    if len(splits) > 1:
        raise ValueError(f"results of different splits cannot be compared in one table: {', '.join(splits)}")
    columns = _columns(results)
    rows = []
    for name, result in sorted(results.items()):
        suites = result.get("suites") or {}
        values: dict[str, float | None] = {}
        for column in columns:
            if column.suite is None:
                values[column.key] = result.get("score")
            else:
                suite = suites.get(column.suite) or {}
                value = (suite.get("metrics") or {}).get(column.metric) if suite.get("status") == "ok" else None
                values[column.key] = value if isinstance(value, (int, float)) and math.isfinite(value) else None
        missing = {s: (v.get("reason") or v.get("status")) for s, v in suites.items() if v.get("status") != "ok"}
        if result.get("status") == "failed":
            missing["model"] = result.get("error") or "failed"
        rows.append({"variant": name, "model": result.get("model"), "status": result.get("status"), "values": values, "missing": missing})
    best: dict[str, list[str]] = {}
    for column in columns:
        scored = [(row["values"][column.key], row["variant"]) for row in rows if row["values"][column.key] is not None]
        if len(scored) > 1 and len({v for v, _ in scored}) > 1:  # a tie of all is no "best"
            top = max(v for v, _ in scored) if column.higher_is_better else min(v for v, _ in scored)
            best[column.key] = [name for v, name in scored if v == top]
    chance = [
        (r.get("suites") or {}).get("multiple_choice", {}).get("metrics", {}).get("chance") for r in results.values()
    ]
    chance = [c for c in chance if c is not None]
    return {
        "split": splits[0] if splits else None,
        "columns": [
            {"key": c.key, "suite": c.suite, "metric": c.metric, "label": c.label, "higher_is_better": c.higher_is_better}
            for c in columns
        ],
        "rows": rows,
        "best": best,
        "chance": {"multiple_choice": chance[0]} if chance else {},
    }


def format_value(key: str, value: float | None) -> str:
    """A table cell: 3 decimals for rates and scores, 2 for perplexities and grades."""
    if value is None:
        return "—"
    if math.isinf(value):
        return "inf"
    if key.endswith(".perplexity") or key.startswith("judge."):
        return f"{value:.2f}"
    return f"{value:.3f}"


def comparison_markdown(comparison: Mapping, *, columns: Sequence[str] | None = None) -> str:
    """The comparison as a Markdown table (best value of each column in bold), with its notes."""
    shown = [c for c in comparison["columns"] if columns is None or c["key"] in columns]
    arrows = {True: "↑", False: "↓"}
    header = "| Variant | " + " | ".join(f"{c['label']} {arrows[c['higher_is_better']]}" for c in shown) + " |"
    lines = [header, "|" + "---|" * (len(shown) + 1)]
    for row in comparison["rows"]:
        cells = []
        for c in shown:
            text = format_value(c["key"], row["values"].get(c["key"]))
            if row["variant"] in comparison["best"].get(c["key"], []):
                text = f"**{text}**"
            cells.append(text)
        lines.append(f"| {row['variant']} | " + " | ".join(cells) + " |")
    notes = [f"Split: `{comparison.get('split')}`. ↑ higher is better, ↓ lower is better; best in bold."]
    if comparison.get("chance", {}).get("multiple_choice") is not None:
        notes.append(f"Multiple-choice chance level: {comparison['chance']['multiple_choice']:.3f}.")
    for row in comparison["rows"]:
        for suite, reason in row["missing"].items():
            notes.append(f"{row['variant']}: {suite} missing — {reason}")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
