"""A merge search's trials do not depend on which of its concurrent trials finishes first.

The searchers of `alloylm.merge.search` on Ray Tune with an objective that only sleeps and returns
a number (no merge: the property is the searcher's), so the order of completion can be set.
"""

from __future__ import annotations

import time

import pytest

from alloylm.config import MergeSearchStageConfig

pytestmark = pytest.mark.slow


def _stage(searcher: str, asha: dict | None = None) -> MergeSearchStageConfig:
    return MergeSearchStageConfig.model_validate(
        {
            "kind": "merge_search",
            "parents": ["a", "b"],
            "method": "slerp",
            "search": {
                "space": {"t": {"anchors": 2, "filters": ["self_attn"], "default": 0.5}},
                "searcher": searcher,
                "num_samples": 6,
                "max_concurrent_trials": 2,
                **({"asha": asha} if asha else {}),
            },
        }
    )


def _trials(stage: MergeSearchStageConfig, storage_path: str, slow_when_above: bool) -> list[tuple[float, ...]]:
    """The values of every trial, in the order Tune created them. A trial whose first value is
    above (or below) 0.5 finishes a second late, so the two orders of completion differ."""
    from ray import tune

    from alloylm.merge.search import METRIC, _searcher
    from alloylm.merge.space import dimensions, tune_space

    dims = dimensions(stage.search)
    keys = [d.key for d in dims]

    def objective(config):
        values = [config[k] for k in keys]
        if (values[0] > 0.5) == slow_when_above:
            time.sleep(1.0)
        tune.report({METRIC: -sum((v - 0.3) ** 2 for v in values)})

    tuner = tune.Tuner(
        tune.with_resources(objective, {"cpu": 0.5}),
        param_space=tune_space(stage.search, dims),
        tune_config=tune.TuneConfig(
            metric=METRIC, mode="max", search_alg=_searcher(stage, 0, []), num_samples=stage.search.num_samples
        ),
        run_config=tune.RunConfig(storage_path=storage_path, verbose=0),
    )
    grid = tuner.fit()
    return [tuple(round(result.config[k], 9) for k in keys) for result in grid]


def test_two_trials_at_a_time_suggest_the_same_trials_whichever_finishes_first(ray_cluster, tmp_path):
    # TPE models the space from its third trial on (2 start-up trials of 6): without Tune's batch
    # mode, the third trial was suggested from whichever of the first two had finished.
    stage = _stage("tpe")
    first = _trials(stage, str(tmp_path / "a"), slow_when_above=True)
    second = _trials(stage, str(tmp_path / "b"), slow_when_above=False)
    assert len(first) == 6
    assert first == second


def test_asha_with_concurrent_trials_is_said_not_reproducible():
    from alloylm.merge.search import search_is_reproducible

    assert not search_is_reproducible(_stage("tpe", asha={"rungs": [0.5, 1.0]}).search)
    assert search_is_reproducible(_stage("tpe").search)
    single = _stage("tpe", asha={"rungs": [0.5, 1.0]})
    assert search_is_reproducible(single.search.model_copy(update={"max_concurrent_trials": 1}))
