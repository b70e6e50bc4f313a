"""What every config model shares: the frozen, strict pydantic base and the base of every stage config.

Schemas live next to their code (`data/config.py`, `generate/config.py`, `train/config.py`,
`merge/config.py`); they all build on the two classes here, and `alloylm.config` assembles them
into the run config.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

NAME_PATTERN = r"^[a-z][a-z0-9_-]{0,63}$"
DATA_FORMATS = ("text", "chat", "preference", "benchmark")


class Frozen(BaseModel):
    """Unknown keys are errors; a built config never changes."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


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
