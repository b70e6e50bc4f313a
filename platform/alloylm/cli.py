"""The `alloylm` command: validate, data, train, merge, search, eval, report, serve and run.

    alloylm validate configs/quickstart.yaml data.block_size=128
    alloylm data configs/quickstart.yaml
    alloylm train configs/quickstart.yaml base
    alloylm search configs/quickstart.yaml merged      (a merge_search stage; `merge` for a fixed merge)
    alloylm eval configs/quickstart.yaml
    alloylm report configs/quickstart.yaml
    alloylm serve configs/quickstart.yaml
    alloylm run configs/quickstart.yaml

Every command takes `key.sub=value` overrides after the config. Exit codes: 0 done, 1 the work
failed (the message says why), 2 the config or the command line is wrong.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any

from alloylm import storage
from alloylm.config import ConfigError, RunConfig, TrainStageConfig, load_config

EXIT_FAILED = 1
EXIT_USAGE = 2
log = logging.getLogger("alloylm")


class UsageError(Exception):
    """A command that does not fit the config (e.g. `eval` without an `evaluate:` section)."""


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="run config (YAML)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override a config value")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alloylm", description=__doc__.split("\n\n")[0])
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_config_arguments(commands.add_parser("validate", help="check a config and print the resolved one"))
    data = commands.add_parser("data", help="prepare the tokenizer and data sets on Ray Data")
    _add_config_arguments(data)
    data.add_argument("--only", action="append", default=None, metavar="NAME", help="prepare only this data set (repeatable)")
    train = commands.add_parser("train", help="run one training stage on Ray Train")
    train.add_argument("config", help="run config (YAML)")
    train.add_argument("stage", help="name of the stage to train")
    train.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override a config value")
    for command, text in (
        ("merge", "run one merge stage (fixed parameters or a mergekit YAML) with mergekit"),
        ("search", "run one merge_search stage: Ray Tune searches merge parameters against the evaluation suites"),
    ):
        sub = commands.add_parser(command, help=text)
        sub.add_argument("config", help="run config (YAML)")
        sub.add_argument("stage", help="name of the merge stage")
        sub.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override a config value")
    _add_config_arguments(commands.add_parser("eval", help="score every variant of `evaluate:` in parallel on Ray"))
    _add_config_arguments(commands.add_parser("report", help="render <run>/report (Markdown, HTML, PNG plots)"))
    _add_config_arguments(commands.add_parser("serve", help="serve the run's variants over an OpenAI-compatible API (Ray Serve)"))
    run = commands.add_parser("run", help="run the whole pipeline: data, stages, merges, evaluation, report")
    _add_config_arguments(run)
    run.add_argument("--serve", action="store_true", help="then serve the `serve:` variants until Ctrl-C")
    return parser


def _stage_uris(config: RunConfig) -> dict[str, str]:
    return {name: storage.join(config.run_uri, "stages", name) for name in config.stages}


def data_command(config: RunConfig, only: list[str] | None = None) -> dict[str, Any]:
    from alloylm.cluster import connect_ray
    from alloylm.data.prepare import prepare_all

    connect_ray()
    return {name: m["counts"] for name, m in prepare_all(config, only).items()}


def train_command(config: RunConfig, stage: str) -> dict[str, Any]:
    from alloylm.cluster import connect_ray
    from alloylm.train.launcher import train_stage

    connect_ray()
    manifest = train_stage(config, stage)
    return {"stage": stage, "model": storage.join(config.run_uri, "stages", stage), **manifest["metrics"]}


def merge_command(config: RunConfig, stage: str, *, search: bool | None = None) -> dict[str, Any]:
    from alloylm.cluster import connect_ray
    from alloylm.merge.stage import merge_stage

    kind = getattr(config.stages.get(stage), "kind", None)
    if search is True and kind != "merge_search":
        raise UsageError(f"stage {stage!r} is {'a ' + kind if kind else 'not a'} stage, not a merge_search stage; `alloylm search` runs merge searches")
    if search is False and kind != "merge":
        raise UsageError(f"stage {stage!r} is {'a ' + kind if kind else 'not a'} stage, not a merge stage; `alloylm merge` runs fixed merges")
    connect_ray()
    manifest = merge_stage(config, stage)
    return {"stage": stage, "model": storage.join(config.run_uri, "stages", stage), **manifest.get("metrics", {})}


def eval_command(config: RunConfig) -> dict[str, Any]:
    from alloylm.cluster import connect_ray
    from alloylm.evaluate import data_uris, evaluate_variants, resolve_variants

    if config.evaluate is None:
        raise UsageError("the config has no `evaluate:` section: nothing to evaluate")
    connect_ray()
    run = config.run_uri
    summary = evaluate_variants(
        config.evaluate,
        resolve_variants(config.evaluate, _stage_uris(config)),
        data_uris(config.evaluate, run),
        storage.join(run, "eval"),
        tokenizer_uri=storage.join(run, "tokenizer"),
        trust_remote_code=config.trust_remote_code,
    )
    return {
        "split": summary["split"],
        "table": storage.join(run, "eval", "comparison.md"),
        "scores": {name: result.get("score") for name, result in summary["variants"].items()},
        "failed": summary["failed"],
    }


def report_command(config: RunConfig) -> dict[str, Any]:
    from alloylm.evaluate import render_report

    run = config.run_uri
    searches = {n: storage.join(run, "stages", n, "search") for n, s in config.stages.items() if s.kind == "merge_search"}
    return render_report(
        storage.join(run, "eval"),
        storage.join(run, "report"),
        stages={n: u for n, u in _stage_uris(config).items() if isinstance(config.stages[n], TrainStageConfig)},  # loss curves
        searches=searches,
        title=f"AlloyLM: {config.experiment}",
    )


def serve_command(config: RunConfig) -> None:
    """Deploy the variants on the current Ray cluster, print the base URL, block until Ctrl-C."""
    from alloylm.cluster import connect_ray
    from alloylm.serve import ServeConfig, serve_run, variant_sources

    serve_config = config.serve or ServeConfig()
    try:
        sources = variant_sources(serve_config, config.run_uri)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    connect_ray()
    _check_serve_resources(serve_config)
    serve_run(serve_config, sources, blocking=True)


def _check_serve_resources(serve_config) -> None:
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
            raise UsageError(
                f"serve: {variants} variant(s) x {replicas} replica(s) x serve.deployment.num_{resource.lower()}s "
                f"plus the ingress need {amount:g} {resource}s, but the Ray cluster has {have.get(resource, 0):g}; "
                "lower serve.deployment.num_cpus / num_gpus or serve fewer variants"
            )


def _check_stage_resources(config: RunConfig) -> None:
    """Refuse a run with a stage the cluster can never schedule, before data preparation spends time.

    The stages' own runners check the same when they start; checking every stage up front means a
    bad last stage fails the run in seconds, not after the data and every earlier stage.
    """
    import ray

    from alloylm.merge.stage import MergeStageError
    from alloylm.train.launcher import StageError

    have = ray.cluster_resources()
    for name in config.stage_order():
        stage = config.stages[name]
        if isinstance(stage, TrainStageConfig):
            res, error = stage.resources, StageError
            needs = {}
            for resource, per_worker in (("CPU", res.cpus_per_worker), ("GPU", res.gpus_per_worker)):
                total = res.workers * per_worker
                needs[resource] = (total, f"{res.workers} workers x {per_worker:g} {resource}s = {total:g} {resource}s")
        else:
            res, error = stage.resources, MergeStageError
            needs = {
                resource: (amount, f"a merge (each search trial) needs {amount:g} {resource}s")
                for resource, amount in (("CPU", res.num_cpus), ("GPU", res.num_gpus))
            }
        for resource, (amount, what) in needs.items():
            if amount > have.get(resource, 0) + 1e-9:
                raise error(
                    f"stage {name!r}: resources: {what}, but the Ray cluster has {have.get(resource, 0):g}; "
                    f"nothing was run (lower stages.{name}.resources or use a larger cluster)"
                )


def run_command(config: RunConfig) -> dict[str, Any]:
    """Data, every stage in dependency order (training and merges), evaluation and the report.

    Stages whose fingerprint is unchanged are skipped by their own runners; an interrupted stage
    resumes from its checkpoint (training) or its Tune experiment (merge search).
    """
    from alloylm.cluster import connect_ray

    started = time.monotonic()
    connect_ray()
    _check_stage_resources(config)
    summary: dict[str, Any] = {"experiment": config.experiment, "run": config.run_uri, "datasets": data_command(config)}
    order = config.stage_order()
    done: dict[str, Any] = {}
    for index, name in enumerate(order, start=1):
        stage = config.stages[name]
        log.info("[%d/%d] stage %s (%s)", index, len(order), name, stage.kind)
        if isinstance(stage, TrainStageConfig):
            done[name] = train_command(config, name)
        else:
            done[name] = merge_command(config, name)
    summary["stages"] = done
    if config.evaluate is not None:
        summary["evaluation"] = eval_command(config)
        summary["report"] = report_command(config)
        scores = {n: s for n, s in summary["evaluation"]["scores"].items() if s is not None}
        if scores:
            best = max(scores, key=scores.get)
            summary["best"] = {"variant": best, "score": scores[best], "model": _stage_uris(config).get(best, best)}
        table = storage.join(config.run_uri, "eval", "comparison.md")
        if storage.exists(table):
            print(storage.read_text(table))
    summary["seconds"] = round(time.monotonic() - started, 1)
    return summary


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"alloylm: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "validate":
        print(config.resolved_yaml(), end="")
        return 0
    from alloylm.data.prepare import DataPreparationError
    from alloylm.data.sources import SourceError
    from alloylm.evaluate import EvaluationInputError
    from alloylm.merge.stage import MergeStageError
    from alloylm.train.launcher import StageError

    if args.command == "serve":
        try:
            serve_command(config)
        except UsageError as exc:
            print(f"alloylm: {exc}", file=sys.stderr)
            return EXIT_FAILED
        except RuntimeError as exc:  # Serve's deploy failure, or vLLM missing for the vllm backend
            print(f"alloylm: serving failed: {exc}", file=sys.stderr)
            return EXIT_FAILED
        return 0
    commands = {
        "data": lambda: data_command(config, args.only),
        "train": lambda: train_command(config, args.stage),
        "merge": lambda: merge_command(config, args.stage, search=False),
        "search": lambda: merge_command(config, args.stage, search=True),
        "eval": lambda: eval_command(config),
        "report": lambda: report_command(config),
        "run": lambda: run_command(config),
    }
    try:
        result = commands[args.command]()
    except UsageError as exc:
        print(f"alloylm: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (SourceError, DataPreparationError, StageError, MergeStageError, EvaluationInputError, storage.StorageError) as exc:
        print(f"alloylm: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(result, indent=2, default=str))
    if args.command == "run" and args.serve and not result.get("failed"):
        try:
            serve_command(config)
        except (UsageError, RuntimeError) as exc:
            print(f"alloylm: serving failed: {exc}", file=sys.stderr)
            return EXIT_FAILED
    return EXIT_FAILED if isinstance(result, dict) and result.get("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
