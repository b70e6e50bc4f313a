"""What every config model shares: the frozen, strict pydantic base and the base of every stage config.

Schemas live next to their code (`data/config.py`, `generate/config.py`, `train/config.py`,
`merge/config.py`); they all build on the two classes here, and `alloylm.config` assembles them
into the run config.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

NAME_PATTERN = r"^[a-z][a-z0-9_-]{0,63}$"
DATA_FORMATS = ("text", "chat", "preference", "benchmark")
SEED_MAX = 2**32 - 1  # numpy's seed range, which transformers' set_seed passes it to


def _wants_a_number(annotation: Any) -> bool:
    """True when a field takes numbers and not booleans (`int`, `float | None`, `Literal[0, 1, 2]`)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _wants_a_number(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        members = typing.get_args(annotation)
        if any(m is bool or (typing.get_origin(m) is Literal and any(isinstance(a, bool) for a in typing.get_args(m))) for m in members):
            return False
        return any(_wants_a_number(m) for m in members)
    if origin is Literal:
        values = typing.get_args(annotation)
        return any(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) and not any(isinstance(v, bool) for v in values)
    return annotation in (int, float)


class ConfigModel(BaseModel):
    """Every config section's base: infinities are refused, and so are booleans where a number is
    expected (pydantic's lax mode would read `true` as 1 and `false` as 0, so `deepspeed.stage:
    false` would mean ZeRO-0 rather than "off")."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool) and info.field_name is not None:
            field = cls.model_fields.get(info.field_name)
            if field is not None and _wants_a_number(field.annotation):
                raise ValueError(f"expected a number, got the boolean {str(value).lower()}")
        return value


class Frozen(ConfigModel):
    """Unknown keys are errors; a built config never changes."""

    model_config = ConfigDict(populate_by_name=True)


def is_model_source(ref: str) -> bool:
    """A parent reference that is a path, URI or hub id rather than a stage name.

    Stage names cannot contain '/' or ':', so anything that does is a path, URI or hub id.
    """
    return "/" in ref or ":" in ref or ref.startswith((".", "~"))


class StageConfigBase(Frozen):
    """Base of every stage config. A stage kind subclasses it with `kind: Literal["..."]` and its fields.

    The three methods below are what the pipeline needs to know about any stage without knowing
    its kind: the parents it waits for, the data sets it reads and what it holds on the cluster.
    """

    kind: str
    description: str = Field("", description="Free text shown in progress and reports.")

    def parent_refs(self) -> list[str]:
        """Every parent reference: stage names of the run and model sources (paths, URIs, hub ids)."""
        return []

    def dataset_refs(self) -> list[str]:
        """Names of the run's data sets this stage reads."""
        return []

    def resource_needs(self) -> dict[str, tuple[float, str]]:
        """Cluster resources the stage holds while it runs: {"CPU": (amount, "how that adds up"), ...}."""
        return {}
