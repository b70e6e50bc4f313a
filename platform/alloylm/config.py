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
from alloylm.evaluate.config import EvalConfig
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


class DatasetConfig(_Frozen):
    """One named data set of the run: where it is read from and what shape it has."""

    source: str | list[str] = Field(
        description=(
            "Where the data is: `builtin:NAME` (the generated corpus), `hf:ORG/NAME` or `hf:/path/saved_to_disk` "
            "(Hugging Face datasets), or local/`s3://` files: a folder, a glob or a file "
            "(.txt, .md, .jsonl, .parquet). A list reads several sources into one data set."
        )
    )
    format: Literal["text", "chat", "preference", "benchmark"] | None = Field(
        None,
        description="text (CPT), chat (SFT), preference (DPO/ORPO) or benchmark. Inferred for `builtin:` sources.",
    )
    columns: ColumnMapping = Field(default_factory=ColumnMapping, description="Source column names per field.")
    hf_split: str = Field("train", description="Split to read from a Hugging Face data set.")
    hf_config: str | None = Field(None, description="Configuration (subset) name of a Hugging Face data set.")
    max_records: int | None = Field(None, gt=0, description="Read at most this many records (for quick trials).")

    @property
    def sources(self) -> list[str]:
        return [self.source] if isinstance(self.source, str) else list(self.source)

    @field_validator("source")
    @classmethod
    def _check_sources(cls, value: str | list[str]) -> str | list[str]:
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


class MergeStageConfig(_StageBase):
    """A merge of two or more parents (fixed parameters or searched)."""

    kind: Literal["merge", "merge_search"] = Field(description="`merge` (fixed parameters) or `merge_search` (Ray Tune).")
    parents: list[str] = Field(min_length=2, description="Stages or models to merge; the first is the base for SLERP.")
    method: str = Field("slerp", description="mergekit merge method name.")


StageConfig = Annotated[
    Union[CptStageConfig, SftStageConfig, DpoStageConfig, OrpoStageConfig, MergeStageConfig], Field(discriminator="kind")
]
TRAIN_STAGES = {"cpt": CptStageConfig, "sft": SftStageConfig, "dpo": DpoStageConfig, "orpo": OrpoStageConfig}
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
            model = TRAIN_STAGES.get(kind, MergeStageConfig if kind in ("merge", "merge_search") else None)
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
        for cut in range(len(loc), 0, -1):
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
