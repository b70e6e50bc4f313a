"""lm-evaluation-harness tasks as an evaluation suite: every variant runs the configured tasks in
process, through lm-eval's own HF model class (`HFLM`) wrapped around the model and tokenizer the
other suites already loaded, so the tasks' scores sit beside the domain scores as "general
retention" columns.

Tasks come from `include_path` (local task YAMLs, e.g. what `export_lm_eval_task` writes) or from
lm-eval's installed tasks. Their data is read offline only (local files or the Hugging Face
cache): while lm-eval builds tasks and runs, Hugging Face offline mode is on, and a task whose
data is not there fails with an `EvaluationInputError` naming it.

Each doc's per-doc metric values (lm-eval's logged samples) are kept, so the comparison computes
intervals and paired differences with the same bootstrap as every other suite: a task's `acc` is
the ratio of its docs' summed `acc` to their count, resampled over all the suite's docs (each
doc on its own). lm-eval's stderr is used only for metrics that are not a mean over docs
(perplexities, corpus-level scores): value +- 1.96 stderr.

lm-eval is imported only when the suite runs or its config is checked.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from alloylm.evaluate.prepared import EvaluationInputError

SUITE = "lm_eval"
TASKS_KEY = "evaluate.suites.lm_eval.tasks"
_TASK_FILES = (".yaml", ".yml", ".py", ".jinja")


@dataclass(frozen=True)
class HarnessDoc:
    """One doc an lm-eval task scores: the task and the doc's position in its evaluation split (lm-eval's doc_id)."""

    task: str
    index: int


# ------------------------------------------------------------------------------ tasks


def _local_folder(include_path: str | None) -> str | None:
    return os.path.abspath(os.path.expanduser(include_path.removeprefix("file://"))) if include_path else None


def _folder_signature(folder: str | None) -> tuple:
    """What identifies a task folder's contents (names, sizes, mtimes): a changed YAML is re-indexed."""
    if folder is None:
        return ()
    entries = []
    for root, _, files in os.walk(folder):
        for name in sorted(files):
            if name.endswith(_TASK_FILES):
                stat = os.stat(os.path.join(root, name))
                entries.append((os.path.join(root, name), stat.st_size, stat.st_mtime_ns))
    return tuple(sorted(entries))


@functools.lru_cache(maxsize=8)
def _cached_task_manager(folder: str | None, defaults: bool, signature: tuple):
    from lm_eval.tasks import TaskManager

    # Indexing lm-eval's own ~15k task YAMLs takes seconds: done once per process and folder state.
    return TaskManager(include_path=folder, include_defaults=defaults)


def _task_manager(tasks: Sequence[str], include_path: str | None):
    """(lm-eval TaskManager, names it does not know). Only `include_path` is indexed when it holds every name."""
    folder = _local_folder(include_path)
    signature = _folder_signature(folder)
    if folder is not None:
        manager = _cached_task_manager(folder, False, signature)
        if all(name in manager.task_index for name in tasks):
            return manager, []
    manager = _cached_task_manager(folder, True, signature)
    return manager, [name for name in tasks if name not in manager.task_index]


def unknown_tasks(tasks: Sequence[str], include_path: str | None = None) -> list[str]:
    """The names in `tasks` that are neither tasks, groups nor tags of lm-eval or of `include_path`.

    Raises ImportError when lm-eval is not installed.
    """
    return _task_manager(tasks, include_path)[1]


def unknown_tasks_message(unknown: Sequence[str], include_path: str | None) -> str:
    """What is wrong with `unknown` task names, for `evaluate.suites.lm_eval.tasks: <message>`."""
    where = f" or those of {include_path!r}" if include_path else " (no include_path given)"
    return f"{', '.join(repr(n) for n in unknown)} not among lm-eval's installed tasks{where}"


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Hugging Face offline mode (what HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1 set at import) for a block."""
    import datasets.config
    import huggingface_hub.constants as hub_constants

    saved = (datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE, hub_constants.HF_HUB_OFFLINE)
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def load_tasks(tasks: Sequence[str], include_path: str | None = None, *, split: str | None = None) -> dict:
    """Leaf task name -> lm-eval Task (data loaded, offline) for every name in `tasks` (groups and tags expanded).

    `split` "validation": each task that has both a test and a validation split is scored on its
    validation split (`_on_validation`); otherwise (test, or none given) lm-eval's rule stands, its
    test split, else its validation split.

    Raises EvaluationInputError naming `evaluate.suites.lm_eval.tasks` and the task: an unknown
    name, data not available offline, or any other failure to build the task.
    """
    try:
        manager, unknown = _task_manager(tasks, include_path)
    except ImportError as exc:
        raise EvaluationInputError(f"{TASKS_KEY}: lm-eval cannot be imported ({exc}); install it (pip install lm_eval)") from None
    if unknown:
        raise EvaluationInputError(f"{TASKS_KEY}: {unknown_tasks_message(unknown, include_path)}")
    loaded: dict = {}
    for name in tasks:
        try:
            with _offline():
                built = manager.load([name])["tasks"]
        except (ConnectionError, FileNotFoundError) as exc:
            # datasets raises ConnectionError (OfflineModeIsEnabled) for a Hub data set not in the cache,
            # FileNotFoundError for a missing local data file.
            raise EvaluationInputError(
                f"{TASKS_KEY}: task {name!r}: its data is not available offline ({type(exc).__name__}: {exc}); "
                "put it in the Hugging Face cache or point the task at local files"
            ) from None
        except Exception as exc:  # a broken task YAML, a task needing code or packages that are not here
            raise EvaluationInputError(f"{TASKS_KEY}: task {name!r} cannot be built: {type(exc).__name__}: {exc}") from None
        loaded.update(built)
    if split == "validation":
        for task in loaded.values():
            _on_validation(task)
    return loaded


def _on_validation(task) -> None:
    """Score `task` on its validation split where it also has a test split: lm-eval scores a task
    on its test split whenever it has one (`eval_docs`), and a validation evaluation chooses the
    best variant and steers the merge search, which must never see the test docs."""
    if task.has_test_docs() and task.has_validation_docs():
        task.config.test_split = None  # eval_docs is then the validation docs


def _eval_split(task) -> str | None:
    config = task.config
    return config.test_split if task.has_test_docs() else getattr(config, "validation_split", None)


def load_harness_docs(suite, *, max_items: int | None = None, split: str | None = None) -> tuple[list[HarnessDoc], str]:
    """(the docs the suite scores, a fingerprint of the tasks' configs and those docs' contents).

    `suite` is the LmEvalConfig, `split` the evaluation's (`load_tasks`). Each task gives its first
    `limit` docs (lm-eval's `--limit` rule); the tasks' docs are then taken in turn (one of each
    task, then the next of each), so a `max_items` cap or a merge search's first fraction keeps
    every task represented.

    Raises EvaluationInputError for a validation evaluation that would score a weighted task
    (`weight` > 0) on its test split, because it has no validation split: that score would choose
    the best variant on test docs.
    """
    problem = suite.include_problem()
    if problem:
        raise EvaluationInputError(f"evaluate.suites.lm_eval.include_path: {problem}")
    tasks = load_tasks(suite.tasks, suite.include_path, split=split)
    on_test = [name for name, task in tasks.items() if task.has_test_docs()]
    if split == "validation" and suite.weight > 0 and on_test:
        raise EvaluationInputError(
            f"{TASKS_KEY}: task(s) {', '.join(on_test)} have a test split and no validation split: with "
            f"evaluate.suites.lm_eval.weight {suite.weight} their test docs would choose the best variant (and steer a merge "
            "search); use tasks with a validation split, or weight 0 to report them as retention columns only"
        )
    per_task: dict[str, list[int]] = {}
    digest = hashlib.sha256()
    for name, task in tasks.items():
        docs = task.eval_docs
        count = suite.limit_for(len(docs))
        if count == 0:
            raise EvaluationInputError(f"{TASKS_KEY}: task {name!r} has no docs in its evaluation split {_eval_split(task)!r}")
        per_task[name] = list(range(count))
        # A config may hold functions (process_docs, ...): their repr's address changes every process.
        config = re.sub(r" at 0x[0-9a-fA-F]+", "", json.dumps([name, task.dump_config()], sort_keys=True, default=str))
        digest.update(config.encode("utf-8"))
        for index in per_task[name]:
            digest.update(json.dumps(docs[index], sort_keys=True, default=str).encode("utf-8"))
    interleaved = [
        HarnessDoc(name, indices[k])
        for k in range(max(len(v) for v in per_task.values()))
        for name, indices in per_task.items()
        if k < len(indices)
    ]
    return (interleaved[:max_items] if max_items else interleaved), digest.hexdigest()


# ------------------------------------------------------------------------------ running


def _flat(metric: str, filter_name: str) -> str:
    # lm-eval's `acc,none` is `acc`; a filtered metric keeps its filter: `exact_match,strict-match`.
    return metric if filter_name == "none" else f"{metric},{filter_name}"


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _json_safe(value):
    return json.loads(json.dumps(value, default=str))


def _first_max(values: Sequence[float]) -> int:
    # numpy.argmax's rule, which lm-eval's multiple-choice `acc` uses: the first of equal maxima.
    return max(range(len(values)), key=lambda i: (values[i], -i))


def _doc_rows(task_name: str, task, samples: Sequence[Mapping], means: set[str]) -> list[dict]:
    """One row per doc: its per-doc metric values (`scores`, mean-aggregated metrics only) and responses."""
    rows: dict[int, dict] = {}
    multiple_choice = task.OUTPUT_TYPE == "multiple_choice"
    for sample in samples:
        doc = sample.get("doc")
        row = rows.setdefault(
            int(sample["doc_id"]),
            {
                "task": task_name,
                "doc_id": int(sample["doc_id"]),
                "id": doc.get("id") if isinstance(doc, Mapping) else None,
                "target": _json_safe(sample.get("target")),
                "scores": {},
                "other": {},
                "responses": {},
            },
        )
        filter_name = sample.get("filter", "none")
        responses = sample.get("filtered_resps")
        row["responses"][filter_name] = _json_safe(responses)
        if multiple_choice and filter_name == "none" and responses:
            row["loglikelihoods"] = [float(r[0]) for r in responses]
            row["predicted"] = _first_max(row["loglikelihoods"])
        for metric in sample.get("metrics", []):
            value = _number(sample.get(metric))
            if metric in means and value is not None:
                row["scores"][_flat(metric, filter_name)] = value
            else:
                row["other"][_flat(metric, filter_name)] = _json_safe(sample.get(metric))
    return [rows[k] for k in sorted(rows)]


def run_lm_eval(scorer, docs: Sequence[HarnessDoc], suite, *, seed: int = 0, split: str | None = None) -> tuple[dict, list[dict]]:
    """Run `suite`'s tasks (an LmEvalConfig) on `docs` (of the evaluation's `split`: `load_tasks`)
    with the scorer's model and tokenizer: (metrics, per-doc details).

    Metrics: `<task>/<metric>` as lm-eval reports it (`acc`, `acc_norm`, ...), each mean metric
    also pooled over every task's docs (`acc`), `stderr` (lm-eval's, by the same keys),
    `higher_is_better`, and per task its split, docs and few-shot count.
    """
    import lm_eval
    from lm_eval.api.metrics import mean
    from lm_eval.models.huggingface import HFLM

    from alloylm.evaluate.intervals import RESAMPLES

    if not docs:
        raise EvaluationInputError(f"{TASKS_KEY}: no docs to score")
    wanted: dict[str, list[int]] = {}
    for doc in docs:
        wanted.setdefault(doc.task, []).append(doc.index)
    tasks = load_tasks(suite.tasks, suite.include_path, split=split)
    missing = sorted(set(wanted) - set(tasks))
    if missing:
        raise EvaluationInputError(f"{TASKS_KEY}: the docs name task(s) {', '.join(missing)}, which the configured tasks do not hold")
    model = HFLM(
        pretrained=scorer.model,
        # A copy: HFLM sets a pad token and padding side on the tokenizer it is given.
        tokenizer=copy.deepcopy(scorer.tokenizer),
        batch_size=scorer.batch_size,
        max_length=scorer.max_length,
    )
    manager, _ = _task_manager(suite.tasks, suite.include_path)
    with _offline():
        output = lm_eval.simple_evaluate(
            model=model,
            tasks=[tasks[name] for name in wanted],
            num_fewshot=suite.num_fewshot,
            # lm-eval maps the k-th selected doc (in split order) to samples[k]: the indices must be sorted.
            samples={name: sorted(indices) for name, indices in wanted.items()},
            log_samples=True,
            bootstrap_iters=RESAMPLES,
            task_manager=manager,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    results, logged = output["results"], output.get("samples") or {}
    higher = output.get("higher_is_better") or {}
    shots = output.get("n-shot") or {}
    metrics: dict = {"items": len(docs), "harness": f"lm-eval {getattr(lm_eval, '__version__', '?')}", "tasks": {}}
    stderr: dict[str, float] = {}
    higher_is_better: dict[str, bool] = {}
    details: list[dict] = []
    for name, indices in wanted.items():
        task = tasks[name]
        means = {metric for metric, function in task.aggregation().items() if function is mean}
        metrics["tasks"][name] = {
            "split": _eval_split(task),
            "items": len(indices),
            "num_fewshot": shots.get(name),
            "output_type": task.OUTPUT_TYPE,
        }
        for key, value in (results.get(name) or {}).items():
            metric, sep, filter_name = key.partition(",")
            if not sep:
                continue  # alias, sample_len
            if metric.endswith("_stderr"):
                if _number(value) is not None:
                    stderr[f"{name}/{_flat(metric.removesuffix('_stderr'), filter_name)}"] = _number(value)
                continue
            if _number(value) is not None:
                metrics[f"{name}/{_flat(metric, filter_name)}"] = _number(value)
                higher_is_better[f"{name}/{_flat(metric, filter_name)}"] = bool((higher.get(name) or {}).get(metric, True))
        details += _doc_rows(name, task, logged.get(name) or [], means)
    # Each mean metric over every task's docs: the suite's headline (`objective_metric`) when weighted.
    totals: dict[str, list[float]] = {}
    for row in details:
        for metric, value in row["scores"].items():
            totals.setdefault(metric, []).append(value)
    for metric, values in totals.items():
        metrics[metric] = sum(values) / len(values)
        higher_is_better.setdefault(metric, next((v for k, v in higher_is_better.items() if k.endswith(f"/{metric}")), True))
    metrics["stderr"] = stderr
    metrics["higher_is_better"] = higher_is_better
    return metrics, details
