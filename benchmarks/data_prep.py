"""Data preparation throughput: the Ray Data pipeline against the raw tokenizer, same data, same run.

    .venv/bin/python benchmarks/data_prep.py                 # >= 50 MB corpus (a few minutes on 2 cores)
    .venv/bin/python benchmarks/data_prep.py --mb 5          # a quick run
    .venv/bin/python benchmarks/data_prep.py --mb 50 --files 200 --block-size 256 --cpus 2

What it does:
1. Generates at least `--mb` MB of `biomaterials-corpus` text with the built-in generator and writes
   it as `--files` JSON-lines shards (`{"id": ..., "text": ...}`, one document a line) into a
   temporary folder; the pipeline reads that folder as a `format: text` data set.
2. Trains one byte-level BPE tokenizer (vocab 2048) on a sample of the documents. Both sides use
   it: the pipeline through `tokenizer: {from: <its folder>}`, prepared before the timed part.
3. Raw tokenizer, one process: reads the same files, calls `tokenizer(batch, add_special_tokens=False)`
   on batches of `--batch-size` documents and packs each batch with
   `alloylm.data.tokenize.pack_token_ids`, the per-batch tails packed together at the end (what
   the pipeline does). Timed from the first file read to the last block; tokens/s = tokens in
   blocks / seconds. It runs twice, before and after the pipeline, and the faster run is the
   baseline (this machine may be shared; the faster run is the fairer yardstick).
4. Pipeline: `alloylm.data.prepare.prepare_dataset` on a local Ray cluster started here with
   `ray.init(num_cpus=--cpus, include_dashboard=False)`, keeping one idle worker per CPU as
   `alloylm`'s local cluster does (`alloylm.cluster.keep_idle_workers`; a RAY_num_workers_soft_limit
   set in the environment stands, `-1` for Ray's default). Start time reported, not counted; then
   part of the corpus, two read tasks per CPU, goes through the pipeline untimed, which starts
   Ray's worker processes. Timed from the call to the committed manifest; tokens/s = manifest
   `tokens_out` / seconds. Each variant runs `--repeats` times, interleaved with the other, and
   its fastest run counts (as for the raw side). Variants:
   `full` (normalisation, exact and near dedup: the defaults) and `tokenize_only`
   (`data.exact_dedup=false data.near_dedup.enabled=false`).
5. Checks each variant against the raw side: the same number of tokens, and for `tokenize_only`
   the same blocks in the same order (SHA-256 of every block's token ids).

Goals (issue 17): full cleaning >= 0.8x and tokenize-only >= 0.9x the raw tokenizer, on a quiet machine
(1-minute load average <= 1.5 before the timed runs; the JSON says `quiet`, and a goal counts as met
only on a quiet run).

Both sides run the Rust tokenizer with its own thread pool (TOKENIZERS_PARALLELISM=true, which
this script sets whatever the environment says; `--no-tokenizer-threads` sets it to false on
both sides, as `make` does for everything else).

Output: readable lines, then as the last line one JSON object with every figure, also written to
`benchmarks/results/data_prep.json`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "data_prep.json"
CORPUS_SOURCE = "biomaterials-corpus"
VOCAB_SIZE = 2048
TOKENIZER_SAMPLE_DOCUMENTS = 2000
DATASET = "corpus"
# The goals, pipeline tokens/s over the raw side's, measured on a quiet machine.
GOALS = {"full": 0.8, "tokenize_only": 0.9}
# A run whose 1-minute load average before the timed part is above this is not called quiet.
QUIET_LOAD = 1.5
VARIANTS = {
    "full": [],
    "tokenize_only": ["data.exact_dedup=false", "data.near_dedup.enabled=false"],
}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=50.0, help="corpus size in MB of UTF-8 text, at least (default 50)")
    parser.add_argument("--files", type=int, default=200, help="JSON-lines files the corpus is written as (default 200)")
    parser.add_argument("--block-size", type=int, default=256, help="tokens per packed block, data.block_size (default 256)")
    parser.add_argument("--batch-size", type=int, default=256, help="documents per tokenizer batch on both sides, data.batch_size (default 256)")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated corpus (default 0)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each pipeline variant, the fastest counts (default 2)")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS), help="pipeline variants to run (default both)")
    parser.add_argument("--no-tokenizer-threads", action="store_true", help="TOKENIZERS_PARALLELISM=false on both sides")
    parser.add_argument("--workdir", default=None, help="keep corpus, tokenizer and artifacts here (default: a temporary folder, removed)")
    parser.add_argument("--results", default=str(RESULTS), help="where the JSON goes (default benchmarks/results/data_prep.json)")
    return parser


def _say(line: str) -> None:
    print(line, flush=True)


# ---------------------------------------------------------------------------------------------
# Corpus and tokenizer
# ---------------------------------------------------------------------------------------------


def generate_corpus(folder: Path, megabytes: float, files: int, seed: int) -> tuple[dict, list[str]]:
    """Write at least `megabytes` MB of generated documents as `files` JSON-lines files.

    Returns the corpus figures and a sample of documents to train the tokenizer on.
    """
    from alloylm.corpus import BuiltinCorpusOptions, generate_builtin

    started = time.monotonic()
    target = int(megabytes * 1_000_000)
    probe = generate_builtin(CORPUS_SOURCE, BuiltinCorpusOptions(seed=seed, materials=100))
    materials = max(2, math.ceil(target / (sum(len(r["text"].encode("utf-8")) for r in probe) / 100) * 1.02))
    while True:
        rows = generate_builtin(CORPUS_SOURCE, BuiltinCorpusOptions(seed=seed, materials=materials))
        size = sum(len(r["text"].encode("utf-8")) for r in rows)
        if size >= target:
            break
        materials = math.ceil(materials * target / size * 1.02)
    folder.mkdir(parents=True, exist_ok=True)
    per_file = math.ceil(len(rows) / max(1, min(files, len(rows))))
    written = 0
    for start in range(0, len(rows), per_file):
        with open(folder / f"part-{written:05d}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"id": r["id"], "text": r["text"]}, ensure_ascii=False) + "\n" for r in rows[start : start + per_file])
        written += 1
    figures = {
        "materials": materials,
        "documents": len(rows),
        "text_bytes": size,
        "files": written,
        "file_bytes": sum(p.stat().st_size for p in folder.glob("*.jsonl")),
        "seconds": round(time.monotonic() - started, 3),
    }
    return figures, [r["text"] for r in rows[:: max(1, len(rows) // TOKENIZER_SAMPLE_DOCUMENTS)]]


def train_benchmark_tokenizer(sample: list[str], folder: Path) -> float:
    """Train the byte-level BPE tokenizer both sides use and save it to `folder`; returns seconds."""
    from alloylm.models.tokenizer import train_tokenizer

    started = time.monotonic()
    train_tokenizer(sample, vocab_size=VOCAB_SIZE).save_pretrained(str(folder))
    return time.monotonic() - started


# ---------------------------------------------------------------------------------------------
# The two sides
# ---------------------------------------------------------------------------------------------


def _read_texts(folder: Path) -> list[str]:
    texts = []
    for path in sorted(folder.glob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            texts.extend(json.loads(line)["text"] for line in f if line.strip())
    return texts


def raw_tokenizer(corpus: Path, tokenizer_dir: Path, block_size: int, batch_size: int) -> dict:
    """One process: read the files, tokenize in batches, pack; timed end to end."""
    from transformers import AutoTokenizer

    from alloylm.data.tokenize import pack_token_ids

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    eos_id = tokenizer.eos_token_id
    tokenizer(["warm up"], add_special_tokens=False)
    started = time.monotonic()
    texts = _read_texts(corpus)
    read_s = time.monotonic() - started
    tokenize_s = 0.0
    digest = hashlib.sha256()
    blocks, tails = 0, []
    for start in range(0, len(texts), batch_size):
        t0 = time.monotonic()
        encoded = tokenizer(texts[start : start + batch_size], add_special_tokens=False, return_attention_mask=False)["input_ids"]
        tokenize_s += time.monotonic() - t0
        full, tail = pack_token_ids(encoded, eos_id, block_size)
        digest.update(full.astype(np.int32).tobytes())
        blocks += len(full)
        tails.append(tail)
    flat = np.concatenate(tails)
    tail_blocks = flat.size // block_size
    digest.update(flat[: tail_blocks * block_size].astype(np.int32).tobytes())
    blocks += tail_blocks
    seconds = time.monotonic() - started
    return {
        "documents": len(texts),
        "blocks": blocks,
        "tokens": blocks * block_size,
        "tokens_dropped_tail": int(flat.size - tail_blocks * block_size),
        "blocks_sha256": digest.hexdigest(),
        "seconds": round(seconds, 3),
        "read_seconds": round(read_s, 3),
        "tokenizer_seconds": round(tokenize_s, 3),
        "tokens_per_s": round(blocks * block_size / seconds, 1),
    }


def _raw_run(corpus: Path, tokenizer_dir: Path, args: argparse.Namespace, when: str) -> dict:
    raw = {"when": when, **raw_tokenizer(corpus, tokenizer_dir, args.block_size, args.batch_size)}
    _say(
        f"raw tokenizer, 1 process ({when}): {raw['tokens']} tokens in {raw['blocks']} blocks of {args.block_size}, "
        f"{raw['seconds']:.2f} s (reading {raw['read_seconds']:.2f} s, tokenizer calls {raw['tokenizer_seconds']:.2f} s) "
        f"-> {raw['tokens_per_s']:,.0f} tokens/s"
    )
    return raw


def _write_config(workdir: Path, name: str, corpus: Path, tokenizer_dir: Path, args: argparse.Namespace) -> Path:
    config = {
        "experiment": name,
        "storage": str(workdir / "runs"),
        "overwrite": True,
        "tokenizer": {"from": str(tokenizer_dir)},
        "datasets": {DATASET: {"source": str(corpus), "format": "text"}},
        "data": {"block_size": args.block_size, "batch_size": args.batch_size},
    }
    path = workdir / f"{name}.yaml"
    path.write_text(json.dumps(config, indent=1), encoding="utf-8")  # JSON is YAML
    return path


def _blocks_sha256(dataset_dir: str, shards: list[str]) -> str:
    """SHA-256 of the token ids of every block, shard by shard in the manifest's (write) order."""
    import pyarrow.parquet as pq

    digest = hashlib.sha256()
    for shard in shards:
        ids = pq.read_table(os.path.join(dataset_dir, shard), columns=["input_ids"]).column("input_ids")
        digest.update(np.asarray(ids.combine_chunks().flatten(), dtype=np.int32).tobytes())
    return digest.hexdigest()


def warm_up(corpus: Path, tokenizer_dir: Path, workdir: Path, args: argparse.Namespace) -> float:
    """Prepare part of the corpus, untimed: starts Ray's worker processes and Ray Data's own
    actors, a once-per-cluster cost that would otherwise land on whichever variant runs first."""
    from alloylm.config import load_config
    from alloylm.data.prepare import prepare_dataset, prepare_tokenizer

    from alloylm.data.sources import FILES_PER_READ_TASK

    started = time.monotonic()
    # Enough files for two read tasks per CPU and two tokenizer tasks per actor, so every worker
    # process the timed runs use has started and imported the pipeline's modules (one file used
    # one worker: the first timed variant then paid 2-3 s of process starts and imports).
    sample = workdir / "warm-up-files"
    shutil.rmtree(sample, ignore_errors=True)
    sample.mkdir()
    for path in sorted(corpus.glob("*.jsonl"))[: 2 * args.cpus * FILES_PER_READ_TASK]:
        shutil.copyfile(path, sample / path.name)
    config = load_config(_write_config(workdir, "bench-warm-up", sample, tokenizer_dir, args))
    prepare_dataset(config, DATASET, prepare_tokenizer(config))
    return time.monotonic() - started


def pipeline(variant: str, corpus: Path, tokenizer_dir: Path, workdir: Path, args: argparse.Namespace) -> dict:
    """`prepare_dataset` on the running Ray cluster; timed from the call to the committed manifest."""
    from alloylm.config import load_config
    from alloylm.data.prepare import dataset_uri, prepare_dataset, prepare_tokenizer

    config = load_config(_write_config(workdir, f"bench-{variant.replace('_', '-')}", corpus, tokenizer_dir, args), VARIANTS[variant])
    tokenizer_manifest = prepare_tokenizer(config)  # not timed: the tokenizer step
    shutil.rmtree(dataset_uri(config, DATASET), ignore_errors=True)  # a repeat must not find it up to date
    started = time.monotonic()
    manifest = prepare_dataset(config, DATASET, tokenizer_manifest)
    seconds = time.monotonic() - started
    counts = manifest["counts"]
    return {
        "documents_in": counts["documents_in"],
        "documents_kept": counts["documents_kept"],
        "dropped": counts["dropped"],
        "blocks": counts["blocks"],
        "tokens": counts["tokens_out"],
        "tokens_dropped_tail": counts["tokens_dropped_tail"],
        # Shard names sort in write order (part-000000, part-000001, ...); tail.parquet (the tails' blocks) last.
        "blocks_sha256": _blocks_sha256(dataset_uri(config, DATASET), sorted(manifest["shards"])),
        "shards": len(manifest["shards"]),
        "seconds": round(seconds, 3),
        "tokens_per_s": round(counts["tokens_out"] / seconds, 1),
        # Where the time went, from the data set's manifest (alloylm.data.prepare.DATA_PHASES).
        "breakdown": manifest["breakdown"],
    }


def _check(result: dict, raw: dict) -> str:
    if result["blocks_sha256"] == raw["blocks_sha256"]:
        return f"same blocks as the raw side, in the same order ({result['tokens']} tokens, {result['blocks']} blocks, SHA-256 equal)"
    if result["documents_kept"] != raw["documents"]:
        removed = raw["documents"] - result["documents_kept"]
        return f"{result['tokens']} tokens vs raw {raw['tokens']}: {removed} documents were removed by cleaning"
    if result["tokens"] == raw["tokens"]:
        return f"same token count as the raw side ({result['tokens']}) but different blocks"
    return f"MISMATCH: {result['tokens']} tokens vs raw {raw['tokens']} from the same documents"


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def run(args: argparse.Namespace, workdir: Path) -> dict:
    import ray

    corpus_dir, tokenizer_dir = workdir / "corpus", workdir / "tokenizer"
    shutil.rmtree(workdir / "runs", ignore_errors=True)
    shutil.rmtree(corpus_dir, ignore_errors=True)
    corpus, sample = generate_corpus(corpus_dir, args.mb, args.files, args.seed)
    _say(
        f"corpus: {corpus['documents']} documents, {corpus['text_bytes'] / 1e6:.1f} MB of text in {corpus['files']} "
        f"JSON-lines files ({corpus['file_bytes'] / 1e6:.1f} MB) at {corpus_dir}, generated in {corpus['seconds']:.1f} s"
    )
    tokenizer_s = train_benchmark_tokenizer(sample, tokenizer_dir)
    _say(f"tokenizer: byte-level BPE, vocab {VOCAB_SIZE}, trained on {len(sample)} documents in {tokenizer_s:.1f} s")
    load_start = os.getloadavg()[0]
    raw_runs = [_raw_run(corpus_dir, tokenizer_dir, args, "before the pipeline")]

    from alloylm.cluster import IDLE_WORKERS_VARIABLE, keep_idle_workers

    started = time.monotonic()
    keep_idle_workers(args.cpus)  # as `alloylm` starts its local cluster (connect_ray)
    ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    cluster_s = time.monotonic() - started
    _say(f"ray cluster: {args.cpus} CPUs, started in {cluster_s:.2f} s (not counted)")
    results: dict[str, dict] = {}
    try:
        warm_up_s = warm_up(corpus_dir, tokenizer_dir, workdir, args)
        _say(f"warm-up: part of the corpus through the pipeline in {warm_up_s:.2f} s (not counted: starts Ray's workers)")
        runs: dict[str, list[dict]] = {variant: [] for variant in args.variants}
        for round_ in range(args.repeats):
            for variant in args.variants:  # interleaved, so a slow spell of the machine hits both
                runs[variant].append(pipeline(variant, corpus_dir, tokenizer_dir, workdir, args))
                phases = " ".join(f"{k} {v:.2f}" for k, v in runs[variant][-1]["breakdown"].items())
                _say(f"pipeline {variant}, run {round_ + 1} of {args.repeats}: {runs[variant][-1]['seconds']:.2f} s ({phases})")
        for variant in args.variants:
            # The fastest run, as for the raw side: on a shared machine it is the fairer yardstick.
            result = results[variant] = dict(min(runs[variant], key=lambda r: r["seconds"]))
            result["runs_seconds"] = [r["seconds"] for r in runs[variant]]
            if len({r["blocks_sha256"] for r in runs[variant]}) != 1:
                raise SystemExit(f"pipeline {variant}: its runs wrote different blocks: {[r['blocks_sha256'] for r in runs[variant]]}")
            result["check"] = _check(result, raw_runs[0])
            result["same_blocks_as_raw"] = result["blocks_sha256"] == raw_runs[0]["blocks_sha256"]
            result["same_token_count_as_raw"] = result["tokens"] == raw_runs[0]["tokens"]
            dropped = ", ".join(f"{k} {v}" for k, v in result["dropped"].items()) or "none"
            _say(
                f"pipeline {variant}: {result['documents_in']} documents in, {result['documents_kept']} kept (dropped: {dropped}), "
                f"{result['tokens']} tokens in {result['blocks']} blocks, {result['seconds']:.2f} s -> {result['tokens_per_s']:,.0f} tokens/s"
            )
            _say(f"  check: {result['check']}")
    finally:
        ray.shutdown()
    raw_runs.append(_raw_run(corpus_dir, tokenizer_dir, args, "after the pipeline"))
    raw = max(raw_runs, key=lambda r: r["tokens_per_s"])
    _say(f"raw baseline: the faster raw run ({raw['when']}), {raw['tokens_per_s']:,.0f} tokens/s")
    for variant, result in results.items():
        result["ratio_to_raw"] = round(result["tokens_per_s"] / raw["tokens_per_s"], 3)
        verdict = "meets" if result["ratio_to_raw"] >= GOALS[variant] else "misses"
        _say(f"pipeline {variant}: {result['tokens_per_s']:,.0f} tokens/s = {result['ratio_to_raw']:.2f}x raw ({verdict} the {GOALS[variant]}x goal)")
    load_end = os.getloadavg()[0]
    quiet = load_start <= QUIET_LOAD
    _say(
        f"load average (1 min) {load_start:.1f} before the timed runs, {load_end:.1f} after, on {os.cpu_count()} cores: "
        + ("a quiet machine" if quiet else f"NOT a quiet machine (load above {QUIET_LOAD} before the timed runs): these ratios are not the goal's measure")
    )
    return {
        "benchmark": "data_prep",
        "machine": {
            "cores": os.cpu_count(),
            "ray_cpus": args.cpus,
            "ray_idle_workers_kept": os.environ.get(IDLE_WORKERS_VARIABLE),
            "python": platform.python_version(),
            "load_average_1min": [round(load_start, 2), round(load_end, 2)],
            "quiet": quiet,
            "tokenizers_parallelism": os.environ["TOKENIZERS_PARALLELISM"],
        },
        "settings": {"block_size": args.block_size, "batch_size": args.batch_size, "files": corpus["files"], "vocab_size": VOCAB_SIZE},
        "corpus_mb": round(corpus["text_bytes"] / 1e6, 2),
        "corpus_file_mb": round(corpus["file_bytes"] / 1e6, 2),
        "documents": corpus["documents"],
        "tokens": raw["tokens"],
        "corpus_seconds": corpus["seconds"],
        "tokenizer_train_seconds": round(tokenizer_s, 3),
        "cluster_start_seconds": round(cluster_s, 3),
        "warm_up_seconds": round(warm_up_s, 3),
        "raw": raw,
        "raw_runs": raw_runs,
        "pipeline": results,
        "ratios": {variant: r["ratio_to_raw"] for variant, r in results.items()},
        "goal_ratio": {variant: GOALS[variant] for variant in results},
        # Met only on a quiet machine: a loaded one slows the raw side more than the pipeline.
        "goal_met": {variant: quiet and r["ratio_to_raw"] >= GOALS[variant] for variant, r in results.items()},
    }


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if args.mb <= 0 or args.files < 1 or args.cpus < 1 or args.repeats < 1 or args.block_size < 8 or args.batch_size < 1:
        raise SystemExit("--mb, --files, --cpus, --repeats and --batch-size must be positive and --block-size at least 8")
    # Before anything imports `tokenizers`; Ray workers inherit it (local cluster started here).
    os.environ["TOKENIZERS_PARALLELISM"] = "false" if args.no_tokenizer_threads else "true"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.workdir:
        from _workdir import claim_workdir

        workdir = claim_workdir(args.workdir, "data_prep")
        result = run(args, workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="alloylm-bench-") as tmp:
            result = run(args, Path(tmp))
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    from _results import save_results

    save_results(args.results, result)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
