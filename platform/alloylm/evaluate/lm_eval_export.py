"""The domain benchmark as an lm-evaluation-harness task: a task YAML plus local JSONL files, so any
model can be scored on it with the harness itself:

    lm_eval --model hf --model_args pretrained=PATH --tasks alloylm_domain_mc --include_path DIR

The task is the multiple-choice part in lm-eval's cloze form, which is what AlloyLM's
`multiple_choice` suite computes with `prompt: plain`: the same model gets the same acc and
acc_norm from both.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import yaml

from alloylm import storage
from alloylm.evaluate.benchmark import BenchmarkItem, load_benchmark
from alloylm.evaluate.prepared import EvaluationInputError
from alloylm.evaluate.scorer import PLAIN_PROMPT

DEFAULT_TASK_NAME = "alloylm_domain_mc"


def _task_yaml(task: str, files: dict[str, str]) -> str:
    config = {
        "task": task,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": files},
        "output_type": "multiple_choice",
        "doc_to_text": PLAIN_PROMPT.replace("{question}", "{{question}}"),
        "doc_to_choice": "choices",
        "doc_to_target": "answer_index",
        "target_delimiter": " ",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0},
    }
    if "validation" in files:
        config["validation_split"] = "validation"
    if "test" in files:
        config["test_split"] = "test"
    header = (
        "# AlloyLM domain benchmark (multiple choice, log-likelihood of each option), exported by\n"
        "# alloylm.evaluate.lm_eval_export. The data files sit beside this YAML.\n"
        f"# Run: lm_eval --model hf --model_args pretrained=MODEL --tasks {task} --include_path {os.path.dirname(next(iter(files.values())))}\n"
    )
    return header + yaml.safe_dump(config, sort_keys=False, allow_unicode=True)


def export_lm_eval_task(
    benchmark: str | Sequence[BenchmarkItem],
    out_dir: str,
    *,
    task_name: str = DEFAULT_TASK_NAME,
    splits: Sequence[str] = ("validation", "test"),
) -> dict[str, str]:
    """Write `<out_dir>/<task_name>.yaml` and one JSONL per split; returns {"yaml": path, split: path}.

    `benchmark` is a benchmark URI (prepared data set or file) or its items. `out_dir` must be local:
    the harness reads the data files from the paths written into the YAML.
    """
    if storage.is_remote(out_dir):
        raise ValueError(f"an lm-eval task is read from local files; out_dir must be a local folder, got {out_dir}")
    items = load_benchmark(benchmark) if isinstance(benchmark, str) else list(benchmark)
    folder = storage.resolve(out_dir)
    os.makedirs(folder, exist_ok=True)
    written: dict[str, str] = {}
    for split in splits:
        rows = [item for item in items if item.type == "multiple_choice" and item.split == split]
        if not rows:
            continue
        path = os.path.join(folder, f"{task_name}.{split}.jsonl")
        lines = [
            json.dumps(
                {
                    "id": item.id,
                    "question": item.question,
                    "choices": list(item.choices),
                    "answer_index": item.answer_index,
                    "answer": item.answer,
                    "material": item.material,
                    "property": item.property,
                },
                ensure_ascii=False,
            )
            for item in rows
        ]
        storage.write_text(path, "\n".join(lines) + "\n")
        written[split] = path
    if not written:
        raise EvaluationInputError(f"the benchmark has no multiple-choice items in split(s) {', '.join(splits)}")
    yaml_path = os.path.join(folder, f"{task_name}.yaml")
    storage.write_text(yaml_path, _task_yaml(task_name, written))
    return {"yaml": yaml_path, **written}
