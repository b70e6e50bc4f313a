"""The run's report: the comparison of variants on the test split, a bar chart per metric, each
training stage's loss curve and the merge search's progress, as Markdown and HTML with PNG plots.

Only `test`-split results are stated. Results scored on `validation` (the split the merge search
optimises) are listed as excluded, never shown as scores. Plots are drawn with matplotlib's Agg
canvas on `Figure` objects (no pyplot global state), so rendering works headless and in threads.

Inputs it reads: `<eval>/<variant>/results.json` (complete artifacts only), `<stage>/metrics.jsonl`
(one JSON object per logged step with `step` and `loss`; a stage without it is skipped), and a
search's `trials.jsonl` (one JSON object per trial with `trial`, `score` and `params`).
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import tempfile
from collections.abc import Mapping, Sequence

from alloylm import storage
from alloylm.evaluate.comparison import (
    build_comparison,
    comparison_markdown,
    comparison_notes,
    format_cell,
    format_position,
    format_value,
    merge_columns,
    merge_parents,
    merges_notes,
)
from alloylm.evaluate.config import SUITE_NAMES
from alloylm.evaluate.runner import load_results, model_id

REPORTED_SPLIT = "test"
_SUITE_TITLES = {
    "multiple_choice": "Domain multiple choice",
    "short_answer": "Domain short answer",
    "domain_perplexity": "Domain perplexity (held-out domain text)",
    "general_perplexity": "General perplexity (held-out general text: forgetting)",
    "judge": "LLM judge",
    "lm_eval": "General retention (lm-evaluation-harness tasks)",
}


def _figure(width: float = 6.4, height: float = 3.6):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _file_name(prefix: str, key: str) -> str:
    return f"{prefix}_{re.sub(r'[^A-Za-z0-9_-]+', '_', key)}.png"


def _bar_chart(column: Mapping, rows: list[dict], chance: float | None, folder: str) -> str:
    figure = _figure(max(4.0, 1.1 * len(rows) + 2), 3.6)
    axes = figure.add_subplot()
    names = [row["variant"] for row in rows]
    values = [row["values"].get(column["key"]) for row in rows]
    shown = [v if v is not None and math.isfinite(v) else 0.0 for v in values]
    intervals = [(row.get("intervals") or {}).get(column["key"]) for row in rows]
    # Error bars: each value's 95% bootstrap interval (none where a value has no interval).
    errors = [
        [max(0.0, v - i["low"]) if i and v is not None and math.isfinite(i["low"]) else 0.0 for v, i in zip(shown, intervals)],
        [max(0.0, i["high"] - v) if i and v is not None and math.isfinite(i["high"]) else 0.0 for v, i in zip(shown, intervals)],
    ]
    bars = axes.bar(
        names, shown, yerr=errors, capsize=3, ecolor="#333333", color=["#4C72B0" if v is not None else "#DDDDDD" for v in values]
    )
    for bar, value in zip(bars, values):
        text = "missing" if value is None else format_value(column["key"], value)
        axes.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    if chance is not None:
        axes.axhline(chance, color="#C44E52", linestyle="--", linewidth=1, label=f"chance {chance:.2f}")
        axes.legend(fontsize=8)
    arrow = "higher is better" if column["higher_is_better"] else "lower is better"
    axes.set_title(f"{column['label']} ({arrow})", fontsize=10)
    axes.tick_params(axis="x", labelrotation=20, labelsize=8)
    figure.tight_layout()
    name = _file_name("metric", column["key"])
    figure.savefig(os.path.join(folder, name), format="png")
    return name


def _nothing_to_show(column: Mapping, rows: list[dict]) -> str | None:
    """One line instead of a chart when every variant has the same value, or none (e.g. all zeros)."""
    values = [row["values"].get(column["key"]) for row in rows]
    known = [v for v in values if v is not None and math.isfinite(v)]
    if not known:
        return f"{column['label']}: no variant has a value."
    if len(set(known)) == 1 and len(known) == len(values):
        return f"{column['label']}: {format_value(column['key'], known[0])} for every variant (nothing to compare)."
    return None


def _depths(dag: Mapping[str, list[str]]) -> dict[str, int]:
    depth: dict[str, int] = {}

    def of(name: str, seen: tuple[str, ...] = ()) -> int:
        if name not in depth:
            parents = [p for p in dag.get(name, []) if p in dag and p not in seen]
            depth[name] = 1 + max((of(p, (*seen, name)) for p in parents), default=-1)
        return depth[name]

    for name in dag:
        of(name)
    return depth


def _dag_figure(dag: Mapping[str, list[str]], rows: list[dict], best: str | None, folder: str) -> str:
    """The run's stage DAG, left to right by depth, each evaluated variant's score at its node."""
    depth = _depths(dag)
    columns: dict[int, list[str]] = {}
    for name in dag:
        columns.setdefault(depth[name], []).append(name)
    height = max(len(names) for names in columns.values())
    figure = _figure(max(6.4, 2.1 * len(columns)), max(2.6, 1.05 * height + 0.8))
    axes = figure.add_subplot()
    position = {name: (d, (height - 1) / 2 - i) for d, names in columns.items() for i, name in enumerate(names)}
    by_variant = {row["variant"]: row for row in rows}
    for name, parents in dag.items():
        for parent in parents:
            if parent in position:
                # An edge that skips columns bends, so it does not hide behind the nodes between.
                skips = position[name][0] - position[parent][0] > 1
                axes.annotate("", xy=position[name], xytext=position[parent],
                              arrowprops={"arrowstyle": "->", "color": "#888888", "shrinkA": 28, "shrinkB": 28,
                                          "connectionstyle": f"arc3,rad={-0.12 if skips else 0.0}"})
    for name, (x, y) in position.items():
        row = by_variant.get(name)
        text = name
        if row is not None:
            score = row["values"].get("score")
            interval = (row.get("intervals") or {}).get("score")
            text += f"\nscore {format_value('score', score)}"
            if interval:
                text += f"\n[{interval['low']:.3f}, {interval['high']:.3f}]"
        color = "#F2C14E" if name == best else ("#DCE6F2" if row is not None else "#EEEEEE")
        axes.text(x, y, text, ha="center", va="center", fontsize=8, bbox={"boxstyle": "round", "facecolor": color, "edgecolor": "#555555"})
    axes.set_xlim(-0.6, max(columns) + 0.6)
    axes.set_ylim(-(height + 1) / 2, (height + 1) / 2 + 0.5)
    axes.axis("off")
    axes.set_title("The run: stages and their test scores" + (f" (highlighted: {best}, best on validation)" if best else ""), fontsize=10)
    figure.tight_layout()
    name = "dag.png"
    figure.savefig(os.path.join(folder, name), format="png")
    return name


# Where a point's label may go, in points from the point, tried in this order.
_LABEL_OFFSETS = ((5, 5), (5, -11), (-5, 5), (-5, -11), (5, 15), (-5, 15), (5, -21), (-5, -21))


def _label_points(axes, labels: list[tuple[str, float, float]]) -> list:
    """Annotate each (text, x, y), moving a label to the next free offset where it would overlap a
    label placed before it (variants close on both axes, e.g. `sft` and `merged`, drew their names
    over each other). matplotlib has no automatic label placement; adjustText does this, but one
    more dependency for eight labels is not worth it. Returns the annotations."""
    renderer = axes.figure.canvas.get_renderer()
    placed, boxes = [], []
    for text, x, y in labels:
        for dx, dy in _LABEL_OFFSETS:
            label = axes.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=8,
                                  ha="left" if dx > 0 else "right", va="bottom" if dy > 0 else "top")
            box = label.get_window_extent(renderer).expanded(1.05, 1.1)
            if not any(box.overlaps(other) for other in boxes):
                break
            if (dx, dy) != _LABEL_OFFSETS[-1]:
                label.remove()  # the last offset stays even if crowded: the name is never dropped
        placed.append(label)
        boxes.append(box)
    return placed


def _trade_off(rows: list[dict], folder: str, chance: float | None = None) -> str | None:
    """Domain multiple-choice accuracy against general perplexity: forgetting and merging in one picture."""
    x_key, y_key = "general_perplexity.perplexity", "multiple_choice.accuracy"
    points = [r for r in rows if r["values"].get(x_key) is not None and r["values"].get(y_key) is not None]
    if len(points) < 2:
        return None
    figure = _figure(6.4, 4.2)
    axes = figure.add_subplot()
    for row in points:
        x, y = row["values"][x_key], row["values"][y_key]
        xi, yi = (row.get("intervals") or {}).get(x_key), (row.get("intervals") or {}).get(y_key)
        xerr = [[max(0.0, x - xi["low"])], [max(0.0, xi["high"] - x)]] if xi else None
        yerr = [[max(0.0, y - yi["low"])], [max(0.0, yi["high"] - y)]] if yi else None
        axes.errorbar([x], [y], xerr=xerr, yerr=yerr, fmt="o", capsize=3)
    if chance is not None:
        axes.axhline(chance, color="#C44E52", linestyle="--", linewidth=1, label=f"chance {chance:.2f}")
        axes.legend(fontsize=8, loc="lower right")
    axes.set_xscale("log")
    axes.set_xlabel("general perplexity (held-out general text; lower: less forgetting)")
    axes.set_ylabel("domain multiple-choice accuracy")
    axes.set_title("Trade-off: domain knowledge against general text, 95% intervals", fontsize=10)
    figure.tight_layout()  # the layout first: labels are placed in the final display coordinates
    _label_points(axes, [(r["variant"], r["values"][x_key], r["values"][y_key]) for r in points])
    name = "trade_off.png"
    figure.savefig(os.path.join(folder, name), format="png")
    return name


def _read_jsonl(uri: str) -> tuple[list[dict], int]:
    rows, bad = [], 0
    for line in storage.read_text(uri).splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    return rows, bad


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def _loss_curve(stage: str, uri: str, folder: str) -> tuple[str | None, str]:
    """(PNG name or None, a note) for one stage's metrics.jsonl."""
    metrics_uri = storage.join(uri, "metrics.jsonl")
    if not storage.exists(metrics_uri):
        return None, f"{stage}: no metrics.jsonl, no loss curve"
    rows, bad = _read_jsonl(metrics_uri)
    points = [(_number(r.get("step")), _number(r.get("loss"))) for r in rows]
    points = sorted((s, l) for s, l in points if s is not None and l is not None)
    if not points:
        return None, f"{stage}: metrics.jsonl has no step with a loss"
    evals = sorted(
        (s, l) for s, l in ((_number(r.get("step")), _number(r.get("eval_loss"))) for r in rows) if s is not None and l is not None
    )
    figure = _figure()
    axes = figure.add_subplot()
    axes.plot([s for s, _ in points], [l for _, l in points], label="training loss", color="#4C72B0")
    if evals:
        axes.plot([s for s, _ in evals], [l for _, l in evals], "o-", label="eval loss", color="#DD8452")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(f"Stage {stage}: loss", fontsize=10)
    axes.legend(fontsize=8)
    figure.tight_layout()
    name = _file_name("loss", stage)
    figure.savefig(os.path.join(folder, name), format="png")
    note = f"{stage}: {len(points)} logged steps" + (f" ({bad} unreadable lines skipped)" if bad else "")
    return name, note


def _search_plot(search: str, uri: str, folder: str) -> tuple[str | None, str]:
    trials_uri = storage.join(uri, "trials.jsonl")
    if not storage.exists(trials_uri):
        return None, f"{search}: no trials.jsonl yet"
    rows, _ = _read_jsonl(trials_uri)
    # `number` is the trial's creation order (the merge search writes it); `trial` may be Tune's hash id.
    points = [(_number(r.get("number", r.get("trial"))), _number(r.get("score"))) for r in rows]
    points = sorted((t, s) for t, s in points if t is not None and s is not None)
    if not points:
        return None, f"{search}: no trial with a score"
    best, running = [], -math.inf
    for _, score in points:
        running = max(running, score)
        best.append(running)
    figure = _figure()
    axes = figure.add_subplot()
    axes.plot([t for t, _ in points], [s for _, s in points], "o", alpha=0.6, label="trial", color="#4C72B0")
    axes.step([t for t, _ in points], best, where="post", label="best so far", color="#C44E52")
    axes.set_xlabel("trial")
    # These numbers are on the searched split: they choose the merge, they are not its result.
    axes.set_ylabel("search objective (validation)")
    axes.set_title(f"Merge search {search}: objective per trial (selection only, not a result)", fontsize=9)
    axes.legend(fontsize=8)
    figure.tight_layout()
    name = _file_name("search", search)
    figure.savefig(os.path.join(folder, name), format="png")
    return name, f"{search}: {len(points)} trials"


def _html_table(comparison: Mapping) -> str:
    head = "".join(
        f"<th>{html.escape(c['label'])} {'↑' if c['higher_is_better'] else '↓'}</th>" for c in comparison["columns"]
    )
    body = []
    for row in comparison["rows"]:
        cells = []
        for c in comparison["columns"]:
            value = row["values"].get(c["key"])
            text = html.escape(format_value(c["key"], value))
            if row["variant"] in comparison["best"].get(c["key"], []):
                text = f"<b>{text}</b>"
            full = format_cell(c["key"], value, (row.get("intervals") or {}).get(c["key"]), (row.get("differences") or {}).get(c["key"]))
            text += html.escape(full[len(format_value(c["key"], value)) :])
            cells.append(f"<td>{text}</td>")
        body.append(f"<tr><th>{html.escape(row['variant'])}</th>{''.join(cells)}</tr>")
    return f"<table>\n<tr><th>Variant</th>{head}</tr>\n" + "\n".join(body) + "\n</table>"


def _html_merges_table(comparison: Mapping) -> str:
    """The merges' positions between their parents (`comparison.merges_markdown`) as HTML; empty without merges."""
    shown = merge_columns(comparison)
    merges = comparison.get("merges") or {}
    if not merges or not shown:
        return ""
    head = "".join(f"<th>{html.escape(c['label'])}</th>" for c in shown)
    body = [
        f"<tr><th>{html.escape(name)}</th><td>{html.escape(merge['start'])} → {html.escape(merge['end'])}</td>"
        + "".join(f"<td>{html.escape(format_position(merge['positions'].get(c['key'])))}</td>" for c in shown)
        + "</tr>"
        for name, merge in merges.items()
    ]
    return f"<table>\n<tr><th>Merge</th><th>Parents (0 → 1)</th>{head}</tr>\n" + "\n".join(body) + "\n</table>"


def _markdown_to_html_lines(lines: list[str]) -> str:
    return "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in lines) + "</ul>"


def render_report(
    eval_uri: str,
    report_uri: str,
    *,
    stages: Mapping[str, str] | None = None,
    searches: Mapping[str, str] | None = None,
    title: str = "AlloyLM report",
    dag: Mapping[str, list[str]] | None = None,
    best: str | None = None,
    variants: Sequence[str] | None = None,
) -> dict:
    """Write `report.md`, `report.html` and their PNGs to `report_uri` (atomically); returns a summary.

    `eval_uri` holds the variants' results (`<run>/eval`); `stages` maps stage names to their
    artifact URIs (for loss curves), `searches` merge-search names to the folders with trials.jsonl,
    `dag` stage names to their parent stages (the picture the report opens with) and `best` the
    variant chosen on validation (highlighted, never chosen here). `variants`: the run's variants
    (its `evaluate.variants` names); results of others still under `eval_uri` (a variant since
    removed from the config) are left out. None: every result there.
    """
    results = load_results(eval_uri) if storage.exists(eval_uri) else {}
    if variants is not None:
        wanted = set(variants)
        results = {name: r for name, r in results.items() if name in wanted}
    reported = {name: r for name, r in results.items() if r.get("split") == REPORTED_SPLIT}
    excluded = {name: r.get("split") for name, r in results.items() if r.get("split") != REPORTED_SPLIT}
    # Results of a model replaced since it was scored (a stage retrained by `alloylm train` after
    # the run): not this model's scores.
    stale = sorted(
        name for name, r in reported.items()
        if r.get("model_fingerprint") is not None and model_id(r.get("model")) != r["model_fingerprint"]
    )  # fmt: skip
    reported = {name: r for name, r in reported.items() if name not in stale}
    comparison = build_comparison(reported, parents=merge_parents(reported)) if reported else None
    with tempfile.TemporaryDirectory(prefix="alloylm-report-") as folder:
        md: list[str] = [f"# {title}", ""]
        parts: list[str] = [f"<h1>{html.escape(title)}</h1>"]
        images: list[str] = []

        if comparison is not None and dag:
            name = _dag_figure(dag, comparison["rows"], best, folder)
            images.append(name)
            md += [f"![the run]({name})", ""]
            parts.append(f'<figure><img src="{name}" alt="the run"></figure>')
        if comparison is not None:
            name = _trade_off(comparison["rows"], folder, comparison["chance"].get("multiple_choice"))
            if name:
                images.append(name)
                md += [f"![trade-off]({name})", ""]
                parts.append(f'<figure><img src="{name}" alt="trade-off"></figure>')

        md += ["## Variants compared", ""]
        parts.append("<h2>Variants compared</h2>")
        if comparison is None:
            text = f"No variant has results on the {REPORTED_SPLIT} split yet (run `alloylm eval` with split: test)."
            md += [text, ""]
            parts.append(f"<p>{html.escape(text)}</p>")
        else:
            md += [comparison_markdown(comparison), ""]
            parts.append(_html_table(comparison))
            parts.append(_markdown_to_html_lines([n.replace("`", "") for n in comparison_notes(comparison)]))
            merges = _html_merges_table(comparison)
            if merges:
                parts.append("<p>Where each merge sits between its parents:</p>" + merges)
                parts.append(_markdown_to_html_lines([n.replace("`", "") for n in merges_notes(comparison)]))
        if excluded:
            text = (
                "Not reported, because they were scored on a split other than test (the validation split is "
                "what the merge search optimises): " + ", ".join(f"{n} ({s})" for n, s in sorted(excluded.items()))
            )
            md += [text, ""]
            parts.append(f"<p>{html.escape(text)}</p>")
        if stale:
            text = (
                "Not reported, because their model has changed since they were scored (evaluate them again, "
                "e.g. `alloylm eval CONFIG`): " + ", ".join(stale)
            )
            md += [text, ""]
            parts.append(f"<p>{html.escape(text)}</p>")

        if comparison is not None:
            md += ["## Metrics", ""]
            parts.append("<h2>Metrics</h2>")
            flat = []
            for column in comparison["columns"]:
                line = _nothing_to_show(column, comparison["rows"])
                if line:
                    flat.append(line)
                    continue
                # 1/options is chance for one answer (and for P(correct) of a model that cannot tell the
                # options apart), not for being right in every rotation: that line would mislead there.
                with_chance = column["key"] in ("multiple_choice.accuracy", "multiple_choice.accuracy_norm", "multiple_choice.mean_prob_correct")
                chance = comparison["chance"].get("multiple_choice") if with_chance else None
                name = _bar_chart(column, comparison["rows"], chance, folder)
                images.append(name)
                md += [f"![{column['label']}]({name})", ""]
                parts.append(f'<figure><img src="{html.escape(name)}" alt="{html.escape(column["label"])}"></figure>')
            if flat:
                md += [f"- {line}" for line in flat] + [""]
                parts.append(_markdown_to_html_lines(flat))
            md += ["## What was scored", ""]
            parts.append("<h2>What was scored</h2>")
            scored = []
            any_result = next(iter(reported.values()))
            suites = any_result.get("suites") or {}
            for suite, entry in sorted(suites.items(), key=lambda kv: SUITE_NAMES.index(kv[0]) if kv[0] in SUITE_NAMES else len(SUITE_NAMES)):
                items = (entry.get("metrics") or {}).get("items")
                scored.append(f"{_SUITE_TITLES.get(suite, suite)}: {items if items is not None else '?'} items from {entry.get('dataset')}")
            md += [f"- {line}" for line in scored] + [""]
            parts.append(_markdown_to_html_lines(scored))

        loss_notes: list[str] = []
        if stages:
            md += ["## Training loss", ""]
            parts.append("<h2>Training loss</h2>")
            for stage, uri in stages.items():
                name, note = _loss_curve(stage, uri, folder)
                loss_notes.append(note)
                if name:
                    images.append(name)
                    md += [f"![loss of {stage}]({name})", ""]
                    parts.append(f'<figure><img src="{html.escape(name)}" alt="loss of {html.escape(stage)}"></figure>')
            md += [f"- {n}" for n in loss_notes] + [""]
            parts.append(_markdown_to_html_lines(loss_notes))

        search_notes: list[str] = []
        if searches:
            md += ["## Merge search", "", "Objective per trial on the validation split: it chose the merge; the merge's result is its test row above.", ""]
            parts.append("<h2>Merge search</h2><p>Objective per trial on the validation split: it chose the merge; the merge's result is its test row above.</p>")
            for search, uri in searches.items():
                name, note = _search_plot(search, uri, folder)
                search_notes.append(note)
                if name:
                    images.append(name)
                    md += [f"![search {search}]({name})", ""]
                    parts.append(f'<figure><img src="{html.escape(name)}" alt="search {html.escape(search)}"></figure>')
            md += [f"- {n}" for n in search_notes] + [""]
            parts.append(_markdown_to_html_lines(search_notes))

        style = "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}img{max-width:100%}"
        page = (
            f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{style}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n"
        )
        with open(os.path.join(folder, "report.md"), "w", encoding="utf-8") as f:
            f.write("\n".join(md).rstrip() + "\n")
        with open(os.path.join(folder, "report.html"), "w", encoding="utf-8") as f:
            f.write(page)
        if comparison is not None:
            with open(os.path.join(folder, "comparison.json"), "w", encoding="utf-8") as f:
                json.dump(comparison, f, indent=2, sort_keys=True)
        with storage.begin_artifact(report_uri, overwrite=True) as artifact:
            storage.upload_dir(folder, artifact.staging_uri)
            files = sorted(os.listdir(folder))
            artifact.commit({"kind": "report", "split": REPORTED_SPLIT, "variants": sorted(reported), "excluded": excluded, "files": files})
    return {"uri": storage.resolve(report_uri), "files": files, "images": images, "variants": sorted(reported), "excluded": excluded, "stale": stale}
