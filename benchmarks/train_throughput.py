"""Training throughput: CPT of `small-llama` on 2 Ray Train workers (DDP and ZeRO-2) against one
plain Hugging Face `Trainer` process, same data, same run; plus achieved FLOP/s against the matmul
FLOP/s this machine measures.

    .venv/bin/python benchmarks/train_throughput.py                                   # the full run (~15-25 min on 2 quiet cores)
    .venv/bin/python benchmarks/train_throughput.py --steps 10 --warmup-steps 5 --max-wait 0 --max-wait-between 0 --no-baseline-after   # quick
    .venv/bin/python benchmarks/train_throughput.py --variants ddp --workdir /tmp/tt  # keep corpus and artifacts

What it does:
1. Waits (up to `--max-wait` s) for the 1-minute load average to fall below `--max-load`, and
   again (up to `--max-wait-between` s) before each later timed run: the machine is shared, and
   every figure here is CPU time. The load at the start and end of every run is recorded.
2. One generated corpus, `builtin:general-text` + `builtin:biomaterials-corpus` as one data set,
   sized so every run below reads each block once at most, prepared once by the AlloyLM pipeline
   (`prepare_tokenizer`, `prepare_dataset`: byte-level BPE vocab 2048, blocks of `--block-size`).
3. Baseline, in this process, without Ray running: a plain `transformers.Trainer`
   (`use_cpu=True`, fp32, default optimizer (AdamW), the stage's learning rate, schedule, clipping
   and `--batch-size` sequences per step, i.e. ONE worker's batch) on `small-llama` built by
   `alloylm.models.presets.build_model` with the run's tokenizer and seed, reading the same packed
   blocks from the prepared parquet shards. Its torch threads are this process's default (what a
   user gets running it: one per core here); a `TrainerCallback` times the steps after
   `--warmup-steps`. It runs before and after the Ray runs, and the faster run is the baseline (the
   fairer yardstick on a shared machine). The same Trainer with 1 thread is measured too, to show
   what one Ray worker's core does alone.
4. AlloyLM: `alloylm.train.launcher.train_stage` on a local Ray cluster (`ray.init(num_cpus=2)`)
   with `resources: {workers: 2, cpus_per_worker: 1}` and `deepspeed: {stage: null}` (DDP over
   gloo) or `{stage: 2}` (DeepSpeed ZeRO-2), `--batch-size` per worker, so a step trains on twice
   the baseline's tokens (`--gradient-accumulation-steps`, default 1, applies to both sides). Steady-state tokens/s comes from the stage's `metrics.jsonl`: each record's
   `tokens_per_second` covers the steps since the previous record and counts the tokens of BOTH
   workers (transformers gathers `num_input_tokens_seen` over the ranks; checked against
   `global_step x workers x batch x accumulation x block` from the manifest); records whose interval starts at or
   after `--warmup-steps` are combined as total tokens / total seconds. The stage's wall time
   (Ray Train start, model load, training, saving) is reported separately.
5. FLOP/s: achieved = tokens/s x (6 N + 12 L d T), N = parameters in matmuls (every nn.Linear,
   lm_head included; the input embedding is a lookup and the norms are not matmuls), L layers,
   d hidden size, T the block size (PaLM's attention term, full not causal). Measured matmul FLOP/s:
   the model's own forward matmuls (x of batch x block rows times each Linear's weight) timed with
   `torch.matmul` in this process at its default threads and at 1 thread (best of repeats), and
   once inside 2 Ray Train workers at the same time (1 thread each, the sum). Ratios of achieved to
   measured are the MFU-like figures.

Goals (issue): DDP and ZeRO-2 >= 1.4x the baseline's tokens/s; achieved >= 50% of measured matmul
FLOP/s.

Output: readable lines, then as the last line one JSON object with every figure, also written to
`benchmarks/results/train_throughput.json`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

# Before torch, DeepSpeed or Ray are imported: DeepSpeed's CPU communication op is prebuilt here,
# and the local Ray cluster started below hands the driver's environment to its workers.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch-extensions"))  # the Makefile's: .venv/torch-extensions
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).resolve().parent / "results" / "train_throughput.json"
EXPERIMENT = "bench-train"
DATASET = "corpus"
MODEL = "small-llama"
VOCAB_SIZE = 2048
WORKERS = 2
GOAL_SPEEDUP = 1.4
GOAL_MFU = 0.5
VARIANTS = {"ddp": {"stage": None}, "zero2": {"stage": 2}}
# Generated documents per unit of --corpus-scale; enough for the default run with room to spare
# (the run stops if the prepared corpus is still too small for the steps asked for).
MATERIALS_PER_SCALE = 300
GENERAL_DOCUMENTS_PER_SCALE = 1500


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="measured optimizer steps after the warm-up, every run (default 60)")
    parser.add_argument("--warmup-steps", type=int, default=10, help="steps not measured at the start of every run (default 10)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step per worker, and per baseline step (default 8)")
    parser.add_argument(
        "--gradient-accumulation-steps", type=int, default=1,
        help="micro-batches per optimizer step on every side (default 1); more amortises the workers' gradient all-reduce",
    )
    parser.add_argument("--block-size", type=int, default=128, help="tokens per packed block, data.block_size (default 128)")
    parser.add_argument("--logging-steps", type=int, default=5, help="AlloyLM's training.logging_steps: one tokens/s record per this many steps (default 5)")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="peak learning rate on every side (default 1e-3)")
    parser.add_argument("--corpus-scale", type=float, default=1.0, help=f"corpus size: {MATERIALS_PER_SCALE} materials x 3 documents + {GENERAL_DOCUMENTS_PER_SCALE} general documents per unit (default 1)")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS), help="AlloyLM variants (default ddp zero2)")
    parser.add_argument("--no-baseline-after", action="store_true", help="run the baseline only before the Ray runs, not after as well")
    parser.add_argument("--no-single-thread", action="store_true", help="skip the 1-thread baseline")
    parser.add_argument("--max-load", type=float, default=1.0, help="wait until the 1-minute load average is below this (default 1.0)")
    parser.add_argument("--max-wait", type=float, default=600, help="wait at most this many seconds for it before the first timed run (default 600; 0: do not wait)")
    parser.add_argument("--max-wait-between", type=float, default=180, help="and at most this many before each later timed run (default 180)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the corpus, tokenizer data order and model (default 0)")
    parser.add_argument("--workdir", default=None, help="keep corpus and artifacts here (default: a temporary folder, removed)")
    parser.add_argument("--results", default=str(RESULTS), help="where the JSON goes (default benchmarks/results/train_throughput.json)")
    parser.add_argument("--verbose", action="store_true", help="show the Ray workers' output (training progress lines)")
    return parser


def _say(line: str) -> None:
    print(line, flush=True)


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def wait_for_quiet_machine(max_load: float, max_wait: float) -> dict:
    """Poll the 1-minute load average until it is below `max_load` or `max_wait` seconds passed."""
    started, first = time.monotonic(), _load()
    while _load() >= max_load and time.monotonic() - started < max_wait:
        _say(f"load average (1 min) {_load():.2f} >= {max_load}: waiting ({time.monotonic() - started:.0f} s of at most {max_wait:.0f} s)")
        time.sleep(min(20.0, max(1.0, max_wait - (time.monotonic() - started))))
    now = _load()
    return {"load_at_start": first, "load_when_done": now, "waited_seconds": round(time.monotonic() - started, 1), "quiet": now < max_load}


# ---------------------------------------------------------------------------------------------
# Corpus, model figures and matmul FLOP/s
# ---------------------------------------------------------------------------------------------


def run_config(workdir: Path, args: argparse.Namespace) -> dict:
    """The run config (a dict for `validate_config`): one data set, one stage per variant."""
    training = {
        "max_steps": args.warmup_steps + args.steps,
        "batch_size": args.batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "learning_rate": args.learning_rate,
        "logging_steps": args.logging_steps,
    }
    stages = {
        name: {
            "kind": "cpt",
            "from": {"init": MODEL},
            "data": DATASET,
            "training": training,
            "resources": {"workers": WORKERS, "cpus_per_worker": 1},
            "deepspeed": deepspeed,
        }
        for name, deepspeed in VARIANTS.items()
    }
    return {
        "experiment": EXPERIMENT,
        "storage": str(workdir / "runs"),
        "overwrite": True,
        "seed": args.seed,
        "builtin": {
            "seed": args.seed,
            "materials": max(2, round(MATERIALS_PER_SCALE * args.corpus_scale)),
            "documents_per_material": 3,
            "general_documents": max(1, round(GENERAL_DOCUMENTS_PER_SCALE * args.corpus_scale)),
        },
        "tokenizer": {"train": {"vocab_size": VOCAB_SIZE}},
        "datasets": {DATASET: {"source": ["builtin:general-text", "builtin:biomaterials-corpus"]}},
        "data": {"block_size": args.block_size},
        "stages": stages,
    }


def prepare_corpus(config) -> dict:
    """Tokenizer and packed blocks through the AlloyLM pipeline (on the running Ray cluster)."""
    from alloylm.data.prepare import dataset_uri, prepare_dataset, prepare_tokenizer

    started = time.monotonic()
    tokenizer_manifest = prepare_tokenizer(config)
    manifest = prepare_dataset(config, DATASET, tokenizer_manifest)
    counts = manifest["counts"]
    return {
        "documents_in": counts["documents_in"],
        "documents_kept": counts["documents_kept"],
        "blocks": counts["blocks"],
        "tokens": counts["tokens_out"],
        "shards": len(manifest["shards"]),
        "seconds": round(time.monotonic() - started, 1),
        "uri": dataset_uri(config, DATASET),
    }


def read_blocks(data_uri: str, block_size: int):
    """The prepared blocks as an int64 array (blocks, block_size), read from the parquet shards."""
    import numpy as np

    from alloylm.train.data import read_prepared_table

    column = read_prepared_table(data_uri, ["input_ids"]).column("input_ids").combine_chunks()
    lengths = np.diff(column.offsets.to_numpy())
    if not (lengths == block_size).all():
        raise SystemExit(f"the prepared shards hold rows of {sorted(set(lengths.tolist()))} tokens, not all {block_size}")
    return column.flatten().to_numpy().astype(np.int64).reshape(-1, block_size)


def model_figures(model, block_size: int) -> dict:
    """Parameter counts and training FLOPs per token (6 N + 12 L d T)."""
    import torch

    config = model.config
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    lm_head = model.get_output_embeddings().weight.numel()
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    attention = 12 * config.num_hidden_layers * config.hidden_size * block_size
    return {
        "parameters": total,
        "input_embedding": embedding,
        "lm_head": lm_head,
        "non_embedding": total - embedding - lm_head,
        "matmul_parameters": linear,
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "attention_flops_per_token": attention,
        "flops_per_token": 6 * linear + attention,
        "formula": "6 * matmul_parameters + 12 * layers * hidden_size * block_size (training FLOPs per token)",
    }


def model_matmul_shapes(model, rows: int) -> list[list[int]]:
    """(rows, in, out) of every nn.Linear of the model: its forward matmuls on one micro-batch."""
    import torch

    return [[rows, m.in_features, m.out_features] for m in model.modules() if isinstance(m, torch.nn.Linear)]


def matmul_gflops(shapes: list[list[int]], threads: int | None = None, min_seconds: float = 0.5, repeats: int = 5) -> float:
    """GFLOP/s of `torch.matmul` over `shapes` (x @ W^T, as nn.Linear), best of `repeats` timings.

    Self-contained (imports inside) so that Ray workers can run it.
    """
    import time as _time

    import torch

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(0)
        operands = [(torch.randn(m, k, generator=generator), torch.randn(n, k, generator=generator).t()) for m, k, n in shapes]
        flops = sum(2 * m * k * n for m, k, n in shapes)

        def once() -> None:
            for a, b in operands:
                torch.matmul(a, b)

        once()
        started = _time.perf_counter()
        once()
        loops = max(1, math.ceil(min_seconds / max(_time.perf_counter() - started, 1e-6)))
        best = float("inf")
        for _ in range(repeats):
            started = _time.perf_counter()
            for _ in range(loops):
                once()
            best = min(best, _time.perf_counter() - started)
        return flops * loops / best / 1e9
    finally:
        torch.set_num_threads(previous)


def measure_process_matmul(shapes: list[list[int]], default_threads: int) -> dict:
    square = [[1024, 1024, 1024]]
    return {
        "default_threads": round(matmul_gflops(shapes, default_threads), 2),
        "one_thread": round(matmul_gflops(shapes, 1), 2),
        "square_1024_default_threads": round(matmul_gflops(square, default_threads), 2),
    }


# ---------------------------------------------------------------------------------------------
# Baseline: one process, plain transformers.Trainer
# ---------------------------------------------------------------------------------------------


def baseline(blocks, tokenizer_uri: str, args: argparse.Namespace, threads: int, workdir: Path) -> dict:
    """A plain Trainer on the same blocks; steady tokens/s over the steps after the warm-up."""
    import torch
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments, default_data_collator

    from alloylm.models.loading import load_tokenizer
    from alloylm.models.presets import build_model

    class Blocks(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(blocks)

        def __getitem__(self, index: int) -> dict:
            ids = torch.from_numpy(blocks[index])
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    class StepTimes(TrainerCallback):
        def __init__(self) -> None:
            self.at: dict[int, float] = {}

        def on_step_end(self, args, state, control, **kwargs):
            self.at[state.global_step] = time.perf_counter()

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        tokenizer = load_tokenizer(tokenizer_uri)
        model = build_model(MODEL, tokenizer, seed=args.seed)
        total_steps = args.warmup_steps + args.steps
        training_args = TrainingArguments(
            output_dir=str(workdir / "baseline"),
            max_steps=total_steps,
            per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            learning_rate=args.learning_rate,
            # The AlloyLM stage's defaults (training: lr_scheduler, weight_decay, max_grad_norm).
            lr_scheduler_type="linear",
            weight_decay=0.0,
            max_grad_norm=1.0,
            seed=args.seed,
            use_cpu=True,
            save_strategy="no",
            report_to="none",
            logging_steps=args.logging_steps,
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        times = StepTimes()
        trainer = Trainer(model=model, args=training_args, train_dataset=Blocks(), data_collator=default_data_collator, callbacks=[times])
        trainer.remove_callback(PrinterCallback)  # its loss lines would bury this script's own output
        started = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - started
        measured = trainer.state.global_step - args.warmup_steps
        seconds = times.at[trainer.state.global_step] - times.at[args.warmup_steps]
        tokens = measured * _tokens_per_worker_step(args)
        return {
            "threads": torch.get_num_threads(),
            "optimizer": str(training_args.optim.value if hasattr(training_args.optim, "value") else training_args.optim),
            "steps": trainer.state.global_step,
            "measured_steps": measured,
            "measured_seconds": round(seconds, 3),
            "tokens_per_step": _tokens_per_worker_step(args),
            "tokens_per_s": round(tokens / seconds, 1),
            "seconds_per_step": round(seconds / measured, 4),
            "wall_seconds": round(wall, 2),
        }
    finally:
        torch.set_num_threads(previous)


def quiet_moment(args: argparse.Namespace, phase: str, waits: list[dict], first: bool = False) -> None:
    """Wait for a quiet machine before a timed phase; the wait is recorded in `waits`."""
    wait = {"phase": phase, **wait_for_quiet_machine(args.max_load, args.max_wait if first else args.max_wait_between)}
    waits.append(wait)
    if wait["waited_seconds"] or not wait["quiet"]:
        _say(f"load average (1 min) before {phase}: {wait['load_when_done']:.2f} after waiting {wait['waited_seconds']:.0f} s ({'below' if wait['quiet'] else 'NOT below'} {args.max_load})")


def _tokens_per_worker_step(args: argparse.Namespace) -> int:
    return args.batch_size * args.gradient_accumulation_steps * args.block_size


def _baseline_run(blocks, tokenizer_uri: str, args, threads: int, workdir: Path, when: str) -> dict:
    load = _load()
    result = {"when": when, "load_1min": load, **baseline(blocks, tokenizer_uri, args, threads, workdir)}
    result["load_1min"] = [load, _load()]
    _say(
        f"baseline, plain Trainer, 1 process, {result['threads']} thread(s) ({when}): {result['measured_steps']} steps of "
        f"{result['tokens_per_step']} tokens in {result['measured_seconds']:.2f} s after {args.warmup_steps} warm-up steps "
        f"-> {result['tokens_per_s']:,.0f} tokens/s ({result['seconds_per_step']:.3f} s/step; load {result['load_1min'][0]:.2f} -> {result['load_1min'][1]:.2f})"
    )
    return result


# ---------------------------------------------------------------------------------------------
# AlloyLM on Ray Train
# ---------------------------------------------------------------------------------------------


def _probe_loop(payload: dict) -> None:
    """2-worker TorchTrainer loop: report each worker's torch threads and matmul GFLOP/s, timed together."""
    import os as _os

    import json

    import torch
    import torch.distributed as dist

    dist.barrier()
    gflops = matmul_gflops(payload["shapes"], None, min_seconds=payload["min_seconds"])
    mine = {"torch_threads": torch.get_num_threads(), "omp_num_threads": _os.environ.get("OMP_NUM_THREADS"), "gflops": gflops}
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    if dist.get_rank() == 0:
        # A file, not ray.train.report: the result's metrics are not kept without a checkpoint.
        with open(payload["out"], "w", encoding="utf-8") as f:
            json.dump(every, f)


def probe_workers(shapes: list[list[int]], storage_path: Path) -> dict:
    """What a Ray Train worker of these stages gets: torch threads, and matmul GFLOP/s with both busy."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        train_loop_per_worker=_probe_loop,
        train_loop_config={"shapes": shapes, "min_seconds": 1.0, "out": str(storage_path / "workers.json")},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=WORKERS, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name="probe", storage_path=str(storage_path)),
    )
    storage_path.mkdir(parents=True, exist_ok=True)
    trainer.fit()
    workers = json.loads((storage_path / "workers.json").read_text(encoding="utf-8"))
    return {
        "torch_threads": [w["torch_threads"] for w in workers],
        "omp_num_threads": [w["omp_num_threads"] for w in workers],
        "matmul_gflops_each": [round(w["gflops"], 2) for w in workers],
        "matmul_gflops_sum": round(sum(w["gflops"] for w in workers), 2),
    }


def steady_tokens_per_second(records: list[dict], warmup_steps: int) -> dict:
    """Tokens/s over the metrics.jsonl intervals that start at or after the warm-up.

    Each record with `tokens_per_second` covers the tokens since the previous such record; its
    seconds are recovered as tokens / tokens_per_second, so the intervals combine exactly.
    """
    tokens = seconds = 0.0
    first = last = None
    previous_step, previous_tokens = 0, 0
    for record in records:
        if "tokens_per_second" not in record:
            continue
        step, seen = record["step"], record["tokens_seen"]
        if previous_step >= warmup_steps:
            tokens += seen - previous_tokens
            seconds += (seen - previous_tokens) / record["tokens_per_second"]
            first = previous_step if first is None else first
            last = step
        previous_step, previous_tokens = step, seen
    if not seconds:
        raise SystemExit(f"no metrics.jsonl interval starts after step {warmup_steps}: raise --steps or lower --logging-steps")
    return {"from_step": first, "to_step": last, "measured_steps": last - first, "tokens": int(tokens), "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1)}


def alloylm_variant(config, name: str, args: argparse.Namespace) -> dict:
    """`train_stage` for one variant; steady tokens/s from its metrics.jsonl, wall times around it."""
    from alloylm import storage
    from alloylm.train.launcher import stage_uri, train_stage

    load = _load()
    started = time.monotonic()
    manifest = train_stage(config, name)
    wall = time.monotonic() - started
    uri = stage_uri(config, name)
    records = [json.loads(line) for line in storage.read_text(storage.join(uri, "metrics.jsonl")).splitlines() if line.strip()]
    steady = steady_tokens_per_second(records, args.warmup_steps)
    metrics = manifest["metrics"]
    expected_tokens = metrics["global_step"] * metrics["world_size"] * _tokens_per_worker_step(args)
    return {
        "deepspeed_stage": VARIANTS[name]["stage"],
        "load_1min": [load, _load()],
        "world_size": metrics["world_size"],
        "global_step": metrics["global_step"],
        "tokens_seen": metrics["tokens_seen"],
        "tokens_seen_counts_every_worker": metrics["tokens_seen"] == expected_tokens,
        "tokens_per_step": metrics["world_size"] * _tokens_per_worker_step(args),
        "steady": steady,
        "tokens_per_s": steady["tokens_per_s"],
        "seconds_per_step": round(steady["seconds"] / steady["measured_steps"], 4),
        "stage_seconds": manifest["seconds"],
        "train_stage_wall_seconds": round(wall, 1),
        "whole_stage_tokens_per_s": round(metrics["tokens_seen"] / wall, 1),
        "first_loss": metrics.get("first_loss"),
        "last_loss": metrics.get("last_loss"),
    }


def _clear_stages(config) -> None:
    """A rerun in a kept --workdir must train again, not find its finished stages up to date."""
    from alloylm import storage

    for folder in ("stages", "checkpoints"):
        path = storage.resolve(storage.join(config.run_uri, folder))
        shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def _ray_init(args: argparse.Namespace) -> float:
    import ray

    started = time.monotonic()
    ray.init(num_cpus=WORKERS, include_dashboard=False, logging_level="WARNING", log_to_driver=args.verbose)
    if not args.verbose:
        import ray.data  # noqa: F401  (it sets its loggers' levels when imported: import first, then quieten)

        # Ray Data's progress lines and the corpus's skipped-duplicate notes would bury the figures.
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        logging.getLogger("alloylm.data").setLevel(logging.ERROR)
    return time.monotonic() - started


def run(args: argparse.Namespace, workdir: Path) -> dict:
    import ray
    import torch

    from alloylm.config import validate_config
    from alloylm.data.prepare import tokenizer_uri
    from alloylm.models.loading import load_tokenizer
    from alloylm.models.presets import build_model

    default_threads = torch.get_num_threads()
    config = validate_config(run_config(workdir, args))
    _clear_stages(config)
    needed = (args.warmup_steps + args.steps) * args.batch_size * args.gradient_accumulation_steps * WORKERS

    _ray_init(args)
    try:
        corpus = prepare_corpus(config)
    finally:
        ray.shutdown()
    _say(
        f"corpus: general-text + biomaterials-corpus, {corpus['documents_in']} documents ({corpus['documents_kept']} kept), "
        f"{corpus['tokens']:,} tokens in {corpus['blocks']} blocks of {args.block_size}, prepared by the AlloyLM pipeline in {corpus['seconds']:.0f} s"
    )
    if corpus["blocks"] < needed:
        raise SystemExit(f"{corpus['blocks']} blocks, but a {WORKERS}-worker run of {args.warmup_steps + args.steps} steps needs {needed}: raise --corpus-scale")
    blocks = read_blocks(corpus["uri"], args.block_size)
    tokenizer = tokenizer_uri(config)
    model = build_model(MODEL, load_tokenizer(tokenizer), seed=args.seed)
    figures = model_figures(model, args.block_size)
    shapes = model_matmul_shapes(model, args.batch_size * args.block_size)
    del model
    _say(
        f"model: {MODEL}, {figures['parameters']:,} parameters ({figures['non_embedding']:,} non-embedding, "
        f"{figures['matmul_parameters']:,} in matmuls incl. lm_head), {figures['layers']} layers, hidden {figures['hidden_size']}, "
        f"vocab {figures['vocab_size']}; {figures['flops_per_token'] / 1e6:.1f} MFLOP per token ({figures['formula']})"
    )

    waits: list[dict] = []
    quiet_moment(args, "the first timed run", waits, first=True)
    loads = [_load()]
    matmul_runs = [measure_process_matmul(shapes, default_threads)]
    _say(
        f"matmul, this process, the model's forward matmuls on {args.batch_size}x{args.block_size} rows: "
        f"{matmul_runs[0]['default_threads']:.1f} GFLOP/s at {default_threads} threads, {matmul_runs[0]['one_thread']:.1f} GFLOP/s at 1 thread "
        f"(1024^3 square: {matmul_runs[0]['square_1024_default_threads']:.1f} GFLOP/s at {default_threads} threads)"
    )

    baseline_runs = [_baseline_run(blocks, tokenizer, args, default_threads, workdir, "before the Ray runs")]
    single = None
    if not args.no_single_thread:
        quiet_moment(args, "the 1-thread baseline", waits)
        single = _baseline_run(blocks, tokenizer, args, 1, workdir, "1 thread, what one worker's core does alone")

    cluster_s = _ray_init(args)
    _say(f"ray cluster: {WORKERS} CPUs, started in {cluster_s:.1f} s (not counted)")
    variants: dict[str, dict] = {}
    try:
        probe = probe_workers(shapes, workdir / "probe")
        _say(
            f"ray train workers: torch threads {probe['torch_threads']} (OMP_NUM_THREADS {probe['omp_num_threads']}); "
            f"model-shaped matmul with both busy: {probe['matmul_gflops_each']} GFLOP/s, sum {probe['matmul_gflops_sum']:.1f}"
        )
        for name in args.variants:
            quiet_moment(args, f"alloylm {name}", waits)
            result = variants[name] = alloylm_variant(config, name, args)
            steady = result["steady"]
            _say(
                f"alloylm {name} ({WORKERS} workers x 1 CPU): steps {steady['from_step']}-{steady['to_step']}, {steady['tokens']} tokens "
                f"of both workers in {steady['seconds']:.2f} s -> {result['tokens_per_s']:,.0f} tokens/s ({result['seconds_per_step']:.3f} s/step "
                f"of {result['tokens_per_step']} tokens; load {result['load_1min'][0]:.2f} -> {result['load_1min'][1]:.2f}); whole stage {result['train_stage_wall_seconds']:.0f} s "
                f"for {result['tokens_seen']} tokens = {result['whole_stage_tokens_per_s']:,.0f} tokens/s incl. Ray Train start and saving; "
                f"loss {result['first_loss']:.3f} -> {result['last_loss']:.3f}; tokens_seen = steps x workers x batch x accumulation x block: {result['tokens_seen_counts_every_worker']}"
            )
    finally:
        ray.shutdown()

    if not args.no_baseline_after:
        quiet_moment(args, "the baseline after the Ray runs", waits)
        baseline_runs.append(_baseline_run(blocks, tokenizer, args, default_threads, workdir, "after the Ray runs"))
    matmul_runs.append(measure_process_matmul(shapes, default_threads))
    loads.append(_load())
    matmul = {key: max(run[key] for run in matmul_runs) for key in matmul_runs[0]}
    base = max(baseline_runs, key=lambda r: r["tokens_per_s"])
    _say(f"baseline: the faster default-thread run ({base['when']}), {base['tokens_per_s']:,.0f} tokens/s")
    _say(f"matmul ceiling (best of the runs before and after): {matmul['default_threads']:.1f} GFLOP/s at {default_threads} threads, {matmul['one_thread']:.1f} at 1 thread")

    def flops(tokens_per_s: float) -> float:
        return round(tokens_per_s * figures["flops_per_token"] / 1e9, 3)

    achieved = {"baseline": flops(base["tokens_per_s"]), **{n: flops(v["tokens_per_s"]) for n, v in variants.items()}}
    if single:
        achieved["baseline_1_thread"] = flops(single["tokens_per_s"])
    mfu = {name: round(value / matmul["default_threads"], 3) for name, value in achieved.items()}
    # Against what the threads each side ran on can do: the baseline's own thread count, 1 thread,
    # and the two workers' matmuls measured while both ran.
    own = {"baseline": matmul["default_threads"], "baseline_1_thread": matmul["one_thread"], **{n: probe["matmul_gflops_sum"] for n in variants}}
    mfu_own = {name: round(value / own[name], 3) for name, value in achieved.items()}
    speedup = {name: round(v["tokens_per_s"] / base["tokens_per_s"], 3) for name, v in variants.items()}
    scaling = {name: round(v["tokens_per_s"] / (WORKERS * single["tokens_per_s"]), 3) for name, v in variants.items()} if single else {}
    for name, v in variants.items():
        verdict = "meets" if speedup[name] >= GOAL_SPEEDUP else "MISSES"
        extra = f"; {scaling[name]:.0%} of 2 x the 1-thread baseline" if single else ""
        _say(f"alloylm {name}: {v['tokens_per_s']:,.0f} tokens/s = {speedup[name]:.2f}x the baseline ({verdict} the {GOAL_SPEEDUP}x goal){extra}")
    for name, value in achieved.items():
        verdict = "meets" if mfu[name] >= GOAL_MFU else "MISSES"
        _say(
            f"FLOP/s {name}: {value:.2f} GFLOP/s achieved = {mfu[name]:.0%} of the measured {matmul['default_threads']:.1f} GFLOP/s matmul "
            f"({verdict} the {GOAL_MFU:.0%} goal); {mfu_own[name]:.0%} of the matmul FLOP/s of its own threads ({own[name]:.1f})"
        )
    if max(mfu.values()) > 1:
        _say("WARNING: achieved FLOP/s above the measured matmul FLOP/s: other load disturbed the matmul timing (multi-threaded matmul suffers most)")
    _say(f"load average (1 min) {loads[0]:.2f} at the start of the timed runs, {loads[1]:.2f} at the end, on {os.cpu_count()} cores")
    return {
        "benchmark": "train_throughput",
        "command": " ".join([".venv/bin/python", "benchmarks/train_throughput.py", *sys.argv[1:]]),
        "machine": {
            "cores": os.cpu_count(),
            "ray_cpus": WORKERS,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "process_torch_threads": default_threads,
            "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
            "worker_torch_threads": probe["torch_threads"],
            "load_waits": waits,
            "load_average_1min": loads,
        },
        "settings": {
            "model": MODEL,
            "workers": WORKERS,
            "batch_size_per_worker": args.batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "block_size": args.block_size,
            "warmup_steps": args.warmup_steps,
            "measured_steps": args.steps,
            "logging_steps": args.logging_steps,
            "learning_rate": args.learning_rate,
            "precision": "fp32",
            "seed": args.seed,
        },
        "corpus": {k: v for k, v in corpus.items() if k != "uri"},
        "model": figures,
        "matmul_gflops": {"process": matmul, "process_runs": matmul_runs, "ray_workers_both_busy": probe, "shapes": "every nn.Linear of the model, x of batch*block rows"},
        "baseline": base,
        "baseline_runs": baseline_runs,
        "baseline_1_thread": single,
        "alloylm": variants,
        "tokens_per_s": {"baseline": base["tokens_per_s"], **({"baseline_1_thread": single["tokens_per_s"]} if single else {}), **{n: v["tokens_per_s"] for n, v in variants.items()}},
        "speedup_vs_baseline": speedup,
        "scaling_vs_2x_single_thread": scaling,
        "achieved_gflops": achieved,
        "mfu_vs_process_matmul": mfu,
        "mfu_vs_own_threads_matmul": mfu_own,
        "goals": {"speedup": GOAL_SPEEDUP, "mfu": GOAL_MFU},
        "goal_met": {
            "speedup": {n: s >= GOAL_SPEEDUP for n, s in speedup.items()},
            "mfu": {n: r >= GOAL_MFU for n, r in mfu.items()},
        },
    }


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if min(args.steps, args.warmup_steps, args.batch_size, args.gradient_accumulation_steps, args.logging_steps) < 1 or args.block_size < 8 or args.corpus_scale <= 0:
        raise SystemExit("--steps, --warmup-steps, --batch-size and --logging-steps must be positive, --block-size at least 8")
    if args.steps < 2 * args.logging_steps:
        raise SystemExit("--steps must cover at least two --logging-steps intervals")
    if args.workdir:
        from _workdir import claim_workdir

        workdir = claim_workdir(args.workdir, "train_throughput")
        result = run(args, workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="alloylm-bench-train-") as tmp:
            result = run(args, Path(tmp))
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    from _results import save_results

    save_results(args.results, result)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
