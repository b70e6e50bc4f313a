"""Where a training stage's wall time goes: the manifest's `breakdown` (issue 17, goal 2).

One real stage (CPT of a tiny preset for a few steps, on the session's Ray cluster) records every
phase, none negative, adding up to the stage's `seconds`; the run summary's table shows it. The
arithmetic of the breakdown (rank 0's phases against the driver's clock, a skewed worker clock)
is checked without Ray.
"""

from __future__ import annotations

import pytest

from alloylm.cli import stage_timings_table
from alloylm.config import validate_config
from alloylm.train.launcher import BREAKDOWN_PHASES, stage_breakdown, train_stage


def test_breakdown_adds_up_and_clamps_a_skewed_worker_clock():
    worker = {"started_at": 105.0, "seconds": {"imports": 3.0, "load": 1.0, "engine_init": 0.5, "training": 10.0, "save": 0.5}}
    breakdown = stage_breakdown(prepare=1.0, fit_seconds=20.0, fit_started_at=100.0, worker=worker, finish=0.25)
    assert list(breakdown) == list(BREAKDOWN_PHASES)
    assert breakdown["worker_start"] == 5.0  # the worker started 5 s after fit
    assert breakdown["finish"] == 0.25 + 20.0 - 15.0 - 5.0
    assert sum(breakdown.values()) == pytest.approx(1.0 + 20.0 + 0.25)
    # A worker clock ahead of the driver's by more than fit took: start-up is cut at what is left.
    skewed = stage_breakdown(prepare=1.0, fit_seconds=20.0, fit_started_at=100.0, worker={**worker, "started_at": 200.0}, finish=0.0)
    assert skewed["worker_start"] == 5.0 and skewed["finish"] == 0.0
    # ... and one behind it: none of it before the worker, all after.
    behind = stage_breakdown(prepare=1.0, fit_seconds=20.0, fit_started_at=100.0, worker={**worker, "started_at": 50.0}, finish=0.0)
    assert behind["worker_start"] == 0.0 and behind["finish"] == 5.0
    assert all(value >= 0 for value in (*skewed.values(), *behind.values()))
    # No return value from rank 0 (an older worker): all of fit is Ray Train's start-up.
    assert stage_breakdown(prepare=0.5, fit_seconds=8.0, fit_started_at=0.0, worker=None, finish=0.1)["worker_start"] == 8.0


@pytest.mark.slow
def test_a_trained_stage_records_where_its_time_went(ray_cluster, tmp_path):
    config = validate_config(
        {
            "experiment": "startup",
            "storage": str(tmp_path),
            "builtin": {"materials": 4, "documents_per_material": 2, "general_documents": 40},
            "tokenizer": {"train": {"vocab_size": 300}},
            "datasets": {"text": {"source": "builtin:general-text"}},
            "data": {"block_size": 32, "tokenizer_actors": 1},
            "stages": {
                "base": {"kind": "cpt", "from": {"init": "tiny-llama"}, "data": "text", "training": {"batch_size": 4, "max_steps": 4, "logging_steps": 2}},
            },
        }
    )
    manifest = train_stage(config, "base")
    breakdown = manifest["breakdown"]
    assert list(breakdown) == list(BREAKDOWN_PHASES)
    assert all(value >= 0 for value in breakdown.values()), breakdown
    assert sum(breakdown.values()) == pytest.approx(manifest["seconds"], abs=0.1)
    # Each phase that always takes time did, on the worker and around it.
    assert all(breakdown[key] > 0 for key in ("prepare", "worker_start", "imports", "load", "engine_init", "training", "save", "finish")), breakdown
    table = stage_timings_table({"base": {"seconds": manifest["seconds"], "breakdown": breakdown}})
    assert "| base | " in table and "Median time outside training per stage" in table
    assert "{" not in table  # printed before the summary's JSON, which tests find by its first "{"
