"""Wall time of a whole run: the scheduler's parallel branches against one stage at a time.

Both sides run the same config from empty storage in the same session; the baseline is the same
pipeline with `run.max_parallel_stages=1` (every step in dependency order, one at a time, which is
what `alloylm run` did before the scheduler). Two workloads:

(a) `configs/quickstart.yaml` unchanged, on a local 2-CPU cluster (`--skip-quickstart` leaves it out);
(b) the paper's DAG in miniature (base -> cpt -> sft -> {dpo, orpo}; the instruct model; two fixed
    SLERP merges and a merge search; evaluation of every variant) on a two-node local cluster
    (`ray start --head` plus a worker node, 2 CPUs each: 4 CPUs; `--skip-paper-dag` leaves it out).

    .venv/bin/python benchmarks/pipeline.py [--skip-quickstart | --skip-paper-dag] [--workdir DIR]

Each side also records every training stage's time outside the trainer loop (wall minus
`breakdown.training` in its manifest) and their median.

The last line is one JSON object, also written to benchmarks/results/pipeline.json. On a machine
with fewer cores than the cluster's logical CPUs the parallel side gains less: stages share cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RESULTS = REPO / "benchmarks" / "results" / "pipeline.json"


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def paper_dag(storage: str) -> dict:
    """The DAG of configs/paper/llama-3.1-8b-base.yaml on the built-in corpus with pico models."""
    raw = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text(encoding="utf-8"))
    raw.update(experiment="paper-dag", storage=storage)
    raw["builtin"] = {"materials": 8, "documents_per_material": 2, "general_documents": 120, "general_chats": 80,
                      "heldout_documents": 4, "general_heldout_documents": 8}
    raw["tokenizer"] = {"train": {"vocab_size": 512}}
    raw["data"] = {**raw["data"], "block_size": 64, "tokenizer_actors": 1}
    fast = {"max_steps": 8, "batch_size": 4, "learning_rate": 1.0e-3}
    stages = {
        "base": {"kind": "cpt", "from": {"init": "pico-llama"}, "data": "general-text", "training": fast},
        "instruct": {"kind": "sft", "from": "base", "data": "general-chat", "training": fast},
        "cpt": {"kind": "cpt", "from": "base", "data": "domain-text", "training": fast},
        "sft": {"kind": "sft", "from": "cpt", "data": "domain-qa", "training": fast},
        "dpo": {"kind": "dpo", "from": "sft", "data": "domain-preferences", "training": fast},
        "orpo": {"kind": "orpo", "from": "sft", "data": "domain-preferences", "training": fast},
    }
    gradient = {"t": {"self_attn": [0, 0.5, 0.3, 0.7, 1], "mlp": [1, 0.5, 0.7, 0.3, 0], "default": 0.5}}
    for name, parent in (("dpo-slerp", "dpo"), ("orpo-slerp", "orpo")):
        stages[name] = {"kind": "merge", "parents": [parent, "instruct"], "method": "slerp", "parameters": gradient}
    search = raw["stages"]["merged"]
    search["search"].update(num_samples=4)  # one trial at a time, as the quickstart: reproducible under ASHA
    search["search"]["objective"]["max_items"] = 8
    stages["merged"] = search
    raw["stages"] = stages
    raw["evaluate"] = {**raw["evaluate"], "variants": ["instruct", "cpt", "sft", "dpo", "orpo", "dpo-slerp", "orpo-slerp", "merged"],
                       "max_items": 8}
    raw["evaluate"]["suites"]["short_answer"]["max_new_tokens"] = 4
    raw.pop("serve", None)
    return raw


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def stop_processes_under(marker: str) -> None:
    """Stop only our cluster's processes (their command lines name our temp dir), never `ray stop`."""
    ours = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if marker in " ".join(proc.info["cmdline"] or []):
                ours.append(proc)
        except psutil.Error:
            pass
    for proc in ours:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    # Ray 2.60's gcs_server and raylet do not exit on SIGTERM (tests/conftest.py stop_ray_processes):
    # 3 s for the others, then the rest are killed.
    _, alive = psutil.wait_procs(ours, timeout=3)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass


def run_once(config: dict, label: str, workdir: Path, env: dict, *overrides: str) -> dict:
    shutil.rmtree(config["storage"], ignore_errors=True)  # from empty storage (a kept --workdir's earlier run)
    path = workdir / f"{label}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    before = load_average()
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "alloylm.cli", "-q", "run", str(path), *overrides],
                          env=env, capture_output=True, text=True, cwd=REPO)
    seconds = round(time.monotonic() - started, 1)
    if done.returncode != 0:
        raise SystemExit(f"{label}: alloylm run exited {done.returncode}:\n{done.stderr[-4000:]}")
    summary = json.JSONDecoder().raw_decode(done.stdout[done.stdout.rfind('{\n  "experiment"'):])[0]
    steps = {k: s.get("seconds") for k, s in summary["steps"].items()}
    # Issue 17's figure: each training stage's wall time minus its trainer loop (manifest `breakdown`).
    outside = {name: round(entry["seconds"] - entry["breakdown"].get("training", 0.0), 1)
               for name, entry in (summary.get("stages") or {}).items() if entry.get("breakdown")}
    median_outside = round(statistics.median(outside.values()), 1) if outside else None
    print(f"{label}: {seconds} s (load {before} -> {load_average()}); median outside training per stage {median_outside} s", flush=True)
    return {"seconds": seconds, "load_before": before, "load_after": load_average(), "steps": steps,
            "outside_training": outside, "median_outside_training": median_outside,
            "scores": (summary.get("evaluation") or {}).get("scores")}


def compare(config: dict, name: str, workdir: Path, env: dict) -> dict:
    sequential = run_once({**config, "storage": str(workdir / f"{name}-seq")}, f"{name}-sequential", workdir, env, "run.max_parallel_stages=1")
    parallel = run_once({**config, "storage": str(workdir / f"{name}-par")}, f"{name}-parallel", workdir, env)
    same = sequential["scores"] == parallel["scores"]
    return {"sequential": sequential, "parallel": parallel, "speedup": round(sequential["seconds"] / parallel["seconds"], 3),
            "same_scores": same}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-quickstart", action="store_true", help="only the paper DAG on two nodes")
    parser.add_argument("--skip-paper-dag", action="store_true", help="only the quickstart on 2 CPUs")
    parser.add_argument("--workdir", default=None, help="keep both sides' runs here (default: a temporary folder, removed)")
    args = parser.parse_args()
    if args.skip_quickstart and args.skip_paper_dag:
        parser.error("--skip-quickstart and --skip-paper-dag leave nothing to measure")
    if args.workdir:
        from _workdir import claim_workdir

        workdir = claim_workdir(args.workdir, "pipeline")
    else:
        workdir = Path(tempfile.mkdtemp(prefix="alloylm-bench-pipeline-"))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "RAY_DEDUP_LOGS": "0"}
    env.pop("RAY_ADDRESS", None)
    result: dict = {"benchmark": "pipeline", "cores": os.cpu_count(), "load_start": load_average()}
    try:
        if not args.skip_quickstart:
            quickstart = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text(encoding="utf-8"))
            quickstart.pop("serve", None)
            result["quickstart_2cpu"] = compare(quickstart, "quickstart", workdir, env)
        if not args.skip_paper_dag:
            result["paper_dag_2x2cpu"] = paper_dag_on_two_nodes(workdir, env)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    result["load_end"] = load_average()
    from _results import save_results

    measured = [key for key in ("quickstart_2cpu", "paper_dag_2x2cpu") if key in result]
    save_results(RESULTS, result, keep_from_last=tuple(k for k in ("quickstart_2cpu", "paper_dag_2x2cpu") if k not in measured))
    print(json.dumps(result))


def paper_dag_on_two_nodes(workdir: Path, env: dict) -> dict:
    temp_dir = tempfile.mkdtemp(prefix="alpb-", dir="/tmp")
    port = free_ports(1)[0]
    ray_env = {**env, "RAY_AUTH_MODE": "token"}
    common = ["--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    try:
        subprocess.run([str(BIN / "ray"), "start", "--head", f"--port={port}", "--include-dashboard=false", *common],
                       check=True, env=ray_env, capture_output=True)
        subprocess.run([str(BIN / "ray"), "start", f"--address=127.0.0.1:{port}", *common], check=True, env=ray_env, capture_output=True)
        return compare(paper_dag(""), "paper", workdir, {**ray_env, "RAY_ADDRESS": f"127.0.0.1:{port}"})
    finally:
        stop_processes_under(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
