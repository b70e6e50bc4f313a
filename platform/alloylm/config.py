"""The run config: typed, checked at load time, frozen once built.

A run is one YAML file describing named datasets and a DAG of named stages. `load_config` reads it,
applies `key.sub=value` overrides, validates it and raises `ConfigError` (exit code 2 in the CLI)
with the dotted path, the file and line, and what is allowed, before any cluster work starts.

This module keeps the run config itself, loading, overrides and error formatting. The schemas of
the parts live next to their code and are re-exported here: data sets and the tokenizer in
`alloylm.data.config`, teacher generation in `alloylm.generate.config`, training stages in
`alloylm.train.config`, merge stages in `alloylm.merge.config`, experiment tracking in
`alloylm.tracking`. Stage kinds come from the registry in `alloylm.stages`.
"""

from __future__ import annotations

import graphlib
import json
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from alloylm.artifact import fingerprint
from alloylm.corpus import BuiltinCorpusOptions
from alloylm.data.config import (
    ColumnMapping,
    DataPrepConfig,
    DatasetConfig,
    NearDedupConfig,
    TokenizerConfig,
    TrainTokenizerConfig,
)
from alloylm.errors import ConfigError
from alloylm.evaluate.config import EvalConfig
from alloylm.generate.config import GENERATE_TASK_FORMATS, GenerateConfig, HeldoutConfig, TeacherConfig
from alloylm.merge.config import (
    MERGE_STAGES,
    AshaConfig,
    MergeResources,
    MergeSearchConfig,
    MergeSearchStageConfig,
    MergeStageConfig,
    SearchedParameter,
    SearchObjective,
    search_eval_config,
)
from alloylm.plan_config import ClusterConfig
from alloylm.schema import DATA_FORMATS, NAME_PATTERN, SEED_MAX, StageConfigBase, is_model_source
from alloylm.schema import Frozen as _Frozen
from alloylm.serve.config import ServeConfig
from alloylm.stages import AnyStage, load_builtin_kinds
from alloylm.tracking import MlflowConfig, TrackingConfig
from alloylm.train.config import (
    STAGE_DATA_FORMAT,
    TRAIN_STAGES,
    CptStageConfig,
    DpoStageConfig,
    ModelFrom,
    OrpoStageConfig,
    PresetInit,
    SftStageConfig,
    TrainStageConfig,
)

__all__ = [
    "DATA_FORMATS", "GENERATE_TASK_FORMATS", "MERGE_STAGES", "NAME_PATTERN", "STAGE_DATA_FORMAT", "TRAIN_STAGES",
    "AshaConfig", "ColumnMapping", "ConfigError", "CptStageConfig", "DataPrepConfig", "DatasetConfig", "DpoStageConfig",
    "GenerateConfig", "HeldoutConfig", "MergeResources", "MergeSearchConfig", "MergeSearchStageConfig", "MergeStageConfig", "MlflowConfig",
    "ModelFrom", "NearDedupConfig", "OrpoStageConfig", "PresetInit", "RunConfig", "RunOptions", "SearchObjective",
    "SearchedParameter", "SftStageConfig", "StageConfigBase", "TeacherConfig", "TokenizerConfig", "TrainStageConfig",
    "TrackingConfig", "TrainTokenizerConfig", "apply_overrides", "fingerprint", "load_config", "parse_override", "stage_parents",
    "validate_config",
]


def stage_parents(stage: StageConfigBase) -> list[str]:
    """Every parent reference of a stage (stage names and model sources alike)."""
    return stage.parent_refs()


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


class RunOptions(_Frozen):
    """How `alloylm run` schedules the artifact graph."""

    max_parallel_stages: int | None = Field(
        None,
        ge=1,
        description=(
            "Stages (and evaluations) running at the same time. Null: as many as the cluster's free "
            "CPUs/GPUs fit; 1: one at a time, in dependency order."
        ),
    )
    lease_ttl_seconds: float = Field(
        120.0,
        gt=0,
        description=(
            "A writing command holds <run>/.lease and renews it every ttl/4; a lease not renewed for "
            "this long belongs to a dead holder and is taken over."
        ),
    )


class RunConfig(_Frozen):
    """One run of AlloyLM: data sets, tokenizer, the stage DAG and where artifacts go."""

    experiment: str = Field(description="Name of the run; artifacts go to <storage>/<experiment>/.", pattern=NAME_PATTERN)
    storage: str = Field("./runs", description="Root folder for artifacts: a local path or an s3:// URI.")
    overwrite: bool = Field(
        False,
        description="Allow replacing a finished artifact whose inputs changed. Off: such a run stops instead of overwriting.",
    )
    seed: int = Field(0, ge=0, le=SEED_MAX, description="Seed of model initialisation, training order and the merge search (the built-in corpus has `builtin.seed`).")
    trust_remote_code: bool = Field(
        False, description="Let transformers run code shipped with a model. Off unless you trust the model's author."
    )
    builtin: BuiltinCorpusOptions = Field(
        default_factory=BuiltinCorpusOptions, description="Sizes and seed of the generated built-in corpus."
    )
    tokenizer: TokenizerConfig = Field(description="Where the run's tokenizer comes from.")
    datasets: dict[str, DatasetConfig] = Field(default_factory=dict, description="Named data sets of the run.")
    data: DataPrepConfig = Field(default_factory=DataPrepConfig, description="Data preparation settings.")
    stages: dict[str, AnyStage] = Field(
        default_factory=dict, description="Named stages; each names its parents and its `kind` (see alloylm.stages.STAGE_KINDS)."
    )
    evaluate: EvalConfig | None = Field(None, description="Variants scored by `alloylm eval`, on which suites and split.")
    serve: ServeConfig | None = Field(None, description="OpenAI-compatible serving of the run's variants (`alloylm serve`).")
    run: RunOptions = Field(default_factory=RunOptions, description="How `alloylm run` schedules the stages.")
    cluster: ClusterConfig | None = Field(
        None, description="The target GPU cluster `alloylm plan` sizes the stages for (and `alloylm run` checks they fit)."
    )
    tracking: TrackingConfig | None = Field(
        None, description="Optional experiment tracking (`tracking.mlflow`, needs `pip install 'alloylm[mlflow]'`)."
    )

    @field_validator("storage")
    @classmethod
    def _storage(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("is empty: give a folder (e.g. ./runs) or an s3://bucket/prefix URI")
        if value != value.strip():
            raise ValueError(f"{value!r} has leading or trailing spaces")
        scheme, sep, rest = value.partition("://")
        if sep and not rest.strip("/"):
            raise ValueError(f"{value!r} names no location after {scheme}:// (e.g. {scheme}://bucket/prefix)")
        if sep and scheme.lower() in ("s3", "s3a") and rest.startswith("/"):
            raise ValueError(f"{value!r} has no bucket: write {scheme}://bucket/prefix")
        return value

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
        kinds = load_builtin_kinds()
        for name, stage in self.stages.items():
            kind = kinds[stage.kind]
            for data in kind.datasets(stage):
                if data not in self.datasets:
                    problems.append(f"stages.{name}.data: {data!r} is not a data set (known: {_known(self.datasets)})")
                elif kind.data_format is not None and self.datasets[data].format != kind.data_format:
                    have = self.datasets[data].format
                    problems.append(
                        f"stages.{name}.data: data set {data!r} has format {have!r}, a {stage.kind} stage needs {kind.data_format!r}"
                    )
            key = "from" if "from_" in type(stage).model_fields else "parents"
            for parent in kind.parents(stage):
                if parent == name:
                    problems.append(f"stages.{name}.{key}: a stage cannot be its own parent")
                elif parent not in self.stages and not is_model_source(parent):
                    problems.append(
                        f"stages.{name}.{key}: {parent!r} is neither a stage of this run (stages: {_known(self.stages)}) "
                        "nor a model path, s3:// URI or Hugging Face id"
                    )
            if kind.problems is not None:
                problems += kind.problems(self, name)
        if self.evaluate is not None:
            problems += self.evaluate.reference_problems(set(self.stages), {n: d.format for n, d in self.datasets.items()})
        if self.serve is not None:
            if self.serve.model == "best" and self.evaluate is None:
                problems.append("serve.model: `best` is chosen by the run's evaluation on validation; the run has no `evaluate:` section")
            for name in self.serve.variant_names:
                if name == "best":
                    continue
                if name not in self.stages and name not in self.serve.sources:
                    key = "serve.model" if name == self.serve.model else "serve.variants"
                    problems.append(
                        f"{key}: {name!r} is neither a stage of this run (stages: {_known(self.stages)}) "
                        "nor named under serve.sources"
                    )
        if problems:
            raise ValueError("\n".join(problems))  # format_validation_error gives each its own line
        self.stage_order()  # raises on a cycle
        return self

    def stage_order(self) -> list[str]:
        """Stage names in an order where every parent comes before its children."""
        graph = {name: [p for p in stage.parent_refs() if p in self.stages] for name, stage in self.stages.items()}
        try:
            return list(graphlib.TopologicalSorter(graph).static_order())
        except graphlib.CycleError as exc:
            cycle = exc.args[1]
            key = "from" if "from_" in type(self.stages[cycle[0]]).model_fields else "parents"
            raise ValueError(f"stages.{cycle[0]}.{key}: stages form a cycle: " + " -> ".join(cycle)) from None

    def search_eval_config(self, name: str) -> EvalConfig:
        """The evaluation a trial of merge search `name` runs (see `alloylm.merge.config.search_eval_config`)."""
        return search_eval_config(self, name)

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


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error: PyYAML keeps
    the last one silently, so a second `sft:` stage would replace the first without a word."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                line = first.get(key)
            except TypeError:  # an unhashable key: PyYAML's own construction names it
                continue
            if line is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (first on line {line})", key_node.start_mark
                )
            first[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _timestamp_as_written(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> str:
    # A date-like scalar (`experiment: 2024-06-01`, a revision named by date) stays the text it is:
    # no config key takes a date, and a date object cannot be carried further (JSON, fingerprints).
    return loader.construct_scalar(node)


def _not_in_a_config(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    raise yaml.constructor.ConstructorError(
        None, None, f"a {node.tag.rsplit(':', 1)[-1]} value has no meaning in a config; write it as text", node.start_mark
    )


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:timestamp", _timestamp_as_written)
for _tag in ("binary", "set"):
    _UniqueKeyLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", _not_in_a_config)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's message without its position (we give file:line); a ReaderError has no `problem`."""
    if isinstance(exc, yaml.reader.ReaderError):
        code = exc.character if isinstance(exc.character, int) else ord(exc.character)
        return f"character U+{code:04X} is not allowed in YAML (a control character?)"
    return str(getattr(exc, "problem", None) or exc)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value parsed as a YAML scalar or flow collection)."""
    key, sep, raw = text.partition("=")
    key = key.strip()  # `a.b = 1`, quoted as one argument: the spaces are not part of the key
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: expected key.sub=value")
    try:
        value = _load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({_yaml_problem(exc)})") from None
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
            registered = load_builtin_kinds().get(kind)
            model = registered.config if registered else None
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
    overridden = {tuple(o.partition("=")[0].strip().split(".")): o for o in overrides or []}
    messages = []
    seen = set()
    errors = []
    for error in exc.errors():
        # Cross-field checks report "a.b.c: problem" lines at the top level (RunConfig._references):
        # split them so each gets its own path and line.
        if not error["loc"] and error["type"] == "value_error":
            for item in error["msg"].removeprefix("Value error, ").split("\n"):
                head, sep, rest = item.partition(": ")
                if sep and re.fullmatch(r"[\w.-]+", head):
                    errors.append({**error, "loc": tuple(head.split(".")), "msg": rest})
                else:
                    errors.append({**error, "msg": item})
        else:
            errors.append(error)
    for error in errors:
        loc = _clean_loc(error["loc"], raw)
        msg = error["msg"].removeprefix("Value error, ")
        # A model's own check names its key first ("base: 'cpt' is not one of parents"): point at it.
        head, sep, rest = msg.partition(": ")
        if error["type"] == "value_error" and loc and sep and re.fullmatch(r"[A-Za-z_][\w]*", head):
            if (*loc, head) in lines or (*loc, head) in overridden:
                loc, msg = (*loc, head), rest
        dotted = ".".join(loc) or "(top level)"
        if error["type"] == "extra_forbidden":
            owner = _model_at(loc[:-1], raw)
            msg = "unknown key" + (f"; allowed here: {_allowed_keys(owner)}" if owner else "")
        elif error["type"] == "missing":
            msg = "required key is missing"
        elif error["type"] == "literal_error":
            msg = f"{msg} (got {error.get('input')!r})"
        elif "input" in error and error["type"] not in ("value_error", "model_type", "dict_type", "unknown_kind", "missing_kind", "stage_type"):
            msg = f"{msg} (got {error['input']!r})"
        if error["type"] == "missing_kind" and len(loc) == 2 and loc[0] == "stages" and loc not in lines:
            # Only overrides name this stage: most likely a typo of one of the file's stages.
            in_file = sorted(key[1] for key in lines if len(key) == 2 and key[0] == "stages")
            msg = f"no stage {loc[1]!r} in {path} (stages: {', '.join(in_file) or 'none'}); a new stage also needs `kind`"
        where = path
        # An override below the failing mapping (e.g. `stages.x.kind=...` making `stages.x` invalid)
        # caused it; one at or above it replaced what the file had there.
        below = [o for key, o in overridden.items() if len(key) > len(loc) and key[: len(loc)] == loc] if loc else []
        above = next((overridden[loc[:cut]] for cut in range(len(loc), 0, -1) if loc[:cut] in overridden), None)
        if below or above:
            where = f"override {(below or [above])[0]!r}"
        else:
            line = next((lines[loc[:cut]] for cut in range(len(loc), 0, -1) if loc[:cut] in lines), None)
            where = path if line is None else f"{path}:{line}"
        line = f"{where}: {dotted}: {msg}"
        if line not in seen:
            seen.add(line)
            messages.append(line)
    return "invalid config:\n  " + "\n  ".join(messages)


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read, override and validate a run config; raise ConfigError naming every problem."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); save the file as UTF-8") from None
    try:
        raw = _load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f"{path}:{mark.line + 1}"
        elif isinstance(exc, yaml.reader.ReaderError):
            where = f"{path}:{text[: exc.position].count(chr(10)) + 1}"
        else:
            where = str(path)
        raise ConfigError(f"{where}: not valid YAML: {_yaml_problem(exc)}") from None
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
