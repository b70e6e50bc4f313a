"""The report opens with the run's DAG and the trade-off plot; a metric with nothing to show is one line."""

from __future__ import annotations

from alloylm.evaluate.report import _dag_figure, _depths, _figure, _label_points, _nothing_to_show, _trade_off

DAG = {"base": [], "instruct": ["base"], "cpt": ["instruct"], "sft": ["cpt"], "dpo": ["sft"], "merged": ["dpo", "instruct"]}


def _row(variant, accuracy, perplexity, score):
    return {
        "variant": variant,
        "values": {"multiple_choice.accuracy": accuracy, "general_perplexity.perplexity": perplexity, "score": score, "short_answer.accuracy": 0.0},
        "intervals": {"multiple_choice.accuracy": {"low": accuracy - 0.05, "high": accuracy + 0.05}, "score": {"low": score - 0.1, "high": score + 0.1}},
    }


ROWS = [_row("instruct", 0.28, 47.0, 0.2), _row("dpo", 0.65, 900.0, 0.5), _row("merged", 0.6, 90.0, 0.45)]


def test_depths_place_each_stage_after_its_deepest_parent():
    assert _depths(DAG) == {"base": 0, "instruct": 1, "cpt": 2, "sft": 3, "dpo": 4, "merged": 5}


def test_dag_and_trade_off_pictures_are_drawn(tmp_path):
    assert (tmp_path / _dag_figure(DAG, ROWS, "dpo", str(tmp_path))).stat().st_size > 1000
    assert (tmp_path / _trade_off(ROWS, str(tmp_path), 0.25)).stat().st_size > 1000
    assert _trade_off(ROWS[:1], str(tmp_path)) is None  # one point is no trade-off


def test_trade_off_labels_of_close_points_do_not_overlap():
    """The quickstart's sft, merged and dpo sit close on both axes; their names drew over each other."""
    figure = _figure(6.4, 4.2)
    axes = figure.add_subplot()
    points = [("instruct", 87.9, 0.286), ("cpt", 10718.0, 0.648), ("sft", 3779.0, 0.886), ("dpo", 5092.0, 0.895),
              ("orpo", 2332.0, 0.562), ("merged", 3565.0, 0.867), ("sft-direct", 193.0, 0.248), ("merged-paper", 288.0, 0.352)]
    axes.plot([x for _, x, _ in points], [y for _, _, y in points], "o")
    axes.set_xscale("log")
    figure.tight_layout()
    labels = _label_points(axes, points)
    assert [label.get_text() for label in labels] == [name for name, _, _ in points]
    renderer = figure.canvas.get_renderer()
    boxes = [label.get_window_extent(renderer) for label in labels]
    crossing = [(labels[i].get_text(), labels[j].get_text()) for i in range(len(boxes)) for j in range(i) if boxes[i].overlaps(boxes[j])]
    assert not crossing


def test_a_metric_with_nothing_to_show_is_said_in_one_line():
    zeros = {"key": "short_answer.accuracy", "label": "Short-answer accuracy"}
    assert _nothing_to_show(zeros, ROWS) == "Short-answer accuracy: 0.000 for every variant (nothing to compare)."
    assert _nothing_to_show({"key": "judge.overall", "label": "Judge"}, ROWS) == "Judge: no variant has a value."
    assert _nothing_to_show({"key": "multiple_choice.accuracy", "label": "MC"}, ROWS) is None
