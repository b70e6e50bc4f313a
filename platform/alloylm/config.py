"""The run config: typed, checked at load time, frozen once built.

A run is one YAML file describing named datasets and a DAG of named stages. `load_config` reads it,
applies `key.sub=value` overrides, validates it and raises `ConfigError` (exit code 2 in the CLI)
with the dotted path, the file and line, and what is allowed, before any cluster work starts.
"""

from __future__ import annotations

import graphlib
import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from alloylm.corpus import BUILTIN_FORMATS, BuiltinCorpusOptions
from alloylm.evaluate.config import EvalConfig, SuitesConfig
from alloylm.serve.config import ServeConfig
from alloylm.train.options import CheckpointOptions, DeepSpeedOptions, LoraOptions, ResourceOptions, TrainingOptions

NAME_PATTERN = r"^[a-z][a-z0-9_-]{0,63}$"
DATA_FORMATS = ("text", "chat", "preference", "benchmark")


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


# --------------------------------------------------------------------------------------------
# Datasets and data preparation
# --------------------------------------------------------------------------------------------


class ColumnMapping(_Frozen):
    """Which source column holds each field AlloyLM reads. Unset fields use the field's own name."""

    id: str | None = Field(None, description="Column with a stable record id (default: derived from file and row).")
    text: str | None = Field(None, description="Text column, for `format: text` (default `text`).")
    messages: str | None = Field(
        None, description="Column holding a list of {role, content} messages, for `format: chat` (default `messages`)."
    )
    user: str | None = Field(
        None, description="For chat data stored as question/answer columns: the column with the user turn."
    )
    assistant: str | None = Field(
        None, description="For chat data stored as question/answer columns: the column with the assistant turn."
    )
    system: str | None = Field(None, description="Optional column with a system prompt for each chat.")
    prompt: str | None = Field(None, description="Prompt column for `format: preference` (default `prompt`).")
    chosen: str | None = Field(None, description="Chosen-answer column for `format: preference` (default `chosen`).")
    rejected: str | None = Field(
        None, description="Rejected-answer column for `format: preference` (default `rejected`)."
    )

    @model_validator(mode="after")
    def _user_assistant_together(self) -> ColumnMapping:
        if (self.user is None) != (self.assistant is None):
            raise ValueError("`user` and `assistant` columns must be given together")
        if self.user is not None and self.messages is not None:
            raise ValueError("give either `messages` or `user`/`assistant`, not both")
        return self


# What each `generate` task produces: the format of the generated data set.
GENERATE_TASK_FORMATS = {"qa": "chat", "preference": "preference", "benchmark": "benchmark"}
_PROMPT_PLACEHOLDER = "{chunk}"


class TeacherConfig(_Frozen):
    """The teacher model: any OpenAI-compatible chat completions endpoint, and how hard to drive it."""

    base_url: str = Field(
        description=(
            "API base URL, up to and including /v1: vLLM, Ray Serve LLM, `alloylm serve`, or a hosted API "
            "(e.g. http://127.0.0.1:8000/v1). Requests go to <base_url>/chat/completions."
        )
    )
    model: str = Field(description="The `model` field of each request: the teacher's name at that endpoint.")
    api_key_env: str | None = Field(
        None,
        description=(
            "Name of the environment variable (on the machine that runs `alloylm data`) holding the API key, "
            "sent as a Bearer token. The key itself never goes into a config or an artifact."
        ),
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
    )
    max_concurrency: int = Field(4, ge=1, le=1024, description="Most requests in flight at once, over all actors.")
    requests_per_second: float | None = Field(
        None, gt=0, description="Most requests started per second, over all actors (null: no rate limit)."
    )
    max_retries: int = Field(
        3,
        ge=0,
        le=20,
        description=(
            "Retries of one request after a connection error, a timeout, or HTTP 408/409/429/5xx. Other 4xx "
            "answers are not retried. A request still failing after its retries fails its batch only."
        ),
    )
    retry_backoff_s: float = Field(
        1.0, ge=0, le=60, description="Wait before the first retry; doubled at each retry. A Retry-After header (up to 60 s) wins."
    )
    timeout_s: float = Field(120.0, gt=0, description="Seconds one request may take (connect and each read).")
    temperature: float = Field(0.7, ge=0, le=2, description="Sampling temperature of the teacher.")
    max_tokens: int = Field(1024, ge=1, description="Most tokens the teacher may write per answer.")
    extra_body: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "Further request fields, sent as given: e.g. {response_format: {type: json_object}} for endpoints "
            "that constrain output to JSON, or vLLM's guided decoding options."
        ),
    )
    actors: int = Field(
        1, ge=1, description="Ray Data actors sending requests; each has max_concurrency / actors requests in flight."
    )
    cpus_per_actor: float = Field(
        0.1, gt=0, description="CPUs reserved per sending actor (it mostly waits on the network)."
    )

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"base_url must be an http:// or https:// URL, got {value!r}")
        return value.rstrip("/")

    @field_validator("extra_body")
    @classmethod
    def _no_reserved_fields(cls, value: dict[str, Any]) -> dict[str, Any]:
        reserved = sorted({"model", "messages", "temperature", "max_tokens", "stream", "n"} & value.keys())
        if reserved:
            raise ValueError(f"{', '.join(reserved)} cannot be set in extra_body (they are fields of teacher, or fixed)")
        return value

    @model_validator(mode="after")
    def _actors_within_concurrency(self) -> TeacherConfig:
        if self.actors > self.max_concurrency:
            raise ValueError(f"actors ({self.actors}) must not exceed max_concurrency ({self.max_concurrency})")
        return self


class HeldoutConfig(_Frozen):
    """Which source documents are held out: benchmark questions come only from them, training items never."""

    fraction: float = Field(
        0.1,
        ge=0,
        lt=1,
        description=(
            "Share of the source documents held out (rounded, at least one when above 0 and there are two "
            "or more documents, never all). Every `generate` data set reading the same documents must agree."
        ),
    )
    seed: int = Field(0, description="Seed of the draw of held-out documents.")
    validation_fraction: float = Field(
        0.5,
        ge=0,
        le=1,
        description="For task `benchmark`: share of held-out documents whose questions go to split `validation` (the rest: `test`).",
    )


class GenerateConfig(_Frozen):
    """A data set written by a teacher model from the chunks of a text data set of this run."""

    from_: str = Field(
        alias="from", pattern=NAME_PATTERN, description="A `format: text` data set of this run: its prepared documents are chunked and sent."
    )
    task: Literal["qa", "preference", "benchmark"] = Field(
        description=(
            "qa: question-answer chats (format chat, for SFT); preference: a question with a chosen and a "
            "rejected answer (format preference, for DPO/ORPO); benchmark: held-out questions (format benchmark)."
        )
    )
    teacher: TeacherConfig = Field(description="The teacher endpoint and its request settings.")
    prompt: str | None = Field(
        None,
        description=(
            "The user prompt template instead of the built-in one of the task. `{chunk}` is replaced by the "
            "chunk's text, `{n}` by items_per_chunk, `{choices}` by num_choices; other braces are left as they are."
        ),
    )
    prompt_file: str | None = Field(None, description="A file (local or s3://) holding the prompt template; read when generation starts.")
    system_prompt: str | None = Field(None, description="The system message of every request (null: the built-in one).")
    items_per_chunk: int = Field(1, ge=1, le=20, description="Items asked for in one request about one chunk.")
    question_type: Literal["short_answer", "multiple_choice"] = Field(
        "short_answer", description="For task `benchmark`: short-answer or multiple-choice questions."
    )
    num_choices: int = Field(4, ge=2, le=8, description="For multiple-choice benchmark questions: options per question.")
    chunk_chars: int = Field(
        3000, ge=200, le=100_000, description="Longest chunk, in characters; documents are cut at paragraph, then sentence ends."
    )
    min_chunk_chars: int = Field(200, ge=1, description="Chunks shorter than this (a document's short tail) are not sent.")
    max_chunks: int | None = Field(None, gt=0, description="Send at most this many chunks, drawn with the held-out seed (quick trials).")
    batch_chunks: int = Field(
        8,
        ge=1,
        le=10_000,
        description="Chunks per batch: the unit that is written when finished and, after a failure, sent again.",
    )
    heldout: HeldoutConfig = Field(default_factory=HeldoutConfig, description="Held-out source documents.")

    @model_validator(mode="after")
    def _check(self) -> GenerateConfig:
        if self.prompt is not None and self.prompt_file is not None:
            raise ValueError("give either `prompt` or `prompt_file`, not both")
        if self.prompt is not None and _PROMPT_PLACEHOLDER not in self.prompt:
            raise ValueError(f"prompt must contain {_PROMPT_PLACEHOLDER}, where the chunk's text goes")
        if self.min_chunk_chars >= self.chunk_chars:
            raise ValueError(f"min_chunk_chars ({self.min_chunk_chars}) must be below chunk_chars ({self.chunk_chars})")
        if self.task != "benchmark":
            misplaced = sorted({"question_type", "num_choices"} & self.model_fields_set)
            if misplaced:
                raise ValueError(f"{', '.join(misplaced)} only apply to task `benchmark`")
        elif self.heldout.fraction == 0:
            raise ValueError("task `benchmark` asks about held-out documents only: heldout.fraction must be above 0")
        return self

    @property
    def format(self) -> str:
        return GENERATE_TASK_FORMATS[self.task]


class DatasetConfig(_Frozen):
    """One named data set of the run: where it is read from, or which teacher writes it, and its shape."""

    source: str | list[str] | None = Field(
        None,
        description=(
            "Where the data is: `builtin:NAME` (the generated corpus), `hf:ORG/NAME` or `hf:/path/saved_to_disk` "
            "(Hugging Face datasets), or local/`s3://` files: a folder, a glob or a file "
            "(.txt, .md, .pdf, .jsonl, .parquet). A list reads several sources into one data set. "
            "Not given when `generate` is."
        ),
    )
    generate: GenerateConfig | None = Field(
        None, description="Write this data set with a teacher model from a text data set of the run, instead of reading a source."
    )
    format: Literal["text", "chat", "preference", "benchmark"] | None = Field(
        None,
        description=(
            "text (CPT), chat (SFT), preference (DPO/ORPO) or benchmark. Inferred for `builtin:` sources and "
            "from the task of `generate`."
        ),
    )
    columns: ColumnMapping = Field(default_factory=ColumnMapping, description="Source column names per field.")
    hf_split: str = Field("train", description="Split to read from a Hugging Face data set.")
    hf_config: str | None = Field(None, description="Configuration (subset) name of a Hugging Face data set.")
    max_records: int | None = Field(None, gt=0, description="Read at most this many records (for quick trials).")

    @property
    def sources(self) -> list[str]:
        if self.source is None:
            return []
        return [self.source] if isinstance(self.source, str) else list(self.source)

    @field_validator("source")
    @classmethod
    def _check_sources(cls, value: str | list[str] | None) -> str | list[str] | None:
        if value is None:
            return value
        for item in [value] if isinstance(value, str) else value:
            if not item.strip():
                raise ValueError("a source must not be empty")
            if item.startswith("builtin:") and item.removeprefix("builtin:") not in BUILTIN_FORMATS:
                raise ValueError(
                    f"unknown built-in source {item!r}; known: "
                    + ", ".join(f"builtin:{name}" for name in sorted(BUILTIN_FORMATS))
                )
        if isinstance(value, list) and not value:
            raise ValueError("at least one source is needed")
        return value

    @model_validator(mode="after")
    def _check_format(self) -> DatasetConfig:
        if self.generate is not None:
            if self.source is not None:
                raise ValueError("give either `source` or `generate`, not both")
            if "columns" in self.model_fields_set:
                raise ValueError("`columns` do not apply to a generated data set")
            if self.format is not None and self.format != self.generate.format:
                raise ValueError(f"format {self.format!r} does not match task {self.generate.task!r}, which writes {self.generate.format!r}")
            object.__setattr__(self, "format", self.generate.format)
            return self
        if self.source is None:
            raise ValueError("give `source` (where the data is) or `generate` (a teacher writes it)")
        builtin = {BUILTIN_FORMATS.get(s.removeprefix("builtin:")) for s in self.sources if s.startswith("builtin:")}
        every_builtin = all(s.startswith("builtin:") for s in self.sources)
        if self.format is None:
            if not (every_builtin and len(builtin) == 1):
                raise ValueError(
                    "`format` is required (text, chat, preference or benchmark) unless every source is a builtin: one of one format"
                )
            # Frozen model: filling the inferred default is the one write we allow, during validation.
            object.__setattr__(self, "format", builtin.pop())
        elif builtin and builtin != {self.format}:
            raise ValueError(f"format {self.format!r} does not match the built-in source's format {sorted(builtin)}")
        return self

    def generation_problems(self, name: str, datasets: dict[str, DatasetConfig]) -> list[str]:
        """What is wrong with this data set's `generate` given the run's other data sets (empty: nothing).

        `generate.from` must name a text data set that is read, not generated; every generated data set
        reading the same documents must hold out the same ones, or a benchmark question could come
        from a document that trained the model.
        """
        if self.generate is None:
            return []
        source = self.generate.from_
        where = f"datasets.{name}.generate.from"
        if source not in datasets:
            return [f"{where}: {source!r} is not a data set (known: {', '.join(sorted(datasets)) or 'none'})"]
        if datasets[source].generate is not None or datasets[source].format != "text":
            return [f"{where}: data set {source!r} must be a `format: text` data set read from files or a source"]
        problems = []
        for other_name, other in sorted(datasets.items()):
            if other.generate is None or other.generate.from_ != source:
                continue
            mine, theirs = self.generate.heldout, other.generate.heldout
            if (mine.fraction, mine.seed) != (theirs.fraction, theirs.seed):
                problems.append(
                    f"datasets.{name}.generate.heldout: fraction and seed differ from datasets.{other_name}.generate.heldout, "
                    f"which reads the same documents ({source!r}); held-out documents must be the same for both"
                )
                break
        return problems


class NearDedupConfig(_Frozen):
    """Near-duplicate removal by MinHash signatures and locality-sensitive hashing."""

    enabled: bool = Field(True, description="Remove near-duplicate documents (text data sets only).")
    threshold: float = Field(0.8, gt=0, lt=1, description="Estimated Jaccard similarity above which a document is a near duplicate.")
    num_perm: int = Field(64, ge=8, le=512, description="Number of MinHash permutations (signature length).")
    shingle_chars: int = Field(5, ge=2, le=32, description="Character n-gram length used as shingles.")


class DataPrepConfig(_Frozen):
    """How every data set is cleaned, tokenized and packed."""

    block_size: int = Field(256, ge=8, description="Tokens per packed CPT block (EOS separates documents).")
    min_chars: int = Field(16, ge=0, description="Drop text documents shorter than this after normalisation.")
    max_chars: int = Field(2_000_000, gt=0, description="Drop text documents longer than this after normalisation.")
    exact_dedup: bool = Field(True, description="Drop records whose normalised content was already seen.")
    near_dedup: NearDedupConfig = Field(default_factory=NearDedupConfig, description="Near-duplicate removal.")
    tokenizer_actors: int = Field(2, ge=1, description="At most this many tokenizer actors in the Ray Data actor pool (fewer for small data sets).")
    cpus_per_tokenizer_actor: float = Field(
        0.5,
        gt=0,
        description=(
            "CPUs reserved per tokenizer actor. Fractional on purpose: whole-CPU actors on a 2-CPU "
            "cluster leave nothing for the read tasks and the pipeline stalls."
        ),
    )
    batch_size: int = Field(256, ge=1, description="Records per batch sent to a tokenizer actor.")
    rows_per_shard: int = Field(4096, ge=1, description="Target rows per output parquet shard.")
    tail: Literal["drop", "pad"] = Field(
        "drop",
        description=(
            "What happens to the last partial block of a text data set: `drop` discards it (its token count "
            "is reported in the manifest as tokens_dropped_tail) or `pad` pads it with the pad token and "
            "marks the padding in `attention_mask`."
        ),
    )

    @model_validator(mode="after")
    def _chars_order(self) -> DataPrepConfig:
        if self.min_chars >= self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) must be below max_chars ({self.max_chars})")
        return self


class TrainTokenizerConfig(_Frozen):
    """Train a byte-level BPE tokenizer on the run's own data (for models built from a preset)."""

    vocab_size: int = Field(2048, ge=300, le=262144, description="Vocabulary size, special tokens included.")
    min_frequency: int = Field(2, ge=1, description="Minimum pair frequency for a BPE merge.")
    datasets: list[str] | None = Field(
        None, description="Data sets whose text trains the tokenizer (default: every text and chat data set)."
    )
    max_documents: int = Field(20000, gt=0, description="Train on at most this many documents per data set.")


class TokenizerConfig(_Frozen):
    """Where the run's tokenizer comes from: trained here, or taken from a model."""

    train: TrainTokenizerConfig | None = Field(None, description="Train a new byte-level BPE tokenizer.")
    from_: str | None = Field(
        None, alias="from", description="Use the tokenizer of this model (local path, s3:// URI or Hugging Face id)."
    )
    model_max_length: int = Field(4096, gt=0, description="Longest sequence the tokenizer admits.")

    @model_validator(mode="after")
    def _one_of(self) -> TokenizerConfig:
        if (self.train is None) == (self.from_ is None):
            raise ValueError("give exactly one of `train` or `from`")
        return self


# --------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------


class PresetInit(_Frozen):
    """Start from a freshly initialised model of a named preset architecture."""

    init: str = Field(description="Preset name, e.g. tiny-llama, small-llama, tiny-mistral.")
    seed: int | None = Field(None, description="Initialisation seed (default: the run's seed).")

    @field_validator("init")
    @classmethod
    def _known_preset(cls, value: str) -> str:
        from alloylm.models.presets import PRESETS

        if value not in PRESETS:
            raise ValueError(f"unknown preset {value!r}; known: {', '.join(sorted(PRESETS))}")
        return value


ModelFrom = Union[PresetInit, str]


class _StageBase(_Frozen):
    description: str = Field("", description="Free text shown in progress and reports.")


class TrainStageConfig(_StageBase):
    """A training stage run on Ray Train; one subclass per method (cpt, sft, dpo, orpo)."""

    kind: str
    from_: ModelFrom = Field(
        alias="from",
        description="Parent: a stage name of this run, a model (local path, s3:// URI, Hugging Face id) or {init: PRESET}.",
    )
    data: str = Field(description="Name of a data set under `datasets:`.")
    training: TrainingOptions = Field(default_factory=TrainingOptions, description="Optimisation hyperparameters.")
    deepspeed: DeepSpeedOptions = Field(default_factory=DeepSpeedOptions, description="DeepSpeed ZeRO (null stage: DDP).")
    lora: LoraOptions | None = Field(None, description="Train LoRA adapters instead of all weights (null: full fine-tuning).")
    resources: ResourceOptions = Field(default_factory=ResourceOptions, description="Workers and their resources.")
    checkpoint: CheckpointOptions = Field(default_factory=CheckpointOptions, description="Checkpointing and failure handling.")

    @model_validator(mode="after")
    def _hardware(self) -> TrainStageConfig:
        if self.deepspeed.precision == "fp16" and not self.resources.use_gpu:
            raise ValueError(
                "deepspeed.precision: fp16 needs GPUs (resources.gpus_per_worker > 0); on CPU use bf16 or fp32"
            )
        if self.deepspeed.stage is None and self.deepspeed.precision != "fp32" and not self.resources.use_gpu:
            raise ValueError("deepspeed.precision: without DeepSpeed (stage: null) CPU training runs in fp32")
        return self


class CptStageConfig(TrainStageConfig):
    """Continued pretraining: causal-LM loss on packed token blocks."""

    kind: Literal["cpt"] = Field(description="cpt")


class SftStageConfig(TrainStageConfig):
    """Supervised fine-tuning with TRL's SFTTrainer on chats."""

    kind: Literal["sft"] = Field(description="sft")
    assistant_only_loss: bool = Field(True, description="Learn only the assistant turns (needs {% generation %} in the chat template).")
    packing: bool = Field(False, description="Pack several chats into one sequence (TRL's packing).")


class DpoStageConfig(TrainStageConfig):
    """Direct preference optimisation with TRL's DPOTrainer; the parent is the reference model."""

    kind: Literal["dpo"] = Field(description="dpo")
    beta: float = Field(0.1, gt=0, description="KL penalty strength (the paper uses 0.05).")
    loss_type: str = Field("sigmoid", description="TRL DPO loss type (sigmoid is the original DPO loss).")


class OrpoStageConfig(TrainStageConfig):
    """Odds-ratio preference optimisation (TRL's experimental ORPOTrainer); no reference model."""

    kind: Literal["orpo"] = Field(description="orpo")
    beta: float = Field(0.1, gt=0, description="Weight of the odds-ratio term (lambda in the ORPO paper).")


class MergeResources(_Frozen):
    """Cluster resources of one merge (or of one merge-search trial)."""

    num_cpus: float = Field(1.0, gt=0, description="CPUs per merge / per trial.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per merge / per trial (fractional shares a GPU).")


ParameterValue = Union[float, dict[str, Union[float, list[float]]]]


class MergeStageConfig(_StageBase):
    """A merge of two or more parents with fixed parameters, through mergekit."""

    kind: Literal["merge"] = Field(description="merge")
    parents: list[str] = Field(
        min_length=2,
        description="Stages of this run or models (local path, s3:// URI, Hugging Face id) to merge, in order.",
    )
    method: str = Field(
        "slerp", description="mergekit merge method: slerp, linear, task_arithmetic, ties, dare_ties, or any other mergekit method."
    )
    base: str | None = Field(
        None, description="The parent that is the base model (slerp's t=0 end, task vectors' origin); default: the first parent."
    )
    parameters: dict[str, ParameterValue] = Field(
        default_factory=dict,
        description=(
            "Method parameters, e.g. {t: 0.5}, or a layer-wise gradient per tensor filter: "
            "{t: {self_attn: [0, 0.5, 0.3, 0.7, 1], mlp: [1, 0.5, 0.7, 0.3, 0], default: 0.5}}."
        ),
    )
    model_parameters: dict[str, dict[str, ParameterValue]] = Field(
        default_factory=dict, description="Per-parent parameters by parent name, e.g. {dpo: {weight: 0.6, density: 0.5}}."
    )
    mergekit_config: str | None = Field(
        None,
        description=(
            "A mergekit YAML file used as is (method, parameters and parents come from it; a `model:` equal to a stage "
            "name of this run means that stage's model). `parents` must still list those stages, for the DAG."
        ),
    )
    tokenizer_from: str | None = Field(
        None, description="The parent whose tokenizer, chat template and EOS the merged model keeps; default: the first parent."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="dtype of the merge and of the merged model.")
    resources: MergeResources = Field(default_factory=MergeResources, description="What the merge reserves on the cluster.")

    @model_validator(mode="after")
    def _parents_named(self) -> MergeStageConfig:
        if len(set(self.parents)) != len(self.parents):
            raise ValueError(f"parents: each parent once, got {self.parents}")
        for key, value in (("base", self.base), ("tokenizer_from", self.tokenizer_from)):
            if value is not None and value not in self.parents:
                raise ValueError(f"{key}: {value!r} is not one of parents {self.parents}")
        unknown = sorted(set(self.model_parameters) - set(self.parents))
        if unknown:
            raise ValueError(f"model_parameters: {', '.join(unknown)} not among parents {self.parents}")
        if self.mergekit_config and (self.parameters or self.model_parameters):
            raise ValueError("mergekit_config: the YAML file holds the parameters; leave `parameters`/`model_parameters` unset")
        return self


class SearchedParameter(_Frozen):
    """How one merge parameter is searched: a number in [low, high], or a layer-wise gradient of anchors."""

    low: float = Field(0.0, description="Lower bound of every searched value.")
    high: float = Field(1.0, description="Upper bound of every searched value.")
    anchors: int | None = Field(
        None, ge=2, le=16, description="Search a layer-wise gradient of this many anchor points (mergekit interpolates between them)."
    )
    filters: list[str] = Field(
        default_factory=list,
        description="With anchors: one gradient per tensor-name filter (e.g. [self_attn, mlp]); empty: one gradient for all tensors.",
    )
    default: float | Literal["search"] = Field(
        0.5, description="With filters: the value for tensors no filter matches: a number, or `search` (searched in [low, high])."
    )
    values: list[float] | None = Field(
        None, min_length=1, description="Discrete values the grid searcher crosses (for a scalar parameter)."
    )

    @model_validator(mode="after")
    def _consistent(self) -> SearchedParameter:
        if self.high <= self.low:
            raise ValueError(f"high ({self.high}) must be greater than low ({self.low})")
        if self.filters and self.anchors is None:
            raise ValueError("filters need `anchors` (how many gradient points per filter)")
        if self.values is not None and self.anchors is not None:
            raise ValueError("`values` is for a scalar parameter; a gradient (anchors) is searched in [low, high] or given as search.points")
        if self.values is not None and any(not self.low <= v <= self.high for v in self.values):
            raise ValueError(f"values {self.values} must lie in [low, high] = [{self.low}, {self.high}]")
        if self.filters and isinstance(self.default, float) and not self.low <= self.default <= self.high:
            raise ValueError(f"default {self.default} must lie in [low, high] = [{self.low}, {self.high}]")
        return self


class AshaConfig(_Frozen):
    """ASHA early stopping: a trial reports its objective on growing subsets of the items; weak ones stop early."""

    rungs: list[float] = Field(
        default_factory=lambda: [0.25, 0.5, 1.0],
        min_length=2,
        description="Fractions of the objective's items at which a trial reports, increasing, the last 1.0.",
    )
    reduction_factor: float = Field(2.0, gt=1, description="ASHA keeps about 1/reduction_factor of the trials at each rung.")

    @field_validator("rungs")
    @classmethod
    def _increasing(cls, value: list[float]) -> list[float]:
        if any(b <= a for a, b in zip(value, value[1:])) or value[0] <= 0 or value[-1] != 1.0:
            raise ValueError(f"rungs must increase within (0, 1] and end at 1.0, got {value}")
        return value


class SearchObjective(_Frozen):
    """What a trial maximises: the weighted score of evaluation suites on the validation split."""

    split: Literal["validation", "test"] = Field(
        "validation", description="Always `validation`: searching on the test split would make the reported result a fit to it."
    )
    suites: SuitesConfig | None = Field(
        None, description="Suites and their weights (the objective is their weighted mean); default: the run's evaluate.suites."
    )
    max_items: int | None = Field(64, gt=0, description="Items per suite a trial scores (the full budget of the last ASHA rung).")

    @field_validator("split")
    @classmethod
    def _not_test(cls, value: str) -> str:
        if value != "validation":
            raise ValueError(
                "the merge search optimises on the validation split only; the test split is kept for the report "
                "(searching on it would report a fit to the test set)"
            )
        return value


class MergeSearchConfig(_Frozen):
    """The Ray Tune search over merge parameters."""

    space: dict[str, SearchedParameter] = Field(
        default_factory=dict, description="Method parameters to search, by name (e.g. t) -> bounds or gradient shape."
    )
    model_space: dict[str, dict[str, SearchedParameter]] = Field(
        default_factory=dict, description="Per-parent parameters to search, e.g. {dpo: {weight: {low: 0, high: 1}}}."
    )
    points: list[dict[str, Any]] = Field(
        default_factory=list,
        description=(
            "Candidate parameter sets in the `parameters` form (and `model_parameters:` inside), e.g. the paper's gradients. "
            "grid: exactly these are tried; other searchers try them first."
        ),
    )
    searcher: Literal["tpe", "cmaes", "random", "grid"] = Field(
        "tpe", description="tpe (Optuna TPE), cmaes (Optuna CMA-ES), random, or grid (search.points, or the product of `values`)."
    )
    num_samples: int = Field(16, ge=1, description="Trials to run (grid: ignored, every point is one trial).")
    max_concurrent_trials: int = Field(2, ge=1, description="Trials running at the same time (each takes resources).")
    asha: AshaConfig | None = Field(None, description="Early stopping on growing evaluation subsets (null: every trial scores all items).")
    objective: SearchObjective = Field(default_factory=SearchObjective, description="What a trial maximises.")
    seed: int | None = Field(None, description="Searcher seed (default: the run's seed).")

    @model_validator(mode="after")
    def _something_searched(self) -> MergeSearchConfig:
        if not self.space and not self.model_space and not self.points:
            raise ValueError("declare `space`, `model_space` or `points`: nothing is searched")
        if self.searcher == "grid" and not self.points:
            scalars = [p for p in self.space.values()] + [p for m in self.model_space.values() for p in m.values()]
            missing = [p for p in scalars if p.values is None]
            if missing:
                raise ValueError("searcher grid needs `points`, or `values` on every searched parameter")
        return self


class MergeSearchStageConfig(MergeStageConfig):
    """A merge whose parameters Ray Tune searches against the evaluation suites (validation split)."""

    kind: Literal["merge_search"] = Field(description="merge_search")
    search: MergeSearchConfig = Field(description="What is searched, how, and against which objective.")

    @model_validator(mode="after")
    def _search_fits_method(self) -> MergeSearchStageConfig:
        if self.mergekit_config:
            raise ValueError("mergekit_config: a search builds its own mergekit configs; use kind `merge` for a fixed YAML")
        both = sorted(set(self.search.space) & set(self.parameters))
        if both:
            raise ValueError(f"search.space: {', '.join(both)} also fixed under `parameters`; keep one")
        unknown = sorted(set(self.search.model_space) - set(self.parents))
        if unknown:
            raise ValueError(f"search.model_space: {', '.join(unknown)} not among parents {self.parents}")
        return self


StageConfig = Annotated[
    Union[CptStageConfig, SftStageConfig, DpoStageConfig, OrpoStageConfig, MergeStageConfig, MergeSearchStageConfig],
    Field(discriminator="kind"),
]
TRAIN_STAGES = {"cpt": CptStageConfig, "sft": SftStageConfig, "dpo": DpoStageConfig, "orpo": OrpoStageConfig}
MERGE_STAGES = {"merge": MergeStageConfig, "merge_search": MergeSearchStageConfig}
STAGE_DATA_FORMAT = {"cpt": "text", "sft": "chat", "dpo": "preference", "orpo": "preference"}


def stage_parents(stage: TrainStageConfig | MergeStageConfig) -> list[str]:
    """Every parent reference of a stage (stage names and model sources alike)."""
    if isinstance(stage, TrainStageConfig):
        return [] if isinstance(stage.from_, PresetInit) else [stage.from_]
    return list(stage.parents)


def _is_model_source(ref: str) -> bool:
    # Stage names cannot contain '/' or ':', so anything that does is a path, URI or hub id.
    return "/" in ref or ":" in ref or ref.startswith((".", "~"))


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


class RunConfig(_Frozen):
    """One run of AlloyLM: data sets, tokenizer, the stage DAG and where artifacts go."""

    experiment: str = Field(description="Name of the run; artifacts go to <storage>/<experiment>/.", pattern=NAME_PATTERN)
    storage: str = Field("./runs", description="Root folder for artifacts: a local path or an s3:// URI.")
    overwrite: bool = Field(
        False,
        description="Allow replacing a finished artifact whose inputs changed. Off: such a run stops instead of overwriting.",
    )
    seed: int = Field(0, description="Seed for everything random in the run.")
    trust_remote_code: bool = Field(
        False, description="Let transformers run code shipped with a model. Off unless you trust the model's author."
    )
    builtin: BuiltinCorpusOptions = Field(
        default_factory=BuiltinCorpusOptions, description="Sizes and seed of the generated built-in corpus."
    )
    tokenizer: TokenizerConfig = Field(description="Where the run's tokenizer comes from.")
    datasets: dict[str, DatasetConfig] = Field(default_factory=dict, description="Named data sets of the run.")
    data: DataPrepConfig = Field(default_factory=DataPrepConfig, description="Data preparation settings.")
    stages: dict[str, StageConfig] = Field(default_factory=dict, description="Named stages; each names its parents.")
    evaluate: EvalConfig | None = Field(None, description="Variants scored by `alloylm eval`, on which suites and split.")
    serve: ServeConfig | None = Field(None, description="OpenAI-compatible serving of the run's variants (`alloylm serve`).")

    @field_validator("datasets", "stages")
    @classmethod
    def _names(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name in value:
            if not re.match(NAME_PATTERN, name):
                raise ValueError(f"name {name!r} must match {NAME_PATTERN} (lower case, digits, '-' and '_')")
        return value

    @model_validator(mode="after")
    def _references(self) -> RunConfig:
        problems = []
        if self.tokenizer.train and self.tokenizer.train.datasets:
            for name in self.tokenizer.train.datasets:
                if name not in self.datasets:
                    problems.append(f"tokenizer.train.datasets: {name!r} is not a data set (known: {_known(self.datasets)})")
        for name, dataset in self.datasets.items():
            problems += dataset.generation_problems(name, self.datasets)
        for name, stage in self.stages.items():
            if isinstance(stage, TrainStageConfig):
                if stage.data not in self.datasets:
                    problems.append(f"stages.{name}.data: {stage.data!r} is not a data set (known: {_known(self.datasets)})")
                else:
                    have, need = self.datasets[stage.data].format, STAGE_DATA_FORMAT[stage.kind]
                    if have != need:
                        problems.append(
                            f"stages.{name}.data: data set {stage.data!r} has format {have!r}, a {stage.kind} stage needs {need!r}"
                        )
            key = "from" if isinstance(stage, TrainStageConfig) else "parents"
            for parent in stage_parents(stage):
                if parent == name:
                    problems.append(f"stages.{name}.{key}: a stage cannot be its own parent")
                elif parent not in self.stages and not _is_model_source(parent):
                    problems.append(
                        f"stages.{name}.{key}: {parent!r} is neither a stage of this run (stages: {_known(self.stages)}) "
                        "nor a model path, s3:// URI or Hugging Face id"
                    )
            if isinstance(stage, MergeSearchStageConfig):
                if stage.search.objective.suites is None and self.evaluate is None:
                    problems.append(
                        f"stages.{name}.search.objective.suites: no suites given and the run has no `evaluate:` section to take them from"
                    )
                else:
                    formats = {n: d.format for n, d in self.datasets.items()}
                    for problem in self.search_eval_config(name).reference_problems(set(self.stages), formats):
                        problems.append(problem.replace("evaluate.suites.", f"stages.{name}.search.objective.suites.", 1))
        if self.evaluate is not None:
            problems += self.evaluate.reference_problems(set(self.stages), {n: d.format for n, d in self.datasets.items()})
        if self.serve is not None:
            for name in self.serve.variant_names:
                if name not in self.stages and name not in self.serve.sources:
                    problems.append(
                        f"serve.variants: {name!r} is neither a stage of this run (stages: {_known(self.stages)}) "
                        "nor named under serve.sources"
                    )
        if problems:
            raise ValueError("; ".join(problems))
        self.stage_order()  # raises on a cycle
        return self

    def stage_order(self) -> list[str]:
        """Stage names in an order where every parent comes before its children."""
        graph = {name: [p for p in stage_parents(stage) if p in self.stages] for name, stage in self.stages.items()}
        try:
            return list(graphlib.TopologicalSorter(graph).static_order())
        except graphlib.CycleError as exc:
            cycle = exc.args[1]
            raise ValueError("stages form a cycle: " + " -> ".join(cycle)) from None

    def search_eval_config(self, name: str) -> EvalConfig:
        """The evaluation a trial of merge search `name` runs: its objective's suites on the validation split."""
        stage = self.stages[name]
        objective = stage.search.objective
        base = self.evaluate.model_dump(exclude={"variants", "suites", "split", "max_items"}) if self.evaluate else {}
        suites = objective.suites or self.evaluate.suites
        # A suite of weight 0 cannot move the objective: trials skip it instead of paying for it.
        unweighted = {n: getattr(suites, n).model_copy(update={"enabled": False}) for n, s in suites.enabled().items() if s.weight == 0}
        if unweighted and len(unweighted) < len(suites.enabled()):
            suites = suites.model_copy(update=unweighted)
        return EvalConfig(variants=[name], split="validation", max_items=objective.max_items, suites=suites, **base)

    @property
    def run_uri(self) -> str:
        from alloylm import storage

        return storage.join(storage.resolve(self.storage), self.experiment)

    def resolved_yaml(self) -> str:
        """The config with every default filled in, as saved next to every output."""
        return yaml.safe_dump(self.model_dump(mode="json", by_alias=True), sort_keys=False)


def _known(mapping: dict[str, Any]) -> str:
    return ", ".join(sorted(mapping)) or "none"


# --------------------------------------------------------------------------------------------
# Loading, overrides and error reporting
# --------------------------------------------------------------------------------------------


class ConfigError(Exception):
    """A config that cannot be used; the message names every problem and where it is."""


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value parsed as a YAML scalar or flow collection)."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: expected key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc.problem})") from None
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.sub=value` overrides to the raw config mapping (a deep copy is returned)."""
    data = json.loads(json.dumps(data))
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for depth, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(path[: depth + 1])
                raise ConfigError(f"override {text!r}: {where} is a {type(child).__name__}, not a mapping")
            node = child
        node[path[-1]] = value
    return data


def _yaml_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map each key path of a YAML document to its 1-based line number, for error messages."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key_path = (*path, str(key_node.value))
                lines[key_path] = key_node.start_mark.line + 1
                walk(value_node, key_path)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                lines[(*path, str(index))] = item.start_mark.line + 1
                walk(item, (*path, str(index)))

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


def _allowed_keys(model: type[BaseModel]) -> str:
    return ", ".join(sorted(f.alias or name for name, f in model.model_fields.items()))


def _model_at(path: tuple[str, ...], raw: dict[str, Any]) -> type[BaseModel] | None:
    """The pydantic model that owns the mapping at `path`, to list its allowed keys."""
    model: type[BaseModel] | None = RunConfig
    node: Any = raw
    for depth, part in enumerate(path):
        node = node.get(part, {}) if isinstance(node, dict) else {}
        if depth == 1 and path[0] == "datasets":
            model = DatasetConfig
        elif depth == 1 and path[0] == "stages":
            kind = node.get("kind") if isinstance(node, dict) else None
            model = TRAIN_STAGES.get(kind) or MERGE_STAGES.get(kind)
        else:
            field = next((f for n, f in model.model_fields.items() if part in (n, f.alias)), None) if model else None
            if field is None:
                return None
            annotation = field.annotation
            members = getattr(annotation, "__args__", (annotation,))
            models = [a for a in members if isinstance(a, type) and issubclass(a, BaseModel)]
            model = models[0] if models else None
    return model


def _clean_loc(loc: tuple[Any, ...], raw: dict[str, Any]) -> tuple[str, ...]:
    parts = [str(p) for p in loc]
    # pydantic puts the discriminator value into the location of tagged unions: drop it.
    if len(parts) >= 3 and parts[0] == "stages":
        stages = raw.get("stages") if isinstance(raw.get("stages"), dict) else {}
        stage = stages.get(parts[1], {})
        if isinstance(stage, dict) and parts[2] == str(stage.get("kind")):
            del parts[2]
    # Union members appear in locations as their type names ('str', 'PresetInit', ...): drop them.
    return tuple(p for p in parts if not re.match(r"^(str|int|list\[.*\]|PresetInit|function-.*)$", p))


def format_validation_error(
    exc: ValidationError, raw: dict[str, Any], text: str, path: str, overrides: list[str] | None = None
) -> str:
    lines = _yaml_lines(text)
    overridden = {tuple(o.partition("=")[0].split(".")): o for o in overrides or []}
    messages = []
    seen = set()
    errors = []
    for error in exc.errors():
        # Cross-field checks report "a.b.c: problem; d.e: problem" at the top level: split them so
        # each gets its own path and line.
        if not error["loc"] and error["type"] == "value_error":
            for item in error["msg"].removeprefix("Value error, ").split("; "):
                head, sep, rest = item.partition(": ")
                if sep and re.fullmatch(r"[\w.-]+", head):
                    errors.append({**error, "loc": tuple(head.split(".")), "msg": rest})
                else:
                    errors.append({**error, "msg": item})
        else:
            errors.append(error)
    for error in errors:
        loc = _clean_loc(error["loc"], raw)
        dotted = ".".join(loc) or "(top level)"
        msg = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            owner = _model_at(loc[:-1], raw)
            msg = "unknown key" + (f"; allowed here: {_allowed_keys(owner)}" if owner else "")
        elif error["type"] == "missing":
            msg = "required key is missing"
        elif error["type"] == "literal_error":
            msg = f"{msg} (got {error.get('input')!r})"
        elif "input" in error and error["type"] not in ("value_error", "model_type", "dict_type"):
            msg = f"{msg} (got {error['input']!r})"
        where = path
        # An override below the failing mapping (e.g. `stages.x.kind=...` making `stages.x` invalid) caused it.
        below = [o for key, o in overridden.items() if len(key) > len(loc) and key[: len(loc)] == loc] if loc else []
        if below:
            where = f"override {below[0]!r}"
        for cut in range(len(loc), 0, -1) if not below else ():
            if loc[:cut] in overridden:
                where = f"override {overridden[loc[:cut]]!r}"
                break
            if loc[:cut] in lines:
                where = f"{path}:{lines[loc[:cut]]}"
                break
        line = f"{where}: {dotted}: {msg}"
        if line not in seen:
            seen.add(line)
            messages.append(line)
    return "invalid config:\n  " + "\n  ".join(messages)


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read, override and validate a run config; raise ConfigError naming every problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a YAML mapping, got {type(raw).__name__}")
    raw = apply_overrides(raw, overrides or [])
    return validate_config(raw, text=text, path=str(path), overrides=overrides)


def validate_config(
    raw: dict[str, Any], *, text: str = "", path: str = "<config>", overrides: list[str] | None = None
) -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, raw, text, path, overrides)) from None


def fingerprint(*parts: Any) -> str:
    """A stable hash of JSON-able inputs: equal inputs, equal fingerprint, on every machine."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]
