"""The schema of merge stages (`merge`, `merge_search`) and their registration as stage kinds.

The code that runs them is `alloylm.merge.stage` (imported only when a stage runs: this module
stays light, because loading any run config imports it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Union

from pydantic import Field, field_validator, model_validator

from alloylm.evaluate.config import EvalConfig, SuitesConfig
from alloylm.schema import SEED_MAX
from alloylm.schema import Frozen as _Frozen
from alloylm.schema import StageConfigBase as _StageBase
from alloylm.stages import StageKind, register_stage_kind

if TYPE_CHECKING:
    from alloylm.config import RunConfig

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
        None,
        description=(
            "The parent that is the base model (slerp's t=0 end, task vectors' origin); default: the first parent for a method"
            " that needs a base (slerp, task_arithmetic, ties, ...), none for one where it is optional (nuslerp, multislerp)."
        ),
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

    def parent_refs(self) -> list[str]:
        return list(self.parents)

    def resource_needs(self) -> dict[str, tuple[float, str]]:
        # A search runs max_concurrent_trials trials at once, but Tune queues the rest; one
        # trial's share is what the stage needs to make progress at all.
        return {
            resource: (amount, f"a merge (each search trial) needs {amount:g} {resource}s")
            for resource, amount in (("CPU", self.resources.num_cpus), ("GPU", self.resources.num_gpus))
        }

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
        if "default" in self.filters or len(set(self.filters)) != len(self.filters):
            raise ValueError(
                f"filters {self.filters}: each once, and not `default`, which names the value of the tensors no filter matches"
            )
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
    seed: int | None = Field(None, ge=0, le=SEED_MAX, description="Searcher seed (default: the run's seed).")

    @model_validator(mode="after")
    def _something_searched(self) -> MergeSearchConfig:
        if not self.space and not self.model_space and not self.points:
            raise ValueError("declare `space`, `model_space` or `points`: nothing is searched")
        if self.searcher in ("tpe", "cmaes") and len(self.points) > self.num_samples:
            # Tune's searcher runs the points first and stops at num_samples trials.
            raise ValueError(
                f"num_samples ({self.num_samples}) is below the number of points ({len(self.points)}): {self.searcher} tries "
                "the points first and stops after num_samples trials, so the last points would never run"
            )
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
        both = sorted(f"{parent}.{name}" for parent, specs in self.search.model_space.items() for name in specs if name in self.model_parameters.get(parent, {}))
        if both:
            raise ValueError(f"search.model_space: {', '.join(both)} also fixed under `model_parameters`; keep one")
        return self




MERGE_STAGES = {"merge": MergeStageConfig, "merge_search": MergeSearchStageConfig}


def _a_point(spec: SearchedParameter) -> Any:
    """One value of a searched parameter, in the form a trial gives it (to check its name and shape)."""
    middle = (spec.low + spec.high) / 2
    if spec.anchors is None:
        return middle
    if not spec.filters:
        return [middle] * spec.anchors
    return {**{f: [middle] * spec.anchors for f in spec.filters}, "default": middle if spec.default == "search" else spec.default}


def merge_settings_problems(config: RunConfig, names: list[str] | None = None) -> list[str]:
    """What mergekit would refuse in the merge stages `names` (all by default), found before any
    parent is trained: an unknown method or parameter, the wrong number of parents, a required
    parameter missing, a mergekit_config file that is not there. Imports mergekit (seconds), so
    config loading leaves it to `alloylm validate` and the start of a run."""
    from alloylm import storage
    from alloylm.merge.mergekit_builder import MergeInputError, check_merge_settings

    problems = []
    for name in names if names is not None else list(config.stages):
        stage = config.stages[name]
        if not isinstance(stage, MergeStageConfig):
            continue
        if stage.mergekit_config:
            if not storage.exists(stage.mergekit_config):
                problems.append(f"stages.{name}.mergekit_config: no file at {stage.mergekit_config}")
            continue
        parameters, model_parameters = dict(stage.parameters), {k: dict(v) for k, v in stage.model_parameters.items()}
        if isinstance(stage, MergeSearchStageConfig):
            parameters.update({key: _a_point(spec) for key, spec in stage.search.space.items()})
            for parent, space in stage.search.model_space.items():
                model_parameters.setdefault(parent, {}).update({key: _a_point(spec) for key, spec in space.items()})
        base = stage.parents.index(stage.base) if stage.base else None
        try:
            check_merge_settings(stage.method, stage.parents, base=base, parameters=parameters, model_parameters=model_parameters)
        except MergeInputError as exc:
            problems.append(f"stages.{name}: {exc}")
    return problems


def search_eval_config(config: RunConfig, name: str) -> EvalConfig:
    """The evaluation a trial of merge search `name` runs: its objective's suites on the validation split."""
    stage = config.stages[name]
    objective = stage.search.objective
    base = config.evaluate.model_dump(exclude={"variants", "suites", "split", "max_items"}) if config.evaluate else {}
    suites = objective.suites or config.evaluate.suites
    # A suite of weight 0 cannot move the objective: trials skip it instead of paying for it.
    unweighted = {n: getattr(suites, n).model_copy(update={"enabled": False}) for n, s in suites.enabled().items() if s.weight == 0}
    if unweighted and len(unweighted) < len(suites.enabled()):
        suites = suites.model_copy(update=unweighted)
    return EvalConfig(variants=[name], split="validation", max_items=objective.max_items, suites=suites, **base)


def _search_problems(config: RunConfig, name: str) -> list[str]:
    stage = config.stages[name]
    if stage.search.objective.suites is None and config.evaluate is None:
        return [f"stages.{name}.search.objective.suites: no suites given and the run has no `evaluate:` section to take them from"]
    formats = {n: d.format for n, d in config.datasets.items()}
    evaluation = search_eval_config(config, name)
    problems = [
        problem.replace("evaluate.suites.", f"stages.{name}.search.objective.suites.", 1)
        for problem in evaluation.reference_problems(set(config.stages), formats)
    ]
    if not any(suite.weight > 0 for suite in evaluation.suites.enabled().values()):
        where = f"stages.{name}.search.objective.suites" if stage.search.objective.suites is not None else "evaluate.suites"
        problems.append(f"{where}: every enabled suite has weight 0, so a merge search has no objective to maximise")
    # The candidate points, at load (`alloylm validate`), not once the parents have trained.
    from alloylm.merge.space import dimensions, flatten_point

    try:
        dims = dimensions(stage.search)
    except ValueError:
        return problems  # the space's own problem is reported where the space is checked
    for index, point in enumerate(stage.search.points):
        try:
            flatten_point(point, stage.search, dims, where=f"stages.{name}.search.points.{index}")
        except ValueError as exc:
            problems.append(str(exc))
    return problems


def _objective_datasets(config: RunConfig, name: str) -> list[str]:
    """The run's data sets the search objective scores on (its suites' `dataset`)."""
    suites = search_eval_config(config, name).suites.enabled().values()
    return sorted({s.dataset for s in suites if getattr(s, "dataset", None) in config.datasets})


def _run(config: RunConfig, name: str) -> dict:
    from alloylm.merge.stage import merge_stage

    return merge_stage(config, name)


register_stage_kind(StageKind(name="merge", config=MergeStageConfig, run=_run, command="merge", description="A fixed merge with mergekit."))
register_stage_kind(
    StageKind(
        name="merge_search",
        config=MergeSearchStageConfig,
        run=_run,
        command="search",
        problems=_search_problems,
        reads=_objective_datasets,
        description="A merge whose parameters Ray Tune searches on the validation split.",
    )
)
