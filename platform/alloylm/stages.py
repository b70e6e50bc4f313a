"""The registry of stage kinds: what a kind's config is, which data it reads, what it needs, how it runs.

    STAGE_KINDS["cpt"].run(config, "cpt")      # -> the stage's manifest

Each kind is registered next to its own code: training kinds in `alloylm.train.config`, merge
kinds in `alloylm.merge.config`. A plain dict, no plugin machinery: a new kind is a config class
(a `StageConfigBase` subclass with `kind: Literal["name"]`), a `run` function and one
`register_stage_kind(StageKind(...))` call. The run config validates `stages:` through this
registry, and the pipeline schedules stages by what the kind says, so neither `config.py` nor
`cli.py` changes for a new kind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from pydantic_core import PydanticCustomError, core_schema

from alloylm.errors import UsageError
from alloylm.schema import StageConfigBase

if TYPE_CHECKING:
    from alloylm.config import RunConfig


@dataclass(frozen=True)
class StageKind:
    """One kind of stage.

    - `name`: the value of `kind:` in the config.
    - `config`: its pydantic config class (a `StageConfigBase` subclass).
    - `run(config, name) -> manifest`: runs stage `name` of the run (skipping it when up to date).
    - `data_format`: the format of the data set it trains on (None: it reads no data set).
    - `command`: the `alloylm` command that runs one stage of this kind (`train`, `merge`, `search`).
    - `problems(config, name) -> [str]`: checks that need the whole run config (beyond parents,
      data sets and formats, which every kind gets), as "dotted.key: problem" strings.
    - `makes_model`: whether the stage writes a model other stages, evaluation and serving can use.
    - `reads(config, name) -> [data set]`: data sets the stage reads besides its own config's
      (`dataset_refs`) that only the whole run config names, e.g. a merge search's objective; the
      pipeline prepares them before the stage.
    """

    name: str
    config: type[StageConfigBase]
    run: Callable[[RunConfig, str], dict]
    data_format: str | None = None
    command: str = "run"
    problems: Callable[[RunConfig, str], list[str]] | None = None
    makes_model: bool = True
    description: str = ""
    reads: Callable[[RunConfig, str], list[str]] | None = None

    def parents(self, stage: StageConfigBase) -> list[str]:
        return stage.parent_refs()

    def datasets(self, stage: StageConfigBase) -> list[str]:
        return stage.dataset_refs()

    def resources(self, stage: StageConfigBase) -> dict[str, tuple[float, str]]:
        return stage.resource_needs()


STAGE_KINDS: dict[str, StageKind] = {}


def register_stage_kind(kind: StageKind) -> StageKind:
    """Add (or replace) a stage kind; returns it, so it can be used at module level."""
    if not issubclass(kind.config, StageConfigBase):
        raise TypeError(f"stage kind {kind.name!r}: config must subclass alloylm.schema.StageConfigBase")
    STAGE_KINDS[kind.name] = kind
    return kind


def load_builtin_kinds() -> dict[str, StageKind]:
    """Import the modules that register AlloyLM's own kinds (light modules: schemas only)."""
    import alloylm.merge.config  # noqa: F401  (registers merge, merge_search)
    import alloylm.train.config  # noqa: F401  (registers cpt, sft, dpo, orpo)

    return STAGE_KINDS


def stage_kind(kind: str) -> StageKind:
    load_builtin_kinds()
    try:
        return STAGE_KINDS[kind]
    except KeyError:
        raise UsageError(f"unknown stage kind {kind!r}; known: {', '.join(sorted(STAGE_KINDS))}") from None


def kind_of(config: RunConfig, name: str, *, command: str | None = None) -> StageKind:
    """The kind of stage `name`; with `command`, refuse (exit 2) a stage that command does not run."""
    if name not in config.stages:
        raise UsageError(f"no stage {name!r}; stages: {', '.join(config.stage_order()) or 'none'}")
    kind = stage_kind(config.stages[name].kind)
    if command is not None and kind.command != command:
        raise UsageError(
            f"stage {name!r} is a {kind.name} stage, which `alloylm {command}` does not run; "
            f"run it with `alloylm {kind.command} CONFIG {name}` (or `alloylm run CONFIG`)"
        )
    return kind


def _validate_stage(value: Any) -> StageConfigBase:
    if isinstance(value, StageConfigBase):
        return value
    if not isinstance(value, dict):
        raise PydanticCustomError("stage_type", "a stage must be a mapping with a `kind`")
    kinds = load_builtin_kinds()
    kind = value.get("kind")
    if kind is None:
        raise PydanticCustomError("missing_kind", "required key `kind` is missing; known kinds: {known}", {"known": ", ".join(sorted(kinds))})
    if kind not in kinds:
        raise PydanticCustomError(
            "unknown_kind", "unknown stage kind '{kind}'; known kinds: {known}", {"kind": kind, "known": ", ".join(map(repr, sorted(kinds)))}
        )
    # A ValidationError raised here keeps its locations: pydantic nests them under this stage's key.
    return kinds[kind].config.model_validate(value)


def _serialize_stage(value: StageConfigBase, info: core_schema.SerializationInfo) -> Any:
    return value.model_dump(mode=info.mode, by_alias=info.by_alias, exclude_none=info.exclude_none)


class AnyStage:
    """Pydantic type of one entry of `stages:`: validated by the class its `kind` is registered with.

    A static discriminated union would have to list every kind in `config.py`; dispatching through
    the registry at validation time is what lets a kind be added without editing it.
    """

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            _validate_stage,
            serialization=core_schema.plain_serializer_function_ser_schema(_serialize_stage, info_arg=True),
        )

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: Any, handler: Any) -> dict:
        return {"type": "object", "description": "a stage; `kind` picks its schema: " + ", ".join(sorted(load_builtin_kinds()))}


__all__ = ["STAGE_KINDS", "AnyStage", "StageKind", "ValidationError", "kind_of", "load_builtin_kinds", "register_stage_kind", "stage_kind"]
