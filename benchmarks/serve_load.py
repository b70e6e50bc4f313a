"""Serving throughput: continuously batched deployment against an unbatched one, same model, same run.

    .venv/bin/python benchmarks/serve_load.py                       # tiny-llama, levels 1, 8, 16, 32
    .venv/bin/python benchmarks/serve_load.py --preset small-llama --max-tokens 64
    .venv/bin/python benchmarks/serve_load.py --model runs/quickstart/stages/merged

What it does:
1. Builds one model in-process (`--preset`, a tokenizer trained here, seed 0) and saves it to a
   temporary folder, or takes `--model` (a run's stage folder, local or s3://).
2. Starts a local Ray cluster (`--cpus`) and Serve on a free loopback port, and deploys that model
   twice side by side with `alloylm.serve.serve_run`: `batched` (`batching.max_batch_size=
   --max-batch-size`) and `unbatched` (`batching.max_batch_size=1`: one sequence at a time, the
   baseline). Everything else (one replica each, its CPUs, an ingress each, HTTP) is the same.
3. After a warm-up of each, for every concurrency level it measures `batched` and then
   `unbatched`, `--rounds` times over, alternating, so that both see the same background load (on
   a shared machine it drifts). Each measurement sends `--requests-per-slot` x concurrency
   completions (at least 16), closed loop, with `alloylm.serve.loadgen.run_load`: the same prompt,
   `max_tokens = min_tokens = --max-tokens` (so every answer is equally long), temperature 1.
   Tokens/s = completion tokens / wall time; latency is per request, end to end. A level's figure
   is the median over its rounds (every round is in the JSON).
4. Ratios: batched over unbatched median throughput per level, and the batched p99/p50 latency
   (medians over rounds).
5. Scoring (`--scoring-levels`, default 16): log-likelihood requests as lm-evaluation-harness's
   `local-completions` sends them (`echo: true`, `logprobs: 1`, `max_tokens: 0`) on a prompt of
   about `--scoring-prompt-tokens` tokens, batched against unbatched the same way; the figure is
   requests/s (and prompt tokens scored per second).

Goals (issues): >= 5x the unbatched throughput at concurrency 16-32 with p99 <= 2x p50; scoring
>= 5x the unbatched requests/s at concurrency 16.

Output: a table, then as the last line one JSON object with every figure, also written to
`benchmarks/results/serve_load.json`. The load generator runs in this process, on the same CPUs
as the server; on a 2-core machine it takes a share of them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).resolve().parent / "results" / "serve_load.json"
PROMPT = "The toughness of nacre comes from"
GOAL_RATIO = 5.0
GOAL_TAIL = 2.0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny-llama", help="model preset built here (default tiny-llama)")
    parser.add_argument("--model", default=None, help="serve this model folder instead of building one")
    parser.add_argument("--levels", default="1,8,16,32", help="concurrency levels, comma-separated")
    parser.add_argument("--requests-per-slot", type=int, default=4, help="requests per measurement = this x concurrency (>= 16)")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per deployment and level (the median counts)")
    parser.add_argument("--max-tokens", type=int, default=64, help="completion tokens per request")
    parser.add_argument("--max-batch-size", type=int, default=32, help="batch size of the batched deployment")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="CPUs of the local Ray cluster")
    parser.add_argument("--replica-cpus", type=float, default=0.5, help="CPUs reserved for each model replica")
    parser.add_argument("--scoring-levels", default="16", help="concurrency levels of the scoring workload ('' skips it)")
    parser.add_argument("--scoring-prompt-tokens", type=int, default=96, help="about how many tokens each scored prompt has")
    parser.add_argument("--skip-generation", action="store_true", help="measure only the scoring workload")
    parser.add_argument("--results", default=str(RESULTS), help="where the JSON goes (default benchmarks/results/serve_load.json)")
    return parser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _build_model(preset: str, folder: Path) -> str:
    from alloylm.models import build_model, save_model, train_tokenizer

    sentences = [
        f"Material {i} has a toughness of {i * 3 % 17} MPa, a modulus of {i * 7 % 23} GPa and a density "
        f"of {1 + i % 9 / 10:.1f} g/cm3; organism {i % 11} grows it in layers of {i % 5 + 2} levels."
        for i in range(400)
    ]
    tokenizer = train_tokenizer(sentences, vocab_size=1024)
    path = str(folder / preset)
    save_model(build_model(preset, tokenizer, seed=0), tokenizer, path)
    return path


def _serve_config(args: argparse.Namespace, port: int, name: str, batch_size: int):
    from alloylm.serve import ServeConfig

    max_ongoing = max(64, batch_size)
    return ServeConfig.model_validate(
        {
            "model": "bench",
            "app_name": name,
            "route_prefix": f"/{name}",
            "port": port,
            "batching": {"max_batch_size": batch_size},
            "deployment": {
                "num_cpus": args.replica_cpus,
                "max_ongoing_requests": max_ongoing,
                "max_queued_requests": -1,
            },
            "ingress": {"num_cpus": 0.1},
            "limits": {"max_tokens": max(1024, args.max_tokens), "default_max_tokens": 16},
        }
    )


def _scoring_prompt(tokens: int) -> str:
    # About 12 tokens per sentence with the benchmark's tokenizer; the server reports the true count.
    sentences = [f"Material {i} has a toughness of {i * 3 % 17} MPa and a modulus of {i * 7 % 23} GPa." for i in range(1000)]
    return " ".join(sentences[: max(1, tokens // 12)])


def _measure(url: str, concurrency: int, args: argparse.Namespace, *, scoring: bool = False) -> dict:
    from alloylm.serve.loadgen import run_load

    result = asyncio.run(
        run_load(
            url,
            model="bench",
            concurrency=concurrency,
            requests=max(16, args.requests_per_slot * concurrency),
            max_tokens=args.max_tokens,
            min_tokens=None if scoring else args.max_tokens,
            prompt=_scoring_prompt(args.scoring_prompt_tokens) if scoring else PROMPT,
            scoring=scoring,
        )
    ).as_dict()
    if result["errors"]:
        raise RuntimeError(f"{result['errors']} requests failed at concurrency {concurrency} ({url})")
    return result


def _show(name: str, result: dict) -> None:
    print(
        f"  {name:9s} c={result['concurrency']:3d}  {result['tokens_per_s']:9.1f} tok/s  {result['prompt_tokens_per_s']:9.1f} prompt tok/s  "
        f"{result['requests_per_s']:7.2f} req/s  "
        f"p50 {result['latency_p50_s'] * 1000:8.1f} ms  p99 {result['latency_p99_s'] * 1000:8.1f} ms",
        flush=True,
    )


def _median_round(rounds: list[dict]) -> dict:
    """Median figures of one deployment at one level; p99/p50 is the median of each round's ratio."""
    figures = {
        key: round(statistics.median(r[key] for r in rounds), 4)
        for key in ("tokens_per_s", "prompt_tokens_per_s", "requests_per_s", "latency_p50_s", "latency_p99_s")
    }
    figures["p99_over_p50"] = round(statistics.median(r["latency_p99_s"] / r["latency_p50_s"] for r in rounds), 2)
    figures["requests"] = sum(r["requests"] for r in rounds)
    return figures


def run(args: argparse.Namespace, workdir: Path) -> dict:
    import ray
    from ray import serve

    from alloylm.serve import serve_run

    levels = [] if args.skip_generation else [int(level) for level in args.levels.split(",") if level]
    scoring_levels = [int(level) for level in args.scoring_levels.split(",") if level]
    started = time.perf_counter()
    model = args.model or _build_model(args.preset, workdir)
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    deployments = {"batched": args.max_batch_size, "unbatched": 1}
    figures: dict[str, dict[str, list[dict]]] = {name: {} for name in deployments}
    scoring: dict[str, dict[str, list[dict]]] = {name: {} for name in deployments}
    scoring_prompt_tokens = None
    try:
        urls = {}
        for name, batch_size in deployments.items():
            deploy_started = time.perf_counter()
            urls[name] = serve_run(_serve_config(args, port, name, batch_size), {"bench": model}, blocking=False)
            print(f"{name} (max_batch_size={batch_size}) ready in {time.perf_counter() - deploy_started:.1f} s at {urls[name]}", flush=True)
        for name, url in urls.items():  # warm-up: first forward passes, connections, routing tables
            _measure(url, 4, argparse.Namespace(**{**vars(args), "requests_per_slot": 2}))
            if scoring_levels:
                warm = _measure(url, 4, argparse.Namespace(**{**vars(args), "requests_per_slot": 2}), scoring=True)
                scoring_prompt_tokens = warm["prompt_tokens"] // warm["requests"]
        for concurrency in levels:
            for _ in range(args.rounds):
                for name, url in urls.items():
                    result = _measure(url, concurrency, args)
                    figures[name].setdefault(str(concurrency), []).append(result)
                    _show(name, result)
        if scoring_levels:
            print("scoring (echo, logprobs 1, max_tokens 0):", flush=True)
        for concurrency in scoring_levels:
            for _ in range(args.rounds):
                for name, url in urls.items():
                    result = _measure(url, concurrency, args, scoring=True)
                    scoring[name].setdefault(str(concurrency), []).append(result)
                    _show(name, result)
    finally:
        serve.shutdown()
        ray.shutdown()
    summary = {name: {level: _median_round(rounds) for level, rounds in by_level.items()} for name, by_level in figures.items()}
    ratios = {
        level: round(summary["batched"][level]["tokens_per_s"] / summary["unbatched"][level]["tokens_per_s"], 2)
        for level in summary["batched"]
    }
    tails = {level: r["p99_over_p50"] for level, r in summary["batched"].items()}
    high = [level for level in ratios if 16 <= int(level) <= 32]
    scored = {name: {level: _median_round(rounds) for level, rounds in by_level.items()} for name, by_level in scoring.items()}
    scoring_ratios = {
        level: round(scored["batched"][level]["requests_per_s"] / scored["unbatched"][level]["requests_per_s"], 2)
        for level in scored["batched"]
    }
    return {
        "benchmark": "serve_load",
        "model": args.model or args.preset,
        "max_tokens": args.max_tokens,
        "max_batch_size": args.max_batch_size,
        "cpus": args.cpus,
        "replica_cpus": args.replica_cpus,
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(), "platform": sys.platform},
        "rounds": args.rounds,
        "batched": summary["batched"],
        "unbatched": summary["unbatched"],
        "throughput_ratio": ratios,
        "batched_p99_over_p50": tails,
        "goal": f">= {GOAL_RATIO}x unbatched throughput at concurrency 16-32 with p99 <= {GOAL_TAIL}x p50",
        "goal_met": bool(high) and all(ratios[level] >= GOAL_RATIO and tails[level] <= GOAL_TAIL for level in high),
        "scoring": {
            "prompt_tokens": scoring_prompt_tokens,
            "batched": scored["batched"],
            "unbatched": scored["unbatched"],
            "requests_per_s_ratio": scoring_ratios,
            "goal": f">= {GOAL_RATIO}x unbatched log-likelihood requests/s at concurrency 16",
            "goal_met": "16" in scoring_ratios and scoring_ratios["16"] >= GOAL_RATIO,
        },
        "wall_s": round(time.perf_counter() - started, 1),
        "all_rounds": figures,
    }


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="alloylm-serve-bench-") as tmp:
        result = run(args, Path(tmp))
    print("\nthroughput batched/unbatched:", result["throughput_ratio"], " batched p99/p50:", result["batched_p99_over_p50"])
    print("scoring requests/s batched/unbatched:", result["scoring"]["requests_per_s_ratio"])
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    from _results import save_results

    save_results(args.results, result)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
