"""alloylm.pipeline: the artifact graph scheduled on a real Ray cluster, with a stage kind registered here.

The `toy` kind below is registered from this test module only: it runs through `alloylm run`
with no edit to cli.py or config.py, which is the proof that the registry is the one place a
kind is declared. Toy stages hold a CPU and sleep, so the scheduler's decisions are visible in
their recorded start and end times (ordering only: no test here depends on how long anything takes).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

import pytest
import yaml
from pydantic import Field

from alloylm import artifact, storage
from alloylm.cli import main
from alloylm.errors import StageError
from alloylm.layout import RunLayout
from alloylm.pipeline import RunSummary, check_stage_resources
from alloylm.schema import StageConfigBase
from alloylm.stages import STAGE_KINDS, StageKind, register_stage_kind

REPO = Path(__file__).resolve().parents[1]


class ToyStageConfig(StageConfigBase):
    """Sleeps while holding `cpus`, then writes a small artifact (or fails)."""

    kind: Literal["toy"] = Field(description="toy")
    after: list[str] = Field(default_factory=list)
    seconds: float = 1.0
    cpus: float = 1.0
    fail: bool = False

    def parent_refs(self) -> list[str]:
        return list(self.after)

    def resource_needs(self) -> dict[str, tuple[float, str]]:
        return {"CPU": (self.cpus, f"{self.cpus:g} CPUs")}


def run_toy(config, name: str) -> dict:
    stage = config.stages[name]
    layout = RunLayout.of(config)
    parents = [storage.read_manifest(layout.stage(p))["fingerprint"] for p in stage.after]
    fp = artifact.fingerprint("toy", stage.model_dump(mode="json", exclude={"seconds", "cpus"}), parents)
    done = artifact.up_to_date(layout.stage(name), fp)
    if done:
        return done
    started = time.time()
    time.sleep(stage.seconds)
    if stage.fail:
        raise StageError(f"stage {name!r}: failed on purpose")
    with artifact.begin(layout.stage(name), fp, config) as building:
        storage.write_text(storage.join(building.staging_uri, "out.txt"), name)
        return building.commit({"kind": "stage", "stage_kind": "toy", "name": name, "metrics": {"started": started, "ended": time.time()}})


@pytest.fixture(autouse=True)
def toy_kind():
    register_stage_kind(StageKind(name="toy", config=ToyStageConfig, run=run_toy, command="toy"))
    yield
    STAGE_KINDS.pop("toy", None)


def toy_config(tmp_path: Path, stages: dict, **extra) -> Path:
    raw = {"experiment": "toy", "storage": str(tmp_path / "runs"), "tokenizer": {"from": "unused"}, "stages": stages, **extra}
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def run(capsys, config: Path, *overrides: str) -> tuple[int, dict]:
    code = main(["-q", "run", str(config), *overrides])
    out = capsys.readouterr().out
    return code, json.loads(out[out.index("{") :])


def interval(summary: dict, name: str) -> tuple[float, float]:
    metrics = summary["stages"][name]
    return metrics["started"], metrics["ended"]


def test_toy_kind_runs_in_parallel_and_a_failed_branch_stops_only_its_descendants(ray_cluster, tmp_path, capsys):
    stages = {
        "a": {"kind": "toy", "seconds": 2},
        "c": {"kind": "toy", "seconds": 2},  # independent of a: runs beside it (1 CPU each, 2 CPUs)
        "b": {"kind": "toy", "after": ["a"], "fail": True},
        "e": {"kind": "toy", "after": ["b"]},  # below the failed stage: not run
        "f": {"kind": "toy", "after": ["c"]},  # sibling branch: runs although b failed
    }
    code, summary = run(capsys, toy_config(tmp_path, stages))
    assert code == 1
    assert summary["steps"]["stage:b"]["status"] == "failed" and "failed on purpose" in summary["failed"]["stage:b"]
    assert summary["steps"]["stage:e"]["status"] == "not run" and "stage:b" in summary["failed"]["stage:e"]
    assert {k for k, s in summary["steps"].items() if s["status"] == "done"} == {"stage:a", "stage:c", "stage:f"}
    (a0, a1), (c0, c1) = interval(summary, "a"), interval(summary, "c")
    assert a0 < c1 and c0 < a1, "independent stages that fit the cluster together must overlap"
    f0, _ = interval(summary, "f")
    assert f0 >= c1, "a stage starts only after its parent finished"
    assert (RunLayout(summary["run"]).stage("f") + "/out.txt").endswith("out.txt")
    assert storage.read_text(RunLayout(summary["run"]).stage("f") + "/out.txt") == "f"

    # Fixed: only b and its descendant e run; a, c and f are up to date and skipped.
    code, again = run(capsys, toy_config(tmp_path, {**stages, "b": {"kind": "toy", "after": ["a"]}}))
    assert code == 0 and again["failed"] == {}
    for name in ("a", "c", "f"):
        assert interval(again, name) == interval(summary, name)
    assert interval(again, "e")[0] >= interval(again, "b")[1]


def test_max_parallel_stages_and_resources_limit_concurrency(ray_cluster, tmp_path, capsys):
    one_at_a_time = {"a": {"kind": "toy", "seconds": 1}, "c": {"kind": "toy", "seconds": 1}}
    code, summary = run(capsys, toy_config(tmp_path / "one", one_at_a_time), "run.max_parallel_stages=1")
    assert code == 0
    (a0, a1), (c0, c1) = interval(summary, "a"), interval(summary, "c")
    assert a1 <= c0 or c1 <= a0, "run.max_parallel_stages=1 runs stages one at a time"

    # Two stages of 1.5 CPUs each do not fit 2 CPUs together: the scheduler runs them in turn.
    too_big = {"a": {"kind": "toy", "seconds": 1, "cpus": 1.5}, "c": {"kind": "toy", "seconds": 1, "cpus": 1.5}}
    code, summary = run(capsys, toy_config(tmp_path / "big", too_big))
    assert code == 0
    (a0, a1), (c0, c1) = interval(summary, "a"), interval(summary, "c")
    assert a1 <= c0 or c1 <= a0


def test_a_stage_larger_than_the_cluster_fails_before_any_step(ray_cluster, tmp_path, capsys):
    config = toy_config(tmp_path, {"a": {"kind": "toy", "seconds": 0}, "huge": {"kind": "toy", "cpus": 64}})
    assert main(["-q", "run", str(config)]) == 1
    assert "stage 'huge': resources: 64 CPUs, but the Ray cluster has 2" in capsys.readouterr().err
    assert not storage.exists(str(tmp_path / "runs" / "toy" / "stages" / "a"))
    # `--only a` runs a and its ancestors: a stage it does not run does not have to fit
    assert main(["-q", "run", str(config), "--only", "a"]) == 0, capsys.readouterr().err
    assert storage.exists(str(tmp_path / "runs" / "toy" / "stages" / "a"))


def test_an_evaluation_larger_than_the_cluster_fails_before_any_step(ray_cluster, tmp_path):
    """Only stages were checked up front: with evaluate.resources.num_gpus on a CPU cluster every
    stage trained, then each evaluation task waited for a GPU that never came."""
    from alloylm.config import load_config
    from alloylm.evaluate import EvaluationInputError
    from alloylm.evaluate.runner import check_eval_resources
    from alloylm.pipeline import run_pipeline

    config = load_config(REPO / "configs" / "quickstart.yaml", [f"storage={tmp_path}", "evaluate.resources.num_gpus=1"])
    with pytest.raises(EvaluationInputError, match=r"evaluate.resources.num_gpus: 1 per evaluation task, but the Ray cluster has 0"):
        run_pipeline(config)
    assert not any(tmp_path.iterdir())  # no lease, no tokenizer, no data
    check_eval_resources(config.evaluate.model_copy(update={"resources": config.evaluate.resources.model_copy(update={"num_gpus": 0.0})}),
                         {"CPU": 2.0})
    big = config.evaluate.resources.model_copy(update={"num_gpus": 0.0, "memory_gb": 64.0})
    with pytest.raises(EvaluationInputError, match=r"evaluate.resources.memory_gb: 64 GiB per evaluation task, but the Ray cluster has 2 GiB"):
        check_eval_resources(config.evaluate.model_copy(update={"resources": big}), {"CPU": 2.0, "memory": 2 * 1024**3})


def test_one_resource_check_names_the_stage_and_the_shortfall():
    from alloylm.config import load_config

    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml", ["stages.cpt.resources.workers=3"])
    check_stage_resources(config, have={"CPU": 3.0})
    with pytest.raises(StageError, match=r"stage 'cpt': resources: 3 workers x 1 CPUs = 3 CPUs, but the Ray cluster has 2"):
        check_stage_resources(config, have={"CPU": 2.0})


def test_failed_evaluation_makes_the_run_fail():
    """The bug this guards: variants that failed evaluation left `alloylm run` at exit 0 (and serving)."""
    summary = RunSummary(experiment="x", run="/tmp/x", steps={"stage:a": {"status": "done"}})
    assert summary.ok
    summary.evaluation = {"split": "test", "scores": {"a": None}, "failed": {"a": "model does not load"}}
    assert not summary.ok and summary.to_json()["failed"] == {"eval:a": "model does not load"}


def test_a_comparison_that_is_not_made_leaves_no_earlier_table_behind(tmp_path):
    # Every variant failed its evaluation: `alloylm run` prints the comparison table if there is
    # one, so an earlier run's table must not be there to be printed as this run's.
    from alloylm.config import load_config
    from alloylm.pipeline import _add_evaluation

    config = load_config(REPO / "configs" / "quickstart.yaml", [f"storage={tmp_path}"])
    layout = RunLayout.of(config)
    for name in ("comparison.md", "comparison.json"):
        storage.write_text(storage.join(layout.eval, name), "an earlier run's table")
    summary = RunSummary(experiment=config.experiment, run=config.run_uri, steps={"eval:dpo": {"status": "failed", "error": "boom"}})
    steps: dict = {}
    _add_evaluation(config, summary, steps)
    with pytest.raises(StageError, match="evaluation failed for"):
        steps["comparison"].run()
    assert not storage.exists(layout.comparison_table) and not storage.exists(storage.join(layout.eval, "comparison.json"))
    assert summary.evaluation["failed"]["dpo"] == "boom"


def test_on_the_validation_split_the_selection_takes_the_comparisons_scores(tmp_path, monkeypatch):
    """With `evaluate.split: validation` the comparison already scores every variant on validation,
    into the folder the selection uses: the selection waits for it and takes its result, instead of
    comparing again beside it (which scored every variant without a manifest a second time)."""
    import alloylm.evaluate as evaluate
    from alloylm.config import load_config
    from alloylm.pipeline import _add_evaluation

    config = load_config(REPO / "configs" / "quickstart.yaml", [f"storage={tmp_path}", "evaluate.split=validation"])
    calls = []

    def evaluate_variants(eval_config, variants, data, out, **options):
        calls.append((sorted(variants), out, options.get("split")))
        return {"split": "validation", "out": out, "variants": {v: {"status": "ok", "score": 0.5} for v in variants},
                "comparison": {"rows": list(variants)}, "failed": {}}

    monkeypatch.setattr(evaluate, "evaluate_variants", evaluate_variants)
    monkeypatch.setattr(evaluate, "best_variant", lambda comparison: {"variant": comparison["rows"][0], "score": 0.5, "within_noise": []})
    summary = RunSummary(experiment=config.experiment, run=config.run_uri, steps={"eval:dpo": {"status": "done"}})
    steps: dict = {}
    _add_evaluation(config, summary, steps)
    assert "validate:dpo" not in steps and steps["selection"].after == ("comparison",)
    with pytest.raises(StageError, match="evaluation failed for"):  # the other variants were not scored
        steps["comparison"].run()
    best = steps["selection"].run()
    assert calls == [(["dpo"], RunLayout.of(config).eval, None)]
    assert best["variant"] == "dpo" and storage.read_json(RunLayout.of(config).best)["variant"] == "dpo"


def test_run_only_a_merge_search_prepares_the_data_its_objective_scores_on(tmp_path):
    """The bug this guards: `alloylm run --only merged` prepared the parents' data only, so the search
    failed for want of its objective's benchmark (or scored on a stale copy of it)."""
    from alloylm.config import load_config
    from alloylm.pipeline import build_graph

    config = load_config(REPO / "configs" / "quickstart.yaml", [f"storage={tmp_path}"])
    summary = RunSummary(experiment=config.experiment, run=config.run_uri)
    steps = build_graph(config, summary, only=["merged"])
    # The objective's suites of weight > 0 (multiple choice, short answers): the benchmark; the
    # perplexity suites weigh 0 in the quickstart's score, so trials skip them and their data.
    assert "data:domain-benchmark" in steps and "data:domain-benchmark" in steps["stage:merged"].parents
    assert "data:domain-heldout" not in steps and "data:domain-benchmark" not in steps["stage:dpo"].parents


def test_a_merge_search_holds_what_its_concurrent_trials_take(tmp_path):
    """The search's step held one trial's CPUs while Tune ran max_concurrent_trials trials, so the
    scheduler started siblings on resources the other trials took (on GPUs: a Ray Train worker
    group waited for a placement group until its start timeout)."""
    from alloylm.config import load_config
    from alloylm.pipeline import build_graph

    overrides = [f"storage={tmp_path}", "stages.merged.search.max_concurrent_trials=3", "stages.merged.resources.num_cpus=0.5"]
    config = load_config(REPO / "configs" / "quickstart.yaml", overrides)
    summary = RunSummary(experiment=config.experiment, run=config.run_uri)
    held = {cpus: build_graph(config, summary, capacity={"CPU": cpus})["stage:merged"].needs for cpus in (8.0, 1.0, 0.5)}
    assert held == {8.0: {"CPU": 1.5}, 1.0: {"CPU": 1.0}, 0.5: {"CPU": 0.5}}  # as many trials as fit, at least one
    assert build_graph(config, summary, capacity={"CPU": 8.0})["stage:merged-head"].needs == {"CPU": 1.0}  # a fixed merge: one
    few = load_config(REPO / "configs" / "quickstart.yaml", [*overrides, "stages.merged.search.num_samples=2"])
    assert build_graph(few, summary, capacity={"CPU": 8.0})["stage:merged"].needs == {"CPU": 1.0}
    # A grid runs one trial per point, whatever num_samples says: 1 point here, or 3 of them.
    grid = [*overrides, "stages.merged.search.searcher=grid", "stages.merged.search.num_samples=1"]
    one_point = load_config(REPO / "configs" / "quickstart.yaml", grid)
    assert build_graph(one_point, summary, capacity={"CPU": 8.0})["stage:merged"].needs == {"CPU": 0.5}
    point = "{t: {self_attn: [0, 0.5, 0.5, 0.5, 1], mlp: [1, 0.5, 0.5, 0.5, 0], default: 0.5}}"
    three = load_config(REPO / "configs" / "quickstart.yaml", [*grid, f"stages.merged.search.points=[{point}, {point}, {point}]"])
    assert build_graph(three, summary, capacity={"CPU": 8.0})["stage:merged"].needs == {"CPU": 1.5}


def test_an_artifact_is_up_to_date_only_with_the_builds_of_its_inputs_it_recorded(tmp_path):
    parent, child = str(tmp_path / "parent"), str(tmp_path / "child")
    with artifact.begin(parent, "p") as building:
        built = building.commit({"kind": "stage"})
    inputs = artifact.input_versions({"parent": parent, "missing": str(tmp_path / "missing")})
    assert inputs == {"parent": built["created_at"]}  # by name: a run copied elsewhere is the same run
    with artifact.begin(child, "c") as building:
        made = building.commit({"kind": "stage", "inputs": inputs})
    assert artifact.up_to_date(child, "c", inputs) == made
    assert artifact.up_to_date(child, "c", {"parent": "another build"}) is None
    assert artifact.up_to_date(child, "other fingerprint", inputs) is None
    # A manifest made before builds were recorded: judged by its fingerprint, as it was then.
    storage.write_json(storage.join(child, storage.MANIFEST_NAME), {k: v for k, v in made.items() if k != "inputs"})
    assert artifact.up_to_date(child, "c", {"parent": "another build"})["fingerprint"] == "c"
    # Work folders (Ray Train checkpoints, Tune experiments) are per build: one made on the old
    # parent is not resumed by the rebuild.
    assert artifact.build_key("c", {}) == "c" and artifact.build_key("c", inputs) != artifact.build_key("c", {"parent": "another build"})


def test_a_lost_lease_starts_no_more_steps_and_fails_the_run():
    """The lease's heartbeat noticed a takeover, logged it, and the run went on writing beside the
    other writer, and ended with exit 0."""
    from alloylm.pipeline import LEASE_LOST, Step, run_graph

    lost = []
    ran = []
    steps = {
        "a": Step("a", run=lambda: (ran.append("a"), lost.append(True))),  # the heartbeat finds the lease taken
        "b": Step("b", run=lambda: ran.append("b"), parents=("a",)),
        "c": Step("c", run=lambda: ran.append("c"), parents=("b",)),
    }
    summary = RunSummary(experiment="x", run="/tmp/x")
    run_graph(steps, summary, capacity={"CPU": 2.0}, max_parallel=1, halt=lambda: LEASE_LOST if lost else None)
    assert ran == ["a"] and summary.steps["a"]["status"] == "done"
    assert {k: summary.steps[k]["status"] for k in ("b", "c")} == {"b": "not run", "c": "not run"}
    assert not summary.ok and "lease was lost" in summary.failed["b"]


_INTERRUPTED_RUN = """
import logging, os, sys, time
from alloylm.lease import RunLease
from alloylm.pipeline import RunSummary, Step, run_graph

logging.basicConfig(level=logging.INFO)
uri, seconds = sys.argv[1], float(sys.argv[2])

def slow():
    print("step running", flush=True)
    time.sleep(seconds)
    open(os.path.join(uri, "finished"), "w").close()

with RunLease(uri, "run", ttl=60).held():
    summary = RunSummary(experiment="x", run=uri)
    steps = {"slow": Step("slow", run=slow), "after": Step("after", run=lambda: print("after ran", flush=True), parents=("slow",))}
    try:
        run_graph(steps, summary, capacity={"CPU": 1.0}, max_parallel=1)
    finally:
        print("statuses", {k: v["status"] for k, v in summary.steps.items()}, flush=True)
"""


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_waits_for_running_steps_and_a_second_stops_at_once_keeping_the_lease(tmp_path, presses):
    """The first Ctrl-C waited silently for the running steps; a second released the run's lease
    while their threads went on training, so another run could take it and write beside them."""
    import signal
    import subprocess
    import sys
    import threading

    uri = tmp_path / "exp"
    seconds = 4 if presses == 1 else 60
    proc = subprocess.Popen([sys.executable, "-c", _INTERRUPTED_RUN, str(uri), str(seconds)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()

    def wait_for(text: str) -> None:
        deadline = time.monotonic() + 120
        while not any(text in line for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.05)

    try:
        wait_for("step running")
        proc.send_signal(signal.SIGINT)
        wait_for("interrupted: no more steps start; waiting for the running ones (slow)")
        if presses == 2:
            proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        proc.kill()
    reader.join(timeout=10)
    out = "".join(lines)
    assert "after ran" not in out, out
    if presses == 1:  # the step finished, the other was not run, the lease was released
        assert (uri / "finished").exists() and not (uri / ".lease").exists(), out
        assert "statuses {'slow': 'done', 'after': 'not run'}" in out and proc.returncode != 0, out
    else:  # stopped at once: the step never finished, and the lease stays until its TTL
        assert proc.returncode == 130 and not (uri / "finished").exists() and (uri / ".lease").exists(), out
        assert "stopped while slow ran" in out, out
