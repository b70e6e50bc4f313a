"""The evaluation config: which variants are scored, on which suites and split, with what resources.

`EvalConfig` is the `evaluate:` section of a run config. It is typed and frozen like the rest of
the run config; a bad key or value fails when the config is loaded, before any model is touched.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Collection, Mapping
from typing import Literal

from pydantic import Field, field_validator, model_validator

from alloylm.schema import SEED_MAX, ConfigModel

# The paper's judge criteria (arXiv:2409.03444, section on LLM-judged conversations).
DEFAULT_JUDGE_CRITERIA = ("reasoning_depth", "creativity", "clarity", "quantitative_precision")
SPLITS = ("validation", "test")
_CRITERION_PATTERN = r"^[a-z][a-z0-9_]{0,63}$"
# The judge's metrics beside one mean per criterion (`judge.summarise_grades`): a criterion of the
# same name would overwrite one, and its interval's denominator with it.
_JUDGE_METRICS = ("overall", "graded", "items", "unparseable")
_VARIANT_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
# What eval/ holds besides one folder per variant (alloylm.layout.RunLayout).
RESERVED_VARIANT_NAMES = ("validation", "comparison.md", "comparison.json", "best.json", "best")


class _Frozen(ConfigModel):
    """Unknown keys are errors; a built config never changes (alloylm.schema.ConfigModel)."""


class _SuiteBase(_Frozen):
    enabled: bool = Field(True, description="Run this suite.")
    weight: float = Field(
        1.0,
        ge=0,
        description=(
            "Weight of this suite's headline metric (scaled to 0..1, higher is better) in the variant's "
            "aggregate `score`, which the merge search maximises. 0 reports the suite without scoring it."
        ),
    )
    max_items: int | None = Field(
        None, gt=0, description="Score at most this many items (or text blocks) of the split; none: all of them."
    )


_PROMPT_DESCRIPTION = (
    "How a question is put to the model: `chat` renders it with the model's chat template, `plain` as "
    "`Question: ...\\nAnswer:` (what the lm-eval export uses), `auto` is chat when the tokenizer has a template."
)


class MultipleChoiceConfig(_SuiteBase):
    """Multiple-choice items scored by the log-likelihood of each option."""

    dataset: str = Field("domain-benchmark", description="Benchmark data set (format `benchmark`) with the items.")
    prompt: Literal["auto", "chat", "plain"] = Field("auto", description=_PROMPT_DESCRIPTION)
    formulation: Literal["letters", "cloze"] = Field(
        "letters",
        description=(
            "`letters`: the options are listed with letters and the model's `B. option` is scored (the "
            "multiple-choice formulation of MMLU and OLMES). `cloze`: the question alone, each option scored "
            "as the continuation of the item's `answer_prefix` (or of the prompt): what models too small for "
            "letters can answer (OLMES's cloze formulation)."
        ),
    )
    circular: bool = Field(
        True,
        description=(
            "Also ask every item with its options rotated (MMBench CircularEval) and report `accuracy_circular` "
            "(right only if every rotation is). Chat prompts list the options, so this costs one scoring pass "
            "per option; plain prompts reuse the same log-likelihoods."
        ),
    )
    objective_metric: Literal["prob_correct", "accuracy", "accuracy_circular"] = Field(
        "prob_correct",
        description=(
            "This suite's headline in the aggregate `score` (the merge-search objective and the comparison's Score "
            "column): `prob_correct` is `mean_prob_correct`, the softmax probability of the correct option over the "
            "options' log-likelihoods (continuous, so close candidates still differ); or `accuracy`, `accuracy_circular`."
        ),
    )

    @model_validator(mode="after")
    def _circular_objective_needs_rotations(self):
        if self.objective_metric == "accuracy_circular" and not self.circular:
            raise ValueError("objective_metric: accuracy_circular needs circular: true (without the rotations it is plain accuracy)")
        return self


class ShortAnswerConfig(_SuiteBase):
    """Short-answer items: the model generates, the answer is matched exactly or numerically."""

    dataset: str = Field("domain-benchmark", description="Benchmark data set (format `benchmark`) with the items.")
    prompt: Literal["auto", "chat", "plain"] = Field("auto", description=_PROMPT_DESCRIPTION)
    max_new_tokens: int = Field(48, ge=1, le=4096, description="Longest generated answer, in tokens.")
    relative_tolerance: float = Field(
        0.01, ge=0, lt=1, description="A number matches when |given - true| <= tolerance * |true| (after unit conversion)."
    )
    require_unit: bool = Field(
        False, description="Count a number without a unit as an answer. Off: a bare number may match; on: it never does."
    )


_PERPLEXITY_WEIGHT = Field(
    0.0,
    ge=0,
    description=(
        "Weight of 2^-bits_per_byte in the aggregate `score` (0: reported, not scored; perplexity is a "
        "diagnostic of what CPT taught and made the model forget, the benchmark is the goal)."
    ),
)


class DomainPerplexityConfig(_SuiteBase):
    """Perplexity of held-out domain text (format `text`, packed token blocks)."""

    dataset: str = Field("domain-heldout", description="Held-out domain text data set (format `text`).")
    weight: float = _PERPLEXITY_WEIGHT


class GeneralPerplexityConfig(_SuiteBase):
    """Perplexity of held-out general text: what continued pretraining may make the model forget."""

    dataset: str = Field("general-heldout", description="Held-out general text data set (format `text`).")
    weight: float = _PERPLEXITY_WEIGHT


class JudgeConfig(_SuiteBase):
    """Open questions answered by the variant and graded by a judge model over an OpenAI-compatible API."""

    enabled: bool = Field(False, description="Run this suite (it needs a judge endpoint).")
    base_url: str | None = Field(
        None, description="OpenAI-compatible endpoint, e.g. http://judge:8000/v1; `/chat/completions` is appended."
    )
    model: str | None = Field(None, description="The judge's model name, as the endpoint knows it.")
    api_key_env: str = Field(
        "ALLOYLM_JUDGE_API_KEY",
        description="Environment variable holding the judge's API key (sent as a Bearer token; unset: none is sent). Never written to results.",
    )
    dataset: str = Field(
        "domain-benchmark", description="Benchmark data set whose facts the built-in questions ask about (when `questions` is none)."
    )
    questions: str | None = Field(
        None,
        description=(
            "JSONL file (local or s3://) of open questions, one {id, question, split, reference?} per line. "
            "None: questions built from the benchmark's facts of the split being scored."
        ),
    )
    criteria: list[str] = Field(
        default_factory=lambda: list(DEFAULT_JUDGE_CRITERIA),
        min_length=1,
        description="Criteria graded 1-10 each; the paper's are reasoning_depth, creativity, clarity, quantitative_precision.",
    )
    max_items: int | None = Field(12, gt=0, description="Judge at most this many questions of the split.")
    answer_max_new_tokens: int = Field(256, ge=1, le=8192, description="Longest answer the variant may give, in tokens.")
    timeout_s: float = Field(60.0, gt=0, description="Seconds to wait for one judge response.")
    max_retries: int = Field(
        2, ge=0, le=10, description="Retries of a failed judge request (connection error, timeout, HTTP 429/5xx) before giving up."
    )
    retry_backoff_s: float = Field(1.0, ge=0, description="Wait before the first retry; doubled before each further one.")
    temperature: float = Field(0.0, ge=0, le=2, description="Judge sampling temperature (0 for reproducible grades).")

    @field_validator("criteria")
    @classmethod
    def _criteria_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not re.match(_CRITERION_PATTERN, name):
                raise ValueError(f"criterion {name!r} must match {_CRITERION_PATTERN} (lower case, digits, '_')")
            if name in _JUDGE_METRICS:
                raise ValueError(f"criterion {name!r} is the name of one of the judge's own metrics ({', '.join(_JUDGE_METRICS)}); name it otherwise")
        if len(set(value)) != len(value):
            raise ValueError("criteria must not repeat")
        return value

    @model_validator(mode="after")
    def _endpoint_when_enabled(self) -> JudgeConfig:
        if self.enabled and (not self.base_url or not self.model):
            raise ValueError("an enabled judge needs `base_url` and `model`")
        if self.base_url and not re.match(r"^https?://", self.base_url):
            raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}")
        return self


_LM_EVAL_TASK_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,199}$"
_LM_EVAL_METRIC_PATTERN = r"^[A-Za-z][A-Za-z0-9_,.-]{0,99}$"


class LmEvalConfig(_SuiteBase):
    """lm-evaluation-harness tasks run in process on every variant (what the domain training may erode)."""

    enabled: bool = Field(False, description="Run this suite; on when `tasks` are given, unless set false.")
    weight: float = Field(
        0.0,
        ge=0,
        description=(
            "Weight of `objective_metric` pooled over every task's docs in the aggregate `score` (0: reported as "
            "retention columns, not scored). On the test split each task is scored on lm-eval's evaluation split (its "
            "`test_split`, else `validation_split`); on the validation split (choosing the best variant, the merge "
            "search) on its `validation_split` where it has one. With weight > 0 every task needs a validation split."
        ),
    )
    tasks: list[str] = Field(
        default_factory=list,
        description=(
            "lm-eval task, group or tag names: tasks of `include_path`, or installed ones whose data is available "
            "offline (in the local Hugging Face cache or in local files). Nothing is downloaded."
        ),
    )
    include_path: str | None = Field(
        None,
        description=(
            "Local folder of task YAMLs (e.g. what `export_lm_eval_task` writes), searched before lm-eval's own "
            "tasks (`lm_eval --include_path`); a relative path is taken from where the config is loaded."
        ),
    )
    limit: int | float | None = Field(
        None,
        gt=0,
        description=(
            "Docs per task: a count, or a fraction below 1 of each task's docs (lm-eval's `--limit`: the first ones); "
            "none: all."
        ),
    )
    max_items: int | None = Field(
        None, gt=0, description="Score at most this many docs in all, taken from the tasks in turn; none: every selected doc."
    )
    num_fewshot: int | None = Field(
        None, ge=0, description="Few-shot examples per prompt (lm-eval's `--num_fewshot`); none: each task's own default (0 if it has none)."
    )
    objective_metric: str = Field(
        "acc",
        pattern=_LM_EVAL_METRIC_PATTERN,
        description=(
            "The metric (mean over docs, 0..1, higher better: acc, acc_norm, exact_match, ...) pooled over every task "
            "that reports it: this suite's headline in the aggregate `score` when `weight` > 0."
        ),
    )

    @model_validator(mode="before")
    @classmethod
    def _enabled_by_tasks(cls, data):
        # `lm_eval: {tasks: [...]}` is enough to run it; `enabled` stays false without tasks.
        if isinstance(data, Mapping) and "enabled" not in data:
            return {**data, "enabled": bool(data.get("tasks"))}
        return data

    @field_validator("include_path")
    @classmethod
    def _absolute_include_path(cls, value: str | None) -> str | None:
        # Resolved where the config is loaded: a Ray worker may run in another working directory.
        if value is None or "://" in value:
            return value
        return os.path.abspath(os.path.expanduser(value))

    @field_validator("tasks")
    @classmethod
    def _task_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not re.match(_LM_EVAL_TASK_PATTERN, name):
                raise ValueError(f"task {name!r} must match {_LM_EVAL_TASK_PATTERN}")
        repeated = sorted({n for n in value if value.count(n) > 1})
        if repeated:
            raise ValueError(f"tasks must not repeat: {', '.join(repeated)}")
        return value

    @model_validator(mode="after")
    def _tasks_when_enabled(self) -> LmEvalConfig:
        if self.enabled and not self.tasks:
            raise ValueError("an enabled lm_eval suite needs `tasks`")
        if isinstance(self.limit, float) and self.limit >= 1 and not self.limit.is_integer():
            raise ValueError(f"limit {self.limit} must be a whole number of docs or a fraction below 1")
        return self

    def limit_for(self, docs: int) -> int:
        """How many of a task's `docs` the suite scores (lm-eval's `--limit` rule)."""
        if self.limit is None:
            return docs
        count = math.ceil(docs * self.limit) if self.limit < 1 else int(self.limit)
        return min(docs, count)

    def include_problem(self) -> str | None:
        """Why `include_path` cannot be read (None when it can or is not given)."""
        if self.include_path is None:
            return None
        if "://" in self.include_path and not self.include_path.startswith("file://"):
            return f"{self.include_path!r}: lm-eval reads task YAMLs from a local folder"
        if not os.path.isdir(os.path.expanduser(self.include_path.removeprefix("file://"))):
            return f"{self.include_path!r} is not a folder"
        return None


class SuitesConfig(_Frozen):
    """The suites every variant is scored on."""

    multiple_choice: MultipleChoiceConfig = Field(
        default_factory=MultipleChoiceConfig, description="Domain multiple choice (log-likelihood of each option)."
    )
    short_answer: ShortAnswerConfig = Field(
        default_factory=ShortAnswerConfig, description="Domain short answer (generated; exact and numeric match)."
    )
    domain_perplexity: DomainPerplexityConfig = Field(
        default_factory=DomainPerplexityConfig, description="Perplexity on held-out domain text."
    )
    general_perplexity: GeneralPerplexityConfig = Field(
        default_factory=GeneralPerplexityConfig,
        description="Perplexity on held-out general text: what continued pretraining may make the model forget.",
    )
    judge: JudgeConfig = Field(default_factory=JudgeConfig, description="LLM judge of open questions.")
    lm_eval: LmEvalConfig = Field(
        default_factory=LmEvalConfig,
        description="lm-evaluation-harness tasks run in process: general retention columns (off unless `tasks` are given).",
    )

    def enabled(self) -> dict[str, _SuiteBase]:
        """The enabled suites by name, in a fixed order."""
        return {name: suite for name in SUITE_NAMES if (suite := getattr(self, name)).enabled}


SUITE_NAMES = ("multiple_choice", "short_answer", "domain_perplexity", "general_perplexity", "judge", "lm_eval")
# Suites a config leaves off unless it turns them on (what an older results.json without them meant).
OFF_BY_DEFAULT = ("judge", "lm_eval")
# Part of every evaluation's and merge search's fingerprint: raised when scoring changes, so
# results scored the old way are scored again instead of being reused. 2: a short answer with a
# value is right by its number alone; the score's interval resamples the benchmark's suites together.
# 3: a plain prompt's short answer ends at a blank line or an invented "Question:"; the merge
# search's ASHA rungs score items drawn with the seed, not the first ones in file order.
SCORING_VERSION = 3


class EvalResources(_Frozen):
    """What one evaluation task (one variant) reserves on the Ray cluster."""

    num_cpus: float = Field(
        0.5,
        gt=0,
        description="CPUs per task. Fractional so several small variants share a node; on a GPU node the GPU does the work.",
    )
    num_gpus: float = Field(0.0, ge=0, description="GPUs per task (fractional shares one GPU between variants).")
    memory_gb: float | None = Field(None, gt=0, description="Memory to reserve per task, in GiB (none: no reservation).")


class EvalConfig(_Frozen):
    """The `evaluate:` section: every variant, every suite, one split, reproducible."""

    variants: list[str] = Field(
        min_length=1,
        description=(
            "What to score: names of stages of this run, or models (local path, s3:// URI, Hugging Face id); "
            "`name=source` names a model in the tables."
        ),
    )
    split: Literal["validation", "test"] = Field(
        "test",
        description="Benchmark split to score. The merge search optimises `validation`; the report states `test` only.",
    )
    seed: int = Field(0, ge=0, le=SEED_MAX, description="Seed of everything random in evaluation (item sampling, generation).")
    max_items: int | None = Field(
        None, gt=0, description="Cap on items per suite for every suite (quick trials); a suite's own max_items also applies."
    )
    batch_size: int = Field(8, ge=1, description="Sequences per forward pass.")
    max_length: int | None = Field(
        None, ge=8, description="Longest sequence fed to a model, in tokens (none: the model's max_position_embeddings)."
    )
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "float32", description="Dtype the variants are loaded in (`auto`: as saved)."
    )
    suites: SuitesConfig = Field(default_factory=SuitesConfig, description="The suites and their weights and sizes.")
    resources: EvalResources = Field(default_factory=EvalResources, description="Ray resources per evaluation task.")

    @field_validator("variants")
    @classmethod
    def _variant_entries(cls, value: list[str]) -> list[str]:
        names = []
        for entry in value:
            if not entry.strip():
                raise ValueError("a variant must not be empty")
            if not variant_source(entry):
                raise ValueError(f"variant {entry!r}: `name=source` needs a source after '='")
            name = variant_name(entry)
            # The name is a folder under eval/: '.' or '..' (a path's last part) would be eval/ itself
            # or the run folder, and the others are what eval/ holds besides the variants.
            if not re.match(_VARIANT_NAME_PATTERN, name) or name in RESERVED_VARIANT_NAMES:
                raise ValueError(
                    f"variant {entry!r} would be named {name!r}, which cannot name a folder under eval/ "
                    f"(reserved: {', '.join(RESERVED_VARIANT_NAMES)}); name it with `name=source`"
                )
            names.append(name)
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"variants have the same name: {', '.join(duplicates)}; name them with `name=source`")
        return value

    @model_validator(mode="after")
    def _some_suite(self) -> EvalConfig:
        if not self.suites.enabled():
            raise ValueError("suites: enable at least one suite")
        return self

    def reference_problems(self, stages: Collection[str], dataset_formats: Mapping[str, str]) -> list[str]:
        """Problems with what this section names, as `evaluate.<key>: problem` lines for the run config.

        `stages` are the run's stage names, `dataset_formats` its data set names and their formats.
        A variant must be a stage or look like a model source; each enabled suite's data set must
        exist with the format the suite reads.
        """
        problems = []
        for index, entry in enumerate(self.variants):
            source = variant_source(entry)
            if source not in stages and not _looks_like_model_source(source):
                problems.append(
                    f"evaluate.variants.{index}: {source!r} is neither a stage of this run "
                    f"(stages: {', '.join(sorted(stages)) or 'none'}) nor a model path, s3:// URI or Hugging Face id"
                )
        for name, suite in self.suites.enabled().items():
            if name == "lm_eval":
                problems += [f"evaluate.suites.lm_eval.{problem}" for problem in _lm_eval_problems(suite)]
                continue
            if name == "judge" and suite.questions:
                continue
            need = "text" if name.endswith("perplexity") else "benchmark"
            have = dataset_formats.get(suite.dataset)
            if have is None:
                problems.append(
                    f"evaluate.suites.{name}.dataset: {suite.dataset!r} is not a data set "
                    f"(known: {', '.join(sorted(dataset_formats)) or 'none'}); disable the suite or declare it"
                )
            elif have != need:
                problems.append(f"evaluate.suites.{name}.dataset: {suite.dataset!r} has format {have!r}, this suite needs {need!r}")
        return problems

    def suite_max_items(self, suite: str) -> int | None:
        """The item cap of `suite`: the smaller of its own max_items and the global one."""
        caps = [c for c in (getattr(self.suites, suite).max_items, self.max_items) if c is not None]
        return min(caps) if caps else None


def _lm_eval_problems(suite: LmEvalConfig) -> list[str]:
    """`<key>: problem` lines for the lm_eval suite: the include folder, lm-eval itself, unknown task names."""
    problem = suite.include_problem()
    if problem:
        return [f"include_path: {problem}"]
    # Imported only here: a config without the suite never imports lm-eval.
    from alloylm.evaluate.lm_eval_suite import unknown_tasks, unknown_tasks_message

    try:
        unknown = unknown_tasks(suite.tasks, suite.include_path)
    except ImportError as exc:
        return [f"tasks: lm-eval cannot be imported ({exc}); install it (pip install lm_eval) or disable the suite"]
    return [f"tasks: {unknown_tasks_message(unknown, suite.include_path)}"] if unknown else []


def _named(entry: str) -> tuple[str, str] | None:
    # `name=source` only when the part before '=' is a plain name: an s3 key may hold '=' too.
    name, sep, source = entry.partition("=")
    return (name, source.strip()) if sep and re.match(_VARIANT_NAME_PATTERN, name) else None


def variant_name(entry: str) -> str:
    """The name a variant entry goes by: the part before `=`, a stage name, or a model path's last part."""
    named = _named(entry)
    if named:
        return named[0]
    last = entry.rstrip("/").rsplit("/", 1)[-1].removeprefix("s3:")
    return re.sub(r"[^A-Za-z0-9._-]", "_", last)[:64] or "model"


def _looks_like_model_source(ref: str) -> bool:
    # Stage names cannot hold '/' or ':' (the run config's rule), so anything that does is a model.
    return "/" in ref or ":" in ref or ref.startswith((".", "~"))


def variant_source(entry: str) -> str:
    """The stage name or model source of a variant entry (`name=source` -> source)."""
    named = _named(entry)
    return named[1] if named else entry
