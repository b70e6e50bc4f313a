"""Domain knowledge against CPT tokens, for two or three model sizes (issue 12: measure, don't guess).

    .venv/bin/python benchmarks/cpt_curves.py                                  # tiny, mini, small (~25 min on 2 cores)
    .venv/bin/python benchmarks/cpt_curves.py --presets mini-llama --points 4  # one size, a quick look
    .venv/bin/python benchmarks/cpt_curves.py --workdir /tmp/curves            # keep the runs (reruns reuse them)

What it does, for each `--presets` entry:
1. The quickstart's config (`configs/quickstart.yaml`: its world, data, tokenizer and stage
   settings) with the base model built from that preset, run through the pipeline up to the `cpt`
   stage (`alloylm run --only cpt`): data, tokenizer, base, instruct, cpt. The CPT stage keeps a
   Ray Train checkpoint every `1/--points` of its steps (`checkpoint.every_steps`, `keep`), so one
   CPT run gives the whole curve. Its learning rate follows the quickstart's cosine schedule over
   the full run: a checkpoint at half the steps is not a run half as long (which would have
   annealed), so the curve reads as "knowledge along one quickstart CPT run".
2. Every checkpoint, and the Instruct model at 0 CPT tokens, is scored on the test split by the
   library's own evaluation (`alloylm.evaluate.evaluate_variants`): cloze multiple-choice accuracy
   (the quickstart's formulation, 105 items), short-answer accuracy (the CPT model asked the
   question in chat form, 64 new tokens) and general perplexity (held-out general text), each with
   its bootstrap 95% interval.

Output: readable lines; a plot (accuracy against CPT tokens, one line per size, with intervals;
general perplexity below) at `--plot` (default `docs/results/cpt-curves.png`); and as the last
line one JSON object with every figure, also written to `benchmarks/results/cpt_curves.json`.
This is a measurement of learning, not of speed: the seconds are recorded, there is no baseline ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "cpt_curves.json"
PLOT = REPO / "docs" / "results" / "cpt-curves.png"
METRICS = (
    ("multiple_choice", "accuracy", "mc"),
    ("short_answer", "accuracy", "short_answer"),
    ("general_perplexity", "perplexity", "general_ppl"),
)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="tiny-llama,mini-llama,small-llama", help="comma-separated model presets")
    parser.add_argument("--points", type=int, default=6, help="checkpoints along the CPT run (default 6)")
    parser.add_argument("--workdir", default=None, help="keep the runs here (default: a temporary folder, removed)")
    parser.add_argument("--plot", default=str(PLOT), help=f"PNG of the curves (default {PLOT.relative_to(REPO)})")
    parser.add_argument("--results", default=str(RESULTS), help="where the JSON figures go")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every size, e.g. stages.cpt.training.epochs=30 (repeatable)")
    return parser


def _say(text: str) -> None:
    print(f"[cpt_curves] {text}", flush=True)


def _config(preset: str, storage: str, points: int, overrides: list[str]):
    """The quickstart up to `cpt` at this preset, CPT checkpointing `points` times along its run.

    The checkpoint interval needs the CPT step count, which needs the packed corpus: the tokenizer
    and the CPT data set are prepared first (the pipeline then reuses them, same fingerprints).
    """
    import yaml

    from alloylm.cluster import connect_ray
    from alloylm.config import apply_overrides, load_config
    from alloylm.data.prepare import prepare_dataset, prepare_tokenizer
    from alloylm.train.data import steps_for

    raw = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    raw.update(experiment=f"curve-{preset}", storage=storage)
    raw.pop("serve", None)
    raw["stages"] = {n: raw["stages"][n] for n in ("base", "instruct", "cpt")}
    raw["stages"]["base"]["from"] = {"init": preset}
    raw["evaluate"]["variants"] = ["instruct", "cpt"]
    raw = apply_overrides(raw, overrides)

    def load(data: dict):
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
            yaml.safe_dump(data, handle, sort_keys=False)
        try:
            return load_config(handle.name)
        finally:
            os.unlink(handle.name)

    config = load(raw)
    connect_ray()
    cpt = config.stages["cpt"]
    data = prepare_dataset(config, cpt.data, prepare_tokenizer(config))
    rows = data["counts"].get("blocks") or data["counts"]["records_out"]
    steps = steps_for(rows, cpt, cpt.resources.workers)
    raw["stages"]["cpt"]["checkpoint"] = {"every_steps": max(1, steps // points), "keep": points + 1}
    return load(raw), steps


def _checkpoints(run_uri: str) -> list[tuple[int, str]]:
    """(global step, model folder) of every CPT checkpoint Ray Train kept, oldest first.

    Each is `checkpoints/cpt-<fp>/checkpoint_<time>/checkpoint/`: the HF Trainer's checkpoint
    (weights, config, tokenizer) as Ray Train's report callback registered it."""
    found = []
    for state in Path(run_uri, "checkpoints").glob("cpt-*/checkpoint_*/*/trainer_state.json"):
        folder = state.parent
        if (folder / "model.safetensors").exists() and (folder / "config.json").exists():
            found.append((int(json.loads(state.read_text())["global_step"]), str(folder)))
    return sorted(set(found))


def _figure(result: dict, key: str):
    suite = result["suites"].get(key[0]) or {}
    value = (suite.get("metrics") or {}).get(key[1])
    interval = (suite.get("intervals") or {}).get(key[1])
    return value, ([interval["low"], interval["high"]] if interval else None)


def one_size(preset: str, workdir: str, points: int, overrides: list[str]) -> dict:
    from alloylm.evaluate import data_uris, evaluate_variants
    from alloylm.layout import RunLayout
    from alloylm.pipeline import run_pipeline
    from alloylm.storage import read_manifest

    config, steps = _config(preset, workdir, points, overrides)
    layout = RunLayout.of(config)
    _say(f"{preset}: data, tokenizer, base, instruct and cpt ({steps} steps, a checkpoint every {steps // points}) under {layout.run}")
    started = time.monotonic()
    summary = run_pipeline(config, only=["cpt"])
    if not summary.ok:
        raise SystemExit(f"{preset}: the run failed: {summary.failed}")
    seconds = round(time.monotonic() - started, 1)  # this call's: stages already trained are reused
    cpt_manifest = read_manifest(layout.stage("cpt"))
    cpt = cpt_manifest["metrics"]
    tokens_per_step = cpt["tokens_seen"] / cpt["global_step"]
    kept = _checkpoints(layout.run)
    if len(kept) < 2:
        raise SystemExit(f"{preset}: expected {points} CPT checkpoints under {layout.checkpoints_root}, found {kept}")
    variants = {"step-0": layout.stage("instruct")} | {f"step-{s}": folder for s, folder in kept}
    variants[f"step-{cpt['global_step']}"] = layout.stage("cpt")  # the stage's own weights at the end
    from alloylm.data.prepare import prepare_dataset, prepare_tokenizer

    tokenizer = prepare_tokenizer(config)  # up to date: the pipeline made it
    for name in data_uris(config.evaluate, layout.run):  # the benchmark and held-out text (`--only` skips them)
        prepare_dataset(config, name, tokenizer)
    _say(f"{preset}: scoring {len(variants)} models on the test split")
    out = str(Path(workdir, f"curve-{preset}", "curve-eval"))
    evaluated = evaluate_variants(config.evaluate, variants, data_uris(config.evaluate, layout.run), out,
                                  tokenizer_uri=layout.tokenizer, split="test", compare=False)
    rows = []
    for name in sorted(variants, key=lambda n: int(n.split("-")[1])):
        step = int(name.split("-")[1])
        result = evaluated["variants"][name]
        row = {"step": step, "cpt_tokens": int(round(step * tokens_per_step)), "epoch": round(step / cpt["global_step"] * config.stages["cpt"].training.epochs, 2)}
        for key in METRICS:
            row[key[2]], row[f"{key[2]}_interval"] = _figure(result, key)
        rows.append(row)
        _say(f"{preset} step {step:5d} ({row['cpt_tokens']:>9,} tokens): MC {row['mc']:.3f} {row['mc_interval']}, "
             f"short answer {row['short_answer']:.3f}, general ppl {row['general_ppl']:.0f}")
    from alloylm.models import preset_config

    parameters = _parameter_count(preset_config(preset, vocab_size=config.tokenizer.train.vocab_size if config.tokenizer.train else 2048))
    return {"preset": preset, "parameters": parameters, "cpt_steps": cpt["global_step"], "cpt_tokens": cpt["tokens_seen"],
            "pipeline_seconds": seconds, "cpt_stage_seconds": cpt_manifest.get("seconds"),
            "cpt_final_loss": cpt.get("last_loss"), "points": rows}


def _parameter_count(model_config) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    return sum(p.numel() for p in model.parameters())


def plot(sizes: list[dict], path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.2, 7.0), dpi=100)
    FigureCanvasAgg(figure)
    top, middle, bottom = figure.subplots(3, 1, sharex=True)
    for size in sizes:
        label = f"{size['preset']} ({size['parameters'] / 1e6:.2f}M)"
        xs = [p["cpt_tokens"] / 1e6 for p in size["points"]]
        for axes, key in ((top, "mc"), (middle, "short_answer"), (bottom, "general_ppl")):
            ys = [p[key] for p in size["points"]]
            errors = [[max(0.0, y - p[f"{key}_interval"][0]) for y, p in zip(ys, size["points"])],
                      [max(0.0, p[f"{key}_interval"][1] - y) for y, p in zip(ys, size["points"])]]
            axes.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=label)
    top.axhline(0.25, color="#C44E52", linestyle="--", linewidth=1, label="chance 0.25")
    top.set_ylabel("cloze MC accuracy")
    top.set_title("Domain knowledge along CPT (test split, 95% intervals)", fontsize=10)
    top.legend(fontsize=8, loc="lower right")
    middle.set_ylabel("short-answer accuracy")
    bottom.set_ylabel("general perplexity")
    bottom.set_yscale("log")
    bottom.set_xlabel("CPT tokens (millions)")
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    if not presets or args.points < 2:
        raise SystemExit("--presets needs at least one preset and --points at least 2")
    sys.path.insert(0, str(REPO / "platform"))
    from alloylm.models import PRESETS

    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        raise SystemExit(f"--presets: unknown {unknown}; known: {', '.join(sorted(PRESETS))}")
    cleanup = None
    if args.workdir is None:
        cleanup = tempfile.TemporaryDirectory(prefix="cpt-curves-")
        workdir = cleanup.name
    else:
        from _workdir import claim_workdir

        workdir = str(claim_workdir(args.workdir, "cpt_curves"))
    load_start = os.getloadavg()[0]
    try:
        sizes = [one_size(p, workdir, args.points, args.set) for p in presets]
    finally:
        if cleanup is not None:
            cleanup.cleanup()
    plot(sizes, args.plot)
    _say(f"plot: {args.plot}")
    results = {"sizes": sizes, "overrides": args.set, "plot": os.path.relpath(args.plot, REPO),
               "load_1min": {"start": round(load_start, 2), "end": round(os.getloadavg()[0], 2)}, "cpus": os.cpu_count()}
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    from _results import save_results

    save_results(args.results, results)
    print(json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
