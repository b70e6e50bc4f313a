"""The merge search space: config `search:` sections to Ray Tune dimensions and back.

A merge parameter is searched as one number (`t` in [0, 1]) or as a layer-wise gradient of N
anchor points per tensor filter (`t.self_attn.0` ... `t.self_attn.4`, `t.mlp.0` ...), the form the
paper's hand-chosen SLERP gradients take. Tune sees flat numeric dimensions; `assemble` turns a
trial's flat values back into the `parameters` / `model_parameters` mappings that
`alloylm.merge.mergekit_builder` reads. Candidate points (the paper's gradients) are given in that
same nested form and flattened with `flatten_point`.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from alloylm.config import MergeSearchConfig, SearchedParameter

GRID_KEY = "point"  # the one Tune dimension of a grid over explicit points: the point's index


@dataclass(frozen=True)
class Dimension:
    """One searched number: its Tune key, bounds, grid values, and where it goes in the merge parameters."""

    key: str
    low: float
    high: float
    values: tuple[float, ...] | None
    parent: str | None  # None: a method-level parameter; else the parent it belongs to
    parameter: str
    filter: str | None  # the gradient's tensor filter ("default" for the rest), None for a scalar
    anchor: int | None  # the gradient point, None for a scalar


def _dimensions_of(prefix: str, parent: str | None, name: str, spec: SearchedParameter) -> list[Dimension]:
    values = tuple(spec.values) if spec.values is not None else None
    if spec.anchors is None:
        return [Dimension(prefix + name, spec.low, spec.high, values, parent, name, None, None)]
    filters = spec.filters or ["default"]
    dims = [
        Dimension(f"{prefix}{name}.{flt}.{i}", spec.low, spec.high, None, parent, name, flt, i)
        for flt in filters
        for i in range(spec.anchors)
    ]
    if spec.filters and spec.default == "search":
        dims.append(Dimension(f"{prefix}{name}.default", spec.low, spec.high, None, parent, name, "default", None))
    return dims


def dimensions(search: MergeSearchConfig) -> list[Dimension]:
    """Every searched number of `search`, method parameters first, then per-parent ones."""
    dims = []
    for name, spec in search.space.items():
        dims += _dimensions_of("", None, name, spec)
    for parent, specs in search.model_space.items():
        for name, spec in specs.items():
            dims += _dimensions_of(f"model.{key_part(parent)}.", parent, name, spec)
    return dims


def key_part(parent: str) -> str:
    """A parent's name as part of a Tune key. Tune splits keys at `/` (and refuses a search space
    whose keys hold one), so a parent given as a model path or a Hugging Face id
    (`meta-llama/Llama-3.1-8B-Instruct`) has its slashes written as `|`."""
    return parent.replace("/", "|")


def tune_space(search: MergeSearchConfig, dims: list[Dimension]) -> dict[str, Any]:
    """Tune's param_space: uniform ranges, or for the grid searcher the points / the product of values."""
    from ray import tune

    if search.searcher == "grid":
        if search.points:
            return {GRID_KEY: tune.grid_search(list(range(len(search.points))))}
        return {d.key: tune.grid_search(list(d.values or ())) for d in dims}
    return {d.key: tune.uniform(d.low, d.high) for d in dims}


def grid_size(search: MergeSearchConfig, dims: list[Dimension]) -> int:
    if search.points:
        return len(search.points)
    return len(list(itertools.product(*[d.values or () for d in dims])))


def flatten_point(point: Mapping[str, Any], search: MergeSearchConfig, dims: list[Dimension], *, where: str) -> dict[str, float]:
    """A candidate in the nested `parameters` form (plus `model_parameters:`) as flat Tune values.

    Raises ValueError naming `where` (e.g. `search.points.0`) and the missing or malformed value.
    """
    flat: dict[str, float] = {}
    model_parameters = point.get("model_parameters") or {}
    unknown = sorted(set(point) - set(search.space) - {"model_parameters"})
    if unknown:
        raise ValueError(f"{where}: {', '.join(unknown)} is not searched (search.space has: {', '.join(search.space) or 'nothing'})")
    for d in dims:
        source = point if d.parent is None else model_parameters.get(d.parent, {})
        label = f"{where}.{d.parameter}" if d.parent is None else f"{where}.model_parameters.{d.parent}.{d.parameter}"
        if d.parameter not in source:
            raise ValueError(f"{label}: missing (every searched parameter needs a value in a point)")
        value = source[d.parameter]
        if d.filter is not None:
            if not isinstance(value, Mapping) and d.filter == "default" and isinstance(value, list):
                value = {"default": value}
            if not isinstance(value, Mapping) or d.filter not in value:
                raise ValueError(f"{label}: needs a gradient for filter {d.filter!r}, got {value!r}")
            value = value[d.filter]
            if d.anchor is not None:
                anchors = search.space[d.parameter].anchors if d.parent is None else search.model_space[d.parent][d.parameter].anchors
                if not isinstance(value, list) or len(value) != anchors:
                    raise ValueError(f"{label}.{d.filter}: needs a list of {anchors} anchor values, got {value!r}")
                value = value[d.anchor]
        if not isinstance(value, (int, float)) or not d.low <= float(value) <= d.high:
            raise ValueError(f"{label}: {value!r} is not a number in [{d.low}, {d.high}]")
        flat[d.key] = float(value)
    _refuse_ignored_values(point, search, where)
    return flat


def _refuse_ignored_values(point: Mapping[str, Any], search: MergeSearchConfig, where: str) -> None:
    """A value in a point that the trial would not use is an error, not silently replaced: a filter
    the space has no gradient for, a `default` the space fixes at another value, a per-parent value
    that is not searched."""
    specs = [(f"{where}.{name}", search.space[name], point[name]) for name in search.space if name in point]
    for parent, values in (point.get("model_parameters") or {}).items():
        searched = search.model_space.get(parent, {})
        for name, value in (values or {}).items():
            if name not in searched:
                raise ValueError(
                    f"{where}.model_parameters.{parent}.{name}: not searched (search.model_space has "
                    f"{', '.join(f'{p}.{n}' for p, v in search.model_space.items() for n in v) or 'nothing'}); it would be ignored"
                )
            specs.append((f"{where}.model_parameters.{parent}.{name}", searched[name], value))
    for label, spec, value in specs:
        if not spec.filters or not isinstance(value, Mapping):
            continue
        extra = sorted(set(value) - set(spec.filters) - {"default"})
        if extra:
            raise ValueError(f"{label}: filter(s) {', '.join(extra)} not in the space's filters ({', '.join(spec.filters)}); they would be ignored")
        if "default" in value and spec.default != "search" and value["default"] != spec.default:
            raise ValueError(
                f"{label}.default: {value['default']!r}, but the space fixes default at {spec.default!r} (it is not searched); "
                "give that value or leave it out"
            )


def assemble(
    flat: Mapping[str, float],
    search: MergeSearchConfig,
    dims: list[Dimension],
    *,
    parameters: Mapping[str, Any],
    model_parameters: Mapping[str, Mapping[str, Any]],
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(parameters, model_parameters) for mergekit_config: the fixed ones plus a trial's flat values."""
    params: dict[str, Any] = dict(parameters)
    per_model: dict[str, dict[str, Any]] = {p: dict(v) for p, v in model_parameters.items()}
    for d in dims:
        target = params if d.parent is None else per_model.setdefault(d.parent, {})
        spec = search.space[d.parameter] if d.parent is None else search.model_space[d.parent][d.parameter]
        value = float(flat[d.key])
        if d.filter is None:
            target[d.parameter] = value
            continue
        gradient = target.setdefault(d.parameter, {})
        if spec.filters and "default" not in gradient and spec.default != "search":
            gradient["default"] = float(spec.default)
        if d.anchor is None:
            gradient[d.filter] = value
        else:
            gradient.setdefault(d.filter, [0.0] * int(spec.anchors))[d.anchor] = value
    return params, per_model
