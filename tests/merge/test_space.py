"""The merge search space: `search:` sections flattened into Tune dimensions, candidate points
flattened, and a trial's flat values assembled back into merge parameters (no cluster: Tune's
search-space objects are built, nothing runs).
"""

from __future__ import annotations

import copy

import pytest

from alloylm.config import MergeSearchConfig
from alloylm.merge.space import GRID_KEY, Dimension, assemble, dimensions, flatten_point, grid_size, tune_space


def search(**fields) -> MergeSearchConfig:
    return MergeSearchConfig.model_validate(fields)


GRADIENT = search(space={"t": {"anchors": 3, "filters": ["self_attn", "mlp"], "default": 0.25}})
SEARCHED_DEFAULT = search(space={"t": {"anchors": 2, "filters": ["self_attn"], "default": "search", "low": 0.1, "high": 0.9}})
MIXED = search(
    space={"t": {"low": 0.2, "high": 0.8, "values": [0.2, 0.5]}},
    model_space={"dpo": {"weight": {"low": 0.0, "high": 2.0, "values": [0.5, 1.0, 1.5]}}, "sft": {"density": {}}},
)


def keys(config: MergeSearchConfig) -> list[str]:
    return [d.key for d in dimensions(config)]


# ----------------------------------------------------------------------------- dimensions


def test_a_scalar_is_one_dimension_with_its_bounds_and_values():
    (dim,) = dimensions(search(space={"t": {"low": 0.1, "high": 0.7, "values": [0.1, 0.4]}}))
    assert dim == Dimension("t", 0.1, 0.7, (0.1, 0.4), None, "t", None, None)


def test_a_gradient_is_one_dimension_per_filter_and_anchor():
    dims = dimensions(GRADIENT)
    assert [d.key for d in dims] == [
        "t.self_attn.0", "t.self_attn.1", "t.self_attn.2",
        "t.mlp.0", "t.mlp.1", "t.mlp.2",
    ]  # fmt: skip
    assert [(d.filter, d.anchor) for d in dims] == [(f, i) for f in ("self_attn", "mlp") for i in range(3)]
    assert all(d.parameter == "t" and d.parent is None and d.values is None for d in dims)
    assert all((d.low, d.high) == (0.0, 1.0) for d in dims)


def test_a_gradient_without_filters_is_one_default_gradient():
    dims = dimensions(search(space={"t": {"anchors": 2}}))
    assert [(d.key, d.filter, d.anchor) for d in dims] == [("t.default.0", "default", 0), ("t.default.1", "default", 1)]


def test_a_searched_default_adds_one_scalar_dimension_after_the_gradients():
    dims = dimensions(SEARCHED_DEFAULT)
    assert [d.key for d in dims] == ["t.self_attn.0", "t.self_attn.1", "t.default"]
    assert (dims[-1].filter, dims[-1].anchor, dims[-1].low, dims[-1].high) == ("default", None, 0.1, 0.9)


def test_a_fixed_default_is_not_searched():
    assert "t.default" not in keys(GRADIENT)


def test_per_parent_dimensions_come_after_method_ones_and_name_their_parent():
    dims = dimensions(MIXED)
    assert [d.key for d in dims] == ["t", "model.dpo.weight", "model.sft.density"]
    assert [(d.parent, d.parameter) for d in dims] == [(None, "t"), ("dpo", "weight"), ("sft", "density")]
    assert (dims[1].low, dims[1].high, dims[1].values) == (0.0, 2.0, (0.5, 1.0, 1.5))



def test_a_parent_named_by_path_or_hub_id_has_no_slash_in_its_keys():
    """Tune refuses a search space with `/` in a key (its nesting delimiter): a parent given as a
    model path or Hub id is written with `|` in the key, and still assembled under its own name."""
    hub = "meta-llama/Llama-3.1-8B-Instruct"
    config = search(model_space={hub: {"weight": {"low": 0.5, "high": 1.5}}, "/models/dpo": {"density": {}}})
    dims = dimensions(config)
    assert [d.key for d in dims] == ["model.meta-llama|Llama-3.1-8B-Instruct.weight", "model.|models|dpo.density"]
    _, per_model = assemble({d.key: 0.75 for d in dims}, config, dims, parameters={}, model_parameters={})
    assert per_model == {hub: {"weight": 0.75}, "/models/dpo": {"density": 0.75}}
    point = {"model_parameters": {hub: {"weight": 1.0}, "/models/dpo": {"density": 0.5}}}
    assert flatten_point(point, config, dims, where="pt") == {dims[0].key: 1.0, dims[1].key: 0.5}


# ----------------------------------------------------------------------------- Tune's space


def test_searchers_sample_each_dimension_uniformly_within_its_bounds():
    from ray.tune.search.sample import Float

    config = search(space={"t": {"low": 0.2, "high": 0.8}}, model_space={"dpo": {"weight": {"low": 0.5, "high": 1.5}}}, searcher="random")
    space = tune_space(config, dimensions(config))
    assert set(space) == {"t", "model.dpo.weight"}
    for key, (low, high) in {"t": (0.2, 0.8), "model.dpo.weight": (0.5, 1.5)}.items():
        assert isinstance(space[key], Float)
        assert (space[key].lower, space[key].upper) == (low, high)
        assert not hasattr(space[key].get_sampler(), "q") or space[key].get_sampler().q is None


def test_grid_over_points_is_one_index_dimension():
    config = search(space={"t": {}}, searcher="grid", points=[{"t": 0.1}, {"t": 0.2}, {"t": 0.3}])
    space = tune_space(config, dimensions(config))
    assert space == {GRID_KEY: {"grid_search": [0, 1, 2]}}
    assert grid_size(config, dimensions(config)) == 3


def test_grid_over_values_crosses_every_parameter():
    config = MIXED.model_copy(update={"searcher": "grid", "model_space": {"dpo": MIXED.model_space["dpo"]}})
    dims = dimensions(config)
    assert tune_space(config, dims) == {"t": {"grid_search": [0.2, 0.5]}, "model.dpo.weight": {"grid_search": [0.5, 1.0, 1.5]}}
    assert grid_size(config, dims) == 6


# ----------------------------------------------------------------------------- points and trials


def test_a_gradient_point_round_trips_through_its_flat_values():
    point = {"t": {"self_attn": [0.0, 0.5, 1.0], "mlp": [1.0, 0.75, 0.0]}}
    dims = dimensions(GRADIENT)
    flat = flatten_point(point, GRADIENT, dims, where="search.points.0")
    assert flat == {"t.self_attn.0": 0.0, "t.self_attn.1": 0.5, "t.self_attn.2": 1.0, "t.mlp.0": 1.0, "t.mlp.1": 0.75, "t.mlp.2": 0.0}
    parameters, per_model = assemble(flat, GRADIENT, dims, parameters={}, model_parameters={})
    # The fixed default (0.25) covers every tensor neither filter names.
    assert parameters == {"t": {"default": 0.25, "self_attn": [0.0, 0.5, 1.0], "mlp": [1.0, 0.75, 0.0]}}
    assert per_model == {}


def test_a_searched_default_round_trips():
    point = {"t": {"self_attn": [0.2, 0.8], "default": 0.3}}
    dims = dimensions(SEARCHED_DEFAULT)
    flat = flatten_point(point, SEARCHED_DEFAULT, dims, where="p")
    assert flat == {"t.self_attn.0": 0.2, "t.self_attn.1": 0.8, "t.default": 0.3}
    parameters, _ = assemble(flat, SEARCHED_DEFAULT, dims, parameters={}, model_parameters={})
    assert parameters == point


def test_a_plain_list_is_the_gradient_of_an_unfiltered_parameter():
    config = search(space={"t": {"anchors": 3}})
    dims = dimensions(config)
    flat = flatten_point({"t": [0.1, 0.2, 0.3]}, config, dims, where="p")
    assert flat == {"t.default.0": 0.1, "t.default.1": 0.2, "t.default.2": 0.3}
    parameters, _ = assemble(flat, config, dims, parameters={}, model_parameters={})
    assert parameters == {"t": {"default": [0.1, 0.2, 0.3]}}


def test_scalars_and_per_parent_values_round_trip_next_to_the_fixed_parameters():
    dims = dimensions(MIXED)
    point = {"t": 0.5, "model_parameters": {"dpo": {"weight": 1.5}, "sft": {"density": 1}}}
    flat = flatten_point(point, MIXED, dims, where="p")
    assert flat == {"t": 0.5, "model.dpo.weight": 1.5, "model.sft.density": 1.0}
    assert isinstance(flat["model.sft.density"], float)
    fixed = {"normalize": True}
    fixed_models = {"dpo": {"density": 0.7}, "orpo": {"weight": 0.1}}
    before = copy.deepcopy((fixed, fixed_models))
    parameters, per_model = assemble(flat, MIXED, dims, parameters=fixed, model_parameters=fixed_models)
    assert parameters == {"normalize": True, "t": 0.5}
    assert per_model == {"dpo": {"density": 0.7, "weight": 1.5}, "sft": {"density": 1.0}, "orpo": {"weight": 0.1}}
    assert (fixed, fixed_models) == before  # the stage's own parameters are not changed


def test_each_trial_value_lands_on_its_own_anchor():
    dims = dimensions(GRADIENT)
    flat = {d.key: float(i) / 10 for i, d in enumerate(dims)}
    parameters, _ = assemble(flat, GRADIENT, dims, parameters={}, model_parameters={})
    assert parameters["t"] == {"default": 0.25, "self_attn": [0.0, 0.1, 0.2], "mlp": [0.3, 0.4, 0.5]}
    assert all(isinstance(v, float) for v in parameters["t"]["mlp"])


def test_trial_values_are_assembled_as_floats():
    config = search(space={"t": {}})
    parameters, _ = assemble({"t": 1}, config, dimensions(config), parameters={}, model_parameters={})
    assert parameters == {"t": 1.0} and isinstance(parameters["t"], float)


@pytest.mark.parametrize(
    ("config", "point", "message"),
    [
        (GRADIENT, {"t": {"self_attn": [0, 0.5, 1], "mlp": [1, 0.5, 0]}, "s": 0.5}, r"^pt: s is not searched \(search.space has: t\)$"),
        (GRADIENT, {}, r"^pt.t: missing \(every searched parameter needs a value in a point\)$"),
        (GRADIENT, {"t": {"self_attn": [0, 0.5, 1]}}, r"^pt.t: needs a gradient for filter 'mlp', got \{'self_attn'"),
        (GRADIENT, {"t": 0.5}, r"^pt.t: needs a gradient for filter 'self_attn', got 0.5$"),
        (GRADIENT, {"t": {"self_attn": [0, 1], "mlp": [1, 0.5, 0]}}, r"^pt.t.self_attn: needs a list of 3 anchor values, got \[0, 1\]$"),
        (GRADIENT, {"t": {"self_attn": 0.5, "mlp": [1, 0.5, 0]}}, r"^pt.t.self_attn: needs a list of 3 anchor values, got 0.5$"),
        (GRADIENT, {"t": {"self_attn": [0, 1.5, 1], "mlp": [1, 0.5, 0]}}, r"^pt.t: 1.5 is not a number in \[0.0, 1.0\]$"),
        (GRADIENT, {"t": {"self_attn": [0, "x", 1], "mlp": [1, 0.5, 0]}}, r"^pt.t: 'x' is not a number in \[0.0, 1.0\]$"),
        (SEARCHED_DEFAULT, {"t": {"self_attn": [0.2, 0.8]}}, r"^pt.t: needs a gradient for filter 'default'"),
        (SEARCHED_DEFAULT, {"t": {"self_attn": [0.2, 0.8], "default": 0.05}}, r"^pt.t: 0.05 is not a number in \[0.1, 0.9\]$"),
        (SEARCHED_DEFAULT, {"t": {"self_attn": [0.2, 0.95], "default": 0.5}}, r"^pt.t: 0.95 is not a number in \[0.1, 0.9\]$"),
        (search(space={"t": {"anchors": 2}}), {"t": 0.5}, r"^pt.t: needs a gradient for filter 'default', got 0.5$"),
        (MIXED, {"t": 0.5, "model_parameters": {"dpo": {"weight": 1.0}}}, r"^pt.model_parameters.sft.density: missing"),
        (MIXED, {"t": 0.5, "model_parameters": {"dpo": {"weight": 2.5}, "sft": {"density": 0.5}}}, r"^pt.model_parameters.dpo.weight: 2.5 is not a number in \[0.0, 2.0\]$"),
        (MIXED, {"t": 0.1, "model_parameters": {"dpo": {"weight": 1.0}, "sft": {"density": 0.5}}}, r"^pt.t: 0.1 is not a number in \[0.2, 0.8\]$"),
        (search(model_space={"dpo": {"weight": {"anchors": 2}}}), {"model_parameters": {"dpo": {"weight": [0.1]}}}, r"^pt.model_parameters.dpo.weight.default: needs a list of 2 anchor values"),
        (search(model_space={"dpo": {"weight": {}}}), {"t": 0.5, "model_parameters": {"dpo": {"weight": 0.5}}}, r"^pt: t is not searched \(search.space has: nothing\)$"),
        # values the trial would not use: refused, not silently dropped or replaced
        (GRADIENT, {"t": {"self_attn": [0, 0.5, 1], "mlp": [1, 0.5, 0], "default": 0.3}}, r"^pt.t.default: 0.3, but the space fixes default at 0.25"),
        (GRADIENT, {"t": {"self_attn": [0, 0.5, 1], "mlp": [1, 0.5, 0], "lm_head": 0.3}}, r"^pt.t: filter\(s\) lm_head not in the space's filters \(self_attn, mlp\)"),
        (MIXED, {"t": 0.5, "model_parameters": {"dpo": {"weight": 1.0, "density": 0.5}, "sft": {"density": 0.5}}}, r"^pt.model_parameters.dpo.density: not searched"),
    ],
)
def test_bad_points_name_where_and_what(config, point, message):
    with pytest.raises(ValueError, match=message):
        flatten_point(point, config, dimensions(config), where="pt")


def test_bounds_are_inclusive():
    config = search(space={"t": {"low": 0.2, "high": 0.8}})
    dims = dimensions(config)
    assert flatten_point({"t": 0.2}, config, dims, where="p") == {"t": 0.2}
    assert flatten_point({"t": 0.8}, config, dims, where="p") == {"t": 0.8}


def test_a_searched_default_of_a_parent_stays_with_that_parent():
    config = search(model_space={"dpo": {"weight": {"anchors": 2, "filters": ["mlp"], "default": "search"}}})
    dims = dimensions(config)
    assert [(d.key, d.parent) for d in dims] == [("model.dpo.weight.mlp.0", "dpo"), ("model.dpo.weight.mlp.1", "dpo"), ("model.dpo.weight.default", "dpo")]
    point = {"model_parameters": {"dpo": {"weight": {"mlp": [0.1, 0.9], "default": 0.4}}}}
    flat = flatten_point(point, config, dims, where="p")
    assert assemble(flat, config, dims, parameters={}, model_parameters={}) == ({}, {"dpo": {"weight": {"mlp": [0.1, 0.9], "default": 0.4}}})


def test_every_unknown_key_and_every_searched_one_is_listed():
    config = search(space={"t": {}, "u": {}})
    with pytest.raises(ValueError, match=r"^p: a, b is not searched \(search.space has: t, u\)$"):
        flatten_point({"t": 0.5, "u": 0.5, "a": 1, "b": 2}, config, dimensions(config), where="p")


def test_every_method_parameter_is_a_dimension():
    config = search(space={"t": {}, "u": {"low": 0.5, "high": 2.0}})
    assert [(d.key, d.low, d.high) for d in dimensions(config)] == [("t", 0.0, 1.0), ("u", 0.5, 2.0)]


@pytest.mark.parametrize(
    ("fixed", "message"),
    [
        ({"parameters": {"t": 0.5}}, r"search.space: t also fixed under `parameters`; keep one"),
        ({"model_parameters": {"a": {"weight": 0.5, "density": 0.3}}}, r"search.model_space: a.weight also fixed under `model_parameters`; keep one"),
    ],
)
def test_a_parameter_both_fixed_and_searched_is_refused(fixed, message):
    """assemble writes a trial's values over the stage's fixed ones: a per-parent parameter both
    fixed and searched would crash every trial (a fixed 0.5 has no gradient to fill) or write the
    trial's anchors into the stage's own `model_parameters` (a fixed gradient is not copied)."""
    from alloylm.merge.config import MergeSearchStageConfig

    stage = {"kind": "merge_search", "parents": ["a", "b"], "search": {"space": {"t": {}}, "model_space": {"a": {"weight": {"anchors": 2}}}}}
    with pytest.raises(ValueError, match=message):
        MergeSearchStageConfig.model_validate({**stage, **fixed})
    # Fixed and searched side by side (different names) stay allowed.
    ok = MergeSearchStageConfig.model_validate({**stage, "model_parameters": {"a": {"density": 0.3}, "b": {"weight": 0.5}}})
    assert ok.model_parameters == {"a": {"density": 0.3}, "b": {"weight": 0.5}}


def test_a_bad_point_fails_when_the_config_loads():
    """Before the parents train: `alloylm validate` and `alloylm run` refuse it at load."""
    from pathlib import Path

    from alloylm.config import ConfigError, load_config

    quickstart = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"
    point = "[{t: {self_attn: [1, 0.5, 0.7, 0.3, 0], mlp: [0, 0.5, 0.3, 0.7], default: 0.5}}]"
    with pytest.raises(ConfigError, match=r"stages.merged.search.points.0.t.mlp: needs a list of 5 anchor values"):
        load_config(quickstart, [f"stages.merged.search.points={point}"])
