"""The merge search on Ray Tune: each trial merges the parents in memory and scores the result.

Trials are Tune function trainables with the stage's resources, at most
`max_concurrent_trials` at once. A trial process keeps its `InMemoryMerger` (the parents, loaded
once) across trials (`reuse_actors=True`), merges one candidate into the same model instance,
and scores it with the evaluation suites on the validation split. With ASHA the trial reports
its score on growing subsets of the items (`asha.rungs`) and ASHA stops the weak ones early.

Searchers: Optuna TPE (default) and CMA-ES (Optuna's samplers through Tune's OptunaSearch),
random (Tune's BasicVariantGenerator), grid (the explicit `points`, or the product of `values`).
Candidate `points` (e.g. the paper's gradients) are evaluated first by every searcher.

Reproducibility: with several trials at once, TPE and CMA-ES run in Tune's batch mode
(`ConcurrencyLimiter(batch=True)`): the next trials are suggested only once every running one has
finished, so what the sampler learns from never depends on which trial finished first, and a rerun
suggests the same trials. Random and grid draw their trials up front. ASHA is asynchronous by
design: it judges a trial at a rung against the trials that reached the rung before it, so with
`max_concurrent_trials` > 1 the order in which trials finish a rung can change which are stopped
(`search_is_reproducible`; the search says so when it starts); `max_concurrent_trials: 1` makes it
reproducible.

The experiment lives at `<run>/searches/<stage>-<fingerprint>/tune` (local or s3://): an
interrupted search resumes there with `Tuner.restore`, without redoing finished trials, when Tune's
saved state is whole and consistent (`unresumable_reason`); otherwise it starts again.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from alloylm import storage
from alloylm.config import MergeSearchStageConfig
from alloylm.evaluate.config import EvalConfig
from alloylm.evaluate.runner import EvalData
from alloylm.merge.space import GRID_KEY, Dimension, assemble, dimensions, flatten_point, grid_size, tune_space

if TYPE_CHECKING:
    from alloylm.tracking import MlflowTarget

log = logging.getLogger("alloylm.merge")
EXPERIMENT_NAME = "tune"
METRIC = "score"


class SearchError(RuntimeError):
    """A search that cannot run or produced no complete trial; the message says why."""


@dataclass(frozen=True)
class TrialJob:
    """What every trial needs besides its sampled values (sent once through the object store)."""

    stage: MergeSearchStageConfig
    parent_uris: tuple[str, ...]
    names: tuple[str, ...]
    eval_config: EvalConfig
    points_flat: tuple[dict[str, float], ...] = ()
    trust_remote_code: bool = False
    rungs: tuple[float, ...] = (1.0,)
    dims: tuple[Dimension, ...] = field(default_factory=tuple)
    random_seed: int | None = None  # random methods (dare_ties, della): every trial draws the same masks

    def merge_parameters(self, flat: Mapping[str, float]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        return assemble(
            flat, self.stage.search, list(self.dims), parameters=self.stage.parameters, model_parameters=self.stage.model_parameters
        )


def mergekit_config_for(
    stage, parent_dirs: list[str], names: list[str], parameters: Mapping[str, Any], model_parameters: Mapping[str, Any]
) -> dict:
    """The mergekit config of one candidate of `stage` over local parent folders."""
    from alloylm.merge import mergekit_config

    base = names.index(stage.base) if stage.base else None
    # No tokenizer_source: the parents share one vocabulary (check_compatible), and the merged
    # folder takes the tokenizer of `tokenizer_from` when it is materialised.
    return mergekit_config(
        stage.method,
        parent_dirs,
        names=names,
        base=base,
        parameters=parameters,
        model_parameters=model_parameters,
        dtype=stage.dtype,
    )


# ------------------------------------------------------------------------------ the trial

_WORKER: dict[str, Any] = {}  # per trial process: the merger and tokenizer of the parents it holds


def _worker_state(job: TrialJob):
    """The InMemoryMerger and the scoring tokenizer for `job`'s parents, built once per process."""
    from alloylm.merge import InMemoryMerger
    from alloylm.models.loading import load_tokenizer, local_model_dir

    key = repr((job.parent_uris, job.stage.dtype))
    if _WORKER.get("key") != key:
        from alloylm.models.loading import release_cached

        for folder in _WORKER.get("dirs") or []:
            release_cached(folder)  # another search's parents: their cached copies may go (ignored for local ones)
        _WORKER.clear()
        dirs = [local_model_dir(uri) for uri in job.parent_uris]
        device = "cuda" if job.stage.resources.num_gpus > 0 and _cuda() else "cpu"
        # The parent the stage's model takes its tokenizer and generation settings from (`materialize`):
        # a trial scores with that parent's generation settings too, not with the base model's.
        donor = dirs[job.names.index(job.stage.tokenizer_from or job.names[0])]
        # check=False: merge_stage checked the parents once, before any trial; each trial process need not.
        merger = InMemoryMerger(
            dirs, names=list(job.names), dtype=job.stage.dtype, device=device, trust_remote_code=job.trust_remote_code, check=False,
            tokenizer_from=donor,
        )
        tokenizer = load_tokenizer(donor, trust_remote_code=job.trust_remote_code)
        _WORKER.update(key=key, dirs=dirs, merger=merger, tokenizer=tokenizer, device=device)
    return _WORKER


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def trial_flat_values(tune_config: Mapping[str, Any], job: TrialJob) -> dict[str, float]:
    if GRID_KEY in tune_config:
        return dict(job.points_flat[int(tune_config[GRID_KEY])])
    return {d.key: float(tune_config[d.key]) for d in job.dims}


def run_trial(tune_config: dict, job: TrialJob, eval_data: EvalData) -> None:
    """One trial: merge the candidate in memory, then report the objective on each rung's items."""
    from ray import tune

    from alloylm.evaluate.comparison import headline_value
    from alloylm.evaluate.runner import score_model
    from alloylm.evaluate.scorer import CausalLMScorer

    state = _worker_state(job)
    flat = trial_flat_values(tune_config, job)
    parameters, model_parameters = job.merge_parameters(flat)
    config = mergekit_config_for(job.stage, state["dirs"], list(job.names), parameters, model_parameters)
    model = state["merger"].merge(config, random_seed=job.random_seed)
    scorer = CausalLMScorer(
        model,
        state["tokenizer"],
        batch_size=job.eval_config.batch_size,
        max_length=job.eval_config.max_length,
        device=state["device"],
    )
    for rung, fraction in enumerate(job.rungs, start=1):
        data = eval_data.rung(fraction, job.eval_config.seed)
        results, _ = score_model(job.eval_config, "in-memory merge", data, variant="trial", scorer=scorer)
        if results.get("score") is None:
            reasons = {n: s.get("reason") for n, s in results["suites"].items() if s.get("status") != "ok"}
            raise SearchError(f"the objective is missing for this candidate: {results.get('error') or reasons}")
        suites = {
            f"suite/{name}": headline_value(name, suite.get("metrics") or {}, getattr(job.eval_config.suites, name))
            for name, suite in results["suites"].items()
            if suite.get("status") == "ok"
        }
        tune.report({
            METRIC: float(results["score"]), "rung": rung, ASHA_TIME: asha_time(job.stage, rung), "fraction": fraction,
            "items": sum(data.sizes().values()), **suites,
        })


# ------------------------------------------------------------------------------ the search


def search_is_reproducible(search) -> bool:
    """Whether a rerun of the search makes the same trials and decisions whatever the timing:
    always one trial at a time; with several, unless ASHA judges them (see the module's note)."""
    return search.max_concurrent_trials == 1 or search.asha is None


def _searcher(stage: MergeSearchStageConfig, seed: int, points: list[dict[str, float]]):
    from ray.tune.search.basic_variant import BasicVariantGenerator

    search = stage.search
    # Tune applies TuneConfig.max_concurrent_trials to a Searcher only (it warns and ignores it for a
    # SearchGenerator such as BasicVariantGenerator), so grid and random take their own limit.
    if search.searcher == "grid":
        return BasicVariantGenerator(random_state=seed, max_concurrent=search.max_concurrent_trials)
    if search.searcher == "random":
        return BasicVariantGenerator(points_to_evaluate=points or None, random_state=seed, max_concurrent=search.max_concurrent_trials)
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    if search.searcher == "cmaes":
        # CMA-ES from Optuna; its first generation can start from the given points.
        sampler = optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    else:
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, min(10, search.num_samples // 3)))
    from ray.tune.search import ConcurrencyLimiter

    # Tune's batch mode (what TuneConfig.max_concurrent_trials does, without batch): a sampler asked
    # while one trial of two is still running would learn from whichever finished first, so two
    # runs of one config could suggest different trials.
    return ConcurrencyLimiter(
        OptunaSearch(sampler=sampler, points_to_evaluate=points or None),  # metric and mode come from TuneConfig
        max_concurrent=search.max_concurrent_trials,
        batch=search.max_concurrent_trials > 1,
    )


# ASHA's clock: Tune's ASHAScheduler judges a trial only at times grace_period x rf^k, so rung r
# (1, 2, ...) is reported at rf^(r-1). Reported as the rung number, the judging points were 1, rf,
# rf^2: with rungs [0.25, 0.5, 1.0] and reduction_factor 3 no trial was judged at the second rung
# (each surviving trial still scored it, for nothing). Two rungs with rf 2 read the same either way.
ASHA_TIME = "asha_time"


def asha_time(stage: MergeSearchStageConfig, rung: int) -> float:
    """The time a trial reports rung `rung` (1-based) at, for the stage's ASHA."""
    factor = stage.search.asha.reduction_factor if stage.search.asha is not None else 2.0
    return float(factor ** (rung - 1))


def _scheduler(stage: MergeSearchStageConfig):
    asha = stage.search.asha
    if asha is None:
        return None
    from ray.tune.schedulers import ASHAScheduler

    # A hair above the last rung's time: Tune counts its rungs as int(log(max_t) / log(rf) + 1),
    # which rounding would cut by one for some rf and rung counts (rf 3 and 6 rungs gave 5).
    last = asha_time(stage, len(asha.rungs))
    return ASHAScheduler(time_attr=ASHA_TIME, max_t=last * (1 + 1e-9), grace_period=1, reduction_factor=asha.reduction_factor)


def prepare_job(
    stage: MergeSearchStageConfig, parent_uris, names, eval_config: EvalConfig, *, trust_remote_code: bool, random_seed: int | None = None
) -> TrialJob:
    """Check the search space and points (before any trial) and bundle what trials need."""
    dims = dimensions(stage.search)
    points = []
    for index, point in enumerate(stage.search.points):
        try:
            points.append(flatten_point(point, stage.search, dims, where=f"search.points.{index}"))
        except ValueError as exc:
            raise SearchError(str(exc)) from None
    rungs = tuple(stage.search.asha.rungs) if stage.search.asha else (1.0,)
    return TrialJob(
        stage=stage,
        parent_uris=tuple(parent_uris),
        names=tuple(names),
        eval_config=eval_config,
        points_flat=tuple(points),
        trust_remote_code=trust_remote_code,
        rungs=rungs,
        dims=tuple(dims),
        random_seed=random_seed,
    )


# The files of Tune's saved state that `unresumable_reason` checks, as its messages name them.
_STATE_FILES = {
    "tuner": "the tuner",
    "experiment": "the experiment state",
    "generator": "the search generator's state",
    "searcher": "the searcher's state",
}


def unresumable_reason(fs, experiment_path: str, searcher: str) -> str | None:
    """Why Tune's saved state of an interrupted search at `experiment_path` (on the pyarrow file
    system `fs`) cannot be resumed consistently; None when it can.

    Tune writes its experiment state (the trials), the searcher's state and `tuner.pkl` in the
    driver's staging folder and copies them to the storage path in the background, one file after
    another and in place. A driver stopped during a copy (killed, preempted) leaves a truncated or
    missing file, or a searcher state one copy older than the trials'. `Tuner.restore` then either
    fails on the truncated file, or (a searcher state it cannot find) resumes with the searcher as
    it was before its search space was set, and every later attempt failed the same way in Optuna
    ("no search space has been defined"). Checked here, before Tune reads them: each file parses,
    the Optuna searcher has its space, and the search generator has created as many trials as the
    experiment state holds. (A BasicVariantGenerator, grid or random, records no such count: only
    that its state parses is checked.)
    """
    import fnmatch
    import json

    import pyarrow.fs as pafs
    from ray import cloudpickle
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.search import BasicVariantGenerator, SearchGenerator, Searcher

    try:
        infos = fs.get_file_info(pafs.FileSelector(experiment_path, allow_not_found=True))
    except OSError as exc:
        return f"its folder cannot be listed ({exc})"
    names = [info.base_name for info in infos if info.type == pafs.FileType.File]

    def newest(template: str) -> str | None:
        # Tune's own file names (its classes' CKPT_FILE_TMPL), and the last by name, as Tune reads them
        return max(fnmatch.filter(names, template.format("*")), default=None)

    basic = searcher in ("grid", "random")  # a BasicVariantGenerator; TPE and CMA-ES: OptunaSearch
    files = {"tuner": "tuner.pkl" if "tuner.pkl" in names else None, "experiment": newest(TuneController.CKPT_FILE_TMPL)}
    if basic:
        files["generator"] = newest(BasicVariantGenerator.CKPT_FILE_TMPL)
    else:
        files |= {"generator": newest(SearchGenerator.CKPT_FILE_TMPL), "searcher": newest(Searcher.CKPT_FILE_TMPL)}
    missing = [_STATE_FILES[kind] for kind, name in files.items() if name is None]
    if missing:
        return f"{', '.join(missing)} never reached the storage"
    loaded = {}
    for kind, name in files.items():
        try:
            with fs.open_input_stream(f"{experiment_path}/{name}") as handle:
                data = handle.readall()
            if not data:
                raise ValueError("empty")
            loaded[kind] = json.loads(data) if kind == "experiment" else cloudpickle.loads(data)
        except Exception as exc:  # truncated: EOFError, UnpicklingError, ValueError and others
            return f"{name} is unreadable ({type(exc).__name__}: {exc or 'truncated'})"
    trials = loaded["experiment"].get("trial_data") if isinstance(loaded["experiment"], dict) else None
    if not isinstance(trials, list):
        return f"{files['experiment']} holds no trial list"
    if not basic:
        if not isinstance(loaded["searcher"], dict) or not loaded["searcher"].get("_space"):
            return f"{files['searcher']} holds no search space"
        counter = loaded["generator"].get("counter") if isinstance(loaded["generator"], dict) else None
        if counter != len(trials):
            return (f"{files['generator']} counts {counter} trial(s) created where {files['experiment']} holds "
                    f"{len(trials)}: one copy older than the other")
    return None


def run_search(
    job: TrialJob, eval_data: EvalData, experiment_uri: str, *, seed: int, mlflow: MlflowTarget | None = None
) -> list[dict]:
    """Run (or resume) the Tune experiment under `experiment_uri`; returns one row per trial.

    With `mlflow`, Ray Tune's MLflowLoggerCallback logs every trial (its values and each rung's
    report) as an MLflow run, from the driver.
    """
    from ray import tune

    from alloylm.tracking import search_callbacks

    stage = job.stage
    search = stage.search
    fs, root = storage.arrow_filesystem(experiment_uri)
    experiment_path = f"{root}/{EXPERIMENT_NAME}"
    resources = {"cpu": stage.resources.num_cpus, "gpu": stage.resources.num_gpus}
    trainable = tune.with_resources(tune.with_parameters(run_trial, job=job, eval_data=eval_data), resources)
    resumable = tune.Tuner.can_restore(experiment_path, storage_filesystem=fs)
    if resumable and (problem := unresumable_reason(fs, experiment_path, search.searcher)) is not None:
        # Not resumable as it is; the finished trials' results are in the folder, but the searcher
        # that suggested them is not, so they cannot be told to it consistently. The search starts
        # again: with the same seed it suggests the same trials and scores them the same.
        log.warning(
            "merge search: the interrupted experiment at %s cannot be resumed: %s (its driver stopped while Tune "
            "was copying its state to the storage). Starting the search again; its finished trials run again.",
            storage.join(experiment_uri, EXPERIMENT_NAME), problem,
        )
        storage.remove(storage.join(experiment_uri, EXPERIMENT_NAME))
        resumable = False
    if resumable:
        log.info("merge search: resuming the interrupted experiment at %s", storage.join(experiment_uri, EXPERIMENT_NAME))
        tuner = tune.Tuner.restore(
            experiment_path, trainable=trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=fs
        )
    else:
        dims = list(job.dims)
        num_samples = 1 if search.searcher == "grid" else search.num_samples
        tuner = tune.Tuner(
            trainable,
            param_space=tune_space(search, dims),
            tune_config=tune.TuneConfig(
                metric=METRIC,
                mode="max",
                search_alg=_searcher(stage, seed, list(job.points_flat)),
                scheduler=_scheduler(stage),
                num_samples=num_samples,
                # every searcher holds its own limit (see _searcher)
                max_concurrent_trials=None,
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name=EXPERIMENT_NAME,
                storage_path=root,
                storage_filesystem=fs,
                failure_config=tune.FailureConfig(max_failures=1),
                callbacks=search_callbacks(mlflow) or None,
                verbose=1,
            ),
        )
        log.info(
            "merge search: %s, %d trial(s) (%d at a time) over %d dimension(s)",
            search.searcher,
            grid_size(search, dims) if search.searcher == "grid" else num_samples,
            search.max_concurrent_trials,
            len(dims),
        )
        if not search_is_reproducible(search):
            log.warning(
                "merge search: ASHA with %d trials at a time: which trials it stops depends on the order in which "
                "they reach a rung, so a rerun may stop others and find another best; max_concurrent_trials: 1 "
                "makes the search reproducible",
                search.max_concurrent_trials,
            )
    grid = tuner.fit()
    return trial_rows(grid, job)


def trial_rows(grid, job: TrialJob) -> list[dict]:
    """One row per trial: id, status, score (complete trials only), the merge parameters."""
    rows = []
    last_rung = len(job.rungs)
    for result in grid:
        metrics = result.metrics or {}
        config = result.config or {}
        flat = trial_flat_values(config, job) if config else {}
        parameters, model_parameters = job.merge_parameters(flat) if flat else ({}, {})
        complete = metrics.get("rung") == last_rung and result.error is None
        score = metrics.get(METRIC)
        folder = (result.path or "").rstrip("/").rsplit("/", 1)[-1]
        # Tune names trial folders <trainable>_<id>_<creation number>_<params>: the number orders trials in time.
        number = re.match(r"^.+?_[0-9a-f]{5,}_(\d+)_", folder)
        rows.append(
            {
                "trial": metrics.get("trial_id") or folder,
                "number": int(number.group(1)) if number else None,
                "status": "error" if result.error else ("complete" if complete else "stopped"),
                "score": float(score) if complete and score is not None and math.isfinite(score) else None,
                "last_score": score,
                "rung": metrics.get("rung"),
                "items": metrics.get("items"),
                "params": {"parameters": parameters, **({"model_parameters": model_parameters} if model_parameters else {})},
                "values": flat,
                "suites": {k.removeprefix("suite/"): v for k, v in metrics.items() if k.startswith("suite/")},
                "error": _last_line(result.error),
            }
        )
    rows.sort(key=lambda r: (r["number"] is None, r["number"] or 0, r["trial"]))
    return rows


def _last_line(error: BaseException | None) -> str | None:
    """The exception's own message (Ray's wrapper puts the worker's traceback first)."""
    if error is None:
        return None
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
