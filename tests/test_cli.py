"""`alloylm` exit codes: 0 done, 1 the work failed, 2 the config or the command line is wrong.

The same mistake gets the same code and the same kind of message, whichever command makes it;
none of these needs a Ray cluster (usage errors are found before one is joined).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from alloylm.cli import main
from alloylm.errors import EXIT_FAILED, EXIT_USAGE, ConfigError, InputError, RunError, StageError, UsageError
from alloylm.evaluate.prepared import EvaluationInputError
from alloylm.storage import StorageError

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")


@pytest.mark.parametrize(
    ("command", "stage", "says"),
    [
        ("train", "merged", "stage 'merged' is a merge_search stage, which `alloylm train` does not run; run it with `alloylm search"),
        ("merge", "base", "stage 'base' is a cpt stage, which `alloylm merge` does not run; run it with `alloylm train"),
        ("search", "dpo", "stage 'dpo' is a dpo stage, which `alloylm search` does not run; run it with `alloylm train"),
        ("merge", "merged", "stage 'merged' is a merge_search stage, which `alloylm merge` does not run; run it with `alloylm search"),
        ("train", "ghost", "no stage 'ghost'; stages: base, instruct"),
    ],
)
def test_a_stage_the_command_does_not_run_is_a_usage_error(capsys, command, stage, says):
    assert main([command, QUICKSTART, stage]) == EXIT_USAGE
    assert says in capsys.readouterr().err


def test_eval_without_an_evaluate_section_is_a_usage_error(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("experiment: x\ntokenizer: {from: some/model}\n", encoding="utf-8")
    assert main(["eval", str(config)]) == EXIT_USAGE
    assert "no `evaluate:` section" in capsys.readouterr().err


def test_bad_config_and_bad_override_exit_2(tmp_path, capsys):
    assert main(["validate", QUICKSTART, "stages.sft.kind=kto"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "override 'stages.sft.kind=kto'" in err and "unknown stage kind 'kto'" in err and "merge_search" in err
    assert main(["validate", str(tmp_path / "missing.yaml")]) == EXIT_USAGE
    assert main(["validate", QUICKSTART]) == 0


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["stages.merged-head.method=frobnicate"], "stages.merged-head: unknown merge method 'frobnicate'; mergekit knows:"),
        (["stages.merged-head.parameters={tt: 0.5}"], "stages.merged-head: parameters: merge method 'slerp' has no parameter 'tt'"),
        (["stages.merged-head.parents=[dpo, instruct, sft]"], "Merge method requires exactly 2 inputs; got 3"),
        (["stages.merged-paper.method=linear", "stages.merged-paper.parameters={}"], "merge method 'linear' needs parameter 'weight'"),
        (["stages.merged.method=linear"], "stages.merged: parameters: merge method 'linear' has no parameter 't'"),
        (["stages.merged-head.parameters={}", "stages.merged-head.mergekit_config=/nonexistent/merge.yml"], "stages.merged-head.mergekit_config: no file at /nonexistent/merge.yml"),
    ],
)
def test_merge_settings_mergekit_would_refuse_fail_before_any_training(tmp_path, capsys, overrides, says):
    # Otherwise they fail only when the merge runs, after every parent has trained.
    storage = f"storage={tmp_path}"
    assert main(["validate", QUICKSTART, *overrides]) == EXIT_USAGE
    assert says in capsys.readouterr().err
    assert main(["run", QUICKSTART, storage, *overrides]) == EXIT_USAGE  # before the cluster and the lease
    assert says in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_unknown_names_and_missing_runs_are_usage_errors_that_write_nothing(tmp_path, capsys):
    storage = f"storage={tmp_path}"
    assert main(["run", QUICKSTART, storage, "--only", "ghost"]) == EXIT_USAGE
    assert "--only: no stage 'ghost'" in capsys.readouterr().err
    assert main(["data", QUICKSTART, storage, "--only", "ghost"]) == EXIT_USAGE
    assert "--only: no data set 'ghost'; data sets: domain-benchmark" in capsys.readouterr().err
    # A report of a run that is not there (a typo of `experiment`): no report of nothing, no folder.
    assert main(["report", QUICKSTART, storage, "experiment=typo"]) == EXIT_USAGE
    assert f"no run at {tmp_path}/typo: nothing to report" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_error_classes_map_to_their_exit_codes():
    # The CLI catches the two branches, not a list of classes: each error is on one of them.
    for error in (ConfigError, UsageError):
        assert issubclass(error, InputError) and error.exit_code == EXIT_USAGE
    for error in (StageError, StorageError, EvaluationInputError):
        assert issubclass(error, RunError) and error.exit_code == EXIT_FAILED
    from alloylm.data.prepare import DataPreparationError
    from alloylm.data.sources import SourceError
    from alloylm.generate.run import TeacherGenerationError
    from alloylm.merge import stage as merge_stage
    from alloylm.serve.engine import EngineStoppedError
    from alloylm.train import launcher

    assert issubclass(SourceError, RunError) and issubclass(TeacherGenerationError, DataPreparationError)
    assert launcher.StageError is merge_stage.StageError is StageError  # one stage error for every kind
    assert not hasattr(merge_stage, "MergeStageError")
    assert EngineStoppedError.__name__ != TeacherGenerationError.__name__


def test_job_entry_point_under_the_wrong_python_says_what_to_do():
    # `python -S` has no site-packages: what a Ray node's system Python without the venv looks like.
    result = subprocess.run(
        [sys.executable, "-S", str(REPO / "jobs" / "pipeline.py"), QUICKSTART], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == EXIT_USAGE, result.stderr
    assert "lacks pydantic" in result.stderr and "source .venv/bin/activate" in result.stderr


def test_cli_exit_code_2_on_bad_config(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "alloylm.cli", "validate", QUICKSTART, "data.nope=1"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "data.nope" in result.stderr and "unknown key" in result.stderr


def test_cli_serve_refuses_unfinished_stages_and_unschedulable_deployments(ray_cluster, tmp_path):
    quickstart = QUICKSTART
    # The CLI joins the session's cluster (2 CPUs) rather than starting a Ray of its own.
    env = {**__import__("os").environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    run = [sys.executable, "-m", "alloylm.cli", "serve", quickstart, f"storage={tmp_path}", "serve.model=merged", "serve.variants=[merged, dpo, instruct]"]
    unfinished = subprocess.run(run, capture_output=True, text=True, env=env)
    assert unfinished.returncode == 1
    assert "no manifest.json" in unfinished.stderr
    for stage in ("merged", "dpo", "instruct"):  # finished (manifest present) as far as serving can tell
        folder = tmp_path / "quickstart" / "stages" / stage
        folder.mkdir(parents=True)
        (folder / "manifest.json").write_text("{}")
    too_big = subprocess.run([*run, "serve.deployment.num_cpus=4"], capture_output=True, text=True, env=env)
    assert too_big.returncode == 1
    assert "need 12.25 CPUs, but the Ray cluster has" in too_big.stderr


def test_inside_a_ray_job_the_driver_forwards_only_variables_the_job_does_not_set(monkeypatch):
    """A RayJob's runtimeEnvYAML (or `ray job submit --runtime-env-json`) setting TOKENIZERS_PARALLELISM,
    which the image also sets: `ray.init` refused the driver's runtime env naming it again, so the
    shipped RayJob failed before any work. The job's value stands; the rest is forwarded."""
    import json

    from ray.runtime_env.runtime_env import _merge_runtime_env

    from alloylm.cluster import forwarded_environment

    job_env = {"working_dir": "gcs://_ray_pkg_x.zip", "env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert forwarded_environment()["TOKENIZERS_PARALLELISM"] == "false"  # outside a job: forwarded
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": job_env, "metadata": {}}))
    forwarded = forwarded_environment()
    assert forwarded["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000" and "TOKENIZERS_PARALLELISM" not in forwarded
    # what ray.init does with the two (None: the conflict it raises on)
    assert _merge_runtime_env(job_env, {"env_vars": forwarded}) is not None
    assert _merge_runtime_env(job_env, {"env_vars": {**forwarded, "TOKENIZERS_PARALLELISM": "false"}}) is None


def test_a_job_that_ships_the_checkout_ships_the_library_to_its_workers(monkeypatch, tmp_path):
    """`ray job submit --working-dir .`: the driver imported platform/alloylm from the working dir,
    but Ray's workers imported the copy installed in the image, so code edits reached the driver alone."""
    import json
    import os

    import alloylm
    from alloylm.cluster import shipped_library

    package = os.path.dirname(os.path.abspath(alloylm.__file__))
    working_dir = os.path.dirname(os.path.dirname(package))  # the checkout: platform/alloylm below it
    job = {"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip"}, "metadata": {}}
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.chdir(working_dir)
    assert shipped_library() == []  # not a Ray job: nothing to ship
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    assert shipped_library() == [package]
    monkeypatch.chdir(tmp_path)
    assert shipped_library() == []  # the library is not the job's working dir's (an installed one)
    monkeypatch.chdir(working_dir)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {**job["runtime_env"], "py_modules": ["s3://b/m.zip"]}}))
    assert shipped_library() == []  # the job's own py_modules stand
