"""Ray Train's own start-up cost per stage: AlloyLM's trainer class against Ray Train's as it is.

Every training stage is one `TorchTrainer.fit`. Before any of our code runs, Ray Train starts a
controller, a synchronization actor and the workers (each a fresh process importing `ray.train`,
two of them torch), plus helper actors. `alloylm.train.launcher.trainer_class()` leaves out the
helpers that have nothing to do: the `DatasetManager` of a stage that passes no data set (every
kind but CPT) and, on a cluster without a State API (as here, and as `alloylm` starts a local one),
the `PlacementGroupCleaner`. This measures what that saves, and the floor that stays: a `fit` of
an empty train loop, both sides in interleaved pairs on one local cluster, wall time and the CPU
time of the whole machine (psutil's `cpu_times`) over each `fit`.

    .venv/bin/python benchmarks/stage_startup.py [--pairs 6] [--workers 1]

The first pair is a warm-up and not counted. The last line is one JSON object, also written to
benchmarks/results/stage_startup.json. A run with 1-minute load above 1.5 before it is not quiet,
and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))
sys.path.insert(0, str(REPO / "benchmarks"))
RESULTS = REPO / "benchmarks" / "results" / "stage_startup.json"
QUIET_LOAD = 1.5


def _busy_seconds() -> float:
    """CPU-seconds the machine's CPUs have been busy since boot, all CPUs together (psutil)."""
    import psutil

    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def _empty_loop(config: dict) -> dict:
    return {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=6, help="interleaved pairs counted (one more is the warm-up)")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()

    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from _results import save_results
    from alloylm.train.launcher import trainer_class

    load_before = round(os.getloadavg()[0], 2)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ours = trainer_class()
    cpus = os.cpu_count() or 1
    sides = {"ray_train_defaults": TorchTrainer, "alloylm": ours}
    runs: dict[str, list[dict]] = {name: [] for name in sides}
    with tempfile.TemporaryDirectory(prefix="alloylm-startup-") as storage:
        for pair in range(args.pairs + 1):
            order = list(sides) if pair % 2 else list(reversed(sides))
            for name in order:
                busy0 = _busy_seconds()
                started = time.monotonic()
                sides[name](
                    _empty_loop,
                    scaling_config=ray.train.ScalingConfig(num_workers=args.workers, resources_per_worker={"CPU": 1}),
                    run_config=ray.train.RunConfig(name=f"{name}-{pair}", storage_path=storage),
                ).fit()
                seconds = time.monotonic() - started
                cpu_seconds = _busy_seconds() - busy0
                if pair:  # the first pair starts Ray's own worker pool: not counted
                    runs[name].append({"seconds": round(seconds, 2), "cpu_seconds": round(cpu_seconds, 1)})
                print(f"pair {pair} {name}: {seconds:.2f} s, {cpu_seconds:.1f} CPU-s{'' if pair else ' (warm-up)'}", flush=True)
                time.sleep(2)  # the previous fit's processes exit
    ray.shutdown()
    load_after = round(os.getloadavg()[0], 2)

    medians = {name: {key: round(statistics.median(run[key] for run in values), 2) for key in ("seconds", "cpu_seconds")}
               for name, values in runs.items()}
    base, new = medians["ray_train_defaults"], medians["alloylm"]
    result = {
        "workers": args.workers,
        "pairs": args.pairs,
        "runs": runs,
        "median": medians,
        "saved_seconds": round(base["seconds"] - new["seconds"], 2),
        "saved_cpu_seconds": round(base["cpu_seconds"] - new["cpu_seconds"], 2),
        "pairs_with_less_cpu": sum(a["cpu_seconds"] < b["cpu_seconds"] for a, b in zip(runs["alloylm"], runs["ray_train_defaults"], strict=True)),
        "pairs_faster": sum(a["seconds"] < b["seconds"] for a, b in zip(runs["alloylm"], runs["ray_train_defaults"], strict=True)),
        "speedup": round(base["seconds"] / new["seconds"], 3),
        "load_before": load_before,
        "load_after": load_after,
        "quiet": load_before <= QUIET_LOAD,
        "machine": {"cpus": cpus, "python": sys.version.split()[0]},
    }
    if not result["quiet"]:
        print(f"not a quiet machine: 1-minute load {load_before} > {QUIET_LOAD} before the runs", flush=True)
    save_results(RESULTS, result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
