"""Optional MLflow tracking (`tracking.mlflow`): the config section, the training payload and the evaluation run.

The runs of training stages and merge-search trials of a whole pipeline are checked on the
quickstart DAG in tests/jobs/test_pipeline.py, which tracks to a local file store.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from alloylm.config import ConfigError, load_config, validate_config

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"

CONFIG = """\
experiment: tracked
tokenizer:
  train: {vocab_size: 400}
tracking:
  mlflow:
    tracking_uri: %s
"""


def _load(tmp_path: Path, uri: str):
    path = tmp_path / "run.yaml"
    path.write_text(CONFIG % json.dumps(uri))
    return load_config(path)


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_without_a_tracking_section_nothing_imports_mlflow():
    done = _python(
        "import sys\n"
        "from alloylm.config import load_config\n"
        "import alloylm.pipeline, alloylm.train.worker, alloylm.train.launcher, alloylm.tracking\n"
        f"config = load_config({str(QUICKSTART)!r})\n"
        "assert config.tracking is None\n"
        "assert alloylm.tracking.mlflow_target(config, step='stage:sft') is None\n"
        "print('mlflow' in sys.modules, 'mlflow' in sys.modules or any(m.startswith('mlflow.') for m in sys.modules))\n"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["False", "False"], done.stdout


@pytest.mark.parametrize("uri", ["s3://bucket/mlruns", "", "http://", "databricks://profile", "ftp://host/x", "sqlite://"])
def test_a_tracking_uri_mlflow_cannot_use_is_a_config_error_at_its_line(tmp_path, uri):
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, uri)
    message = str(info.value)
    assert "run.yaml:6: tracking.mlflow.tracking_uri: must be a local path, a file: URI" in message, message
    assert repr(uri) in message, message


@pytest.mark.parametrize(
    ("uri", "resolved"),
    [
        ("mlruns", "file://{cwd}/mlruns"),
        ("/srv/mlruns", "file:///srv/mlruns"),
        ("file:///srv/mlruns", "file:///srv/mlruns"),
        ("sqlite:///mlflow.db", "sqlite:///{cwd}/mlflow.db"),
        ("http://mlflow.internal:5000", "http://mlflow.internal:5000"),
        ("https://mlflow.example.com/", "https://mlflow.example.com/"),
    ],
)
def test_local_stores_resolve_to_absolute_uris_every_worker_can_use(tmp_path, monkeypatch, uri, resolved):
    monkeypatch.chdir(tmp_path)
    config = _load(tmp_path, uri)
    assert config.tracking.mlflow.tracking_uri == uri  # the config keeps what was written
    assert config.tracking.mlflow.resolved_uri() == resolved.format(cwd=tmp_path.resolve())


def test_without_mlflow_installed_the_section_says_what_to_install(tmp_path):
    (tmp_path / "run.yaml").write_text(CONFIG % "mlruns")
    done = _python(
        "import sys\n"
        "sys.modules['mlflow'] = None  # as if it were not installed\n"
        "from alloylm.config import load_config, ConfigError\n"
        "try:\n"
        f"    load_config({str(tmp_path / 'run.yaml')!r})\n"
        "except ConfigError as exc:\n"
        "    print(exc)\n"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "run.yaml:5: tracking.mlflow: MLflow tracking needs the mlflow package" in done.stdout, done.stdout
    assert "pip install 'alloylm[mlflow]'" in done.stdout, done.stdout


def test_a_tracked_stage_tells_its_workers_where_to_log(tmp_path):
    from alloylm.config import CptStageConfig
    from alloylm.tracking import mlflow_target
    from alloylm.train.worker import StageJob, common_arguments

    config = _load(tmp_path, str(tmp_path / "mlruns"))
    target = mlflow_target(config, step="stage:cpt")
    job = StageJob(
        stage_name="cpt", stage={"kind": "cpt", "from": {"init": "pico-llama"}, "data": "text"}, seed=0,
        trust_remote_code=False, tokenizer_uri="t", data_uri="d", parent_kind="preset", parent="pico-llama",
        output_uri="o", data_rows=8, mlflow=target,
    )
    # The payload travels to the Ray Train workers as a plain dict.
    again = StageJob.model_validate(job.model_dump())
    assert again.mlflow == target
    env = again.mlflow.environment()
    assert env["MLFLOW_TRACKING_URI"] == (tmp_path / "mlruns").resolve().as_uri()
    assert env["MLFLOW_EXPERIMENT_NAME"] == "tracked"
    assert json.loads(env["MLFLOW_TAGS"]) == {"alloylm.experiment": "tracked", "alloylm.step": "stage:cpt"}
    stage = CptStageConfig.model_validate(job.stage)
    arguments = common_arguments(again, stage, str(tmp_path), max_steps=2)
    assert arguments["report_to"] == ["tensorboard", "mlflow"] and arguments["run_name"] == "tracked/cpt"
    untracked = common_arguments(job.model_copy(update={"mlflow": None}), stage, str(tmp_path), max_steps=2)
    assert untracked["report_to"] == ["tensorboard"] and "run_name" not in untracked


def _comparison_result(out: Path) -> dict:
    comparison = {
        "split": "test",
        "rows": [
            {"variant": "sft", "values": {"multiple_choice.accuracy": 0.5, "score": 0.4}},
            {"variant": "merged", "values": {"multiple_choice.accuracy": 0.75, "score": None}},
        ],
        "merges": {
            "merged": {
                "start": "instruct",
                "end": "dpo",
                "positions": {
                    "multiple_choice.accuracy": {"position": 0.73, "low": 0.57, "high": 0.86},
                    "general_perplexity.bits_per_byte": {"position": None, "parents_within_noise": True},
                },
            }
        },
    }
    out.mkdir(parents=True)
    (out / "comparison.json").write_text(json.dumps(comparison))
    (out / "comparison.md").write_text("| variant | score |\n")
    return {"split": "test", "out": str(out), "variants": {}, "comparison": comparison, "failed": {}}


@pytest.mark.parametrize("store", ["mlruns", "sqlite:///{tmp}/mlflow.db"])
def test_the_comparison_is_one_mlflow_run_with_each_variants_metrics_and_the_files(tmp_path, monkeypatch, store):
    from mlflow import MlflowClient

    from alloylm.tracking import log_comparison

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    uri = store.format(tmp=tmp_path) if "{tmp}" in store else str(tmp_path / store)
    config = validate_config(
        {"experiment": "tracked", "tokenizer": {"train": {"vocab_size": 400}}, "tracking": {"mlflow": {"tracking_uri": uri, "experiment": "shared"}}}
    )
    run_id = log_comparison(config, _comparison_result(tmp_path / "eval"))

    client = MlflowClient(tracking_uri=config.tracking.mlflow.resolved_uri())
    run = client.get_run(run_id)
    assert run.info.run_name == "tracked/evaluation" and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "shared"
    assert run.data.metrics == {
        "sft/multiple_choice.accuracy": 0.5, "sft/score": 0.4, "merged/multiple_choice.accuracy": 0.75,
        "merged/position/multiple_choice.accuracy": 0.73,  # where the merge sits between its parents; none without a position
    }
    assert run.data.params == {"split": "test", "variants": "sft,merged"}
    assert run.data.tags["alloylm.experiment"] == "tracked" and run.data.tags["alloylm.step"] == "comparison"
    assert sorted(a.path for a in client.list_artifacts(run_id)) == ["comparison.json", "comparison.md"]
    # The files stay in the store's folder, not in the working directory (MLflow's ./mlruns for sqlite).
    assert (tmp_path / ("mlartifacts" if uri.startswith("sqlite") else "mlruns")).is_dir()
    assert not (tmp_path / "cwd" / "mlruns").exists()



def test_a_checkpoints_mlflow_run_is_continued_only_where_it_is(tmp_path, monkeypatch):
    """A resume sets MLFLOW_RUN_ID to the run its checkpoint recorded; a run that is not in the
    configured store and experiment, or was deleted, made every resume from that checkpoint fail."""
    from mlflow import MlflowClient

    from alloylm.tracking import MlflowTarget, ensure_experiment, resumable_run

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    store = (tmp_path / "mlruns").as_uri()
    here = MlflowTarget(tracking_uri=store, experiment="qs", run_name="qs/cpt")
    client = MlflowClient(tracking_uri=store)
    run = client.create_run(ensure_experiment(here)).info.run_id
    assert resumable_run(here, run)
    other = MlflowTarget(tracking_uri=store, experiment="renamed", run_name="qs/cpt")
    ensure_experiment(other)
    assert not resumable_run(other, run)  # tracking.mlflow.experiment changed
    assert not resumable_run(MlflowTarget(tracking_uri=(tmp_path / "elsewhere").as_uri(), experiment="qs", run_name="qs/cpt"), run)
    assert not resumable_run(here, "0" * 32)
    client.delete_run(run)
    assert not resumable_run(here, run)
