"""Evaluation: every variant of a run scored on the domain benchmark (multiple choice, short answer),
held-out domain and general perplexity, an LLM judge and lm-evaluation-harness tasks (general
retention), in parallel on Ray; the comparison of variants; the lm-evaluation-harness export; and
the report with its plots.

    results = evaluate_variants(config.evaluate, resolve_variants(config.evaluate, stage_uris),
                                data_uris(config.evaluate, run_uri), join(run_uri, "eval"),
                                tokenizer_uri=join(run_uri, "tokenizer"))
    render_report(join(run_uri, "eval"), join(run_uri, "report"), stages=stage_uris)
"""

from __future__ import annotations

import importlib
from typing import Any

# The config is imported eagerly (the run config embeds it and must load fast, without torch);
# everything else on first use.
from alloylm.evaluate.config import (
    EvalConfig,
    EvalResources,
    JudgeConfig,
    LmEvalConfig,
    MultipleChoiceConfig,
    DomainPerplexityConfig,
    GeneralPerplexityConfig,
    ShortAnswerConfig,
    SuitesConfig,
)

_LAZY = {
    "EvaluationInputError": "prepared",
    "BenchmarkItem": "benchmark",
    "load_benchmark": "benchmark",
    "aggregate_score": "comparison",
    "best_variant": "comparison",
    "build_comparison": "comparison",
    "comparison_markdown": "comparison",
    "export_lm_eval_task": "lm_eval_export",
    "run_lm_eval": "lm_eval_suite",
    "render_report": "report",
    "EvalData": "runner",
    "check_variant_sources": "runner",
    "data_uris": "runner",
    "evaluate_variants": "runner",
    "load_eval_data": "runner",
    "load_results": "runner",
    "resolve_variants": "runner",
    "score_model": "runner",
    "write_variant_results": "runner",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"alloylm.evaluate.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'alloylm.evaluate' has no attribute {name!r}")


__all__ = [
    "BenchmarkItem",
    "DomainPerplexityConfig",
    "EvalConfig",
    "EvalData",
    "EvalResources",
    "EvaluationInputError",
    "GeneralPerplexityConfig",
    "JudgeConfig",
    "LmEvalConfig",
    "MultipleChoiceConfig",
    "ShortAnswerConfig",
    "SuitesConfig",
    "aggregate_score",
    "best_variant",
    "build_comparison",
    "check_variant_sources",
    "comparison_markdown",
    "data_uris",
    "evaluate_variants",
    "export_lm_eval_task",
    "load_benchmark",
    "load_eval_data",
    "load_results",
    "render_report",
    "resolve_variants",
    "run_lm_eval",
    "score_model",
    "write_variant_results",
]
