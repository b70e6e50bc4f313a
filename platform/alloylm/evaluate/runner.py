"""Scoring variants: the inputs loaded and checked once, each variant scored by its own Ray task
(fractional CPUs, so small variants share a node), results written atomically per variant, then
the comparison of all of them.

Layout under `out_uri` (normally `<run>/eval`): `<variant>/results.json` plus one `<suite>.jsonl`
of per-item details each (judge prompts and raw answers included), `<variant>/manifest.json` last;
`comparison.json` and `comparison.md` beside them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field

from alloylm import storage
from alloylm.evaluate.benchmark import BenchmarkItem, load_benchmark, select_items
from alloylm.evaluate.comparison import aggregate_score, build_comparison, comparison_markdown, merge_parents, score_definition, score_interval
from alloylm.evaluate.intervals import METHOD, samples_from_details, suite_intervals
from alloylm.evaluate.config import SCORING_VERSION, SUITE_NAMES, EvalConfig, variant_name, variant_source
from alloylm.evaluate.judge import JudgeQuestion, load_judge_questions, questions_from_benchmark, run_judge
from alloylm.evaluate.lm_eval_suite import HarnessDoc, load_harness_docs, run_lm_eval
from alloylm.evaluate.multiple_choice import run_multiple_choice
from alloylm.evaluate.perplexity import TextBlock, load_text_blocks, run_perplexity, split_blocks
from alloylm.evaluate.prepared import EvaluationInputError
from alloylm.evaluate.short_answer import run_short_answer

log = logging.getLogger("alloylm.evaluate")
RESULTS_NAME = "results.json"


@dataclass(frozen=True)
class EvalData:
    """Everything a variant is scored on, for one split: loaded and checked once, shared by every task."""

    split: str
    multiple_choice: list[BenchmarkItem] = field(default_factory=list)
    short_answer: list[BenchmarkItem] = field(default_factory=list)
    domain_perplexity: list[TextBlock] = field(default_factory=list)
    general_perplexity: list[TextBlock] = field(default_factory=list)
    judge: list[JudgeQuestion] = field(default_factory=list)
    lm_eval: list[HarnessDoc] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)  # suite -> data URI (lm_eval: its tasks, in words)
    fingerprints: dict[str, str | None] = field(default_factory=dict)  # data URI -> manifest fingerprint
    tokenizer_uri: str | None = None  # the tokenizer that wrote the text blocks

    def rung(self, fraction: float, seed: int) -> EvalData:
        """`fraction` of every suite's items (at least one each), drawn with `seed`, kept in file
        order: the merge search's ASHA rungs.

        Drawn, not the first ones: the files are ordered (the benchmark by material), so a prefix
        would judge a trial at its first rung on a few materials only. One order per suite and seed,
        so a smaller fraction's items are among a larger one's and every trial sees the same items.
        """
        cut = {}
        for name in SUITE_NAMES:
            items = getattr(self, name)
            order = random.Random(f"{seed}:rung:{name}").sample(range(len(items)), len(items))
            keep = sorted(order[: max(1, math.ceil(fraction * len(items)))]) if items else []
            cut[name] = [items[i] for i in keep]
        return dataclasses.replace(self, **cut)

    def sizes(self) -> dict[str, int]:
        """Items per suite."""
        return {name: len(getattr(self, name)) for name in SUITE_NAMES}


# ------------------------------------------------------------------------------ inputs


def data_uris(eval_config: EvalConfig, run_uri: str) -> dict[str, str]:
    """`<run>/data/<name>` for every data set an enabled suite names (what `alloylm data` wrote)."""
    names = {suite.dataset for suite in eval_config.suites.enabled().values() if hasattr(suite, "dataset")}
    from alloylm.layout import RunLayout

    layout = RunLayout(run_uri)
    return {name: layout.dataset(name) for name in sorted(names)}


def resolve_variants(eval_config: EvalConfig, stages: Mapping[str, str]) -> dict[str, str]:
    """Variant name -> model URI: a stage name maps to its artifact in `stages`, anything else is a model source."""
    resolved = {}
    for entry in eval_config.variants:
        source = variant_source(entry)
        resolved[variant_name(entry)] = stages.get(source, source)
    return resolved


def _model_folder_problem(source: str, files: list[str]) -> str | None:
    # Only the folder's own files: a checkpoint sub-folder's config.json does not make a model.
    prefix = storage.resolve(source).rstrip("/") + "/"
    names = {f[len(prefix) :] for f in files if f.startswith(prefix) and "/" not in f[len(prefix) :]}
    if not names:
        return "nothing is there"
    if "config.json" not in names:
        return f"no config.json (it holds: {', '.join(sorted(names)[:10])})"
    if not any(n.endswith(".safetensors") or n == "model.safetensors.index.json" for n in names):
        return f"no safetensors weights (it holds: {', '.join(sorted(names)[:10])})"
    return None


def check_variant_sources(variants: Mapping[str, str]) -> None:
    """Raise EvaluationInputError naming every variant whose local or s3:// path holds no model.

    Hugging Face ids are not checked here (it needs the network); their tasks report a failure.
    """
    from alloylm.models.loading import classify_source

    problems = []
    for name, source in variants.items():
        try:
            kind = classify_source(source)
            if kind == "hub":
                continue
            if kind == "local" and not storage.exists(source.removeprefix("file://")):
                problem = "the path does not exist"
            else:
                problem = _model_folder_problem(source, storage.list_files(source.removeprefix("file://")))
        except (ValueError, storage.StorageError) as exc:
            problem = str(exc)
        if problem:
            problems.append(f"variant {name!r} ({source}): {problem}")
    if problems:
        raise EvaluationInputError("no model at these variant paths:\n  " + "\n  ".join(problems))


def _source_fingerprint(uri: str) -> str | None:
    """What identifies an evaluation source in the results' fingerprint: a prepared data set's
    manifest fingerprint; for a file given as it is (a benchmark or judge questions .jsonl) or a
    folder without a manifest, its files' sizes and modification times (ETags on S3), so an edited
    file makes the results made from it stale instead of being reused. None: nothing there."""
    from alloylm.artifact import fingerprint

    if not uri.lower().endswith((".jsonl", ".json", ".parquet")):
        try:
            manifest = storage.read_manifest(uri)
        except storage.StorageError:
            manifest = None
        if manifest and manifest.get("fingerprint"):
            from alloylm.data.prepare import content_fingerprint

            return content_fingerprint(manifest)
    try:
        listing = storage.file_signatures(uri)
    except storage.StorageError:
        return None
    return fingerprint("evaluation-source", listing) if listing else None


def load_eval_data(
    eval_config: EvalConfig, data: Mapping[str, str], *, split: str | None = None, tokenizer_uri: str | None = None
) -> EvalData:
    """Load and check what every enabled suite scores on `split` (default: the config's split).

    `data` maps the data set names the suites use (`domain-benchmark`, ...) to their URIs: prepared
    data set folders, or for a benchmark also a .jsonl/.json/.parquet file. Raises
    EvaluationInputError for a missing data set or a malformed item, naming the file and item.
    """
    split = split or eval_config.split
    if tokenizer_uri and not storage.exists(storage.join(tokenizer_uri, "tokenizer_config.json")):
        raise EvaluationInputError(f"no tokenizer at {tokenizer_uri} (tokenizer_config.json missing); run `alloylm data CONFIG` first")
    suites = eval_config.suites.enabled()
    needed = {name: s.dataset for name, s in suites.items() if name != "lm_eval" and not (name == "judge" and s.questions)}
    unknown = sorted({d for d in needed.values() if d not in data})
    if unknown:
        raise EvaluationInputError(
            f"data set(s) {', '.join(unknown)} named by the evaluation suites are not given (given: {', '.join(sorted(data)) or 'none'})"
        )
    benchmarks: dict[str, list[BenchmarkItem]] = {}

    def benchmark(uri: str) -> list[BenchmarkItem]:
        if uri not in benchmarks:
            benchmarks[uri] = load_benchmark(uri)
        return benchmarks[uri]

    loaded: dict[str, list] = {}
    sources: dict[str, str] = {}
    task_fingerprints: dict[str, str] = {}
    for name, suite in suites.items():
        cap = eval_config.suite_max_items(name)
        if name == "lm_eval":
            # The tasks are built (their data read, offline) here, once, so a task that cannot be
            # fails the evaluation before any variant is scored.
            loaded[name], task_fingerprint = load_harness_docs(suite, max_items=cap, split=split)
            where = f" from {suite.include_path}" if suite.include_path else ""
            sources[name] = f"lm-eval tasks {', '.join(suite.tasks)}{where}"
            task_fingerprints[sources[name]] = task_fingerprint
            continue
        if name == "judge":
            if suite.questions:
                sources[name] = suite.questions
                questions = [q for q in load_judge_questions(suite.questions) if q.split == split]
                loaded[name] = questions[:cap] if cap else questions
            else:
                sources[name] = data[suite.dataset]
                loaded[name] = questions_from_benchmark(benchmark(data[suite.dataset]), split=split, count=cap or 12, seed=eval_config.seed)
            continue
        uri = sources[name] = data[suite.dataset]
        if name in ("multiple_choice", "short_answer"):
            loaded[name] = select_items(benchmark(uri), split=split, type_=name, max_items=cap, seed=eval_config.seed)
            if not loaded[name]:
                raise EvaluationInputError(f"benchmark {uri} has no {name} items in split {split!r}")
        else:
            loaded[name] = split_blocks(load_text_blocks(uri), split, cap)
            if not loaded[name]:
                raise EvaluationInputError(f"{uri} has too few blocks to give the {split!r} split any (need 2 or more)")
    return EvalData(
        split=split,
        sources=sources,
        fingerprints={uri: task_fingerprints.get(uri) or _source_fingerprint(uri) for uri in sorted(set(sources.values()))},
        tokenizer_uri=tokenizer_uri,
        **loaded,
    )


# ------------------------------------------------------------------------------ one variant


def _suite_run(name: str, eval_config: EvalConfig, scorer, eval_data: EvalData, data_tokenizer):
    suite = getattr(eval_config.suites, name)
    items = getattr(eval_data, name)
    if name == "multiple_choice":
        return (*run_multiple_choice(scorer, items, prompt=suite.prompt, circular=suite.circular, formulation=suite.formulation), None)
    if name == "short_answer":
        return (
            *run_short_answer(
                scorer,
                items,
                prompt=suite.prompt,
                max_new_tokens=suite.max_new_tokens,
                relative_tolerance=suite.relative_tolerance,
                require_unit=suite.require_unit,
                seed=eval_config.seed,
            ),
            None,
        )
    if name in ("domain_perplexity", "general_perplexity"):
        return (*run_perplexity(scorer, items, data_tokenizer=data_tokenizer), None)
    if name == "judge":
        return run_judge(scorer, items, suite, seed=eval_config.seed)
    if name == "lm_eval":
        return (*run_lm_eval(scorer, items, suite, seed=eval_config.seed, split=eval_data.split), None)
    raise ValueError(f"unknown suite {name!r}")


def score_model(
    eval_config: EvalConfig,
    model_uri: str,
    eval_data: EvalData,
    *,
    variant: str | None = None,
    trust_remote_code: bool = False,
    device: str | None = None,
    scorer=None,
) -> tuple[dict, dict[str, list[dict]]]:
    """Score one model on every enabled suite: (results, per-suite item details). No Ray, no writes.

    A suite that fails is reported as failed (with the error) and the others still run; a model
    that cannot be loaded gives status `failed`. The merge search calls this inside its trials
    with `scorer` (a CausalLMScorer over a model merged in memory) instead of loading `model_uri`.
    """
    import torch

    from alloylm.evaluate.scorer import CausalLMScorer

    started = time.monotonic()
    results: dict = {
        "variant": variant or variant_name(model_uri),
        "model": model_uri,
        "split": eval_data.split,
        "seed": eval_config.seed,
        "data": dict(eval_data.sources),
        "config": eval_config.model_dump(mode="json"),
        "suites": {},
    }
    details: dict[str, list[dict]] = {}
    torch.manual_seed(eval_config.seed)
    try:
        scorer = scorer or CausalLMScorer.load(
            model_uri,
            dtype=eval_config.dtype,
            batch_size=eval_config.batch_size,
            max_length=eval_config.max_length,
            device=device,
            trust_remote_code=trust_remote_code,
        )
    except Exception as exc:  # any load failure is this variant's, not the run's
        results.update(status="failed", error=f"cannot load the model at {model_uri}: {type(exc).__name__}: {exc}", score=None)
        results["seconds"] = round(time.monotonic() - started, 3)
        return results, details
    data_tokenizer = None
    if eval_data.tokenizer_uri and (eval_data.domain_perplexity or eval_data.general_perplexity):
        from alloylm.models.loading import load_tokenizer

        data_tokenizer = load_tokenizer(eval_data.tokenizer_uri, trust_remote_code=trust_remote_code)
    for name in eval_config.suites.enabled():
        suite_started = time.monotonic()
        entry: dict = {"dataset": eval_data.sources.get(name)}
        try:
            metrics, suite_details, missing_reason = _suite_run(name, eval_config, scorer, eval_data, data_tokenizer)
            entry.update(status="missing" if missing_reason else "ok", reason=missing_reason, metrics=metrics)
            details[name] = suite_details
            criteria = eval_config.suites.judge.criteria if name == "judge" else ()
            samples = samples_from_details(name, suite_details, criteria)
            if samples is not None and len(samples):
                # Per-unit columns: the comparison recomputes intervals and paired differences from them.
                entry["intervals"] = suite_intervals(name, samples, metrics, seed=eval_config.seed)
                entry["samples"] = samples.to_json()
        except Exception as exc:  # a suite's failure must not cost the other suites' scores
            log.warning("variant %s: suite %s failed: %s", results["variant"], name, exc)
            entry.update(status="failed", reason=f"{type(exc).__name__}: {exc}", metrics={}, traceback=traceback.format_exc(limit=5))
        entry["seconds"] = round(time.monotonic() - suite_started, 3)
        if name in details:
            entry["details"] = f"{name}.jsonl"
        results["suites"][name] = entry
    score, score_missing = aggregate_score(results["suites"], eval_config)
    statuses = {s["status"] for s in results["suites"].values()}
    results.update(
        status="ok" if statuses == {"ok"} else "partial",
        error=None,
        score=score,
        score_missing=score_missing,
        score_definition=score_definition(eval_config),
        score_interval=score_interval(results) if score is not None else None,
        intervals_method=METHOD,
        weights={name: s.weight for name, s in eval_config.suites.enabled().items()},
        seconds=round(time.monotonic() - started, 3),
    )
    return results, details


def model_id(model_uri: str | None) -> str | None:
    """What identifies the weights in a model folder, from its manifest: its fingerprint and
    creation time; None without a manifest. The fingerprint alone names the stage's inputs, not its
    weights: a stage trained again from the same inputs (its folder deleted, a GPU's
    nondeterministic kernels) kept its old evaluation."""
    if not model_uri:
        return None
    try:
        manifest = storage.read_manifest(model_uri) if storage.is_remote(model_uri) or storage.exists(model_uri) else None
    except (storage.StorageError, ValueError):
        manifest = None
    if not manifest:
        return None
    parts = [str(manifest[key]) for key in ("fingerprint", "created_at") if manifest.get(key)]
    return "@".join(parts) or None


def _fingerprint(eval_config: EvalConfig, model_uri: str, model: str | None, eval_data: EvalData) -> str | None:
    """What identifies a variant's results (`model`: its `model_id`); None when the model has no
    manifest (never reused)."""
    from alloylm.artifact import fingerprint

    if model is None:
        return None
    config = eval_config.model_dump(mode="json", exclude={"variants", "resources", "batch_size"})
    return fingerprint("evaluation", SCORING_VERSION, config, eval_data.split, model_uri, model, eval_data.fingerprints)


def _reusable_results(name: str, fp: str | None, out_uri: str) -> dict | None:
    """The results of variant `name` under `out_uri` when they are complete, scored fine and up to
    date with `fp` (`_fingerprint`); else None."""
    if fp is None:
        return None
    from alloylm import artifact

    previous_uri = storage.join(out_uri, name)
    try:
        manifest = artifact.up_to_date(previous_uri, fp)
        if manifest and manifest.get("status") == "ok":
            return {**storage.read_json(storage.join(previous_uri, RESULTS_NAME)), "reused": True}
    except storage.StorageError as exc:
        if isinstance(exc, storage.CorruptFileError) or isinstance(exc.__cause__, ValueError):
            return None  # a file cut short or edited: results are not precious, score again
        raise
    return None


def write_variant_results(out_uri: str, results: dict, details: Mapping[str, list[dict]], *, fingerprint: str | None = None) -> str:
    """Write `<out_uri>/<variant>/` atomically (results.json, <suite>.jsonl, manifest last); returns its URI."""
    from alloylm import artifact

    uri = storage.join(out_uri, results["variant"])
    # Results are recomputed, not precious: a rerun replaces them. A None fingerprint (a model
    # without a manifest, or a failed evaluation) is never taken for up to date.
    with artifact.begin(uri, fingerprint, overwrite=True) as building:
        for suite, rows in details.items():
            storage.write_text(storage.join(building.staging_uri, f"{suite}.jsonl"), "".join(json.dumps(r, default=str) + "\n" for r in rows))
        storage.write_json(storage.join(building.staging_uri, RESULTS_NAME), results)
        building.commit({"kind": "evaluation", "variant": results["variant"], "split": results["split"], "status": results["status"]})
    return uri


def _evaluate_variant_task(
    eval_config: EvalConfig, name: str, model_uri: str, eval_data: EvalData, out_uri: str, trust_remote_code: bool, reuse: bool
) -> dict:
    """Ray task: score one variant and write its results; returns the results."""
    scored = model_id(model_uri)
    fp = _fingerprint(eval_config, model_uri, scored, eval_data)
    previous = _reusable_results(name, fp, out_uri) if reuse else None
    if previous is not None:
        return previous
    # The GPU Ray gave this task, or the CPU. Not "a GPU if one is visible": Ray 2.60 leaves
    # CUDA_VISIBLE_DEVICES alone for a task with no GPUs (ray-project/ray#54868), so an evaluation at
    # `num_gpus: 0` on a GPU node would load its model onto GPU 0 beside whatever holds it.
    import ray

    device = "cuda" if ray.get_gpu_ids() else "cpu"
    results, details = score_model(eval_config, model_uri, eval_data, variant=name, trust_remote_code=trust_remote_code, device=device)
    results["model_fingerprint"] = scored  # the report leaves the results out once the model changes
    write_variant_results(out_uri, results, details, fingerprint=fp if results["status"] == "ok" else None)
    return results


# ------------------------------------------------------------------------------ every variant


def check_eval_resources(eval_config: EvalConfig, have: Mapping[str, float]) -> None:
    """Raise EvaluationInputError when one evaluation task needs more than the cluster `have`s
    (`ray.cluster_resources()`): Ray would keep such a task pending for ever, and the pipeline
    would train every stage first."""
    resources = eval_config.resources
    wanted = [("CPU", resources.num_cpus, "num_cpus", 1.0, "")]
    wanted.append(("GPU", resources.num_gpus, "num_gpus", 1.0, ""))
    if resources.memory_gb:
        wanted.append(("memory", resources.memory_gb, "memory_gb", 1024**3, " GiB"))
    for resource, amount, key, unit, suffix in wanted:
        there = have.get(resource, 0) / unit
        if amount > there + 1e-9:
            raise EvaluationInputError(
                f"evaluate.resources.{key}: {amount:g}{suffix} per evaluation task, but the Ray cluster has {there:g}{suffix}; "
                "nothing was run (lower it or use a larger cluster)"
            )


def evaluate_variants(
    eval_config: EvalConfig,
    variants: Mapping[str, str],
    data: Mapping[str, str],
    out_uri: str,
    *,
    tokenizer_uri: str | None = None,
    split: str | None = None,
    trust_remote_code: bool = False,
    reuse: bool = True,
    compare: bool = True,
) -> dict:
    """Score every variant (name -> model URI) in parallel on the Ray cluster; write and return the results.

    Inputs are checked first (EvaluationInputError: a variant path without a model, a missing data
    set, a malformed benchmark item). A variant that fails later (its model does not load, its
    task dies) is reported in `failed` and in the comparison; the others are unaffected. Results of
    a variant whose model (by manifest), data and config are unchanged are reused when `reuse`.
    With `compare` (default) the comparison of these variants is written to `out_uri`; the
    pipeline scores each variant on its own as soon as it exists (`compare=False`) and compares
    them all once, at the end.
    """
    import ray

    from alloylm.cluster import connect_ray, model_task

    if not variants:
        raise EvaluationInputError("no variants to evaluate")
    check_variant_sources(variants)
    eval_data = load_eval_data(eval_config, data, split=split, tokenizer_uri=tokenizer_uri)
    connect_ray()
    check_eval_resources(eval_config, ray.cluster_resources())
    started = time.monotonic()
    # Results already up to date are read here, on the driver, rather than by a task: each task
    # may need a worker process started and its imports (the pipeline's comparison of 9 scored
    # variants took 7.5 s on the quickstart, the check itself well under a second).
    results: dict[str, dict] = {}
    if reuse:
        for name, uri in variants.items():
            try:
                previous = _reusable_results(name, _fingerprint(eval_config, uri, model_id(uri), eval_data), out_uri)
            except (storage.StorageError, OSError):  # unreachable from here: the variant's task tries, and fails it if it must
                previous = None
            if previous is not None:
                results[name] = previous
                log.info("variant %s: %s, score %s (up to date, not scored again)", name, previous["status"], previous.get("score"))
    data_ref = ray.put(eval_data)
    resources = eval_config.resources
    options: dict = {"num_cpus": resources.num_cpus, "num_gpus": resources.num_gpus, "max_retries": 0}
    if resources.memory_gb:
        options["memory"] = int(resources.memory_gb * 1024**3)
    task = model_task(_evaluate_variant_task, num_gpus=resources.num_gpus)  # a GPU task's process exits after it
    pending = {
        task.options(name=f"evaluate:{name}", **options).remote(eval_config, name, uri, data_ref, out_uri, trust_remote_code, reuse): name
        for name, uri in variants.items()
        if name not in results
    }
    if pending:
        log.info("evaluating %d variant(s) on the %s split: %s", len(pending), eval_data.split, ", ".join(pending.values()))
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        name = pending.pop(done[0])
        try:
            results[name] = ray.get(done[0])
        except Exception as exc:  # the task died (out of memory, node lost): this variant failed
            results[name] = {
                "variant": name,
                "model": variants[name],
                "split": eval_data.split,
                "status": "failed",
                "error": f"evaluation task failed: {type(exc).__name__}: {str(exc)[-500:]}",
                "suites": {},
                "score": None,
            }
            write_variant_results(out_uri, results[name], {})
        summary = results[name]
        log.info("variant %s: %s, score %s", name, summary["status"], summary.get("score"))
    comparison = build_comparison(results, parents=merge_parents(results)) if compare else None
    if comparison is not None:
        storage.write_json(storage.join(out_uri, "comparison.json"), comparison)
        storage.write_text(storage.join(out_uri, "comparison.md"), comparison_markdown(comparison))
    failed = {name: r.get("error") for name, r in results.items() if r["status"] == "failed"}
    return {
        "split": eval_data.split,
        "out": out_uri,
        "variants": results,
        "comparison": comparison,
        "failed": failed,
        "seconds": round(time.monotonic() - started, 3),
    }


def load_results(out_uri: str) -> dict[str, dict]:
    """Every complete variant result under `out_uri` (variant -> results.json content)."""
    results = {}
    for uri in storage.list_files(out_uri, f"*/{RESULTS_NAME}"):
        folder = uri[: -len(RESULTS_NAME) - 1]
        if storage.read_manifest(folder) is None:
            continue  # incomplete: never read as a result
        result = storage.read_json(uri)
        results[result.get("variant") or folder.rstrip("/").rsplit("/", 1)[-1]] = result
    return results
