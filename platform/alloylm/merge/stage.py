"""Merge stages of a run: `merge` (fixed parameters or a mergekit YAML) and `merge_search` (Ray Tune).

`merge_stage(config, name)` resolves the parents (stages of the run must be finished; models may
be local, s3:// or Hugging Face ids), refuses incompatible parents before any work, skips a stage
whose fingerprint is unchanged, and writes `<run>/stages/<name>/` atomically (manifest last):

- the merged model in Hugging Face format with the tokenizer, chat template and EOS of
  `tokenizer_from` (default: the first parent), materialised by mergekit's `run_merge` from
- `best_merge.yaml` (or `merge.yaml` for a fixed merge): the mergekit config `mergekit-yaml`
  reproduces the model from;
- for a search, `search/`: `trials.jsonl` and `trials.csv` (every trial, its parameters and
  score), `score_per_trial.png` and `score_vs_<parameter>.png`, and `tune/`, a copy of Tune's
  experiment folder with its TensorBoard events (`tensorboard --logdir <stage>/search/tune`).

Heavy work runs on the cluster: the search's trials are Tune trials and the final merge is a Ray
task with the stage's resources; the driver only orchestrates.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import tempfile
import time
from typing import Any

from alloylm import storage
from alloylm import artifact as lifecycle
from alloylm.artifact import fingerprint
from alloylm.layout import RunLayout
from alloylm.config import MergeSearchStageConfig, MergeStageConfig, RunConfig
from alloylm.evaluate.config import SCORING_VERSION
from alloylm.errors import StageError, UsageError

log = logging.getLogger("alloylm.merge")
SUMMARY_NAME = "merge_summary.json"


def _parents(config: RunConfig, stage: MergeStageConfig) -> tuple[list[str], list[Any]]:
    """(URI of each parent, what identifies each for the fingerprint)."""
    uris, ids = [], []
    for parent in stage.parents:
        if parent in config.stages:
            uri = RunLayout.of(config).stage(parent)
            manifest = storage.read_manifest(uri)
            if manifest is None:
                raise StageError(
                    f"parent stage {parent!r} has no finished artifact at {uri}; run it first "
                    f"(alloylm train CONFIG {parent}, or alloylm run CONFIG)"
                )
            uris.append(uri)
            ids.append(manifest["fingerprint"])
        else:
            from alloylm.models.loading import model_source_id

            uris.append(parent)
            ids.append(model_source_id(parent))
    return uris, ids


def _local_dirs(uris: list[str]) -> list[str]:
    """Local folders of the parents (mergekit reads folders): S3 copies cached, Hub ids downloaded."""
    from alloylm.models.loading import local_model_dir

    try:
        return [local_model_dir(uri) for uri in uris]
    except (OSError, ValueError) as exc:
        raise StageError(f"cannot read a parent model: {exc}") from None


def _check_parents(config: RunConfig, name: str, uris: list[str], dirs: list[str]) -> None:
    """Every parent's weights are whole (a truncated file is named before anything is written) and
    the parents can be merged at all."""
    from alloylm.merge import MergeInputError, check_compatible
    from alloylm.models.loading import check_safetensors

    stage = config.stages[name]
    for parent, uri, folder in zip(stage.parents, uris, dirs, strict=True):
        try:
            check_safetensors(folder, shown_as=uri)
        except storage.CorruptFileError as exc:
            fix = (
                f"retrain stage {parent!r} (delete {uri} first: its manifest says it is complete) or restore the file"
                if parent in config.stages
                else "restore the file or save the model again"
            )
            raise StageError(f"stage {name!r}: its parent {parent!r}: {exc}; {fix}") from None
    try:
        check_compatible(dirs, list(stage.parents), trust_remote_code=config.trust_remote_code)
    except MergeInputError as exc:
        raise StageError(f"cannot merge {', '.join(stage.parents)}: {exc}") from None
    from alloylm.merge.compat import tensor_shapes

    check_filters(name, stage, list(tensor_shapes(dirs[0])))


def _layerwise_filters(stage: MergeStageConfig) -> list[tuple[str, list[str]]]:
    """(config key, tensor-name filters in the order mergekit tries them) of every layer-wise
    setting of the stage: fixed, searched, and in the search's points."""
    found: list[tuple[str, list[str]]] = []

    def add(key: str, value: Any) -> None:
        if isinstance(value, dict):
            found.append((key, [f for f in value if f != "default"]))

    def add_all(prefix: str, parameters: dict, per_parent: dict) -> None:
        for parameter, value in parameters.items():
            add(f"{prefix or 'parameters.'}{parameter}", value)
        for parent, values in per_parent.items():
            for parameter, value in values.items():
                add(f"{prefix}model_parameters.{parent}.{parameter}", value)

    add_all("", stage.parameters, stage.model_parameters)
    if isinstance(stage, MergeSearchStageConfig):
        search = stage.search
        found += [(f"search.space.{p}.filters", list(spec.filters)) for p, spec in search.space.items() if spec.filters]
        found += [
            (f"search.model_space.{parent}.{p}.filters", list(spec.filters))
            for parent, space in search.model_space.items() for p, spec in space.items() if spec.filters
        ]
        for index, point in enumerate(search.points):
            point = dict(point)
            add_all(f"search.points.{index}.", {k: v for k, v in point.items() if k != "model_parameters"}, point.get("model_parameters") or {})
    return found


def check_filters(name: str, stage: MergeStageConfig, tensors: list[str]) -> None:
    """Every tensor-name filter of the stage gives its value to some tensor of the parents: mergekit
    takes the first filter that is part of a tensor's name, so a filter that matches none (a typo:
    `mlps`) or only tensors an earlier one took (`[attn, self_attn]`) would be searched or set in
    vain, its tensors given `default` without a word."""

    def takes(name_part: str, tensor: str) -> bool:  # mergekit's own test; "*" takes every tensor
        return name_part == "*" or name_part in tensor

    for key, filters in _layerwise_filters(stage):
        for index, name_part in enumerate(filters):
            if any(takes(name_part, tensor) and not any(takes(earlier, tensor) for earlier in filters[:index]) for tensor in tensors):
                continue
            shown = ", ".join(t for t in tensors if ".0." in t or "layers" not in t)
            reason = (
                f"every tensor it matches is matched first by {', '.join(repr(e) for e in filters[:index])}"
                if any(takes(name_part, tensor) for tensor in tensors) else "it is part of no tensor's name"
            )
            raise StageError(
                f"stages.{name}.{key}: filter {name_part!r} would set nothing: {reason} (mergekit gives a tensor the "
                f"first filter that is part of its name); the parents' tensors are named like {shown}"
            )


def _fixed_config(config: RunConfig, stage: MergeStageConfig, dirs: list[str], mergekit_yaml: str | None = None) -> dict:
    """The fixed merge's mergekit config over the local parent folders `dirs`: the stage's
    `mergekit_config` YAML (its text `mergekit_yaml` when read already), else from its parameters."""
    from alloylm.merge import MergeInputError, read_mergekit_yaml
    from alloylm.merge.mergekit_builder import referenced_models
    from alloylm.merge.search import mergekit_config_for

    try:
        if stage.mergekit_config:
            stage_dirs = {p: d for p, d in zip(stage.parents, dirs, strict=True)}
            merge_config = read_mergekit_yaml(stage.mergekit_config, stage_dirs=stage_dirs, text=mergekit_yaml)
            # Only the parents are fingerprinted, checked for compatibility and ordered before this
            # stage in the DAG: a model the YAML names besides them would be merged unchecked, and
            # reused stale when replaced (a stage name not listed is taken for a Hub id by mergekit).
            others = sorted(referenced_models(merge_config) - {os.path.abspath(d) for d in dirs})
            if others:
                raise MergeInputError(
                    f"{stage.mergekit_config} names model(s) that are not among the stage's parents: {', '.join(others)}; "
                    "list every model the YAML merges under `parents` (a stage name or a folder)"
                )
            return merge_config
        return mergekit_config_for(stage, dirs, list(stage.parents), stage.parameters, stage.model_parameters)
    except MergeInputError as exc:
        raise StageError(f"merge parameters: {exc}") from None


def _merge_inputs(
    config: RunConfig, name: str, parent_uris: list[str], best_params: dict | None, mergekit_yaml: str | None = None
) -> tuple[list[str], dict]:
    """On the node that merges: the parents' local folders (S3 copies and Hub ids fetched there),
    checked, and the mergekit config over them (a search's: its best trial's parameters; a fixed
    merge's `mergekit_config` from its text `mergekit_yaml`, read on the driver, which sees its path)."""
    from alloylm.merge.search import mergekit_config_for

    stage = config.stages[name]
    dirs = _local_dirs(parent_uris)
    _check_parents(config, name, parent_uris, dirs)
    if best_params is None:
        return dirs, _fixed_config(config, stage, dirs, mergekit_yaml)
    return dirs, mergekit_config_for(
        stage, dirs, list(stage.parents), best_params["parameters"], best_params.get("model_parameters", {})
    )


def _materialize_task(
    config: RunConfig, name: str, parent_uris: list[str], best_params: dict | None, staging_uri: str, random_seed: int,
    mergekit_yaml: str | None = None,
) -> dict:
    """Ray task: fetch and check the parents, write the merged model from its mergekit config into
    the staging location; returns the config's YAML text and the parents' folders with the timings.

    The parents are read here, never on the driver: a job's driver runs on the head node, which
    would otherwise hold a copy of every parent (two 8B models: 32 GB in bf16, more in fp32)."""
    import ray
    import torch

    from alloylm.merge import MergeInputError, materialize
    from alloylm.merge.mergekit_builder import mergekit_yaml_text

    stage = config.stages[name]
    dirs, merge_config = _merge_inputs(config, name, parent_uris, best_params, mergekit_yaml)
    try:
        yaml_text = mergekit_yaml_text(merge_config, random_seed=random_seed)
    except MergeInputError as exc:
        raise StageError(f"stage {name!r}: merge parameters: {exc}") from None
    tokenizer_parent = stage.parents.index(stage.tokenizer_from or stage.parents[0])
    with tempfile.TemporaryDirectory(prefix="alloylm-merge-") as tmp:
        out = os.path.join(tmp, "model")
        started = time.monotonic()
        # On the GPU the stage's resources give it (as the search's trials are merged): mergekit on
        # the CPU alone took the written model's merge to the CPU even on a GPU cluster.
        device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        materialize(
            merge_config, out, tokenizer_from=dirs[tokenizer_parent], trust_remote_code=config.trust_remote_code,
            random_seed=random_seed, device=device,
        )
        storage.upload_dir(out, staging_uri)
        return {
            "merge_seconds": round(time.monotonic() - started, 2),
            "device": device,
            "method": merge_config.get("merge_method", stage.method),  # a mergekit_config YAML's own
            "yaml_text": yaml_text,
            "parent_dirs": dirs,
        }


def _check_task(config: RunConfig, name: str, parent_uris: list[str]) -> None:
    """Ray task: a search's parents are whole and can be merged, checked before its first trial."""
    _check_parents(config, name, parent_uris, _local_dirs(parent_uris))


def _on_cluster(task, stage: MergeStageConfig, *args, num_gpus: float = 0.0):
    """Run `task` as a Ray task with the stage's CPUs (and `num_gpus`), never on a head node that
    offers no CPUs (`k8s/`'s head sets `num-cpus: 0`); a StageError or StorageError it raises is
    raised as is."""
    import ray

    from alloylm.cluster import model_task

    try:
        return ray.get(model_task(task, num_gpus=num_gpus).options(num_cpus=stage.resources.num_cpus, num_gpus=num_gpus).remote(*args))
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, (StageError, storage.StorageError)):
            raise cause from None
        raise StageError(f"merging failed: {cause if cause is not None else exc}") from exc


def merge_seed(config: RunConfig, name: str) -> int:
    """The seed of a merge stage: its search's `seed`, else the run's. It seeds the searcher and the
    random merge methods (dare_ties, della: the same masks in every trial, the written model and
    `mergekit-yaml --random-seed`)."""
    stage = config.stages[name]
    search = getattr(stage, "search", None)
    return search.seed if search is not None and search.seed is not None else config.seed


def merge_fingerprint(config: RunConfig, name: str, parent_ids: list[Any], extra: Any = None) -> str:
    stage = config.stages[name]
    # Resources change how the stage runs, not which model it writes, except for the device: with a
    # GPU the trials and the written model are merged on it, and a random method (dare_ties, della)
    # draws other masks there than on the CPU (benchmarks/gpu_paths.py).
    settings = stage.model_dump(mode="json", by_alias=True, exclude={"resources", "description"})
    if stage.resources.num_gpus > 0:
        settings["device"] = "cuda"
    if isinstance(stage, MergeSearchStageConfig) and stage.search.searcher in ("grid", "random") and stage.search.asha is None:
        # Trials drawn up front and all run to the end: how many at once changes nothing. Otherwise
        # it does (TPE's batches, ASHA's order of arrival at a rung).
        settings["search"].pop("max_concurrent_trials", None)
    if stage.mergekit_config:
        settings["mergekit_config_text"] = storage.read_text(stage.mergekit_config)
    return fingerprint("merge", settings, parent_ids, extra, config.seed)


def merge_stage(config: RunConfig, name: str) -> dict:
    """Run merge stage `name` (fixed merge or merge search); returns its manifest."""
    from alloylm.cluster import check_storage_shared
    from alloylm.pipeline import check_stage_resources
    from alloylm.stages import kind_of

    kind = kind_of(config, name)  # UsageError (exit 2) for a stage that is not there
    if kind.config is not MergeStageConfig and kind.config is not MergeSearchStageConfig:
        raise UsageError(f"stage {name!r} is a {kind.name} stage, not a merge stage; run it with `alloylm {kind.command} CONFIG {name}`")
    stage = config.stages[name]
    started = time.monotonic()
    uri = RunLayout.of(config).stage(name)
    parent_uris, parent_ids = _parents(config, stage)
    search_inputs = _search_inputs(config, name) if isinstance(stage, MergeSearchStageConfig) else None
    fp = merge_fingerprint(config, name, parent_ids, _objective(search_inputs))
    inputs = lifecycle.input_versions({p: u for p, u in zip(stage.parents, parent_uris) if p in config.stages})
    manifest = lifecycle.up_to_date(uri, fp, inputs)
    if manifest is None and search_inputs:
        # Searched before 2026-12-05, when the objective's data were known by where they were: the
        # same data where they were then is the same search.
        manifest = lifecycle.up_to_date(uri, merge_fingerprint(config, name, parent_ids, _objective(search_inputs, by_location=True)), inputs)
    if manifest:
        log.info("stage %s: up to date (fingerprint %s), skipped", name, manifest["fingerprint"])
        return manifest
    check_stage_resources(config, [name])
    check_storage_shared(config.storage)  # again for nodes that joined since the run started (autoscaling)
    mergekit_yaml = None
    if stage.mergekit_config:  # read here, where its path is seen (a task may run on another node)
        try:
            mergekit_yaml = storage.read_text(storage.resolve(stage.mergekit_config))
        except (OSError, storage.StorageError) as exc:
            raise StageError(f"merge parameters: cannot read mergekit YAML {stage.mergekit_config}: {exc}") from None
    if isinstance(stage, MergeSearchStageConfig):
        # Before any trial or staging folder, with a trial's resources: on a node of the kind the
        # trials run on, whose copy of the parents they reuse (not one more copy on a CPU node).
        _on_cluster(_check_task, stage, config, name, parent_uris, num_gpus=stage.resources.num_gpus)
    seed = merge_seed(config, name)  # the searcher and random merge methods
    summary: dict[str, Any] = {"method": stage.method, "parents": dict(zip(stage.parents, parent_uris, strict=True))}
    with lifecycle.begin(uri, fp, config) as artifact:
        if isinstance(stage, MergeSearchStageConfig):
            # The Tune experiment of this build (a search on parents built again starts afresh).
            build = lifecycle.build_key(fp, inputs)
            best_params, search_summary = _search(config, name, build, parent_uris, search_inputs, artifact.staging_uri, seed)
            summary.update(search_summary)
            yaml_name = "best_merge.yaml"
        else:
            best_params, yaml_name = None, "merge.yaml"
        log.info("stage %s: materialising the merge with mergekit -> %s", name, uri)
        merged = _on_cluster(
            _materialize_task, stage, config, name, parent_uris, best_params, artifact.staging_uri, seed, mergekit_yaml,
            num_gpus=stage.resources.num_gpus,
        )
        yaml_text, dirs = merged.pop("yaml_text"), merged.pop("parent_dirs")
        summary.update(merged)
        sources = "".join(f"#   {d}  <-  {u}\n" for d, u in zip(dirs, parent_uris, strict=True) if d != u)
        header = f"# mergekit config of stage {name!r}; reproduce with: mergekit-yaml {yaml_name} OUTPUT_DIR\n"
        if sources:
            header += "# parent folders (local copies, on the node that merged) and where they come from:\n" + sources
        storage.write_text(storage.join(artifact.staging_uri, yaml_name), header + yaml_text)
        # The task wrote where its node sees the staging location: on a cluster whose nodes do not
        # share a local run folder it is not here, and a manifest must never stand over no model.
        # (The folder's own files only: a search's staging also holds its Tune experiment.)
        if not storage.exists(storage.join(artifact.staging_uri, "config.json")) or not storage.list_files(artifact.staging_uri, "*.safetensors"):
            raise StageError(
                f"stage {name!r}: the merged model is not at {artifact.staging_uri} after the merge task (no config.json or "
                "safetensors there): on a multi-node cluster the run's storage must be one every node reaches (s3:// or a "
                "shared file system)"
            )
        summary["mergekit_yaml"] = yaml_name
        summary["seconds"] = round(time.monotonic() - started, 1)
        storage.write_json(storage.join(artifact.staging_uri, SUMMARY_NAME), summary)
        manifest = artifact.commit(
            {
                "kind": "stage",
                "stage_kind": stage.kind,
                "name": name,
                "parents": parent_uris,
                "inputs": inputs,
                "metrics": {k: v for k, v in summary.items() if k in ("best_score", "trials", "complete_trials", "searcher", "method", "device")},
                "seconds": summary["seconds"],
            }
        )
    log.info("stage %s: done in %.1f s", name, summary["seconds"])
    return manifest


# ------------------------------------------------------------------------------ the search


def _objective(search_inputs, *, by_location: bool = False) -> list | None:
    """What a search's result follows besides the stage's own settings: the evaluation settings it
    scores with (suites, weights, evaluate.seed, max_length) and the content of each suite's data.
    Not evaluate.dtype: a trial scores the merged model in memory, in the stage's own dtype
    (search.run_trial). The data by suite, not by location: a run moved to another folder or from
    local storage to S3 holds the same data (`by_location`: as fingerprints made before 2026-12-05)."""
    if not search_inputs:
        return None
    eval_config, eval_data = search_inputs
    data = eval_data.fingerprints if by_location else {suite: eval_data.fingerprints[uri] for suite, uri in sorted(eval_data.sources.items())}
    return [SCORING_VERSION, eval_config.model_dump(mode="json", exclude={"resources", "batch_size", "dtype"}), data]


def _search_inputs(config: RunConfig, name: str):
    """(the trials' EvalConfig, their validation EvalData): loaded and checked before any trial."""
    from alloylm.evaluate import data_uris
    from alloylm.evaluate.prepared import EvaluationInputError
    from alloylm.evaluate.runner import load_eval_data

    eval_config = config.search_eval_config(name)
    layout = RunLayout.of(config)
    try:
        eval_data = load_eval_data(eval_config, data_uris(eval_config, layout.run), split="validation", tokenizer_uri=layout.tokenizer)
    except EvaluationInputError as exc:
        raise StageError(f"stage {name!r}: the search objective's data: {exc}; run `alloylm data CONFIG` first") from None
    return eval_config, eval_data


def _search(config: RunConfig, name: str, build: str, parent_uris, inputs, staging_uri: str, seed: int) -> tuple[dict, dict]:
    """Run the search (its Tune experiment at `searches/<name>-<build>`); returns (the best trial's
    parameters, the summary's search figures)."""
    from alloylm.merge.search import SearchError, prepare_job, run_search
    from alloylm.tracking import mlflow_target

    stage: MergeSearchStageConfig = config.stages[name]
    eval_config, eval_data = inputs
    try:
        job = prepare_job(
            stage, parent_uris, list(stage.parents), eval_config, trust_remote_code=config.trust_remote_code, random_seed=seed
        )
    except SearchError as exc:
        raise StageError(f"stages.{name}.{exc}") from None
    experiment_uri = RunLayout.of(config).search(name, build)
    rows = run_search(job, eval_data, experiment_uri, seed=seed, mlflow=mlflow_target(config, step=f"stage:{name}"))
    complete = [r for r in rows if r["score"] is not None]
    if not complete:
        errors = sorted({r["error"] for r in rows if r["error"]})
        raise StageError(
            f"stage {name!r}: no trial of the search completed ({len(rows)} trial(s)); "
            + (f"errors: {'; '.join(errors)}" if errors else "see the Tune experiment at " + experiment_uri)
        )
    best = max(complete, key=lambda r: r["score"])
    search_uri = storage.join(staging_uri, "search")
    _write_trials(rows, search_uri)
    _write_plots(rows, job, search_uri, name)
    _copy_experiment(storage.join(experiment_uri, "tune"), storage.join(search_uri, "tune"))
    best_params = best["params"]
    summary = {
        "searcher": stage.search.searcher,
        "trials": len(rows),
        "complete_trials": len(complete),
        "stopped_trials": sum(r["status"] == "stopped" for r in rows),
        "errored_trials": sum(r["status"] == "error" for r in rows),
        "best_trial": best["trial"],
        "best_score": best["score"],
        "best_params": best_params,
        "objective": {"split": "validation", "weights": {n: s.weight for n, s in eval_config.suites.enabled().items()}, "items": eval_data.sizes()},
        "experiment": experiment_uri,
    }
    log.info("stage %s: best trial %s, score %.4f over %d complete trial(s)", name, best["trial"], best["score"], len(complete))
    return best_params, summary


def _write_trials(rows: list[dict], search_uri: str) -> None:
    import json

    storage.write_text(storage.join(search_uri, "trials.jsonl"), "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    keys = sorted({k for r in rows for k in r["values"]})
    suites = sorted({k for r in rows for k in r["suites"]})
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["trial", "status", "score", "last_score", "rung", *keys, *(f"suite/{s}" for s in suites), "error"])
    for r in rows:
        writer.writerow(
            [r["trial"], r["status"], r["score"], r["last_score"], r["rung"], *(r["values"].get(k) for k in keys), *(r["suites"].get(s) for s in suites), r["error"] or ""]
        )
    storage.write_text(storage.join(search_uri, "trials.csv"), buffer.getvalue())


def _write_plots(rows: list[dict], job, search_uri: str, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [r for r in rows if r["last_score"] is not None]
    with tempfile.TemporaryDirectory(prefix="alloylm-search-plots-") as tmp:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for status, marker in (("complete", "o"), ("stopped", "x")):
            points = [(i, r["last_score"]) for i, r in enumerate(scored) if r["status"] == status]
            if points:
                ax.scatter(*zip(*points), marker=marker, label=f"{status} ({len(points)})")
        complete = [r["score"] for r in scored if r["score"] is not None]
        if complete:
            ax.axhline(max(complete), color="grey", linestyle="--", linewidth=0.8, label=f"best {max(complete):.4f}")
        ax.set_xlabel("trial")
        ax.set_ylabel("objective (validation)")
        ax.set_title(f"Merge search {name}: objective per trial (stopped: score on a subset)", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(tmp, "score_per_trial.png"), dpi=110)
        plt.close(fig)
        for dim in job.dims:
            fig, ax = plt.subplots(figsize=(4, 3))
            pts = [(r["values"][dim.key], r["last_score"]) for r in scored if dim.key in r["values"]]
            if pts:
                ax.scatter(*zip(*pts), s=14)
            ax.set_xlabel(dim.key)
            ax.set_ylabel("objective (validation)")
            fig.tight_layout()
            fig.savefig(os.path.join(tmp, f"score_vs_{dim.key}.png"), dpi=100)
            plt.close(fig)
        storage.upload_dir(tmp, search_uri)


def _copy_experiment(experiment_uri: str, target_uri: str) -> None:
    """Tune's experiment folder (results, searcher state, TensorBoard events) into the artifact."""
    with tempfile.TemporaryDirectory(prefix="alloylm-tune-copy-") as tmp:
        storage.download_dir(experiment_uri, tmp)
        storage.upload_dir(tmp, target_uri)
