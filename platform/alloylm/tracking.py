"""Optional MLflow tracking of a run: the `tracking:` schema and what each part logs.

Training stages log through transformers' own MLflow callback (rank 0 only), the merge search
logs every trial through Ray Tune's `MLflowLoggerCallback`, and the evaluation logs one run with
every variant's headline metrics and the comparison files. Without a `tracking.mlflow` section
nothing here imports mlflow (it is the optional extra `alloylm[mlflow]`).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from alloylm.errors import RunError
from alloylm.schema import Frozen

if TYPE_CHECKING:
    from alloylm.config import RunConfig

INSTALL_HINT = "pip install 'alloylm[mlflow]'"
# MLflow 3 refuses its file store (in maintenance mode) unless this is set; a config that names a
# file store has chosen it.
_ALLOW_FILE_STORE = "MLFLOW_ALLOW_FILE_STORE"


class TrackingError(RunError):
    """MLflow was asked for and could not be used (not installed, or the tracking server failed)."""


# ------------------------------------------------------------------------------ the schema


class MlflowConfig(Frozen):
    """Where MLflow runs go."""

    tracking_uri: str = Field(
        description=(
            "MLflow tracking store: a local folder or file: URI (a file store; on a multi-node cluster "
            "every node must see it), a sqlite:/// database, or an http(s):// tracking server."
        )
    )
    experiment: str | None = Field(
        None, min_length=1, description="MLflow experiment the runs go to; null: the run's `experiment` name."
    )

    @field_validator("tracking_uri")
    @classmethod
    def _tracking_uri(cls, value: str) -> str:
        if not _valid_tracking_uri(value):
            raise ValueError(
                f"must be a local path, a file: URI, a sqlite:/// URI or an http(s):// URL (got {value!r})"
            )
        return value

    @model_validator(mode="after")
    def _installed(self) -> MlflowConfig:
        if not mlflow_installed():
            raise ValueError(f"MLflow tracking needs the mlflow package, which is not installed: {INSTALL_HINT}")
        return self

    def resolved_uri(self) -> str:
        """The tracking URI every process can use: local paths become absolute file: URIs."""
        return _resolve_uri(self.tracking_uri)


class TrackingConfig(Frozen):
    """Experiment tracking of the run (optional)."""

    mlflow: MlflowConfig | None = Field(
        None,
        description="Log training metrics, merge-search trials and the evaluation comparison to MLflow.",
    )


def _valid_tracking_uri(value: str) -> bool:
    if not value.strip():
        return False
    parsed = urlparse(value)
    if parsed.scheme in ("http", "https"):
        return bool(parsed.netloc)
    if parsed.scheme == "file":
        return bool(parsed.path)
    if parsed.scheme == "sqlite":
        return value.startswith("sqlite:///") and len(value) > len("sqlite:///")
    # No scheme: a path. (A one-letter scheme is a Windows drive.)
    return parsed.scheme == "" or len(parsed.scheme) == 1


def _resolve_uri(value: str) -> str:
    """Like the run's `storage`, a relative path is relative to the driver's working directory."""
    parsed = urlparse(value)
    if parsed.scheme in ("http", "https"):
        return value
    if parsed.scheme == "sqlite":
        return "sqlite:///" + str(Path(os.path.expanduser(value.removeprefix("sqlite:///"))).resolve())
    path = parsed.path if parsed.scheme == "file" else value
    return Path(os.path.expanduser(path)).resolve().as_uri()


def mlflow_installed() -> bool:
    """Whether mlflow can be imported (without importing it)."""
    try:
        return importlib.util.find_spec("mlflow") is not None
    except (ImportError, ValueError):
        return False


def require_mlflow() -> None:
    if not mlflow_installed():
        raise TrackingError(f"MLflow tracking is configured but mlflow is not installed here: {INSTALL_HINT}")


# ------------------------------------------------------------------------------ one process's target


class MlflowTarget(BaseModel):
    """What one process needs to log one MLflow run: the resolved store, experiment, run name, tags."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tracking_uri: str
    experiment: str
    run_name: str
    tags: dict[str, str] = Field(default_factory=dict)

    @property
    def file_store(self) -> bool:
        return self.tracking_uri.startswith("file:")

    def environment(self) -> dict[str, str]:
        """The variables transformers' MLflowCallback reads (the run name is TrainingArguments.run_name)."""
        env = {
            "MLFLOW_TRACKING_URI": self.tracking_uri,
            "MLFLOW_EXPERIMENT_NAME": self.experiment,
            "MLFLOW_TAGS": json.dumps(self.tags),
        }
        if self.file_store:
            env[_ALLOW_FILE_STORE] = os.environ.get(_ALLOW_FILE_STORE, "true")
        return env


def mlflow_target(config: RunConfig, *, step: str, run_name: str | None = None) -> MlflowTarget | None:
    """The MLflow target of one step of the run (`stage:sft`, `comparison`), or None without tracking."""
    settings = config.tracking.mlflow if config.tracking is not None else None
    if settings is None:
        return None
    return MlflowTarget(
        tracking_uri=settings.resolved_uri(),
        experiment=settings.experiment or config.experiment,
        run_name=run_name or f"{config.experiment}/{step.partition(':')[2] or step}",
        tags={"alloylm.experiment": config.experiment, "alloylm.step": step},
    )


_experiment_lock = threading.Lock()


def resumable_run(target: MlflowTarget, run_id: str) -> bool:
    """Whether the MLflow run `run_id` (recorded in a checkpoint) can be continued at `target`: it is
    in the target's store and experiment, and not deleted. A checkpoint outlives a changed
    `tracking.mlflow` (another store or experiment, the run deleted in the UI), and continuing a run
    that is not there fails every attempt to resume from it."""
    if target.file_store:
        os.environ.setdefault(_ALLOW_FILE_STORE, "true")
    from mlflow import MlflowClient

    try:
        client = MlflowClient(tracking_uri=target.tracking_uri)
        run = client.get_run(run_id)
        experiment = client.get_experiment_by_name(target.experiment)
    except Exception:  # mlflow raises its own and its stores' errors; any of them: not resumable
        return False
    return experiment is not None and run.info.experiment_id == experiment.experiment_id and run.info.lifecycle_stage == "active"


def ensure_experiment(target: MlflowTarget) -> str:
    """Create the target's experiment once, on the driver, before workers or trials log to it.

    Two stages started at once would otherwise both create it and one would fail.
    """
    require_mlflow()
    if target.file_store:
        os.environ.setdefault(_ALLOW_FILE_STORE, "true")
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    with _experiment_lock:
        try:
            client = MlflowClient(tracking_uri=target.tracking_uri)
            found = client.get_experiment_by_name(target.experiment)
            if found is not None:
                return found.experiment_id
            try:
                return client.create_experiment(target.experiment, artifact_location=_artifact_location(target.tracking_uri))
            except MlflowException:  # created by another process since
                found = client.get_experiment_by_name(target.experiment)
                if found is None:
                    raise
                return found.experiment_id
        except MlflowException as exc:
            raise TrackingError(f"MLflow at {target.tracking_uri}: cannot open experiment {target.experiment!r}: {exc}") from None


def _artifact_location(tracking_uri: str) -> str | None:
    """Beside a sqlite database (MLflow's default is ./mlruns of whichever process creates it); else MLflow's choice."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return (Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()


# ------------------------------------------------------------------------------ the parts


def search_callbacks(target: MlflowTarget | None) -> list:
    """Ray Tune callbacks that log every trial of a merge search as an MLflow run (none without tracking)."""
    if target is None:
        return []
    ensure_experiment(target)
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    return [MLflowLoggerCallback(tracking_uri=target.tracking_uri, experiment_name=target.experiment, tags=dict(target.tags))]


def _metric_key(text: str) -> str:
    return re.sub(r"[^0-9A-Za-z_\-. :/]", "_", text)


def comparison_metrics(comparison: dict) -> dict[str, float]:
    """`<variant>/<column>` -> value for every scored cell of the comparison table, and
    `<merge>/position/<column>` for each merge's position between its parents (`merges`)."""
    metrics = {}
    for row in comparison.get("rows") or []:
        for key, value in (row.get("values") or {}).items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                metrics[_metric_key(f"{row['variant']}/{key}")] = float(value)
    for merge, entry in (comparison.get("merges") or {}).items():
        for key, position in (entry.get("positions") or {}).items():
            value = position.get("position")
            if isinstance(value, (int, float)) and math.isfinite(value):
                metrics[_metric_key(f"{merge}/position/{key}")] = float(value)
    return metrics


def log_comparison(config: RunConfig, result: dict[str, Any]) -> str | None:
    """Log the committed comparison (`evaluate_variants`' result) as one MLflow run; returns its id.

    The run holds every variant's headline metrics and `comparison.md` / `comparison.json` as
    artifacts. Nothing happens without `tracking.mlflow` or without a comparison.
    """
    comparison = result.get("comparison")
    target = mlflow_target(config, step="comparison", run_name=f"{config.experiment}/evaluation")
    if target is None or not comparison:
        return None
    from alloylm import storage

    experiment_id = ensure_experiment(target)
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=target.tracking_uri)
    run_id = None
    try:
        run = client.create_run(experiment_id, run_name=target.run_name, tags=target.tags)
        run_id = run.info.run_id
        now = run.info.start_time
        metrics = [Metric(key, value, now, 0) for key, value in sorted(comparison_metrics(comparison).items())]
        rows = comparison.get("rows") or []
        params = [Param("split", str(comparison.get("split"))), Param("variants", ",".join(r["variant"] for r in rows))]
        client.log_batch(run_id, metrics=metrics, params=params)
        for name in ("comparison.md", "comparison.json"):
            uri = storage.join(result["out"], name)
            if storage.exists(uri):
                client.log_text(run_id, storage.read_text(uri), name)
        client.set_terminated(run_id, "FINISHED")
    except (MlflowException, OSError) as exc:
        if run_id is not None:
            try:
                client.set_terminated(run_id, "FAILED")
            except (MlflowException, OSError):
                pass
        raise TrackingError(f"MLflow at {target.tracking_uri}: cannot log the evaluation: {exc}") from None
    return run_id
