"""Bootstrap intervals and the paired difference: against hand computations on tiny fixed samples."""

from __future__ import annotations

import math

import numpy as np
import pytest

from alloylm.evaluate.intervals import (
    RatioMetric,
    Samples,
    bootstrap_interval,
    bootstrap_mean_interval,
    paired_difference,
    point_value,
    replicates,
    resample_indices,
)

ACCURACY = RatioMetric("correct")


def _items(correct, clusters=None) -> Samples:
    ids = tuple(f"i{k}" for k in range(len(correct)))
    return Samples("item", ids, {"correct": tuple(float(c) for c in correct)}, tuple(clusters) if clusters else None)


def test_a_constant_sample_has_a_zero_width_interval():
    assert bootstrap_mean_interval([1, 1, 1, 1]) == {"low": 1.0, "high": 1.0}
    assert bootstrap_mean_interval([0, 0, 0]) == {"low": 0.0, "high": 0.0}


def test_two_items_one_right_spans_zero_to_one():
    # By hand: a resample of [0, 1] has mean 0 (p 1/4), 0.5 (p 1/2) or 1 (p 1/4); the 2.5th and
    # 97.5th percentiles of 1000 such means are therefore 0 and 1.
    assert bootstrap_mean_interval([0, 1], resamples=1000) == {"low": 0.0, "high": 1.0}


def test_sixty_of_a_hundred_matches_the_normal_approximation():
    # By hand: the bootstrap distribution of a mean of 100 Bernoulli(0.6) draws has sd
    # sqrt(0.6 * 0.4 / 100) = 0.049, so the 95% interval is about 0.6 -/+ 1.96 * 0.049 = [0.504, 0.696].
    interval = bootstrap_mean_interval([1] * 60 + [0] * 40, seed=0)
    assert interval["low"] == pytest.approx(0.504, abs=0.02)
    assert interval["high"] == pytest.approx(0.696, abs=0.02)
    assert bootstrap_mean_interval([1] * 60 + [0] * 40, seed=0) == interval  # seeded: the same every time


def test_ratio_metric_resamples_whole_blocks():
    # Perplexity of two blocks (nll 2, 4 over 1, 1 tokens): all-block value exp(6 / 2) = e^3; a
    # resample holds block 1 twice (e^2), block 2 twice (e^4) or both (e^3) - nothing else.
    blocks = Samples("block", ("0", "1"), {"nll": (2.0, 4.0), "tokens": (1.0, 1.0)})
    perplexity = RatioMetric("nll", "tokens", np.exp)
    assert point_value(blocks, perplexity) == pytest.approx(math.e**3)
    values = set(np.round(replicates(blocks, perplexity, seed=0, stream="p"), 6))
    assert values == {round(math.e**2, 6), round(math.e**3, 6), round(math.e**4, 6)}
    assert bootstrap_interval(blocks, perplexity, seed=0, stream="p") == {
        "low": pytest.approx(math.e**2),
        "high": pytest.approx(math.e**4),
    }


def test_items_of_one_fact_are_resampled_together():
    # Two facts, three items each, one fact all right: by fact, a resample is 0, 0.5 or 1 exactly;
    # by item, means like 2/6 appear too.
    correct = [1, 1, 1, 0, 0, 0]
    by_fact = replicates(_items(correct, ["a", "a", "a", "b", "b", "b"]), ACCURACY, seed=0, stream="mc")
    by_item = replicates(_items(correct), ACCURACY, seed=0, stream="mc")
    assert set(np.round(by_fact, 6)) <= {0.0, 0.5, 1.0}
    assert not set(np.round(by_item, 6)) <= {0.0, 0.5, 1.0}


def test_resample_indices_depend_only_on_seed_stream_and_size():
    a = resample_indices(50, seed=3, stream="multiple_choice")
    assert a.shape == (1000, 50)
    assert np.array_equal(a, resample_indices(50, seed=3, stream="multiple_choice"))
    assert not np.array_equal(a, resample_indices(50, seed=3, stream="short_answer"))


def test_identical_variants_differ_within_noise():
    a = _items([1, 0] * 50)
    difference = paired_difference(a, a, ACCURACY, seed=0, stream="mc")
    assert difference == {"difference": 0.0, "low": 0.0, "high": 0.0, "within_noise": True}


def test_a_variant_right_on_30_more_of_100_items_is_outside_noise():
    # b is right on items 0-29, a on items 0-59: the paired difference is 0.3 on every item that
    # differs, and its interval (about 0.3 -/+ 1.96 * sqrt(0.3 * 0.7 / 100) = [0.21, 0.39]) excludes 0.
    a, b = _items([1] * 60 + [0] * 40), _items([1] * 30 + [0] * 70)
    difference = paired_difference(a, b, ACCURACY, seed=0, stream="mc")
    assert difference["difference"] == pytest.approx(0.3)
    assert difference["low"] == pytest.approx(0.21, abs=0.03) and difference["high"] == pytest.approx(0.39, abs=0.03)
    assert difference["within_noise"] is False


def test_two_items_of_a_hundred_apart_is_within_noise():
    a, b = _items([1] * 52 + [0] * 48), _items([1] * 50 + [0] * 50)
    difference = paired_difference(a, b, ACCURACY, seed=0, stream="mc")
    assert difference["difference"] == pytest.approx(0.02)
    assert difference["low"] <= 0.0 <= difference["high"] and difference["within_noise"] is True


def test_pairing_is_tighter_than_separate_intervals():
    # Both right on the same 50 items, a also on 8 more: separately the intervals overlap widely,
    # paired the difference 0.08 is clearly above 0 (it is never negative in any resample).
    a, b = _items([1] * 58 + [0] * 42), _items([1] * 50 + [0] * 50)
    ia, ib = bootstrap_interval(a, ACCURACY, seed=0, stream="mc"), bootstrap_interval(b, ACCURACY, seed=0, stream="mc")
    assert ia["low"] < ib["high"]  # the separate intervals overlap
    assert paired_difference(a, b, ACCURACY, seed=0, stream="mc")["within_noise"] is False


def test_different_items_cannot_be_paired():
    assert paired_difference(_items([1, 0]), _items([1, 0, 1]), ACCURACY, seed=0, stream="mc") is None
