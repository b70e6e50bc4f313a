"""Percentile-bootstrap 95% intervals for every metric of the comparison, and the paired bootstrap
that says whether the difference between two variants lies within noise.

Every metric the suites report is a ratio of sums over scoring units (items, text blocks, judged
questions), optionally transformed: an accuracy is sum(correct) / sum(1), a perplexity is
exp(sum(nll) / sum(tokens)). A suite keeps its per-unit columns (`Samples`, stored in
results.json) so that intervals and paired differences can be recomputed from results alone.

Units that are not independent are resampled together: the benchmark asks several questions about
one fact, and a model that knows the fact tends to get all of them right, so multiple-choice and
short-answer items are resampled by fact (cluster bootstrap). Resampling the items one by one would
give intervals too narrow for what the benchmark can tell apart.

The resample indices depend only on (seed, suite, number of clusters), so every variant scored on
the same items is resampled with the same indices: the difference of two variants' replicates is a
paired bootstrap, which is much tighter than comparing two separate intervals.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

RESAMPLES = 1000
CONFIDENCE = 0.95
_Z95 = 1.959963984540054  # the normal quantile of a 95% two-sided interval
METHOD = "percentile bootstrap, 1000 resamples; benchmark items resampled by fact, text blocks and judged questions one by one"


@dataclass(frozen=True)
class RatioMetric:
    """A metric as `transform(sum(numerator) / sum(denominator))` over the resampled units."""

    numerator: str
    denominator: str = "n"  # `n`: one per unit
    transform: Callable[[np.ndarray], np.ndarray] | None = None
    # Only units whose id starts with this count (one lm-eval task among the suite's); the others
    # are still resampled, so every task's replicates come from the same resample indices.
    id_prefix: str | None = None

    def apply(self, numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1.0), np.nan)
            return self.transform(ratio) if self.transform else ratio


def _bits(x: np.ndarray) -> np.ndarray:
    return x / math.log(2)


def _exp(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return np.exp(x)


_PERPLEXITY_METRICS = {
    "perplexity": RatioMetric("nll", "tokens", _exp),
    "nll_per_token": RatioMetric("nll", "tokens"),
    "bits_per_byte": RatioMetric("nll", "bytes", _bits),
}
# suite -> metric -> how it is computed from the suite's per-unit columns. The judge's criteria are
# added per run (their names are configurable).
SUITE_METRICS: dict[str, dict[str, RatioMetric]] = {
    "multiple_choice": {
        "accuracy": RatioMetric("correct"),
        "accuracy_norm": RatioMetric("correct_norm"),
        "accuracy_circular": RatioMetric("correct_circular"),
        "mean_prob_correct": RatioMetric("prob_correct"),
    },
    "short_answer": {
        "accuracy": RatioMetric("correct"),
        "exact_match": RatioMetric("exact_match"),
        "numeric_match": RatioMetric("numeric_match", "numeric_item"),
    },
    "domain_perplexity": _PERPLEXITY_METRICS,
    "general_perplexity": _PERPLEXITY_METRICS,
    "judge": {"overall": RatioMetric("overall", "graded")},
    # lm_eval: any `<task>/<metric>` and pooled `<metric>`, see metric_for.
}


@dataclass(frozen=True)
class Samples:
    """The per-unit columns of one suite on one variant; `clusters` groups units resampled together."""

    unit: str
    ids: tuple[str, ...]
    columns: Mapping[str, tuple[float, ...]]
    clusters: tuple[str, ...] | None = None

    def to_json(self) -> dict:
        return {
            "unit": self.unit,
            "ids": list(self.ids),
            "clusters": list(self.clusters) if self.clusters is not None else None,
            "columns": {name: list(values) for name, values in self.columns.items()},
        }

    @classmethod
    def from_json(cls, data: Mapping) -> Samples:
        clusters = data.get("clusters")
        return cls(
            unit=data["unit"],
            ids=tuple(str(i) for i in data["ids"]),
            columns={name: tuple(float(v) for v in values) for name, values in data["columns"].items()},
            clusters=tuple(str(c) for c in clusters) if clusters is not None else None,
        )

    def __len__(self) -> int:
        return len(self.ids)

    def cluster_labels(self) -> list[str]:
        """The clusters in first-seen order (the order of `cluster_sums`); each unit its own without clusters."""
        return list(dict.fromkeys(self.clusters if self.clusters is not None else self.ids))

    def _cluster_index(self) -> tuple[np.ndarray, int]:
        if self.clusters is None:
            return np.arange(len(self.ids)), len(self.ids)
        order: dict[str, int] = {}
        index = np.array([order.setdefault(c, len(order)) for c in self.clusters], dtype=np.int64)
        return index, len(order)

    def cluster_sums(self, column: str, id_prefix: str | None = None) -> np.ndarray:
        """The sum of `column` (`n`: the unit count) within each cluster, clusters in first-seen order;
        with `id_prefix`, over the units whose id starts with it only."""
        values = np.ones(len(self.ids)) if column == "n" else np.asarray(self.columns[column], dtype=np.float64)
        if id_prefix is not None:
            values = values * np.array([i.startswith(id_prefix) for i in self.ids], dtype=np.float64)
        index, count = self._cluster_index()
        return np.bincount(index, weights=values, minlength=count)

    @property
    def cluster_count(self) -> int:
        return self._cluster_index()[1]


def metric_for(suite: str, metric: str) -> RatioMetric | None:
    """How `metric` of `suite` is computed from per-unit columns (None: it has no interval)."""
    known = SUITE_METRICS.get(suite, {})
    if metric in known:
        return known[metric]
    if suite == "judge" and metric not in ("items", "graded", "unparseable"):
        return RatioMetric(metric, "graded")  # a criterion
    if suite == "lm_eval":
        # `<task>/<metric>`: that task's docs; `<metric>`: every doc of a task that reports it.
        task, sep, name = metric.rpartition("/")
        return RatioMetric(name, f"n:{name}", id_prefix=f"{task}/" if sep else None)
    return None


def _stream_seed(seed: int, stream: str) -> np.random.SeedSequence:
    # zlib.crc32, not hash(): the same stream must get the same indices in every process.
    return np.random.SeedSequence([seed & 0xFFFFFFFF, zlib.crc32(stream.encode("utf-8"))])


def resample_indices(clusters: int, *, seed: int, stream: str, resamples: int = RESAMPLES) -> np.ndarray:
    """(resamples, clusters) cluster indices drawn with replacement; the same for the same arguments."""
    rng = np.random.default_rng(_stream_seed(seed, f"{stream}/{clusters}"))
    return rng.integers(0, clusters, size=(resamples, clusters))


def point_value(samples: Samples, metric: RatioMetric) -> float | None:
    """The metric on all units (what the suite reports)."""
    if metric.numerator not in samples.columns and metric.numerator != "n":
        return None
    numerator = samples.cluster_sums(metric.numerator, metric.id_prefix).sum()
    denominator = samples.cluster_sums(metric.denominator, metric.id_prefix).sum()
    value = metric.apply(np.array([numerator]), np.array([denominator]))[0]
    return float(value) if math.isfinite(value) else None


def replicates(samples: Samples, metric: RatioMetric, *, seed: int, stream: str, resamples: int = RESAMPLES) -> np.ndarray:
    """The metric on each bootstrap resample (NaN where a resample has no denominator)."""
    numerator = samples.cluster_sums(metric.numerator, metric.id_prefix)
    denominator = samples.cluster_sums(metric.denominator, metric.id_prefix)
    index = resample_indices(len(numerator), seed=seed, stream=stream, resamples=resamples)
    return metric.apply(numerator[index].sum(axis=1), denominator[index].sum(axis=1))


def joint_replicates(
    parts: Sequence[tuple[Samples, RatioMetric]], *, seed: int, stream: str, resamples: int = RESAMPLES
) -> list[np.ndarray]:
    """Each part's metric on the same bootstrap resamples of the union of their clusters.

    For suites that ask about the same facts (the benchmark's multiple-choice and short-answer items
    are clustered by fact): a model that knows a fact tends to get both kinds right, so resampling
    each suite on its own would treat correlated halves as independent and make the interval of
    their combination too narrow. A cluster one suite lacks adds nothing to it when drawn.
    """
    labels: dict[str, int] = {}
    for samples, _ in parts:
        for label in samples.cluster_labels():
            labels.setdefault(label, len(labels))
    index = resample_indices(len(labels), seed=seed, stream=stream, resamples=resamples)
    out = []
    for samples, metric in parts:
        where = np.array([labels[label] for label in samples.cluster_labels()], dtype=np.int64)
        numerator, denominator = np.zeros(len(labels)), np.zeros(len(labels))
        numerator[where] = samples.cluster_sums(metric.numerator, metric.id_prefix)
        denominator[where] = samples.cluster_sums(metric.denominator, metric.id_prefix)
        out.append(metric.apply(numerator[index].sum(axis=1), denominator[index].sum(axis=1)))
    return out


def percentile_interval(values: np.ndarray, confidence: float = CONFIDENCE) -> dict[str, float] | None:
    """{low, high}: the (1-confidence)/2 and (1+confidence)/2 percentiles of the finite `values`."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return None
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(finite, [tail, 100 - tail])
    return {"low": float(low), "high": float(high)}


def bootstrap_interval(
    samples: Samples, metric: RatioMetric, *, seed: int, stream: str, resamples: int = RESAMPLES, confidence: float = CONFIDENCE
) -> dict[str, float] | None:
    """The percentile-bootstrap interval of `metric` over `samples`' units (clusters)."""
    if len(samples) == 0 or (metric.numerator != "n" and metric.numerator not in samples.columns):
        return None
    return percentile_interval(replicates(samples, metric, seed=seed, stream=stream, resamples=resamples), confidence)


def bootstrap_mean_interval(values: Sequence[float], *, seed: int = 0, stream: str = "mean", resamples: int = RESAMPLES) -> dict[str, float] | None:
    """The percentile-bootstrap interval of the mean of independent `values` (a convenience)."""
    samples = Samples("item", tuple(str(i) for i in range(len(values))), {"value": tuple(float(v) for v in values)})
    return bootstrap_interval(samples, RatioMetric("value"), seed=seed, stream=stream, resamples=resamples)


def same_units(a: Samples, b: Samples) -> bool:
    """Whether two variants were scored on the same units in the same order (needed for pairing)."""
    return a.ids == b.ids and a.clusters == b.clusters


def paired_difference(
    a: Samples,
    b: Samples,
    metric: RatioMetric,
    *,
    seed: int,
    stream: str,
    resamples: int = RESAMPLES,
    confidence: float = CONFIDENCE,
) -> dict | None:
    """The difference a - b of `metric`, its paired-bootstrap interval, and whether it is within noise.

    Both variants are resampled with the same indices over the same units; the difference is
    within noise when its interval contains 0. None when the units differ or a value is missing.
    """
    if not same_units(a, b) or len(a) == 0:
        return None
    value_a, value_b = point_value(a, metric), point_value(b, metric)
    if value_a is None or value_b is None:
        return None
    difference = replicates(a, metric, seed=seed, stream=stream, resamples=resamples) - replicates(
        b, metric, seed=seed, stream=stream, resamples=resamples
    )
    return difference_entry(value_a - value_b, difference, confidence)


def difference_entry(point: float, replicate_differences: np.ndarray, confidence: float = CONFIDENCE) -> dict | None:
    """{difference, low, high, within_noise} from a point difference and its bootstrap replicates."""
    interval = percentile_interval(replicate_differences, confidence)
    if interval is None:
        return None
    return {"difference": point, **interval, "within_noise": bool(interval["low"] <= 0.0 <= interval["high"])}


def suite_intervals(suite: str, samples: Samples, metrics: Mapping, *, seed: int) -> dict[str, dict[str, float]]:
    """metric -> {low, high} for every metric of `metrics` that has a bootstrap definition.

    A metric without per-unit columns but with a standard error the suite reports
    (`metrics["stderr"][name]`, lm-eval's for its non-mean metrics) gets the normal interval
    value +- 1.96 stderr instead.
    """
    out = {}
    reported_stderr = metrics.get("stderr") if isinstance(metrics.get("stderr"), Mapping) else {}
    for name, value in metrics.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        metric = metric_for(suite, name)
        interval = bootstrap_interval(samples, metric, seed=seed, stream=suite) if metric is not None else None
        stderr = reported_stderr.get(name)
        if interval is None and isinstance(stderr, (int, float)) and math.isfinite(stderr) and math.isfinite(value):
            half = _Z95 * float(stderr)
            interval = {"low": float(value) - half, "high": float(value) + half}
        if interval is not None:
            out[name] = interval
    return out


# ------------------------------------------------------------------------------ per-suite samples


def _flag(value) -> float:
    return 1.0 if value else 0.0


def samples_from_details(suite: str, details: Sequence[Mapping], criteria: Sequence[str] = ()) -> Samples | None:
    """The per-unit columns of one suite's item details (what `<suite>.jsonl` holds); None if unknown."""
    if suite == "multiple_choice":
        columns = {
            "correct": tuple(_flag(d["correct"]) for d in details),
            "correct_norm": tuple(_flag(d["correct_norm"]) for d in details),
            "correct_circular": tuple(_flag(d.get("correct_circular", d["correct"])) for d in details),
            "prob_correct": tuple(float(d.get("prob_correct", math.nan)) for d in details),
        }
        return Samples("item", tuple(str(d["id"]) for d in details), columns, tuple(str(d.get("fact_id") or d["id"]) for d in details))
    if suite == "short_answer":
        columns = {
            "correct": tuple(_flag(d["correct"]) for d in details),
            "exact_match": tuple(_flag(d["exact_match"]) for d in details),
            "numeric_match": tuple(_flag(d.get("numeric_match")) for d in details),
            "numeric_item": tuple(_flag(d.get("answer_value") is not None) for d in details),
        }
        return Samples("item", tuple(str(d["id"]) for d in details), columns, tuple(str(d.get("fact_id") or d["id"]) for d in details))
    if suite in ("domain_perplexity", "general_perplexity"):
        columns = {key: tuple(float(d[key]) for d in details) for key in ("nll", "tokens", "bytes")}
        return Samples("block", tuple(str(d["block"]) for d in details), columns)
    if suite == "judge":
        graded = [d.get("grades") or {} for d in details]
        columns = {"graded": tuple(_flag(g) for g in graded)}
        for criterion in criteria:
            columns[criterion] = tuple(float(g.get(criterion, 0.0)) if g else 0.0 for g in graded)
        columns["overall"] = tuple(
            (sum(float(g.get(c, 0.0)) for c in criteria) / len(criteria)) if g and criteria else 0.0 for g in graded
        )
        return Samples("question", tuple(str(d.get("id", i)) for i, d in enumerate(details)), columns)
    if suite == "lm_eval":
        # One unit per doc (docs are independent); a column per mean metric, 0 where a task lacks it,
        # and `n:<metric>` counting the docs that have it.
        names = list(dict.fromkeys(metric for d in details for metric in d["scores"]))
        columns = {}
        for name in names:
            columns[name] = tuple(float(d["scores"].get(name, 0.0)) for d in details)
            columns[f"n:{name}"] = tuple(_flag(name in d["scores"]) for d in details)
        return Samples("doc", tuple(f"{d['task']}/{d['doc_id']}" for d in details), columns)
    return None
