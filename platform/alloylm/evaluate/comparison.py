"""The comparison of variants: one row per variant, one column per headline metric, the best marked,
each value with its bootstrap 95% interval and its paired difference from the reference variant,
and the aggregate `score` the merge search maximises; `best_variant` picks the winner on validation.

Built from the variants' `results.json`; every value the table shows is one of theirs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from alloylm.evaluate.config import OFF_BY_DEFAULT, SUITE_NAMES, EvalConfig
from alloylm.evaluate.intervals import (
    CONFIDENCE,
    METHOD,
    RESAMPLES,
    Samples,
    difference_entry,
    joint_replicates,
    metric_for,
    paired_difference,
    percentile_interval,
    replicates,
    same_units,
)


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
    Column("multiple_choice", "accuracy_circular", "MC accuracy (every rotation)", True),
    Column("multiple_choice", "mean_prob_correct", "MC P(correct option)", True),
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

# multiple_choice.objective_metric -> the metric it names.
_MC_OBJECTIVE = {"prob_correct": "mean_prob_correct", "accuracy": "accuracy", "accuracy_circular": "accuracy_circular"}


def _config_value(config, key: str, default):
    if config is None:
        return default
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def headline_metric(suite: str, config=None) -> str:
    """The metric a suite's headline value is made from; `config` is the suite's config (or its dump).

    Multiple choice: the one its `objective_metric` names (default `mean_prob_correct`).
    """
    if suite == "multiple_choice":
        return _MC_OBJECTIVE[_config_value(config, "objective_metric", "prob_correct")]
    if suite == "short_answer":
        return "accuracy"
    if suite in ("domain_perplexity", "general_perplexity"):
        return "bits_per_byte"
    if suite == "judge":
        return "overall"
    if suite == "lm_eval":
        return _config_value(config, "objective_metric", "acc")
    raise ValueError(f"unknown suite {suite!r}")


def _to_headline(suite: str, value):
    """A suite's headline metric (a number or an array of replicates) scaled to 0..1, higher better."""
    if suite in ("domain_perplexity", "general_perplexity"):
        return 2.0 ** (-value)
    if suite == "judge":
        return (value - 1.0) / 9.0
    return value


def headline_value(suite: str, metrics: Mapping, config=None) -> float | None:
    """A suite's headline metric scaled to 0..1, higher better (what the aggregate score weighs).

    Multiple choice: its `objective_metric` (default the mean probability of the correct option,
    continuous, so that close merge candidates still get different scores); short answer: accuracy;
    perplexity as 2^-bits_per_byte (the geometric-mean probability of a byte); the judge's 1-10
    overall as (overall - 1) / 9. `config` is the suite's config (or its JSON dump).
    """
    value = metrics.get(headline_metric(suite, config))
    value = None if value is None else _to_headline(suite, value)
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
        value = headline_value(name, result.get("metrics") or {}, suite_config) if result.get("status") == "ok" else None
        if value is None:
            missing.append(name)
            continue
        total += suite_config.weight * value
        weights += suite_config.weight
    if missing or weights == 0:
        return None, missing
    return total / weights, missing


def score_definition(config: Mapping | EvalConfig) -> str:
    """In words, what a result's `score` is: the weighted suites and the metric each contributes."""
    suites = config.model_dump(mode="json")["suites"] if isinstance(config, EvalConfig) else (config or {}).get("suites") or {}
    parts = []
    for name in SUITE_NAMES:
        suite = suites.get(name) or {}
        if not suite.get("enabled", name not in OFF_BY_DEFAULT) or not suite.get("weight", 1.0):
            continue
        metric = headline_metric(name, suite)
        shown = {"bits_per_byte": "2^-bits_per_byte", "overall": "(overall - 1) / 9"}.get(metric, metric)
        parts.append(f"{name} {shown} (weight {suite.get('weight', 1.0):g})")
    return "weighted mean of " + ", ".join(parts) if parts else "no weighted suite"


def _order_sensitive(result: Mapping) -> bool:
    """Whether this result's multiple choice was scored with the options in order (lettered, in a chat
    prompt) and every rotation asked: otherwise `accuracy_circular` is plain accuracy, not CircularEval's."""
    metrics = ((result.get("suites") or {}).get("multiple_choice") or {}).get("metrics") or {}
    letters_in_chat = metrics.get("formulation", "letters") == "letters" and metrics.get("prompt", "chat") == "chat"
    return letters_in_chat and metrics.get("rotations", True) is not False


def _columns(results: Mapping[str, Mapping]) -> list[Column]:
    present = {suite for r in results.values() for suite in (r.get("suites") or {})}
    columns = [c for c in _FIXED_COLUMNS if c.suite in present]
    if not any(_order_sensitive(r) for r in results.values()):
        # Cloze or plain-prompt scoring never sees the options' order: every rotation is the item
        # itself, and the column would repeat MC accuracy.
        columns = [c for c in columns if c.key != "multiple_choice.accuracy_circular"]
    criteria: list[str] = []
    for r in results.values():
        for criterion in ((r.get("config") or {}).get("suites", {}).get("judge", {}) or {}).get("criteria", []):
            if criterion not in criteria:
                criteria.append(criterion)
    if "judge" in present:
        columns += [Column("judge", c, f"Judge: {c.replace('_', ' ')}", True) for c in criteria]
    columns += _lm_eval_columns(results)
    columns.append(Column(None, "score", "Score (weighted)", True))
    return columns


def _lm_eval_columns(results: Mapping[str, Mapping]) -> list[Column]:
    """General retention: one column per lm-eval task and metric, and the pooled headline when there are several tasks."""
    keys: dict[str, str] = {}  # key -> label
    higher: dict[str, bool] = {}
    pooled: dict[str, str] = {}
    for result in results.values():
        metrics = ((result.get("suites") or {}).get("lm_eval") or {}).get("metrics") or {}
        tasks = list(metrics.get("tasks") or {})
        higher.update(metrics.get("higher_is_better") or {})
        for task in tasks:
            for key, value in metrics.items():
                if key.startswith(f"{task}/") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    keys.setdefault(key, f"Retention: {task} {key[len(task) + 1 :]}")
        objective = headline_metric("lm_eval", ((result.get("config") or {}).get("suites") or {}).get("lm_eval"))
        if len(tasks) > 1 and objective in metrics:
            pooled.setdefault(objective, f"Retention: {objective} over all tasks")
    return [Column("lm_eval", key, label, bool(higher.get(key, True))) for key, label in {**keys, **pooled}.items()]


def _suite_samples(result: Mapping, suite: str) -> Samples | None:
    entry = (result.get("suites") or {}).get(suite) or {}
    if entry.get("status") != "ok" or not entry.get("samples"):
        return None
    try:
        return Samples.from_json(entry["samples"])
    except (KeyError, TypeError, ValueError):
        return None


def _seed(result: Mapping) -> int:
    seed = result.get("seed")
    return seed if isinstance(seed, int) else 0


def _score_replicates(result: Mapping, resamples: int = RESAMPLES):
    """The aggregate score on each bootstrap resample, or None. Suites whose units are clustered
    (benchmark items, by fact) are resampled together, over the union of their facts, since they
    ask about the same facts; the others (perplexity's blocks, the judge's questions) each on its own."""
    config = result.get("config") or {}
    suites = config.get("suites") or {}
    weighted = []
    for name in SUITE_NAMES:
        suite = suites.get(name) or {}
        weight = suite.get("weight", 1.0)
        if not suite.get("enabled", name not in OFF_BY_DEFAULT) or not weight:
            continue
        samples = _suite_samples(result, name)
        metric = metric_for(name, headline_metric(name, suite))
        if samples is None or metric is None or not len(samples):
            return None
        weighted.append((name, weight, samples, metric))
    if not weighted:
        return None
    clustered = [(name, samples, metric) for name, _, samples, metric in weighted if samples.clusters is not None]
    together: dict[str, object] = {}
    if len(clustered) > 1:
        parts = [(samples, metric) for _, samples, metric in clustered]
        together = dict(zip((name for name, _, _ in clustered), joint_replicates(parts, seed=_seed(result), stream="benchmark", resamples=resamples)))
    total = 0.0
    for name, weight, samples, metric in weighted:
        values = together[name] if name in together else replicates(samples, metric, seed=_seed(result), stream=name, resamples=resamples)
        total = total + weight * _to_headline(name, values)
    return total / sum(weight for _, weight, _, _ in weighted)


def score_interval(result: Mapping) -> dict | None:
    """The 95% bootstrap interval of a result's aggregate score (`_score_replicates`)."""
    reps = _score_replicates(result)
    return percentile_interval(reps) if reps is not None else None


def _cell_interval(result: Mapping, column: Column) -> dict | None:
    if column.suite is None:
        return result.get("score_interval") or score_interval(result)
    entry = (result.get("suites") or {}).get(column.suite) or {}
    if entry.get("status") != "ok":
        return None
    return (entry.get("intervals") or {}).get(column.metric)


def _scored_units(result: Mapping) -> list[tuple]:
    return [(name, s.ids, s.clusters) for name in SUITE_NAMES if (s := _suite_samples(result, name)) is not None]


def _cell_difference(result: Mapping, reference: Mapping, column: Column) -> dict | None:
    """result - reference on `column`, with its paired-bootstrap interval (None: cannot be paired)."""
    if column.suite is None:
        ours, theirs = _score_replicates(result), _score_replicates(reference)
        if ours is None or theirs is None or result.get("score") is None or reference.get("score") is None:
            return None
        if not _pairable((result, reference), column):
            return None
        return difference_entry(result["score"] - reference["score"], ours - theirs)
    if _own_tokens(result, column) or _own_tokens(reference, column):
        return None
    metric = metric_for(column.suite, column.metric)
    ours, theirs = _suite_samples(result, column.suite), _suite_samples(reference, column.suite)
    if metric is None or ours is None or theirs is None or _seed(result) != _seed(reference):
        return None
    return paired_difference(ours, theirs, metric, seed=_seed(result), stream=column.suite)


def _own_tokens(result: Mapping, column: Column) -> bool:
    """Whether `column` is a per-token perplexity counted on other tokens than the data's: the
    variant's tokenizer is not the one that wrote the text blocks, so they were re-encoded into its
    own. A perplexity per token of another tokenizer is not comparable (fewer, longer tokens give a
    higher one on the same text); bits per byte is, and stays compared."""
    if column.metric != "perplexity" or column.suite is None:
        return False
    metrics = (((result.get("suites") or {}).get(column.suite) or {}).get("metrics")) or {}
    return bool(metrics.get("reencoded"))


def _variant_order(results: Mapping[str, Mapping]) -> list[str]:
    """The variants in the order the evaluate config lists them (the pipeline's), others after, by name."""
    from alloylm.evaluate.config import variant_name

    order: list[str] = []
    for result in results.values():
        for entry in (result.get("config") or {}).get("variants") or []:
            name = variant_name(entry)
            if name in results and name not in order:
                order.append(name)
    return order + sorted(name for name in results if name not in order)


def default_reference(names: Sequence[str]) -> str | None:
    """The variant others are compared with: `instruct` when there is one, else the first."""
    return "instruct" if "instruct" in names else (names[0] if names else None)


def build_comparison(
    results: Mapping[str, Mapping], *, reference: str | None = None, parents: Mapping[str, Sequence[str]] | None = None
) -> dict:
    """The comparison table of variants' results (name -> results.json content); all on one split.

    Rows follow the evaluate config's variant order. Each value carries its 95% bootstrap interval
    (`intervals`), and each row its paired-bootstrap difference from the `reference` variant
    (default: `instruct`, else the first row) with `within_noise` when the interval holds 0.
    `parents` (merge variant -> its two parent variants, `merge_parents`): where each merge sits
    between its parents on every column (`merges`, see `merge_positions`).
    """
    splits = sorted({r.get("split") for r in results.values() if r.get("split")})
    if len(splits) > 1:
        raise ValueError(f"results of different splits cannot be compared in one table: {', '.join(splits)}")
    columns = _columns(results)
    order = _variant_order(results)
    if reference is not None and reference not in results:
        raise ValueError(f"reference variant {reference!r} is not among the results ({', '.join(order)})")
    reference = reference or default_reference(order)
    rows = []
    for name in order:
        result = results[name]
        suites = result.get("suites") or {}
        values: dict[str, float | None] = {}
        intervals: dict[str, dict | None] = {}
        differences: dict[str, dict | None] = {}
        for column in columns:
            if column.suite is None:
                values[column.key] = result.get("score")
            else:
                suite = suites.get(column.suite) or {}
                value = (suite.get("metrics") or {}).get(column.metric) if suite.get("status") == "ok" else None
                values[column.key] = value if isinstance(value, (int, float)) and math.isfinite(value) else None
            intervals[column.key] = _cell_interval(result, column) if values[column.key] is not None else None
            if name != reference and values[column.key] is not None:
                differences[column.key] = _cell_difference(result, results[reference], column)
        missing = {s: (v.get("reason") or v.get("status")) for s, v in suites.items() if v.get("status") != "ok"}
        if result.get("status") == "failed":
            missing["model"] = result.get("error") or "failed"
        rows.append(
            {
                "variant": name,
                "model": result.get("model"),
                "status": result.get("status"),
                "values": values,
                "intervals": intervals,
                "differences": differences,
                "missing": missing,
            }
        )
    best: dict[str, list[str]] = {}
    own_tokens = {
        column.key: [name for name in order if _own_tokens(results[name], column)]
        for column in columns
        if any(_own_tokens(results[name], column) for name in order)
    }
    for column in columns:
        scored = [
            (row["values"][column.key], row["variant"])
            for row in rows
            if row["values"][column.key] is not None and row["variant"] not in own_tokens.get(column.key, ())
        ]
        if len(scored) > 1 and len({v for v, _ in scored}) > 1:  # a tie of all is no "best"
            top = max(v for v, _ in scored) if column.higher_is_better else min(v for v, _ in scored)
            best[column.key] = [name for v, name in scored if v == top]
    chance = [
        (r.get("suites") or {}).get("multiple_choice", {}).get("metrics", {}).get("chance") for r in results.values()
    ]
    chance = [c for c in chance if c is not None]
    first_config = next((r.get("config") for r in results.values() if r.get("config")), None)
    return {
        "split": splits[0] if splits else None,
        "columns": [
            {"key": c.key, "suite": c.suite, "metric": c.metric, "label": c.label, "higher_is_better": c.higher_is_better}
            for c in columns
        ],
        "rows": rows,
        "best": best,
        "chance": {"multiple_choice": chance[0]} if chance else {},
        "reference": reference,
        "intervals": {"confidence": CONFIDENCE, "resamples": RESAMPLES, "method": METHOD},
        "score_definition": score_definition(first_config) if first_config else None,
        "score_leader": _score_leader(rows, results),
        "lm_eval_splits": _lm_eval_splits(results),
        "own_tokens": own_tokens,
        "merges": merge_positions(
            results,
            {row["variant"]: row["values"] for row in rows},
            {n: (parents or {})[n] for n in order if n in (parents or {})},
            columns,
            reference,
            own_tokens,
        ),
    }


# ------------------------------------------------------------------------------ merges


def merge_parents(results: Mapping[str, Mapping]) -> dict[str, list[str]]:
    """Merge variant -> its two parent variants, for each variant among `results` whose model is a
    merge (its stage manifest's `parents`) of two models that are variants here too."""
    from alloylm import storage

    def stage_tail(uri: str) -> str | None:
        # `<run>/stages/<name>`: a run copied elsewhere (local to S3) keeps its merges' parents by name
        parts = uri.rstrip("/").rsplit("/", 2)
        return "/".join(parts[-2:]) if len(parts) == 3 and parts[-2] == "stages" else None

    by_model = {str(r["model"]).rstrip("/"): name for name, r in results.items() if r.get("model")}
    by_tail = {tail: name for uri, name in by_model.items() if (tail := stage_tail(uri))}
    out: dict[str, list[str]] = {}
    for name, result in results.items():
        if not result.get("model"):
            continue
        try:
            manifest = storage.read_manifest(str(result["model"])) or {}
        except Exception:  # a model that is not an artifact of a run (a Hub id, a bare folder): no parents to name
            continue
        if manifest.get("stage_kind") not in ("merge", "merge_search"):
            continue
        uris = [str(uri).rstrip("/") for uri in manifest.get("parents") or []]
        named = [by_model.get(uri) or by_tail.get(stage_tail(uri) or "") for uri in uris]
        if len(named) == 2 and None not in named and name not in named:
            out[name] = named
    return out


def _column_replicates(result: Mapping, column: Column) -> np.ndarray | None:
    """The column's value on each bootstrap resample (the resamples paired differences use)."""
    if column.suite is None:
        return _score_replicates(result)
    samples, metric = _suite_samples(result, column.suite), metric_for(column.suite, column.metric)
    if samples is None or metric is None or not len(samples):
        return None
    return replicates(samples, metric, seed=_seed(result), stream=column.suite)


def _pairable(results: Sequence[Mapping], column: Column) -> bool:
    """Whether these results were scored on the same units with the same resamples (and, for the
    score, on the same terms), so that their replicates pair up."""
    if len({_seed(r) for r in results}) != 1:
        return False
    if column.suite is None:
        terms = [(r.get("config") or {}).get("suites") for r in results]
        return all(t == terms[0] for t in terms) and all(_scored_units(r) == _scored_units(results[0]) for r in results)
    samples = [_suite_samples(r, column.suite) for r in results]
    return None not in samples and all(same_units(s, samples[0]) for s in samples)


def merge_positions(
    results: Mapping[str, Mapping],
    values: Mapping[str, Mapping[str, float | None]],
    parents: Mapping[str, Sequence[str]],
    columns: Sequence[Column],
    reference: str | None,
    own_tokens: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, dict]:
    """Where each merge sits between its two parents, column by column, with a 95% interval.

    The position is (merge - start) / (end - start): 0 is the start parent's value, 1 the end's.
    The start is the `reference` variant (`instruct`) when it is a parent, else the second parent
    (a merge config names the domain model first). So on a domain metric the position is the
    share of the end parent's gain over the start that the merge keeps (issue: "keeps >= 80% of
    dpo's gain"), and on general text below 0.5 means closer to the start. The interval is the
    percentile interval of the same ratio on the paired bootstrap resamples of the three variants
    (the ones the paired differences use). Where the parents do not differ outside noise there is
    no position to give (`parents_within_noise`): the ratio would divide by noise. `values`: each
    variant's row values in the comparison (variant -> column key -> value).
    """
    out: dict[str, dict] = {}
    for name, pair in parents.items():
        if name not in results or len(pair) != 2 or any(p not in results for p in pair):
            continue
        end, start = pair
        if reference == end:
            start, end = end, start
        trio = (results[name], results[start], results[end])
        positions: dict[str, dict] = {}
        for column in columns:
            if any(v in (own_tokens or {}).get(column.key, ()) for v in (name, start, end)) or not _pairable(trio, column):
                continue
            merged, at_start, at_end = (values[v].get(column.key) for v in (name, start, end))
            reps = [_column_replicates(r, column) for r in trio]
            if merged is None or at_start is None or at_end is None or any(r is None for r in reps):
                continue
            spread = reps[2] - reps[1]
            between = difference_entry(at_end - at_start, spread)
            if between is None or between["within_noise"]:
                positions[column.key] = {"position": None, "parents_within_noise": True}
                continue
            with np.errstate(divide="ignore", invalid="ignore"):
                ratios = np.where(spread != 0, (reps[0] - reps[1]) / np.where(spread != 0, spread, 1.0), np.nan)
            interval = percentile_interval(ratios)
            if interval is not None:
                positions[column.key] = {"position": (merged - at_start) / (at_end - at_start), **interval}
        out[name] = {"start": start, "end": end, "positions": positions}
    return out


def _lm_eval_splits(results: Mapping[str, Mapping]) -> dict[str, str]:
    """lm-eval task -> the split it was scored on (the comparison's `split` is the domain suites')."""
    splits: dict[str, str] = {}
    for result in results.values():
        tasks = (((result.get("suites") or {}).get("lm_eval") or {}).get("metrics") or {}).get("tasks") or {}
        for task, info in tasks.items():
            if isinstance(info, Mapping) and info.get("split"):
                splits.setdefault(task, str(info["split"]))
    return splits


def _score_leader(rows: list[dict], results: Mapping[str, Mapping]) -> dict | None:
    """The row with the highest score (the first of equal ones) and each other row's paired difference from it."""
    scored = [row for row in rows if row["values"].get("score") is not None]
    if not scored:
        return None
    leader = max(scored, key=lambda row: row["values"]["score"])  # max keeps the first of equal scores
    column = Column(None, "score", "", True)
    differences = {
        row["variant"]: _cell_difference(results[leader["variant"]], results[row["variant"]], column)
        for row in scored
        if row is not leader
    }
    return {"variant": leader["variant"], "score": leader["values"]["score"], "differences": differences}


def best_variant(comparison: Mapping) -> dict:
    """The variant with the highest `score` in a comparison on the validation split, and why.

    Returns {variant, score, interval, split, score_definition, within_noise}: `within_noise` lists
    the other variants whose score differs from the winner's by less than noise (paired bootstrap;
    a difference that could not be paired counts as within noise). Ties go to the earlier variant in
    pipeline order. Raises ValueError for a comparison on another split (choosing on test would
    report a fit to it) or with no score.
    """
    if comparison.get("split") != "validation":
        raise ValueError(f"the best variant is chosen on the validation split, this comparison is on {comparison.get('split')!r}")
    leader = comparison.get("score_leader")
    if not leader:
        raise ValueError("no variant has a score to choose by")
    row = next(r for r in comparison["rows"] if r["variant"] == leader["variant"])
    return {
        "variant": leader["variant"],
        "score": leader["score"],
        "interval": (row.get("intervals") or {}).get("score"),
        "split": "validation",
        "score_definition": comparison.get("score_definition"),
        "within_noise": [name for name, d in leader["differences"].items() if d is None or d["within_noise"]],
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


NOISE_MARK = "≈"


def format_cell(key: str, value: float | None, interval: Mapping | None = None, difference: Mapping | None = None) -> str:
    """`value [low, high]`, with ≈ when its difference from the reference variant is within noise."""
    text = format_value(key, value)
    if value is not None and interval:
        text += f" [{format_value(key, interval['low'])}, {format_value(key, interval['high'])}]"
    if value is not None and difference and difference.get("within_noise"):
        text += f" {NOISE_MARK}"
    return text


def comparison_notes(comparison: Mapping) -> list[str]:
    """The lines under the table: split, arrows, intervals, noise marks, chance, score, what is missing."""
    notes = [f"Split: `{comparison.get('split')}`. ↑ higher is better, ↓ lower is better; best in bold."]
    method = comparison.get("intervals")
    if method:
        notes.append(f"[low, high]: {method['confidence']:.0%} interval ({method['method']}).")
    if comparison.get("reference"):
        notes.append(
            f"{NOISE_MARK}: the difference from `{comparison['reference']}` lies within noise "
            f"(its paired-bootstrap {method['confidence'] if method else CONFIDENCE:.0%} interval contains 0)."
        )
    if comparison.get("chance", {}).get("multiple_choice") is not None:
        notes.append(f"Multiple-choice chance level: {comparison['chance']['multiple_choice']:.3f}.")
    retention = _retention_note(comparison)
    if retention:
        notes.append(retention)
    for key, names in (comparison.get("own_tokens") or {}).items():
        label = next((c["label"] for c in comparison.get("columns") or [] if c["key"] == key), key)
        notes.append(
            f"{label} of {', '.join(f'`{n}`' for n in names)}: per token of its own tokenizer (the text was re-encoded), "
            "so not compared with the others (no best, no difference); bits per byte compares every variant."
        )
    if comparison.get("score_definition"):
        notes.append(f"Score: {comparison['score_definition']}.")
    for row in comparison["rows"]:
        for suite, reason in row["missing"].items():
            notes.append(f"{row['variant']}: {suite} missing — {reason}")
    return notes


def _retention_note(comparison: Mapping) -> str | None:
    splits = comparison.get("lm_eval_splits") or {}
    if not any(c.get("suite") == "lm_eval" for c in comparison.get("columns") or []):
        return None
    shown = ", ".join(f"{task} on {split}" for task, split in splits.items())
    return (
        "Retention: lm-evaluation-harness tasks run in process on each variant, each on its own evaluation split"
        + (f" ({shown})" if shown else "")
        + "; intervals by the same bootstrap over docs (lm-eval's stderr for metrics that are not a mean over docs)."
    )


def comparison_markdown(comparison: Mapping, *, columns: Sequence[str] | None = None) -> str:
    """The comparison as a Markdown table (value [95% interval], best in bold, ≈ within noise), with its notes."""
    shown = [c for c in comparison["columns"] if columns is None or c["key"] in columns]
    arrows = {True: "↑", False: "↓"}
    header = "| Variant | " + " | ".join(f"{c['label']} {arrows[c['higher_is_better']]}" for c in shown) + " |"
    lines = [header, "|" + "---|" * (len(shown) + 1)]
    for row in comparison["rows"]:
        cells = []
        for c in shown:
            value = row["values"].get(c["key"])
            interval = (row.get("intervals") or {}).get(c["key"])
            difference = (row.get("differences") or {}).get(c["key"])
            text = format_value(c["key"], value)
            if row["variant"] in comparison["best"].get(c["key"], []):
                text = f"**{text}**"
            text = text + format_cell(c["key"], value, interval, difference)[len(format_value(c["key"], value)) :]
            cells.append(text)
        lines.append(f"| {row['variant']} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in comparison_notes(comparison)) + "\n"
    merges = merges_markdown(comparison, columns=columns)
    return text + ("\n" + merges if merges else "")


def format_position(entry: Mapping | None) -> str:
    """A merge's position between its parents: `0.73 [0.57, 0.86]`, `n/a` where its parents do not differ."""
    if not entry:
        return "—"
    if entry.get("position") is None:
        return "n/a"
    return f"{entry['position']:.2f} [{entry['low']:.2f}, {entry['high']:.2f}]"


def merge_columns(comparison: Mapping, columns: Sequence[str] | None = None) -> list[Mapping]:
    """The comparison's columns on which some merge has a position."""
    merges = (comparison.get("merges") or {}).values()
    return [
        c for c in comparison.get("columns") or []
        if (columns is None or c["key"] in columns) and any(c["key"] in m["positions"] for m in merges)
    ]  # fmt: skip


def merges_notes(comparison: Mapping) -> list[str]:
    """What the merges table says, in words."""
    merges = comparison.get("merges") or {}
    if not merges:
        return []
    notes = [
        "Position = (merge - parent 0) / (parent 1 - parent 0), per column, with the parents as `0 → 1`: 0 is parent "
        "0's value, 1 parent 1's, outside [0, 1] beyond one of them; [low, high] is its 95% interval over the same "
        "paired bootstrap resamples as the differences above. On a domain metric it is the share of parent 1's gain "
        "over parent 0 that the merge keeps; on general bits/byte, below 0.5 means closer to parent 0 (per-token "
        "perplexity is exponential in bits, so its positions are smaller)."
    ]
    if any(e.get("position") is None for m in merges.values() for e in m["positions"].values()):
        notes.append("n/a: the parents do not differ outside noise on that column, so there is no position to give.")
    return notes


def merges_markdown(comparison: Mapping, *, columns: Sequence[str] | None = None) -> str:
    """Where each merge sits between its parents (`merge_positions`), as a Markdown table with its notes."""
    merges = comparison.get("merges") or {}
    shown = merge_columns(comparison, columns)
    if not merges or not shown:
        return ""
    lines = [
        "Where each merge sits between its parents:",
        "",
        "| Merge | Parents (0 → 1) | " + " | ".join(c["label"] for c in shown) + " |",
        "|" + "---|" * (len(shown) + 2),
    ]
    for name, merge in merges.items():
        cells = [format_position(merge["positions"].get(c["key"])) for c in shown]
        lines.append(f"| {name} | {merge['start']} → {merge['end']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in merges_notes(comparison)) + "\n"
