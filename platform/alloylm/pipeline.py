"""The pipeline: one run config -> the whole artifact graph, scheduled on the Ray cluster.

    summary = run_pipeline(load_config("configs/quickstart.yaml"))

`alloylm run`, `jobs/pipeline.py` and Python users all call `run_pipeline`. It builds the graph
of steps (tokenizer -> data sets -> stages -> one evaluation per variant -> comparison -> report),
checks up front that every stage fits the cluster, and runs the graph:

- a step starts as soon as its parents are done and the CPUs/GPUs it holds fit beside the
  steps already running (`run.max_parallel_stages` caps how many run at once; 1 reproduces a
  one-at-a-time run in dependency order);
- data preparation runs alone (Ray Data spreads over the whole cluster; a training worker beside
  its actor pool would starve the read tasks on a small cluster);
- every step skips itself when its artifact is up to date (fingerprints), so a rerun continues an
  interrupted run, and an interrupted training stage or search resumes from its checkpoint;
- a failed step stops only its descendants: siblings run on, and the summary lists every failed
  and every not-run step (the CLI then exits 1).

Each step's log lines carry its name (`[stage:sft] ...`).
"""

from __future__ import annotations

import contextvars
import logging
import time
import traceback
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from alloylm.errors import AlloyLMError, ConfigError, ServeError, StageError, UsageError
from alloylm.layout import RunLayout
from alloylm.stages import stage_kind

if TYPE_CHECKING:
    from alloylm.config import RunConfig

log = logging.getLogger("alloylm")

_current_step: contextvars.ContextVar[str] = contextvars.ContextVar("alloylm_step", default="")
# The scheduler's free CPUs/GPUs (after every running step's reservation), while a run is going on.
_free_pool: dict[str, float] | None = None


def unreserved_resources() -> dict[str, float] | None:
    """What no running step of the current pipeline run holds; None outside a run.

    A CPT stage streams its data through Ray Data read tasks only when a CPU is left for them;
    inside a run, siblings hold CPUs the cluster's totals do not show.
    """
    return None if _free_pool is None else dict(_free_pool)


class StepLogFilter(logging.Filter):
    """Adds `record.step` ("[stage:sft] " inside a step, "" elsewhere) for a `%(step)s` log format."""

    def filter(self, record: logging.LogRecord) -> bool:
        step = _current_step.get()
        record.step = f"[{step}] " if step else ""
        return True


# ------------------------------------------------------------------------------ resources


def check_merge_stages(config: RunConfig, names: list[str] | None = None) -> None:
    """Refuse (ConfigError, exit 2) merge settings mergekit would refuse, before any parent trains."""
    from alloylm.merge.config import merge_settings_problems

    problems = merge_settings_problems(config, names)
    if problems:
        raise ConfigError("invalid merge settings:\n  " + "\n  ".join(problems))


def check_stage_resources(config: RunConfig, names: list[str] | None = None, have: dict[str, float] | None = None) -> None:
    """Refuse (StageError) a stage the cluster can never schedule, naming what it needs and what there is.

    The one resource check: the pipeline runs it for every stage before any work, and each stage's
    runner runs it again for itself when it starts (a stage may be run alone with `alloylm train`).
    """
    if have is None:
        import ray

        have = ray.cluster_resources()
    for name in names if names is not None else config.stage_order():
        stage = config.stages[name]
        for resource, (amount, what) in stage_kind(stage.kind).resources(stage).items():
            if amount > have.get(resource, 0) + 1e-9:
                raise StageError(
                    f"stage {name!r}: resources: {what}, but the Ray cluster has {have.get(resource, 0):g}; "
                    f"nothing was run (lower stages.{name}.resources or use a larger cluster)"
                )


def check_stage_memory(config: RunConfig, names: list[str], gpus: float) -> None:
    """Refuse (StageError) a stage `alloylm plan` says cannot fit in one GPU's memory, before any work.

    Only where the memory is known (`cluster.gpu_memory_gib`) and the Ray cluster has GPUs; the
    message gives the numbers and the overrides that would fit (`alloylm.plan.check_stages_fit`).
    """
    if config.cluster is None or config.cluster.gpu_memory_gib is None or gpus <= 0:
        return
    from alloylm.plan import check_stages_fit

    check_stages_fit(config, names, config.cluster.model_copy(update={"gpus": int(gpus), "nodes": 1}))


# ------------------------------------------------------------------------------ the graph


@dataclass
class Step:
    """One node of the artifact graph."""

    key: str  # "tokenizer", "data:NAME", "stage:NAME", "eval:VARIANT", "comparison", "report"
    run: Callable[[], Any]
    parents: tuple[str, ...] = ()  # must be done
    after: tuple[str, ...] = ()  # must be finished, whatever the outcome
    needs: dict[str, float] = field(default_factory=dict)  # cluster resources held while running
    exclusive: bool = False  # runs with nothing else running


@dataclass
class RunSummary:
    """What a run did: every step's outcome, the evaluation and the best variant."""

    experiment: str
    run: str
    steps: dict[str, dict] = field(default_factory=dict)  # key -> {status, seconds, error?}
    datasets: dict[str, Any] = field(default_factory=dict)
    stages: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] | None = None
    report: dict[str, Any] | None = None
    best: dict[str, Any] | None = None
    seconds: float = 0.0

    @property
    def failed(self) -> dict[str, str]:
        """Failed steps and why, plus steps not run because a parent failed."""
        return {key: s.get("error", s["status"]) for key, s in self.steps.items() if s["status"] in ("failed", "not run")}

    @property
    def ok(self) -> bool:
        return not self.failed and not (self.evaluation or {}).get("failed")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"experiment": self.experiment, "run": self.run, "datasets": self.datasets, "stages": self.stages}
        for key in ("evaluation", "report", "best"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        failed = dict(self.failed)
        for variant, error in ((self.evaluation or {}).get("failed") or {}).items():
            failed.setdefault(f"eval:{variant}", error)
        out["failed"] = failed
        out["steps"] = self.steps
        out["seconds"] = self.seconds
        return out


def _stage_uris(config: RunConfig) -> dict[str, str]:
    layout = RunLayout.of(config)
    return {name: layout.stage(name) for name in config.stages}


def _held_while_running(stage, needs: dict[str, float], capacity: dict[str, float] | None) -> dict[str, float]:
    """What a stage's step holds on the cluster while it runs. A merge search's `needs` are one
    trial's, the least it can progress with; Tune then runs up to `max_concurrent_trials` of them
    at once, as many as the cluster fits, so the step holds that many, and the scheduler does not
    start a sibling on resources the search's other trials take."""
    search = getattr(stage, "search", None)
    if search is None or not needs:
        return needs
    trials = search.num_samples
    if search.searcher == "grid":  # num_samples is ignored: one trial per grid point
        from alloylm.merge.space import dimensions, grid_size

        try:
            trials = grid_size(search, dimensions(search))
        except ValueError:  # a bad space: the merge check names it before any step
            trials = search.max_concurrent_trials
    at_once = min(search.max_concurrent_trials, max(1, trials))
    for resource, amount in needs.items():
        if capacity is not None:
            at_once = min(at_once, int(capacity.get(resource, 0) / amount + 1e-9))
    return {resource: amount * max(1, at_once) for resource, amount in needs.items()}


def build_graph(
    config: RunConfig, summary: RunSummary, *, only: list[str] | None = None, capacity: dict[str, float] | None = None
) -> dict[str, Step]:
    """The steps of the run, in a dependency order. `only`: these stages and their ancestors, no evaluation.
    `capacity`: the cluster's CPUs and GPUs, which bound what a merge search's trials hold at once."""
    from alloylm.data.prepare import prepare_dataset, prepare_tokenizer

    layout = RunLayout.of(config)
    steps: dict[str, Step] = {}
    wanted = _with_ancestors(config, only) if only else None
    datasets = sorted(config.datasets) if wanted is None else sorted({d for n in wanted for d in _stage_datasets(config, n)})
    tokenizer_state: dict[str, dict] = {}

    def tokenizer() -> dict:
        from alloylm.train.launcher import check_chat_templates

        tokenizer_state["manifest"] = prepare_tokenizer(config)
        check_chat_templates(config, sorted(wanted or config.stages))  # not only once CPT is done
        return tokenizer_state["manifest"]

    if datasets or (config.evaluate is not None and wanted is None):
        steps["tokenizer"] = Step("tokenizer", tokenizer, exclusive=True)
    # Generated data sets after the data sets they read.
    for name in sorted(datasets, key=lambda n: config.datasets[n].generate is not None):
        spec = config.datasets[name]
        parents = ["tokenizer"] + ([f"data:{spec.generate.from_}"] if spec.generate is not None and spec.generate.from_ in datasets else [])

        def prepare(name: str = name) -> dict:
            manifest = prepare_dataset(config, name, tokenizer_state["manifest"])
            summary.datasets[name] = manifest["counts"]
            return manifest

        steps[f"data:{name}"] = Step(f"data:{name}", prepare, parents=tuple(parents), exclusive=True)
    for name in config.stage_order():
        if wanted is not None and name not in wanted:
            continue
        stage = config.stages[name]
        kind = _kind(config, name)
        parents = [f"stage:{p}" for p in kind.parents(stage) if p in config.stages]
        parents += [f"data:{d}" for d in _stage_datasets(config, name)]
        needs = {resource: amount for resource, (amount, _) in kind.resources(stage).items() if amount > 0}
        needs = _held_while_running(stage, needs, capacity)

        def run_stage(name: str = name, kind=kind) -> dict:
            manifest = kind.run(config, name)
            summary.stages[name] = {"stage": name, "kind": kind.name, "model": layout.stage(name), **(manifest.get("metrics") or {})}
            # A training stage's wall time and where it went (launcher.BREAKDOWN_PHASES), from its manifest.
            summary.stages[name].update({key: manifest[key] for key in ("seconds", "breakdown") if key in manifest})
            return manifest

        steps[f"stage:{name}"] = Step(f"stage:{name}", run_stage, parents=tuple(parents), needs=needs)
    if config.evaluate is not None and wanted is None:
        _add_evaluation(config, summary, steps)
    return steps


def stage_dag(config: RunConfig) -> dict[str, list[str]]:
    """Stage name -> its parent stages (model sources left out), in dependency order."""
    return {name: [p for p in config.stages[name].parent_refs() if p in config.stages] for name in config.stage_order()}


def _stage_datasets(config: RunConfig, name: str) -> list[str]:
    """The data sets stage `name` reads: its own (`data:`) and those the run config gives it (`reads`)."""
    kind = _kind(config, name)
    own = list(kind.datasets(config.stages[name]))
    return own + [d for d in (kind.reads(config, name) if kind.reads else []) if d not in own]


def _kind(config: RunConfig, name: str):
    return stage_kind(config.stages[name].kind)


def _with_ancestors(config: RunConfig, names: list[str]) -> set[str]:
    unknown = [n for n in names if n not in config.stages]
    if unknown:
        raise UsageError(f"--only: no stage {', '.join(map(repr, unknown))}; stages: {', '.join(config.stage_order())}")
    wanted: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in wanted:
            continue
        wanted.add(name)
        todo += [p for p in config.stages[name].parent_refs() if p in config.stages]
    return wanted


def _add_evaluation(config: RunConfig, summary: RunSummary, steps: dict[str, Step]) -> None:
    """One step per variant (scored as soon as its model exists), then the comparison, then the report."""
    from alloylm.evaluate import data_uris, evaluate_variants, render_report, resolve_variants
    from alloylm.evaluate.config import variant_name
    from alloylm.tracking import log_comparison

    eval_config = config.evaluate
    layout = RunLayout.of(config)
    stage_uris = _stage_uris(config)
    variants = resolve_variants(eval_config, stage_uris)
    data = data_uris(eval_config, layout.run)
    data_steps = tuple(f"data:{n}" for n in sorted(data) if f"data:{n}" in steps)
    evaluations: dict[str, dict] = {}
    resources = eval_config.resources
    needs = {k: v for k, v in (("CPU", resources.num_cpus), ("GPU", resources.num_gpus)) if v > 0}
    names = [variant_name(entry) for entry in eval_config.variants]

    # "Best" is chosen on validation, never on the split the report states (test by default):
    # every variant is also scored on validation, unless that is already the report's split.
    splits = {"eval": (eval_config.split, layout.eval)}
    if eval_config.split != "validation":
        splits["validate"] = ("validation", layout.validation_eval)

    def evaluate(variant: str, split: str, out: str) -> dict:
        result = evaluate_variants(
            eval_config,
            {variant: variants[variant]},
            data,
            out,
            tokenizer_uri=layout.tokenizer,
            split=split,
            trust_remote_code=config.trust_remote_code,
            compare=False,
        )
        evaluations[(variant, split)] = result["variants"][variant]
        error = result["failed"].get(variant)
        if error:
            raise StageError(f"variant {variant!r}: evaluation on {split} failed: {error}")
        return result

    for prefix, (split, out) in splits.items():
        for variant in names:
            parents = ("tokenizer", *data_steps) + ((f"stage:{variant}",) if variant in config.stages else ())
            steps[f"{prefix}:{variant}"] = Step(
                f"{prefix}:{variant}", lambda v=variant, s=split, o=out: evaluate(v, s, o), parents=parents, needs=needs
            )

    def compare() -> dict:
        # Every variant whose evaluation finished; the others are listed as failed with the reason.
        from alloylm import storage

        done = {v: variants[v] for v in names if summary.steps.get(f"eval:{v}", {}).get("status") == "done"}
        failed = {v: summary.steps.get(f"eval:{v}", {}).get("error", "not evaluated") for v in names if v not in done}
        # An earlier run's table must not be printed as this run's when none is made now.
        for name in ("comparison.md", "comparison.json"):
            storage.remove(storage.join(layout.eval, name))
        result = evaluate_variants(
            eval_config, done, data, layout.eval, tokenizer_uri=layout.tokenizer, trust_remote_code=config.trust_remote_code
        ) if done else {"split": eval_config.split, "variants": {}, "failed": {}}
        compared.append(result)
        failed.update(result["failed"])
        summary.evaluation = {
            "split": result["split"],
            "table": layout.comparison_table,
            "scores": {name: r.get("score") for name, r in result["variants"].items()},
            "failed": failed,
        }
        log_comparison(config, result)  # to MLflow, with `tracking.mlflow` only
        if failed:
            raise StageError(f"evaluation failed for {', '.join(sorted(failed))}")
        return result

    compared: list[dict] = []  # the comparison's result, for a selection on the same split
    steps["comparison"] = Step("comparison", compare, after=tuple(f"eval:{v}" for v in names))

    def select() -> dict:
        """The validation comparison of every variant that has validation results, and the best of them."""
        from alloylm import storage
        from alloylm.evaluate import best_variant

        storage.remove(layout.best)  # a choice from an earlier run must never outlive a failed selection
        prefix, (split, out) = ("validate", splits["validate"]) if "validate" in splits else ("eval", splits["eval"])
        done = {v: variants[v] for v in names if summary.steps.get(f"{prefix}:{v}", {}).get("status") == "done"}
        if not done:
            raise StageError("no variant was scored on the validation split: nothing to choose from")
        if prefix == "eval" and compared and compared[-1]["variants"]:
            # The report's split is validation: the comparison already compared these variants
            # there, into the same folder (scoring a variant without a manifest again otherwise).
            result = compared[-1]
        else:
            result = evaluate_variants(
                eval_config, done, data, out, tokenizer_uri=layout.tokenizer, split=split, trust_remote_code=config.trust_remote_code
            )
        best = best_variant(result["comparison"])
        best["model"] = stage_uris.get(best["variant"], variants.get(best["variant"]))
        best["scores"] = {name: r.get("score") for name, r in result["variants"].items()}
        # What the choice was made among: a stage retrained since (`alloylm train`, `run --only`)
        # makes it stale (`stale_best`).
        best["fingerprints"] = _stage_fingerprints(config, [v for v in done if v in config.stages])
        # and their builds: one deleted and trained again keeps its fingerprint, not (on a GPU) its weights
        best["builds"] = _stage_builds(config, list(best["fingerprints"]))
        storage.write_json(layout.best, best)
        summary.best = best
        log.info("best on validation: %s (score %s; within noise: %s)", best["variant"], best["score"], ", ".join(best["within_noise"]) or "none")
        return best

    # On the validation split itself the selection takes the comparison's result (above).
    steps["selection"] = Step(
        "selection", select, after=tuple(f"validate:{v}" for v in names) if "validate" in splits else ("comparison",)
    )

    def report() -> dict:
        searches = {n: layout.search_results(n) for n, s in config.stages.items() if s.kind == "merge_search"}
        training = {n: stage_uris[n] for n in config.stages if _kind(config, n).command == "train"}  # loss curves
        summary.report = render_report(
            layout.eval, layout.report, stages=training, searches=searches, title=f"AlloyLM: {config.experiment}",
            dag=stage_dag(config), best=(summary.best or {}).get("variant"), variants=names,
        )
        return summary.report

    steps["report"] = Step("report", report, after=("comparison", "selection"))


# ------------------------------------------------------------------------------ running it


def _fits(needs: dict[str, float], free: dict[str, float]) -> bool:
    return all(amount <= free.get(resource, 0) + 1e-9 for resource, amount in needs.items())


def run_graph(
    steps: dict[str, Step],
    summary: RunSummary,
    *,
    capacity: dict[str, float],
    max_parallel: int | None,
    halt: Callable[[], str | None] | None = None,
) -> None:
    """Run every step once its parents are done and its resources fit; record each outcome in `summary.steps`.

    `halt` is asked before steps are started: a reason it returns (the run's lease was lost) starts
    none more, marks every waiting step not run with it, and waits for the running ones."""
    global _free_pool
    scheduler = _Scheduler(steps, summary, capacity, max_parallel or max(1, len(steps)), halt)
    _free_pool = scheduler.free
    try:
        scheduler.run()
    finally:
        _free_pool = None


class _Scheduler:
    def __init__(
        self, steps: dict[str, Step], summary: RunSummary, capacity: dict[str, float], workers: int, halt: Callable[[], str | None] | None = None
    ) -> None:
        self.steps, self.summary, self.capacity, self.workers = steps, summary, capacity, workers
        self.halt = halt
        self.order = list(steps)
        self.waiting = set(self.order)
        self.running: dict[Future, str] = {}
        self.free = dict(capacity)

    def status(self, key: str) -> str | None:
        return self.summary.steps.get(key, {}).get("status")

    @staticmethod
    def _execute(step: Step) -> Any:
        token = _current_step.set(step.key)
        try:
            return step.run()
        finally:
            _current_step.reset(token)

    def _waiting(self) -> list[str]:
        return [k for k in self.order if k in self.waiting]

    def _skip_broken(self) -> None:
        """Steps whose parent failed (or was not run) will never run: say so, and why."""
        for key in self._waiting():
            broken = [p for p in self.steps[key].parents if self.status(p) in ("failed", "not run")]
            if broken:
                self.waiting.discard(key)
                self.summary.steps[key] = {"status": "not run", "error": f"not run: {broken[0]} did not finish"}
                log.warning("%s: not run, because %s did not finish", key, broken[0])

    def _ready(self, step: Step) -> bool:
        parents_done = all(self.status(p) == "done" for p in step.parents if p in self.steps)
        after_finished = all(self.status(a) not in (None, "running") for a in step.after if a in self.steps)
        return parents_done and after_finished

    def _start_ready(self, pool: ThreadPoolExecutor) -> None:
        exclusive_running = any(self.steps[k].exclusive for k in self.running.values())
        for key in self._waiting():
            step = self.steps[key]
            if exclusive_running or len(self.running) >= self.workers:
                return
            if not self._ready(step) or (step.exclusive and self.running) or not _fits(step.needs, self.free):
                continue
            for resource, amount in step.needs.items():
                self.free[resource] = self.free.get(resource, 0) - amount
            self.waiting.discard(key)
            self.summary.steps[key] = {"status": "running", "started": time.time()}
            log.info("%s: started%s", key, f" ({', '.join(f'{v:g} {k}' for k, v in step.needs.items())})" if step.needs else "")
            self.running[pool.submit(self._execute, step)] = key
            exclusive_running = step.exclusive

    def _finish(self, future: Future) -> None:
        key = self.running.pop(future)
        for resource, amount in self.steps[key].needs.items():
            self.free[resource] = self.free.get(resource, 0) + amount
        entry = self.summary.steps[key]
        entry["seconds"] = round(time.time() - entry.pop("started"), 1)
        error = future.exception()
        if error is None:
            entry["status"] = "done"
            log.info("%s: done in %.1f s", key, entry["seconds"])
            return
        entry["status"] = "failed"
        entry["error"] = str(error) if isinstance(error, AlloyLMError) else f"{type(error).__name__}: {error}"
        if not isinstance(error, AlloyLMError):
            log.error("%s failed:\n%s", key, "".join(traceback.format_exception(error)))
        log.error("%s: failed: %s", key, entry["error"])

    def run(self) -> None:
        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="alloylm-step") as pool:
            try:
                self._loop(pool)
            except KeyboardInterrupt:
                self._interrupted()
                raise

    def _interrupted(self) -> None:
        """Ctrl-C: start nothing more and wait for the running steps (their artifacts stay whole);
        a second Ctrl-C stops the process at once. Without this the executor waited silently, and a
        second Ctrl-C released the run's lease while the steps' threads kept training, so another
        `alloylm run` could take the lease and write beside them."""
        for key in self._waiting():
            self.waiting.discard(key)
            self.summary.steps[key] = {"status": "not run", "error": "not run: interrupted"}
        if not self.running:
            return
        names = ", ".join(sorted(self.running.values()))
        log.warning("interrupted: no more steps start; waiting for the running ones (%s) to finish; Ctrl-C again stops now", names)
        try:
            wait(list(self.running))
        except KeyboardInterrupt:
            import os

            # Not a clean exit, which would join the step threads (Python waits for them) after
            # the lease was released: the process ends now, as if killed. Its lease is taken over
            # once run.lease_ttl_seconds pass without a heartbeat; a stage's checkpoints stay, and
            # its half-written staging is never taken for an artifact.
            log.error("stopped while %s ran; a rerun resumes them (the lease frees after run.lease_ttl_seconds)", names)
            logging.shutdown()
            os._exit(130)
        for future in list(self.running):
            self._finish(future)

    def _loop(self, pool: ThreadPoolExecutor) -> None:
        while self.waiting or self.running:
            self._skip_broken()
            reason = self.halt() if self.halt is not None else None
            if reason:
                for key in self._waiting():
                    self.waiting.discard(key)
                    self.summary.steps[key] = {"status": "not run", "error": f"not run: {reason}"}
                    log.error("%s: not run: %s", key, reason)
            else:
                self._start_ready(pool)
            if not self.running and not self.waiting:
                return
            if not self.running:
                for key in self._waiting():  # nothing can ever start: needs beyond the cluster
                    self.waiting.discard(key)
                    needs = self.steps[key].needs
                    self.summary.steps[key] = {"status": "failed", "error": f"needs {needs}, more than the cluster's {self.capacity}"}
                return
            done, _ = wait(list(self.running), return_when=FIRST_COMPLETED)
            for future in done:
                self._finish(future)


def run_pipeline(
    config: RunConfig,
    *,
    only: list[str] | None = None,
    serve: bool = False,
    on_summary: Callable[[RunSummary], None] | None = None,
    wait_for_lease: bool = False,
) -> RunSummary:
    """Run the whole artifact graph of `config` (or `only` these stages and their ancestors).

    Holds the run's lease while it writes (`alloylm.lease`: a second writer fails at once, or
    waits with `wait_for_lease`). Returns the summary; `summary.ok` is False when any step failed.
    With `serve`, and only when nothing failed, then serves the `serve:` variants until
    interrupted (after `on_summary`; serving only reads, and holds no lease).
    """
    import ray

    from alloylm.cluster import check_storage_shared, connect_ray
    from alloylm.lease import RunLease

    lease = RunLease(config.run_uri, "run", ttl=config.run.lease_ttl_seconds)
    if not wait_for_lease:
        lease.refuse_if_held()  # another writer: fail at once, not after starting a Ray cluster
    names = sorted(_with_ancestors(config, only)) if only else config.stage_order()
    check_merge_stages(config, names)  # not after hours of training the parents
    # A stage the cluster can never hold fails the run before anything is written, the lease included.
    connect_ray()
    capacity = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
    check_stage_resources(config, names, have=capacity)
    check_stage_memory(config, names, capacity.get("GPU", 0))
    if config.evaluate is not None and not only:
        from alloylm.evaluate.runner import check_eval_resources

        check_eval_resources(config.evaluate, ray.cluster_resources())  # not after every stage has trained
    check_storage_shared(config.storage)  # a folder some node does not see: before anything is written there
    with lease.held(wait=wait_for_lease):
        summary = _run(config, only, capacity, halt=lambda: LEASE_LOST if lease.lost else None)
        if lease.lost:  # also when it was lost while the last steps ran
            summary.steps["lease"] = {"status": "failed", "error": LEASE_LOST}
    if on_summary is not None:
        on_summary(summary)
    if serve and summary.ok:
        serve_variants(config)
    return summary


LEASE_LOST = (
    "the run's lease was lost (its heartbeat stalled past run.lease_ttl_seconds and another `alloylm run` took "
    "it over): no more steps are started; run again once the other writer has finished"
)


def _run(config: RunConfig, only: list[str] | None, capacity: dict[str, float], halt: Callable[[], str | None] | None = None) -> RunSummary:
    started = time.monotonic()
    summary = RunSummary(experiment=config.experiment, run=config.run_uri)
    steps = build_graph(config, summary, only=only, capacity=capacity)
    log.info("run %s: %d steps on %s", config.experiment, len(steps), ", ".join(f"{v:g} {k}" for k, v in capacity.items()))
    run_graph(steps, summary, capacity=capacity, max_parallel=config.run.max_parallel_stages, halt=halt)
    summary.seconds = round(time.monotonic() - started, 1)
    return summary


def serve_variants(config: RunConfig) -> None:
    """Deploy the run's `serve:` variants on the current Ray cluster and block until Ctrl-C."""
    from alloylm.cluster import check_models_on_every_node, connect_ray
    from alloylm.serve import ServeConfig, serve_run, variant_sources

    serve_config = resolve_best(config, config.serve or ServeConfig())
    try:
        sources = variant_sources(serve_config, config.run_uri)
    except ValueError as exc:
        raise ServeError(str(exc)) from None
    connect_ray()
    check_serve_resources(serve_config)
    check_models_on_every_node(sources, needs_gpu=serve_config.deployment.num_gpus > 0)
    serve_run(serve_config, sources, blocking=True)


def _stage_fingerprints(config: RunConfig, names: list[str]) -> dict[str, str | None]:
    from alloylm import storage

    layout = RunLayout.of(config)
    return {name: (storage.read_manifest(layout.stage(name)) or {}).get("fingerprint") for name in names}


def _stage_builds(config: RunConfig, names: list[str]) -> dict[str, str]:
    from alloylm.artifact import input_versions

    layout = RunLayout.of(config)
    return input_versions({name: layout.stage(name) for name in names})


def stale_best(config: RunConfig, best: dict) -> str | None:
    """Why `best` (eval/best.json) no longer holds, or None: a stage it was chosen among has changed
    (its fingerprint, or its build where the choice recorded builds)."""
    recorded = best.get("fingerprints")
    if recorded is None:
        return None  # written before fingerprints were recorded: nothing to check it against
    now = _stage_fingerprints(config, [name for name in recorded if name in config.stages])
    changed = {name for name in recorded if now.get(name) != recorded[name]}
    builds = best.get("builds")
    if builds is not None:
        current = _stage_builds(config, [name for name in builds if name in config.stages])
        changed |= {name for name in builds if current.get(name) != builds[name]}
    changed = sorted(changed)
    if changed:
        return f"it was chosen among models that have changed since ({', '.join(changed)})"
    return None


def resolve_best(config: RunConfig, serve_config):
    """`serve.model: best` -> the variant `<run>/eval/best.json` names (chosen on validation by `alloylm run`)."""
    from alloylm import storage
    from alloylm.serve.config import BEST, ChosenVariant

    if serve_config.model != BEST:
        return serve_config
    uri = RunLayout.of(config).best
    try:
        best = storage.read_json(uri)
    except storage.StorageError:
        raise ServeError(
            f"serve.model: best serves the variant the run's validation comparison chose, and {uri} does not exist yet; "
            "run `alloylm run CONFIG` first (or name a variant in serve.model)"
        ) from None
    stale = stale_best(config, best)
    if stale:
        raise ServeError(f"serve.model: best: {uri} is stale: {stale}; run `alloylm run CONFIG` to choose again (or name a variant in serve.model)")
    chosen = ChosenVariant(**{k: best.get(k) for k in ("variant", "score", "score_definition") if best.get(k) is not None},
                           within_noise=best.get("within_noise") or [])
    log.info("serve: `best` is %s (validation score %s)", chosen.variant, chosen.score)
    resolved = serve_config.with_chosen(chosen)
    if chosen.variant not in config.stages and chosen.variant not in resolved.sources and best.get("model"):
        # A model from outside the run (`evaluate.variants: [instruct=meta-llama/...]`) won: serve it
        # from where it was scored, since the run has no stage folder of that name.
        resolved = resolved.with_sources({chosen.variant: best["model"]})
    return resolved


def check_serve_resources(serve_config) -> None:
    """Refuse a deployment the cluster can never schedule, instead of waiting for it forever."""
    import ray

    deployment, ingress = serve_config.deployment, serve_config.ingress
    autoscaling = deployment.autoscaling
    replicas = deployment.num_replicas if autoscaling is None else (autoscaling.initial_replicas or autoscaling.min_replicas)
    variants = len(serve_config.variant_names)
    need = {
        "CPU": variants * replicas * deployment.num_cpus + ingress.num_replicas * ingress.num_cpus,
        "GPU": variants * replicas * deployment.num_gpus,
    }
    have = ray.cluster_resources()
    for resource, amount in need.items():
        if amount > have.get(resource, 0) + 1e-9:
            raise ServeError(
                f"serve: {variants} variant(s) x {replicas} replica(s) x serve.deployment.num_{resource.lower()}s "
                f"plus the ingress need {amount:g} {resource}s, but the Ray cluster has {have.get(resource, 0):g}; "
                "lower serve.deployment.num_cpus / num_gpus or serve fewer variants"
            )
