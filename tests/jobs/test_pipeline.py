"""The whole pipeline end to end (`alloylm run`, `jobs/pipeline.py`) on a cluster started with `ray start`.

One reduced copy of configs/quickstart.yaml (the same DAG: base -> instruct -> cpt (2 workers,
ZeRO-2) -> sft -> dpo, cpt -> orpo, merged = searched SLERP of dpo and instruct; evaluation and
the report) is submitted with `ray job submit`, stores on S3 (moto) and tracks to a local MLflow
file store (`tracking.mlflow`). Then the same run with
one stage changed is killed while that stage trains and run again: the stages upstream of it are
skipped, the cut stage resumes from its checkpoint and its descendant reruns. Bad input (a cycle,
a missing parent, an unknown stage kind, more CPUs than the cluster has) fails before any work.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from alloylm import storage

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
STAGES = ("base", "instruct", "cpt", "sft", "dpo", "orpo", "merged-paper", "merged-head", "merged", "sft-direct")
TRAINED = ("base", "instruct", "cpt", "sft", "dpo", "orpo", "sft-direct")
# Stages that neither are dpo nor descend from it: a change to dpo must leave them alone.
NOT_AFTER_DPO = ("base", "instruct", "cpt", "sft", "orpo", "sft-direct")
# Run 2 changes dpo (beta) and gives it enough steps, with checkpoints, to be cut in the middle.
DPO_CHANGE = ["stages.dpo.beta=0.2", "stages.dpo.training.max_steps=24", "stages.dpo.checkpoint.every_steps=2", "overwrite=true",
              "run.lease_ttl_seconds=10"]  # the killed run 2 holds the run's lease: run 3 takes it over 10 s after its last heartbeat


def reduced_quickstart(storage_uri: str) -> dict:
    """configs/quickstart.yaml with its DAG, stage kinds and resources intact, at test sizes."""
    raw = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text(encoding="utf-8"))
    raw["experiment"] = "qs"
    raw["storage"] = storage_uri
    raw["builtin"] = {
        "materials": 4, "documents_per_material": 2, "general_documents": 60, "general_chats": 40,
        "heldout_documents": 4, "general_heldout_documents": 8,
    }
    raw["tokenizer"] = {"train": {"vocab_size": 400}}
    raw["data"] = {**raw["data"], "block_size": 32, "tokenizer_actors": 1}
    for stage in raw["stages"].values():
        if "training" in stage:
            stage["training"].pop("epochs", None)
            stage["training"].update(max_steps=3, batch_size=4, logging_steps=1)
    raw["stages"]["base"]["from"] = {"init": "pico-llama"}
    search = raw["stages"]["merged"]["search"]
    search.update(num_samples=3, max_concurrent_trials=2)
    search["objective"]["max_items"] = 8
    raw["evaluate"]["max_items"] = 4
    raw["evaluate"]["suites"]["short_answer"]["max_new_tokens"] = 4
    return raw


@dataclass(frozen=True)
class Cluster:
    gcs: str  # host:port, for RAY_ADDRESS
    dashboard: str  # http://host:port, for `ray job submit --address`
    env: dict  # the environment every command against this cluster runs with

    def driver_env(self) -> dict:
        return {**self.env, "RAY_ADDRESS": self.gcs}


@pytest.fixture(scope="module")
def cluster(s3_endpoint, ray_processes):
    """`ray start --head` with 2 CPUs and the job server, on free ports; S3 settings inherited."""
    # A short temp dir of our own: Ray's socket paths must stay under the OS limit (107 bytes),
    # which a pytest tmp_path plus Ray's session folder name can exceed.
    temp_dir = tempfile.mkdtemp(prefix="alp-", dir="/tmp")
    names = ("gcs", "dashboard", "client", "agent", "agent_grpc", "runtime_env", "metrics")
    ports = dict(zip(names, ray_processes.free_ports(len(names)), strict=True))
    # The job's entry point is `python ...`: the venv's python, so PATH starts with its bin folder.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    command = [
        str(BIN / "ray"), "start", "--head", f"--temp-dir={temp_dir}", f"--port={ports['gcs']}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={ports['dashboard']}",
        f"--ray-client-server-port={ports['client']}", f"--dashboard-agent-listen-port={ports['agent']}",
        f"--dashboard-agent-grpc-port={ports['agent_grpc']}", f"--runtime-env-agent-port={ports['runtime_env']}",
        f"--metrics-export-port={ports['metrics']}", "--num-cpus=2", "--disable-usage-stats",
    ]
    start = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = start.communicate(timeout=600)
        assert start.returncode == 0, out[-3000:]
        dashboard = f"http://127.0.0.1:{ports['dashboard']}"
        _wait_for_http(dashboard + "/api/version")
        yield Cluster(gcs=f"127.0.0.1:{ports['gcs']}", dashboard=dashboard, env=env)
    finally:
        ray_processes.stop(marker=temp_dir, pgid=start.pid)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_http(url: str) -> None:
    """Until the dashboard's HTTP server answers (any status: it is up)."""
    for _ in range(600):
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"the dashboard never answered at {url}")


def _summary(output: str) -> dict:
    """The JSON summary `alloylm run` prints last (after log lines and the comparison table)."""
    start = output.rfind('{\n  "experiment"')
    assert start >= 0, output[-3000:]
    return json.JSONDecoder().raw_decode(output[start:])[0]


def _manifests(run_uri: str) -> dict[str, dict | None]:
    return {name: storage.read_manifest(storage.join(run_uri, "stages", name)) for name in STAGES}


def _eval_manifests(run_uri: str) -> dict[str, dict | None]:
    return {name: storage.read_manifest(storage.join(run_uri, "eval", name)) for name in (*STAGES[1:],)}


@dataclass(frozen=True)
class FirstRun:
    config: Path
    run_uri: str
    bucket: str
    prefix: str
    output: str
    manifests: dict
    mlflow_uri: str


@pytest.fixture(scope="module")
def first_run(cluster, s3_endpoint, tmp_path_factory) -> FirstRun:
    """The reduced quickstart, submitted as a Ray job that stores on S3."""
    import boto3

    bucket = f"alloylm-pipeline-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    root = tmp_path_factory.mktemp("pipeline")
    config = root / "quickstart-small.yaml"
    raw = reduced_quickstart(f"s3://{bucket}/runs")
    raw["tracking"] = {"mlflow": {"tracking_uri": str(root / "mlruns")}}
    config.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    submission = f"alloylm-pipeline-{uuid.uuid4().hex[:8]}"
    done = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", cluster.dashboard, "--submission-id", submission,
         "--working-dir", ".", "--", "python", "jobs/pipeline.py", str(config)],
        cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=3600,
    )
    output = done.stdout + done.stderr
    # `ray job submit` exits 1 for a FAILED job and logs "succeeded" only for SUCCEEDED.
    assert done.returncode == 0 and f"Job '{submission}' succeeded" in output, output[-5000:]
    run_uri = f"s3://{bucket}/runs/qs"
    return FirstRun(config, run_uri, bucket, "runs/qs", output, _manifests(run_uri), (root / "mlruns").as_uri())


def test_quickstart_dag_as_a_ray_job_on_s3(first_run):
    run = first_run.run_uri
    assert all(first_run.manifests.values()), {n: m is not None for n, m in first_run.manifests.items()}
    assert first_run.manifests["cpt"]["workers"] == 2 and first_run.manifests["cpt"]["metrics"]["world_size"] == 2
    for name in ("base", "instruct", "cpt", "sft", "dpo", "orpo", "sft-direct"):
        assert first_run.manifests[name]["metrics"]["global_step"] == 3, name
    assert first_run.manifests["merged"]["parents"] == [storage.join(run, "stages", "dpo"), storage.join(run, "stages", "instruct")]
    # The merge search: its mergekit YAML, its trials (3, the paper's point among them), a model.
    merged = storage.join(run, "stages", "merged")
    assert yaml.safe_load(storage.read_text(storage.join(merged, "best_merge.yaml")))["merge_method"] == "slerp"
    trials = [json.loads(line) for line in storage.read_text(storage.join(merged, "search", "trials.jsonl")).splitlines()]
    assert len(trials) == 3 and any(t["score"] is not None for t in trials)
    assert any(f.endswith(".safetensors") for f in storage.list_files(merged))
    # Every variant evaluated; the report compares them.
    summary = _summary(first_run.output)
    assert sorted(summary["evaluation"]["scores"]) == sorted(["instruct", "cpt", "sft", "dpo", "orpo", "merged-paper", "merged-head", "merged", "sft-direct"])
    assert not summary["evaluation"]["failed"]
    report = storage.read_text(storage.join(run, "report", "report.md"))
    assert "AlloyLM: qs" in report and all(v in report for v in ("instruct", "merged", "orpo"))
    # Each merge placed between its parents (read from its manifest): instruct is 0, dpo 1.
    merges = json.loads(storage.read_text(storage.join(run, "eval", "comparison.json")))["merges"]
    assert {name: (m["start"], m["end"]) for name, m in merges.items()} == {n: ("instruct", "dpo") for n in ("merged-paper", "merged-head", "merged")}
    assert storage.exists(storage.join(run, "report", "report.html"))
    # "Best" is chosen on validation (every variant scored there too), never on the test split.
    best = summary["best"]
    assert best["split"] == "validation" and set(best["scores"]) == set(summary["evaluation"]["scores"])
    assert best["score"] == max(s for s in best["scores"].values() if s is not None)
    assert best["model"] == storage.join(run, "stages", best["variant"])
    assert json.loads(storage.read_text(storage.join(run, "eval", "best.json")))["variant"] == best["variant"]


def test_the_run_is_tracked_in_mlflow(first_run, monkeypatch):
    """One MLflow run per trained stage (rank 0's loss per step), per search trial and for the evaluation."""
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=first_run.mlflow_uri)
    experiment = client.get_experiment_by_name("qs")  # tracking.mlflow.experiment defaults to the run's name
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    by_step: dict[str, list] = {}
    for run in runs:
        by_step.setdefault(run.data.tags.get("alloylm.step"), []).append(run)
    for name in TRAINED:
        [run] = by_step[f"stage:{name}"]  # cpt's second worker logs nothing
        assert run.info.run_name == f"qs/{name}" and run.info.status == "FINISHED", name
        # transformers' MLflowCallback logs with `synchronous=False` (MLflow's async queue), so the
        # store holds the steps in the order the queue flushed them, not always the steps' order.
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == [1, 2, 3], name
        assert run.data.params["max_steps"] == "3", name
    trials = by_step["stage:merged"]
    assert len(trials) == 3 and all(t.data.tags["trial_name"].startswith("run_trial_") for t in trials)
    assert all("score" in t.data.metrics and t.info.status == "FINISHED" for t in trials)
    assert "stage:merged-paper" not in by_step and "stage:merged-head" not in by_step  # a fixed merge trains and tries nothing
    [evaluation] = by_step["comparison"]
    assert evaluation.info.run_name == "qs/evaluation"
    scores = _summary(first_run.output)["evaluation"]["scores"]
    metrics = evaluation.data.metrics
    # `<variant>/score` only: `<merge>/position/score` ends the same way, and MLflow's file store
    # lists metrics in the file system's order, so a merge's position could stand for its score.
    logged = {key.split("/")[0]: value for key, value in metrics.items() if key.count("/") == 1 and key.endswith("/score")}
    assert logged == pytest.approx({variant: score for variant, score in scores.items() if score is not None})
    assert {key.split("/")[0] for key in metrics if "/position/" in key} == {"merged-paper", "merged-head", "merged"}
    assert sorted(a.path for a in client.list_artifacts(evaluation.info.run_id)) == ["comparison.json", "comparison.md"]


def _registered_checkpoints(s3, bucket: str, prefix: str) -> int:
    """Checkpoints Ray Train has registered (its manager snapshot) for any dpo-<fingerprint> run."""
    count = 0
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/checkpoints/dpo-")
    for page in pages:
        for item in page.get("Contents", []):
            if item["Key"].endswith("checkpoint_manager_snapshot.json"):
                try:
                    body = s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
                    count = max(count, len(json.loads(body).get("checkpoint_results", [])))
                except (ValueError, s3.exceptions.NoSuchKey):
                    pass  # being replaced
    return count


def test_changed_stage_reruns_with_its_descendants_and_a_cut_run_resumes(first_run, cluster, s3_endpoint, tmp_path):
    import boto3
    import psutil

    before = first_run.manifests
    evaluated_before = _eval_manifests(first_run.run_uri)
    command = [sys.executable, "-m", "alloylm.cli", "run", str(first_run.config), *DPO_CHANGE]
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    # Run 2: killed (driver and all) once dpo, the changed stage, has a checkpoint Ray Train registered.
    with open(tmp_path / "cut.log", "w") as log:
        cut = subprocess.Popen(command, cwd=REPO, env=cluster.driver_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while cut.poll() is None and not _registered_checkpoints(s3, first_run.bucket, first_run.prefix):
                time.sleep(0.5)
            ended = cut.poll()
        finally:
            if cut.poll() is None:
                for proc in [psutil.Process(cut.pid), *psutil.Process(cut.pid).children(recursive=True)]:
                    try:
                        proc.kill()
                    except psutil.NoSuchProcess:
                        pass
            cut.wait()
    assert ended is None, "run 2 ended before dpo could be cut:\n" + (tmp_path / "cut.log").read_text()[-4000:]
    at_cut = _manifests(first_run.run_uri)
    assert at_cut == before  # nothing upstream was redone, and the cut dpo left no finished artifact

    # Run 3: the same command again, to the end. The killed run 2 still holds the lease: run 3
    # waits (--wait) until its heartbeat is older than the TTL, then takes it over.
    done = subprocess.run([*command, "--wait"], cwd=REPO, env=cluster.driver_env(), capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    assert "took over from a holder that stopped renewing it" in done.stderr, done.stderr[-3000:]
    after = _manifests(first_run.run_uri)
    for name in NOT_AFTER_DPO:
        assert after[name] == before[name], name  # same fingerprint and created_at: skipped
    for name in ("dpo", "merged-paper", "merged-head", "merged"):
        assert after[name]["fingerprint"] != before[name]["fingerprint"], name
        assert after[name]["created_at"] != before[name]["created_at"], name
    metrics = after["dpo"]["metrics"]
    assert metrics["global_step"] == 24
    assert metrics["resumed_from_step"] is not None and metrics["resumed_from_step"] >= 2  # resumed, not restarted
    assert "beta: 0.2" in storage.read_text(storage.join(first_run.run_uri, "stages", "dpo", "resolved_config.yaml"))
    summary = _summary(done.stdout)
    assert set(summary["stages"]) == set(STAGES) and not summary["evaluation"]["failed"]
    assert summary["best"]["variant"] in summary["evaluation"]["scores"]
    # The retrained variants were evaluated again; the others' results were reused, not recomputed.
    evaluated_after = _eval_manifests(first_run.run_uri)
    for name in ("dpo", "merged-paper", "merged-head", "merged"):
        assert evaluated_after[name]["fingerprint"] != evaluated_before[name]["fingerprint"], name
        assert evaluated_after[name]["created_at"] != evaluated_before[name]["created_at"], name
    for name in ("instruct", "cpt", "sft", "orpo", "sft-direct"):
        assert evaluated_after[name] == evaluated_before[name], name


# ---------------------------------------------------------------------------------------------
# Bad input: each fails before any work, naming the cause
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "cause"),
    [
        ("stages.base.from=dpo", "stages form a cycle"),
        ("stages.sft.from=ghost", "'ghost' is neither a stage of this run"),
        ("stages.orpo.kind=kto", "stages.orpo"),
    ],
    ids=["cycle", "missing-parent", "unknown-kind"],
)
def test_bad_config_exits_2_naming_the_cause(tmp_path, capsys, override, cause):
    from alloylm.cli import EXIT_USAGE, main

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(reduced_quickstart(str(tmp_path / "runs"))), encoding="utf-8")
    assert main(["run", str(config), override]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert cause in err, err
    if override.endswith("kto"):
        assert "'kto'" in err and "'cpt'" in err, err  # names the bad kind and the known ones
    assert not (tmp_path / "runs").exists()


def test_stage_larger_than_the_cluster_fails_before_data_preparation(cluster, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(reduced_quickstart(str(tmp_path / "runs"))), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "alloylm.cli", "run", str(config), "stages.cpt.resources.workers=8"],
        cwd=REPO, env=cluster.driver_env(), capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 1, done.stderr[-3000:]
    assert "stage 'cpt': resources: 8 workers x 1 CPUs = 8 CPUs, but the Ray cluster has 2" in done.stderr, done.stderr[-3000:]
    assert not (tmp_path / "runs").exists()  # no tokenizer, no data set: nothing was prepared
