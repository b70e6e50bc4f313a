"""Merge search: trial throughput of in-memory merging against merge-to-disk-and-reload, same
trials, same evaluation.

    .venv/bin/python benchmarks/merge_search.py                      # 3 trials per mode (~4-6 min on 2 busy cores)
    .venv/bin/python benchmarks/merge_search.py --trials 3 --skip-cli  # a quick run
    .venv/bin/python benchmarks/merge_search.py --workdir /tmp/ms    # keep the parents and merges

What `trial_throughput` does:
1. Builds two Llama parents of the same shape in-process (`--hidden-size`, `--layers`, vocabulary
   32000: ~58M parameters at the defaults, Llama/Mistral proportions in miniature), seeds 0 and 1,
   and saves them once as safetensors folders (not timed).
2. One trial = a SLERP merge at its own `t` (evenly spaced in (0, 1), the same `t`s in every mode)
   followed by a fixed evaluation: the mean next-token negative log-likelihood of `--eval-blocks`
   fixed token blocks of `--block-size` tokens (seeded random ids), one forward pass each.
3. Modes, each `--trials` timed trials after one untimed warm-up trial:
   - `in_memory`: `alloylm.merge.InMemoryMerger(parents).merge(cfg)` (its CPU defaults: one model
     built once and reused, parent tensors read by mergekit's `LoaderCache` from the safetensors
     files, i.e. the OS page cache, on every merge), then the evaluation on the returned model.
     Its construction and first merge are reported as `setup_seconds`, not in trials/s.
   - `in_memory_preloaded`: the same with `keep_parents_in_memory=True` (the accelerator default:
     parent tensors read once and handed to mergekit's executor): shows what the per-trial reads
     cost.
   - `disk_cli` (the issue's yardstick, mergekit-evolve without its in-memory mode, through the
     CLI): write the mergekit YAML, run `mergekit-yaml cfg.yml OUT --no-copy-tokenizer --quiet`
     as a subprocess, `AutoModelForCausalLM.from_pretrained(OUT)`, evaluate, delete OUT.
   - `disk_in_process`: the same with `mergekit.merge.run_merge` called in this process (what
     mergekit-evolve's `OnDiskMergeEvaluator` does; no interpreter start-up per trial).
4. Checks that every mode scores every `t` the same (the merges are the same tensors).

Goal (issue): in-memory trials/s >= 5x disk trials/s.

Timings are wall-clock on a possibly shared machine; the 1-minute load average at the start and
end is recorded. Output: readable lines, then as the last line one JSON object with every figure,
also written to `benchmarks/results/merge_search.json` (key "trial_throughput").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).resolve().parent / "results" / "merge_search.json"
VOCAB_SIZE = 32000
GOAL_SPEEDUP = 5.0
MODES = ("in_memory", "in_memory_preloaded", "disk_cli", "disk_in_process")
MERGEKIT_YAML = Path(sys.executable).parent / "mergekit-yaml"


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=3, help="timed trials per mode, after one warm-up trial (default 3)")
    parser.add_argument("--hidden-size", type=int, default=512, help="parents' hidden size (default 512)")
    parser.add_argument("--layers", type=int, default=8, help="parents' layer count (default 8)")
    parser.add_argument("--eval-blocks", type=int, default=4, help="token blocks scored per trial (default 4)")
    parser.add_argument("--block-size", type=int, default=128, help="tokens per evaluation block (default 128)")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads in every mode, OMP_NUM_THREADS of the CLI (default 1: on a shared 2-core machine two OpenMP threads spin-wait on each other)",
    )
    parser.add_argument("--skip-cli", action="store_true", help="skip the disk_cli mode (the slowest)")
    parser.add_argument("--skip-quality", action="store_true", help="skip part (b), search quality per budget")
    parser.add_argument(
        "--skip-throughput", action="store_true",
        help="skip part (a); the results file keeps its earlier part (a) figures, marked as not measured in this run",
    )
    parser.add_argument(
        "--search-seeds", default="0",
        help="part (b): comma-separated seeds of the TPE and random searches; figures per seed and their mean (default 0)",
    )
    parser.add_argument(
        "--quickstart-storage",
        default="runs",
        help="storage of the quickstart run whose dpo and instruct stages are the parents of part (b); "
        "missing stages are trained first (about 10 minutes on 2 cores) (default ./runs)",
    )
    parser.add_argument("--grid-points", type=int, default=12, choices=(6, 9, 12), help="part (b): grid size (default 12)")
    parser.add_argument("--quality-items", type=int, default=24, help="part (b): objective items per suite (default 24)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the parents (seed and seed+1) and the evaluation tokens (default 0)")
    parser.add_argument("--workdir", default=None, help="keep parents and merges here (default: a temporary folder, removed)")
    parser.add_argument("--results", default=str(RESULTS), help="where the JSON goes (default benchmarks/results/merge_search.json)")
    return parser


def _say(line: str) -> None:
    print(line, flush=True)


def _load() -> float:
    return round(os.getloadavg()[0], 2)


# ---------------------------------------------------------------------------------------------
# Parents and the fixed evaluation
# ---------------------------------------------------------------------------------------------


def build_parents(workdir: Path, args: argparse.Namespace) -> tuple[list[str], dict]:
    """Two same-shape Llama folders (seeds `seed`, `seed + 1`) and the model's figures."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=args.hidden_size,
        intermediate_size=3 * args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden_size // 64),
        num_key_value_heads=max(1, args.hidden_size // 128),
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    folders = []
    for offset in (0, 1):
        folder = workdir / f"parent-{offset}"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed + offset)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.save_pretrained(str(folder))
        folders.append(str(folder))
    figures = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "layers": args.layers,
        "hidden_size": args.hidden_size,
        "vocab_size": VOCAB_SIZE,
        "bytes_per_parent": sum(f.stat().st_size for f in Path(folders[0]).glob("*.safetensors")),
    }
    return folders, figures


def evaluation_blocks(args: argparse.Namespace):
    import torch

    generator = torch.Generator().manual_seed(args.seed)
    return torch.randint(0, VOCAB_SIZE, (args.eval_blocks, args.block_size), generator=generator)


def mean_nll(model, blocks) -> float:
    """Mean next-token negative log-likelihood of `blocks` (one forward pass each)."""
    import torch

    total = 0.0
    with torch.no_grad():
        for block in blocks:
            ids = block[None]
            total += float(model(input_ids=ids, labels=ids).loss)
    return total / len(blocks)


# ---------------------------------------------------------------------------------------------
# Trial throughput
# ---------------------------------------------------------------------------------------------


def _slerp_config(parents: list[str], t: float) -> dict:
    from alloylm.merge import mergekit_config

    return mergekit_config("slerp", parents, names=["a", "b"], parameters={"t": t})


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the mergekit-yaml subprocesses)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class _InMemoryMode:
    """InMemoryMerger: one model reused, built at setup (with a first merge)."""

    def __init__(self, parents: list[str], blocks, *, keep_parents_in_memory: bool | None) -> None:
        from alloylm.merge import InMemoryMerger

        self.parents, self.blocks = parents, blocks
        started = time.perf_counter()
        self.merger = InMemoryMerger(parents, names=["a", "b"], keep_parents_in_memory=keep_parents_in_memory)
        self.merger.merge(_slerp_config(parents, 0.5))  # builds the held model
        self.setup_seconds = time.perf_counter() - started

    def trial(self, t: float) -> tuple[float, float]:
        """(score, seconds until the merged model was ready)."""
        before = time.perf_counter()
        model = self.merger.merge(_slerp_config(self.parents, t))
        ready = time.perf_counter() - before
        return mean_nll(model, self.blocks), ready


class _DiskMode:
    """Merge to a folder (mergekit-yaml CLI, or run_merge in this process), load it, evaluate it."""

    def __init__(self, parents: list[str], blocks, workdir: Path, *, cli: bool, threads: int) -> None:
        self.parents, self.blocks, self.workdir, self.cli = parents, blocks, workdir, cli
        self.env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        self.setup_seconds = 0.0
        self.count = 0

    def trial(self, t: float) -> tuple[float, float]:
        import torch
        from mergekit.merge import run_merge
        from mergekit.options import MergeOptions
        from transformers import AutoModelForCausalLM

        from alloylm.merge import validate_merge_config, write_mergekit_yaml

        self.count += 1
        cfg = _slerp_config(self.parents, t)
        out = self.workdir / f"merged-{'cli' if self.cli else 'run_merge'}-{self.count}"
        before = time.perf_counter()
        if self.cli:
            path = self.workdir / f"trial-{self.count}.yml"
            write_mergekit_yaml(cfg, str(path))
            subprocess.run(
                [str(MERGEKIT_YAML), str(path), str(out), "--no-copy-tokenizer", "--quiet"],
                check=True, capture_output=True, env=self.env,
            )
        else:
            run_merge(validate_merge_config(cfg), str(out), MergeOptions(copy_tokenizer=False, quiet=True))
        model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
        ready = time.perf_counter() - before
        score = mean_nll(model, self.blocks)
        del model
        shutil.rmtree(out)
        return score, ready


def trial_throughput(args: argparse.Namespace) -> dict:
    """Trials/s of each mode (see the module docstring) and the in-memory speed-ups."""
    import torch

    if args.workdir:
        from _workdir import claim_workdir

        workdir = claim_workdir(args.workdir, "merge_search")
        cleanup = None
    else:
        cleanup = tempfile.TemporaryDirectory(prefix="alloylm-bench-merge-")
        workdir = Path(cleanup.name)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        load_at_start = _load()
        parents, figures = build_parents(workdir, args)
        _say(f"parents: 2 x {figures['parameters'] / 1e6:.1f}M parameters ({figures['bytes_per_parent'] / 2**20:.0f} MiB each) in {workdir}")
        blocks = evaluation_blocks(args)
        ts = [round((i + 1) / (args.trials + 1), 4) for i in range(args.trials)]
        modes = [m for m in MODES if not (args.skip_cli and m == "disk_cli")]
        runners = {}
        for mode in modes:
            if mode.startswith("in_memory"):
                runners[mode] = _InMemoryMode(parents, blocks, keep_parents_in_memory=True if mode == "in_memory_preloaded" else None)
            else:
                runners[mode] = _DiskMode(parents, blocks, workdir, cli=mode == "disk_cli", threads=args.threads)
            runners[mode].trial(0.5)  # warm-up: imports, page cache, first-call costs
        records = {m: {"wall": [], "ready": [], "cpu": [], "scores": []} for m in modes}
        # Round robin, one trial of every mode per t: a change in the machine's load hits every
        # mode alike instead of whichever mode happened to run then.
        for t in ts:
            for mode in modes:
                wall, cpu = time.perf_counter(), _cpu_seconds()
                score, ready = runners[mode].trial(t)
                records[mode]["wall"].append(time.perf_counter() - wall)
                records[mode]["cpu"].append(_cpu_seconds() - cpu)
                records[mode]["ready"].append(ready)
                records[mode]["scores"].append(score)
            _say(f"t={t}: " + ", ".join(f"{m} {records[m]['wall'][-1]:.2f} s" for m in modes))

        results = {}
        for mode in modes:
            r = records[mode]
            median_wall = statistics.median(r["wall"])
            results[mode] = {
                "trials": len(r["wall"]),
                "trials_per_second": round(1 / median_wall, 3),
                "trials_per_second_total": round(len(r["wall"]) / sum(r["wall"]), 3),
                "median_seconds_per_trial": round(median_wall, 3),
                "median_seconds_to_merged_model": round(statistics.median(r["ready"]), 3),
                "median_eval_seconds": round(statistics.median(w - m for w, m in zip(r["wall"], r["ready"])), 3),
                "median_cpu_seconds_per_trial": round(statistics.median(r["cpu"]), 3),
                "setup_seconds": round(runners[mode].setup_seconds, 2),
                "seconds_per_trial": [round(w, 3) for w in r["wall"]],
                "scores": [round(s, 6) for s in r["scores"]],
            }
            _say(
                f"{mode}: {results[mode]['trials_per_second']:.3f} trials/s (median {median_wall:.2f} s per trial, "
                f"{results[mode]['median_seconds_to_merged_model']:.2f} s of it to the merged model; "
                f"{results[mode]['median_cpu_seconds_per_trial']:.2f} CPU s)"
            )
        reference = records["in_memory"]["scores"]
        mismatch = max(abs(a - b) for r in records.values() for a, b in zip(r["scores"], reference))
        fast = results["in_memory"]
        speedups = {
            f"in_memory_vs_{m}": round(fast["trials_per_second"] / results[m]["trials_per_second"], 2) for m in modes if m != "in_memory"
        }
        cpu_speedups = {
            f"in_memory_vs_{m}": round(results[m]["median_cpu_seconds_per_trial"] / fast["median_cpu_seconds_per_trial"], 2)
            for m in modes if m != "in_memory"
        }
        headline = "disk_cli" if "disk_cli" in results else "disk_in_process"
        ratio = speedups[f"in_memory_vs_{headline}"]
        _say(
            f"in-memory {fast['trials_per_second']:.3f} trials/s: {ratio:.2f}x {headline} (goal {GOAL_SPEEDUP:.0f}x), "
            f"{speedups['in_memory_vs_disk_in_process']:.2f}x disk_in_process, "
            f"{speedups['in_memory_vs_in_memory_preloaded']:.2f}x in_memory_preloaded; "
            f"scores agree across modes to {mismatch:.1e}"
        )
        return {
            "model": figures,
            "t_values": ts,
            "eval_blocks": args.eval_blocks,
            "block_size": args.block_size,
            "threads": args.threads,
            "modes": results,
            "speedups": speedups,
            "cpu_time_speedups": cpu_speedups,
            "headline_speedup": ratio,
            "headline_against": headline,
            "goal_speedup": GOAL_SPEEDUP,
            "goal_met": ratio >= GOAL_SPEEDUP,
            "max_score_difference_across_modes": mismatch,
            "load_at_start": load_at_start,
            "load_at_end": _load(),
        }
    finally:
        torch.set_num_threads(previous_threads)
        if cleanup is not None:
            cleanup.cleanup()


# ------------------------------------------------------------------------------ part (b)

# The paper's attention and MLP gradients, their mirror images and flat ones: the kind of grid the
# paper explored by hand. 3 attention x 4 MLP shapes = 12 points (6 and 9 take the first rows).
_ATTENTION = ([0, 0.5, 0.3, 0.7, 1], [1, 0.7, 0.3, 0.5, 0], [0.5] * 5)
_MLP = ([1, 0.5, 0.7, 0.3, 0], [0, 0.3, 0.7, 0.5, 1], [0.5] * 5, [0.25] * 5)


def _grid_points(count: int) -> list[dict]:
    points = [{"t": {"self_attn": a, "mlp": m, "default": 0.5}} for m in _MLP for a in _ATTENTION]
    return points[:count]


def _search_stage(searcher: str, trials: int, items: int, points: list[dict] | None = None, seed: int = 0) -> dict:
    search = {
        # the quickstart's space: embeddings, norms and lm_head (no filter matches them) get a t of their own
        "space": {"t": {"anchors": 5, "filters": ["self_attn", "mlp"], "default": "search"}},
        "searcher": searcher,
        "num_samples": trials,
        "max_concurrent_trials": 2,
        "objective": {"max_items": items},
        "seed": seed,
    }
    if points:
        search["points"] = points
    return {"kind": "merge_search", "parents": ["dpo", "instruct"], "method": "slerp", "search": search}


def quality_per_budget(args: argparse.Namespace) -> dict:
    """TPE's best after N trials against grid and random with the same N, on the quickstart parents.

    Every searcher maximises the same objective (the quickstart's suites on the validation split,
    `--quality-items` items each) over the same space (5-anchor t gradients for attention and MLP).
    The grid has `--grid-points` hand-picked gradients; TPE and random run a third as many trials
    and as many. Figures are the best validation objective each search reached.
    """
    import yaml

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))
    from alloylm.config import load_config
    from alloylm.pipeline import run_pipeline
    from alloylm.storage import read_manifest

    repo = Path(__file__).resolve().parents[1]
    raw = yaml.safe_load((repo / "configs" / "quickstart.yaml").read_text())
    raw["storage"] = args.quickstart_storage
    raw.pop("serve", None)
    grid = args.grid_points
    third = max(1, grid // 3)
    seeds = [int(s) for s in str(args.search_seeds).split(",") if s.strip()]
    # The grid is the same points whatever the seed: one search. TPE and random run once per seed.
    stages = {f"qb-grid-{grid}": _search_stage("grid", grid, args.quality_items, _grid_points(grid))}
    for seed in seeds:
        suffix = "" if seed == 0 else f"-s{seed}"
        stages |= {
            f"qb-tpe-{third}{suffix}": _search_stage("tpe", third, args.quality_items, seed=seed),
            f"qb-random-{third}{suffix}": _search_stage("random", third, args.quality_items, seed=seed),
            f"qb-tpe-{grid}{suffix}": _search_stage("tpe", grid, args.quality_items, seed=seed),
            f"qb-random-{grid}{suffix}": _search_stage("random", grid, args.quality_items, seed=seed),
        }
    raw["stages"] = {n: s for n, s in raw["stages"].items() if s.get("kind") not in ("merge", "merge_search")} | stages
    raw["evaluate"]["variants"] = [v for v in raw["evaluate"]["variants"] if v in raw["stages"]]  # the merges are gone
    raw["run"] = {**(raw.get("run") or {}), "max_parallel_stages": 1}  # one search at a time: timings are its own
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
        yaml.safe_dump(raw, handle, sort_keys=False)
    config = load_config(handle.name)
    os.unlink(handle.name)
    _say(f"(b) quickstart parents under {config.run_uri}: preparing data, training missing stages, then every search")
    # The pipeline prepares the data, trains the parents where missing (skipped when up to date),
    # then runs the searches one after another; a search already done is not rerun, and its
    # manifest's time is the one it took then.
    summary = run_pipeline(config, only=list(stages))
    if not summary.ok:
        raise SystemExit(f"(b) the run failed: {summary.failed}")
    figures: dict = {"grid_points": grid, "objective_items_per_suite": args.quality_items, "searches": {}}
    for name in stages:
        manifest = read_manifest(str(Path(config.run_uri, "stages", name)))
        rows = [json.loads(line) for line in Path(config.run_uri, "stages", name, "search", "trials.jsonl").read_text().splitlines()]
        scores = [r["score"] for r in rows if r["score"] is not None]
        best_so_far = [max(scores[: i + 1]) for i in range(len(scores))]
        figures["searches"][name] = {
            "best": manifest["metrics"]["best_score"],
            "trials": len(rows),
            "best_after_each_trial": [round(b, 6) for b in best_so_far],
            "seconds": manifest.get("seconds"),
        }
        _say(f"(b) {name}: best {manifest['metrics']['best_score']:.4f} over {len(rows)} trial(s)")
    best = {n: f["best"] for n, f in figures["searches"].items()}
    grid_best = best[f"qb-grid-{grid}"]

    def mean_over_seeds(searcher: str, trials: int) -> float:
        return statistics.fmean(best[f"qb-{searcher}-{trials}" + ("" if seed == 0 else f"-s{seed}")] for seed in seeds)

    means = {f"{searcher}_{trials}": round(mean_over_seeds(searcher, trials), 6) for searcher in ("tpe", "random") for trials in (third, grid)}
    figures["seeds"] = seeds
    figures["mean_best_over_seeds"] = means
    figures["ratios"] = {
        f"tpe_{third}_over_grid_{grid}": round(means[f"tpe_{third}"] / grid_best, 4),
        f"random_{third}_over_grid_{grid}": round(means[f"random_{third}"] / grid_best, 4),
        f"tpe_{grid}_over_grid_{grid}": round(means[f"tpe_{grid}"] / grid_best, 4),
        f"tpe_{grid}_over_random_{grid}": round(means[f"tpe_{grid}"] / means[f"random_{grid}"], 4),
    }
    figures["goal"] = f"TPE with {third} trials >= grid with {grid}, as the mean over seeds {seeds}"
    figures["goal_met"] = means[f"tpe_{third}"] >= grid_best
    _say(f"(b) TPE {third} trials, mean over {len(seeds)} seed(s) {means[f'tpe_{third}']:.4f} vs grid {grid} {grid_best:.4f}: "
         f"goal {'met' if figures['goal_met'] else 'missed'}")
    return figures


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if args.threads < 1 or args.trials < 1 or args.eval_blocks < 1 or args.block_size < 2 or args.layers < 1 or args.hidden_size < 64:
        raise SystemExit("--trials, --eval-blocks and --layers must be positive, --block-size at least 2, --hidden-size at least 64")
    results: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()}, "measured_now": []}
    earlier = json.loads(Path(args.results).read_text(encoding="utf-8")) if Path(args.results).exists() else {}
    if args.skip_throughput:
        if "trial_throughput" in earlier:
            results["trial_throughput"] = earlier["trial_throughput"]  # an earlier run's: not in measured_now
    else:
        results["trial_throughput"] = trial_throughput(args)
        results["measured_now"].append("trial_throughput")
    if not args.skip_quality:
        load_before = os.getloadavg()[0]
        results["quality_per_budget"] = quality_per_budget(args)
        results["quality_per_budget"]["load_1min"] = {"start": round(load_before, 2), "end": round(os.getloadavg()[0], 2)}
        results["quality_per_budget"]["command"] = shlex.join(["python", "benchmarks/merge_search.py", *(sys.argv[1:] if argv is None else argv)])
        results["measured_now"].append("quality_per_budget")
    elif "quality_per_budget" in earlier:
        results["quality_per_budget"] = earlier["quality_per_budget"]
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    from _results import save_results

    save_results(args.results, results)
    print(json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
