"""The `alloylm` command: validate, data, train, merge, search, eval, report, serve and run.

    alloylm validate configs/quickstart.yaml data.block_size=128
    alloylm data configs/quickstart.yaml
    alloylm train configs/quickstart.yaml base
    alloylm search configs/quickstart.yaml merged      (a merge_search stage; `merge` for a fixed merge)
    alloylm eval configs/quickstart.yaml
    alloylm report configs/quickstart.yaml
    alloylm serve configs/quickstart.yaml
    alloylm run configs/quickstart.yaml
    alloylm plan configs/paper/llama-3.1-8b-base.yaml --gpus 8 --gpu-memory-gib 80

Every command takes `key.sub=value` overrides after the config. Exit codes: 0 done, 1 the work
failed (the message says why), 2 the config or the command line is wrong.

This module is argparse, logging and the mapping from error class to exit code; the work is in
`alloylm.pipeline` (the run and its steps) and the modules it calls.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from alloylm.config import RunConfig, load_config
from alloylm.errors import EXIT_FAILED, EXIT_USAGE, AlloyLMError, InputError, RunError, UsageError

__all__ = ["EXIT_FAILED", "EXIT_USAGE", "UsageError", "main", "make_parser"]
log = logging.getLogger("alloylm")
# Commands that write into the run: each holds the run's lease (alloylm.lease) while it works.
WRITERS = ("data", "train", "merge", "search", "eval", "run")


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
    for command, text in (
        ("train", "run one training stage on Ray Train"),
        ("merge", "run one merge stage (fixed parameters or a mergekit YAML) with mergekit"),
        ("search", "run one merge_search stage: Ray Tune searches merge parameters against the evaluation suites"),
    ):
        sub = commands.add_parser(command, help=text)
        sub.add_argument("config", help="run config (YAML)")
        sub.add_argument("stage", help="name of the stage")
        sub.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override a config value")
    _add_config_arguments(commands.add_parser("eval", help="score every variant of `evaluate:` in parallel on Ray"))
    _add_config_arguments(commands.add_parser("report", help="render <run>/report (Markdown, HTML, PNG plots)"))
    _add_config_arguments(commands.add_parser("serve", help="serve the run's variants over an OpenAI-compatible API (Ray Serve)"))
    plan = commands.add_parser("plan", help="memory per GPU, tokens, time and GPU-hours of every stage on a target cluster")
    _add_config_arguments(plan)
    plan.add_argument("--gpus", type=int, help="GPUs per node (overrides cluster.gpus)")
    plan.add_argument("--gpu-memory-gib", type=float, help="memory of one GPU in GiB (overrides cluster.gpu_memory_gib)")
    plan.add_argument("--nodes", type=int, help="nodes (overrides cluster.nodes)")
    plan.add_argument("--mfu", type=float, help="model FLOPs utilisation for time estimates (overrides cluster.mfu)")
    plan.add_argument("--gpu-tflops", type=float, help="peak 16-bit TFLOPS of one GPU (overrides cluster.gpu_tflops)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    run = commands.add_parser("run", help="run the whole pipeline: data, stages, merges, evaluation, report")
    _add_config_arguments(run)
    run.add_argument("--serve", action="store_true", help="then serve the `serve:` variants until Ctrl-C (not when a step failed)")
    run.add_argument("--only", action="append", default=None, metavar="STAGE", help="run only this stage and its ancestors (repeatable)")
    for name in WRITERS:
        commands.choices[name].add_argument(
            "--wait", action="store_true", help="if another process is writing to this run (holds its lease), wait for it instead of failing"
        )
    return parser


def _data(config: RunConfig, only: list[str] | None) -> dict[str, Any]:
    from alloylm.data.prepare import prepare_all

    return {name: m["counts"] for name, m in prepare_all(config, only).items()}


def _stage(config: RunConfig, name: str, command: str) -> dict[str, Any]:
    from alloylm.cluster import connect_ray
    from alloylm.layout import RunLayout
    from alloylm.stages import kind_of

    kind = kind_of(config, name, command=command)  # a stage this command does not run: exit 2
    connect_ray()  # connected already by `_before_the_lease`, which also checked the merge settings
    manifest = kind.run(config, name)
    return {"stage": name, "model": RunLayout.of(config).stage(name), **(manifest.get("metrics") or {})}


def _eval(config: RunConfig) -> dict[str, Any]:
    from alloylm.cluster import connect_ray
    from alloylm.evaluate import data_uris, evaluate_variants, resolve_variants
    from alloylm.layout import RunLayout

    connect_ray()  # `_before_the_lease` refused a config without `evaluate:` and connected
    layout = RunLayout.of(config)
    summary = evaluate_variants(
        config.evaluate,
        resolve_variants(config.evaluate, {name: layout.stage(name) for name in config.stages}),
        data_uris(config.evaluate, layout.run),
        layout.eval,
        tokenizer_uri=layout.tokenizer,
        trust_remote_code=config.trust_remote_code,
    )
    return {
        "split": summary["split"],
        "table": layout.comparison_table,
        "scores": {name: result.get("score") for name, result in summary["variants"].items()},
        "failed": summary["failed"],
    }


def _report(config: RunConfig) -> dict[str, Any]:
    from alloylm.evaluate import render_report
    from alloylm.evaluate.config import variant_name
    from alloylm.layout import RunLayout
    from alloylm.stages import stage_kind

    from alloylm import storage
    from alloylm.pipeline import stage_dag, stale_best

    layout = RunLayout.of(config)
    chosen = storage.read_json(layout.best) if storage.exists(layout.best) else None
    stale = stale_best(config, chosen) if chosen else None
    if stale:
        log.warning("%s is not shown as the best variant: %s", layout.best, stale)
    best = chosen.get("variant") if chosen and not stale else None
    return render_report(
        layout.eval,
        layout.report,
        stages={n: layout.stage(n) for n, s in config.stages.items() if stage_kind(s.kind).command == "train"},  # loss curves
        searches={n: layout.search_results(n) for n, s in config.stages.items() if s.kind == "merge_search"},
        title=f"AlloyLM: {config.experiment}",
        dag=stage_dag(config),
        best=best,
        variants=[variant_name(entry) for entry in config.evaluate.variants] if config.evaluate else None,
    )


def _plan(config: RunConfig, args: argparse.Namespace) -> None:
    from pydantic import ValidationError

    from alloylm.plan import format_table, plan_run
    from alloylm.plan_config import ClusterConfig

    flags = {"gpus": args.gpus, "gpu_memory_gib": args.gpu_memory_gib, "nodes": args.nodes, "mfu": args.mfu, "gpu_tflops": args.gpu_tflops}
    base = config.cluster.model_dump() if config.cluster else {}
    try:
        cluster = ClusterConfig.model_validate({**base, **{k: v for k, v in flags.items() if v is not None}})
    except ValidationError as exc:
        problems = "; ".join(f"--{'.'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" for e in exc.errors())
        raise UsageError(f"cluster: {problems}") from None
    plan = plan_run(config, cluster)
    print(json.dumps(plan.to_json(), indent=2) if args.json else format_table(plan))


def stage_timings_table(stages: dict[str, dict]) -> str:
    """The training stages' wall time, the part outside the trainer loop and each phase of it
    (the manifests' `breakdown`), as a Markdown table with the median outside training below."""
    import statistics

    from alloylm.train.launcher import BREAKDOWN_PHASES

    timed = {name: entry for name, entry in stages.items() if entry.get("breakdown")}
    if not timed:
        return ""
    lines = [
        "| stage | wall (s) | outside training (s) | " + " | ".join(BREAKDOWN_PHASES) + " |",
        "| --- | ---: | ---: | " + " | ".join("---:" for _ in BREAKDOWN_PHASES) + " |",
    ]
    outside = []
    for name, entry in timed.items():
        breakdown = entry["breakdown"]
        outside.append(entry["seconds"] - breakdown.get("training", 0.0))
        cells = [f"{entry['seconds']:.1f}", f"{outside[-1]:.1f}", *(f"{breakdown.get(key, 0.0):.1f}" for key in BREAKDOWN_PHASES)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append(
        f"\nMedian time outside training per stage: {statistics.median(outside):.1f} s ({len(outside)} stages; "
        "from each stage's manifest: a stage that was up to date shows the run that trained it)\n"
    )
    return "\n".join(lines)


def _print_summary(summary) -> None:
    from alloylm import storage
    from alloylm.layout import RunLayout

    table = RunLayout(summary.run).comparison_table
    if summary.evaluation is not None and storage.exists(table):
        print(storage.read_text(table))
    timings = stage_timings_table(summary.stages)
    if timings:
        print(timings)
    print(json.dumps(summary.to_json(), indent=2, default=str), flush=True)
    for key, error in summary.to_json()["failed"].items():
        print(f"alloylm: {key}: {error}", file=sys.stderr)


def _before_the_lease(config: RunConfig, args: argparse.Namespace) -> None:
    """What a writing command (but `run`, which does its own) checks before it takes the lease,
    the run's first write: the input it names, then that every node sees a local run folder."""
    from alloylm.cluster import check_storage_shared, connect_ray

    if args.command == "data":
        from alloylm.data.prepare import check_sources

        check_sources(config, args.only)  # a missing path fails before the cluster starts
    if args.command == "eval" and config.evaluate is None:
        raise UsageError("the config has no `evaluate:` section: nothing to evaluate")
    if args.command in ("merge", "search"):
        from alloylm.pipeline import check_merge_stages

        check_merge_stages(config, [args.stage])  # settings mergekit would refuse: before a cluster starts
    connect_ray()
    check_storage_shared(config.storage)


def _command(args: argparse.Namespace, config: RunConfig) -> int:
    from alloylm.pipeline import run_pipeline, serve_variants

    if args.command == "serve":
        serve_variants(config)
        return 0
    if args.command == "plan":  # reads only: no lease
        _plan(config, args)
        return 0
    if args.command == "run":
        if args.only:
            from alloylm.pipeline import _with_ancestors

            _with_ancestors(config, args.only)  # an unknown stage: exit 2 before the lease and the cluster
        summary = run_pipeline(config, only=args.only, serve=args.serve, on_summary=_print_summary, wait_for_lease=args.wait)
        return 0 if summary.ok else EXIT_FAILED
    commands = {
        "data": lambda: _data(config, args.only),
        "train": lambda: _stage(config, args.stage, "train"),
        "merge": lambda: _stage(config, args.stage, "merge"),
        "search": lambda: _stage(config, args.stage, "search"),
        "eval": lambda: _eval(config),
        "report": lambda: _report(config),
    }
    if args.command == "data" and args.only:
        unknown = [name for name in args.only if name not in config.datasets]
        if unknown:
            raise UsageError(f"--only: no data set {', '.join(map(repr, unknown))}; data sets: {', '.join(sorted(config.datasets))}")
    if args.command == "report":
        from alloylm import storage

        if not storage.exists(config.run_uri):  # before the lease, which would create the folder
            raise UsageError(f"no run at {config.run_uri}: nothing to report (check `storage` and `experiment`)")
    if args.command in WRITERS:
        from alloylm.lease import RunLease

        if args.command in ("train", "merge", "search"):
            from alloylm.stages import kind_of

            kind_of(config, args.stage, command=args.command)  # a usage error before waiting for a lease
        lease = RunLease(config.run_uri, args.command, ttl=config.run.lease_ttl_seconds)
        if not args.wait:
            lease.refuse_if_held()  # another writer: fail at once, not after starting a Ray cluster
        _before_the_lease(config, args)
        with lease.held(wait=args.wait):
            result = commands[args.command]()
        if lease.lost:  # `alloylm run` stops starting steps; one step can only fail at its end
            from alloylm.lease import LeaseLostError

            print(json.dumps(result, indent=2, default=str))
            raise LeaseLostError(
                f"the run's lease was lost while `alloylm {args.command}` ran (its heartbeat stalled past "
                "run.lease_ttl_seconds and another writer took it over): it may have written beside that writer; "
                "check the result, or run again once the other writer has finished"
            )
    else:
        result = commands[args.command]()
    print(json.dumps(result, indent=2, default=str))
    return EXIT_FAILED if isinstance(result, dict) and result.get("failed") else 0


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(step)s%(message)s",
        datefmt="%H:%M:%S",
    )
    from alloylm.pipeline import StepLogFilter

    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, StepLogFilter) for f in handler.filters):
            handler.addFilter(StepLogFilter())
    try:
        config = load_config(args.config, args.overrides)
        if args.command == "validate":
            from alloylm.pipeline import check_merge_stages

            check_merge_stages(config)
            print(config.resolved_yaml(), end="")
            return 0
        return _command(args, config)
    except InputError as exc:
        print(f"alloylm: {exc}", file=sys.stderr)
        return exc.exit_code
    except RunError as exc:
        print(f"alloylm: {exc}", file=sys.stderr)
        return exc.exit_code
    except AlloyLMError as exc:  # a direct subclass of the base: treated as a failed run
        print(f"alloylm: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except RuntimeError as exc:  # Serve's deploy failure, or vLLM missing for the vllm backend
        if args.command != "serve" and not getattr(args, "serve", False):
            raise
        print(f"alloylm: serving failed: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
