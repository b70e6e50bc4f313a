"""Where a training stage's wall time goes: the manifest's `breakdown` (issue 17, goal 2).

The arithmetic of the breakdown (rank 0's phases against the driver's clock, a skewed worker
clock), checked without Ray. A real stage's breakdown is checked on the stages that
tests/train/test_launcher.py trains anyway (`test_a_trained_stage_records_where_its_time_went`).
"""

from __future__ import annotations

import pytest

from alloylm.train.launcher import BREAKDOWN_PHASES, stage_breakdown


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


def _callback_names(trainer_cls, **kwargs) -> set[str]:
    import ray.train

    trainer = trainer_cls(train_loop_per_worker=lambda: None, scaling_config=ray.train.ScalingConfig(num_workers=1), **kwargs)
    return {type(callback).__name__ for callback in trainer._create_default_callbacks()}


def test_ray_trains_idle_helpers_are_left_out_and_only_those(ray_cluster, monkeypatch):
    """The session's cluster has no dashboard, so no State API: the placement group cleaner could
    only warn, every second, that it cannot see the controller. A stage that passes no data set
    (all but CPT) gets no DatasetManager actor. Everything else is as Ray Train sets it up."""
    import ray.data
    from ray.train.torch import TorchTrainer

    from alloylm.train import launcher

    everything = _callback_names(TorchTrainer)
    assert {"PlacementGroupCleanerCallback", "DatasetsCallback", "BackendSetupCallback"} <= everything
    assert launcher.state_api_answers() is False  # asked for real: ray.init(include_dashboard=False)
    data = {"datasets": {"train": ray.data.range(4)}}
    assert _callback_names(launcher.trainer_class()) == everything - {"PlacementGroupCleanerCallback", "DatasetsCallback"}
    assert _callback_names(launcher.trainer_class(), **data) == everything - {"PlacementGroupCleanerCallback"}
    monkeypatch.setattr(launcher, "state_api_answers", lambda: True)
    assert _callback_names(launcher.trainer_class()) == everything - {"DatasetsCallback"}
    assert _callback_names(launcher.trainer_class(), **data) == everything
