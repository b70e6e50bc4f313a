"""What a merge keeps: domain knowledge against general text, over the merge search's trials (issue 12).

    .venv/bin/python benchmarks/merge_tradeoff.py                          # the quickstart, from empty storage (~8 min on 2 cores)
    .venv/bin/python benchmarks/merge_tradeoff.py --workdir /tmp/qs/final  # reuse a quickstart run's storage (only the search reruns)
    .venv/bin/python benchmarks/merge_tradeoff.py --general-weight 4
    .venv/bin/python benchmarks/merge_tradeoff.py --filters self_attn,mlp,embed_tokens,lm_head   # t of their own

Issue 12 asks for a merged variant that keeps >= 80% of DPO's multiple-choice gain over `instruct`
with a general perplexity closer to `instruct`'s than to DPO's. This measures whether the SLERP
search space holds such a point at the quickstart's scale:

1. `alloylm run configs/quickstart.yaml --only merged` with the merge search's objective given a
   general term: the quickstart's suites (cloze multiple choice, short answers) plus
   `general_perplexity` at `--general-weight` (its headline is 2^-bits_per_byte), on validation as
   always. Stages upstream of the search are reused when `--workdir` already holds them; the
   merged stage is retrained (`overwrite=true`) when its config changed.
2. Every trial's suite values (what Tune recorded: P(correct option) on the objective's items,
   short-answer accuracy, general bits per byte) against the parents' validation values: the
   target region is P(correct) >= instruct + 0.8 x (dpo - instruct) and general bits per byte
   below the parents' midpoint.

Output: one line per trial; a plot at `--plot` (default docs/results/merge-tradeoff.png); as the
last line one JSON object with every figure, also written to benchmarks/results/merge_tradeoff.json.
A measurement of what the search can find, not of speed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "merge_tradeoff.json"
PLOT = REPO / "docs" / "results" / "merge-tradeoff.png"
CONFIG = REPO / "configs" / "quickstart.yaml"


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=None, help="the run's storage (default: a temporary folder, removed)")
    parser.add_argument("--general-weight", type=float, default=2.0, help="weight of general_perplexity in the search objective (default 2)")
    parser.add_argument(
        "--filters", default="self_attn,mlp",
        help="tensor-name filters with a `t` gradient of their own (default self_attn,mlp, the quickstart's); every other "
        "tensor shares `t.default`. Embeddings and lm_head lie outside the layers, so mergekit reads their gradient's "
        "first anchor only. Other than the default, the paper's point (attention and MLP only) is not tried first",
    )
    parser.add_argument("--plot", default=str(PLOT), help="PNG of the trials")
    parser.add_argument("--results", default=str(RESULTS), help="where the JSON figures go")
    return parser


def objective_override(weight: float) -> str:
    suites = {
        "multiple_choice": {"formulation": "cloze"},
        "short_answer": {"max_new_tokens": 64},
        "domain_perplexity": {"enabled": False},
        "general_perplexity": {"weight": weight},
    }
    return "stages.merged.search.objective.suites=" + json.dumps(suites)


def parent_values(run: Path, variant: str) -> dict:
    """A variant's validation P(correct option) and general bits per byte (the run's own evaluation)."""
    suites = json.loads((run / "eval" / "validation" / variant / "results.json").read_text())["suites"]
    return {
        "p_correct": suites["multiple_choice"]["metrics"]["mean_prob_correct"],
        "general_bpb": suites["general_perplexity"]["metrics"]["bits_per_byte"],
    }


def trial_rows(run: Path) -> list[dict]:
    rows = []
    for line in (run / "stages" / "merged" / "search" / "trials.jsonl").read_text().splitlines():
        trial = json.loads(line)
        suites = trial.get("suites") or {}
        general = suites.get("general_perplexity")
        rows.append({
            "number": trial["number"],
            "status": trial["status"],  # complete, or stopped by ASHA at its first rung (half the items)
            "p_correct": suites.get("multiple_choice"),
            "short_answer": suites.get("short_answer"),
            "general_bpb": -math.log2(general) if general else None,
            "t_default": (trial.get("values") or {}).get("t.default"),
            "t": {k: v for k, v in (trial.get("values") or {}).items() if k.startswith("t.")},
            "score": trial.get("score"),
        })
    return rows


def plot(rows: list[dict], instruct: dict, dpo: dict, target_p: float, midpoint: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 4.5))
    for status, marker in (("complete", "o"), ("stopped", "x")):
        points = [r for r in rows if r["status"] == status and r["general_bpb"] is not None]
        ax.scatter([r["general_bpb"] for r in points], [r["p_correct"] for r in points], marker=marker,
                   label=f"trials, {status}" + (" (ASHA, half the items)" if status == "stopped" else ""))
    for name, values, color in (("instruct", instruct, "tab:green"), ("dpo", dpo, "tab:red")):
        ax.scatter([values["general_bpb"]], [values["p_correct"]], marker="*", s=200, color=color, label=f"{name} (validation)")
    ax.axhline(target_p, color="grey", linestyle="--", linewidth=1)
    ax.axvline(midpoint, color="grey", linestyle=":", linewidth=1)
    ax.fill_between([ax.get_xlim()[0], midpoint], target_p, 1.0, color="tab:blue", alpha=0.08, label="target region")
    ax.set_xlabel("general bits per byte (lower keeps more general text)")
    ax.set_ylabel("P(correct option), validation")
    ax.set_ylim(0, 1)
    ax.set_title("Merge search trials: domain knowledge against general text")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # outside: the points fill the axes
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if args.workdir:
        from _workdir import claim_workdir

        workdir = str(claim_workdir(args.workdir, "merge_tradeoff"))  # its run overwrites (overwrite=true)
    else:
        workdir = tempfile.mkdtemp(prefix="alloylm-tradeoff-")
    command = [sys.executable, "-m", "alloylm.cli", "run", str(CONFIG), f"storage={workdir}", "overwrite=true",
               objective_override(args.general_weight), "--only", "merged"]
    filters = [f.strip() for f in args.filters.split(",") if f.strip()]
    if filters != ["self_attn", "mlp"]:
        command[-2:-2] = [f"stages.merged.search.space.t.filters={json.dumps(filters)}", "stages.merged.search.points=[]"]
    print("$", " ".join(command), flush=True)
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stderr[-5000:], file=sys.stderr)
        return done.returncode
    run = Path(workdir) / "quickstart"
    instruct, dpo = parent_values(run, "instruct"), parent_values(run, "dpo")
    target_p = instruct["p_correct"] + 0.8 * (dpo["p_correct"] - instruct["p_correct"])
    midpoint = (instruct["general_bpb"] + dpo["general_bpb"]) / 2
    rows = trial_rows(run)
    for row in sorted(rows, key=lambda r: r["general_bpb"] or math.inf):
        print(f"trial {row['number']:>2} {row['status']:<8} general bits/byte {row['general_bpb']:.3f}  "
              f"P(correct) {row['p_correct']:.3f}  short answer {row['short_answer']:.3f}  t.default {row['t_default']:.2f}")
    scored = [r for r in rows if r["general_bpb"] is not None and r["p_correct"] is not None]
    below = [r for r in scored if r["general_bpb"] < midpoint]
    in_target = [r for r in below if r["p_correct"] >= target_p]
    best = max((r for r in rows if r["status"] == "complete" and r["score"] is not None), key=lambda r: r["score"])
    plot(rows, instruct, dpo, target_p, midpoint, args.plot)
    result = {
        "benchmark": "merge_tradeoff",
        "general_weight": args.general_weight,
        "filters": filters,
        "trials": len(rows),
        "instruct": instruct,
        "dpo": dpo,
        "target_p_correct": target_p,
        "general_bpb_midpoint": midpoint,
        "trials_below_midpoint": len(below),
        "max_p_correct_below_midpoint": max((r["p_correct"] for r in below), default=None),
        "trials_in_target": len(in_target),
        "best_trial": best,
        "rows": rows,
        "plot": os.path.relpath(args.plot, REPO) if os.path.abspath(args.plot).startswith(str(REPO)) else args.plot,
    }
    os.makedirs(os.path.dirname(args.results), exist_ok=True)
    from _results import save_results

    save_results(args.results, result)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
