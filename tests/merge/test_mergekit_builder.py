"""The mergekit config builder, without merging anything: what it refuses and what it writes.

Complements tests/test_merge.py (which builds pico models and merges them): here the parents
are folders holding only a `config.json`, and the checks are about the mapping itself: names,
bases, the layer-wise gradient form, the YAML file and its header.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest
import yaml

from alloylm.merge.mergekit_builder import (
    MergeInputError,
    known_methods,
    mergekit_config,
    mergekit_yaml_text,
    read_mergekit_yaml,
    validate_merge_config,
    write_mergekit_yaml,
)

# The module, not the function of the same name that alloylm.merge exports.
BUILDER = importlib.import_module("alloylm.merge.mergekit_builder")
NAMES = ["dpo", "sft"]
LAYERS = 3


@pytest.fixture(scope="module")
def parents(tmp_path_factory) -> list[str]:
    """Two folders holding just a 3-layer Llama config.json: all the builder reads."""
    from transformers import LlamaConfig

    root = tmp_path_factory.mktemp("configs")
    folders = []
    for name in NAMES:
        config = LlamaConfig(
            vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=LAYERS, num_attention_heads=2,
            architectures=["LlamaForCausalLM"],
        )
        config.save_pretrained(root / name)
        folders.append(str(root / name))
    return folders


def refused(match: str, *args, **kwargs) -> str:
    with pytest.raises(MergeInputError, match=match) as err:
        mergekit_config(*args, **kwargs)
    return str(err.value)


# ----------------------------------------------------------------------------- methods, parents, bases


def test_known_methods_are_mergekits_sorted():
    methods = known_methods()
    assert methods == sorted(methods)
    assert {"slerp", "linear", "ties", "dare_ties", "task_arithmetic", "passthrough"} <= set(methods)


def test_parents_become_absolute_folders_named_by_their_basename(parents, tmp_path, monkeypatch):
    monkeypatch.chdir(Path(parents[0]).parent)
    cfg = mergekit_config("linear", ["dpo", "./sft/"], model_parameters={"dpo": {"weight": 1.0}, "sft": {"weight": 2.0}})
    assert [m["model"] for m in cfg["models"]] == [os.path.abspath("dpo"), os.path.abspath("sft")]
    assert all(os.path.isabs(m["model"]) for m in cfg["models"])


@pytest.mark.parametrize("bad", ["", None, 3])
def test_a_parent_must_be_a_folder_path(parents, bad):
    refused(rf"parent 1 must be a local folder path, got {bad!r}", "linear", [parents[0], bad])


def test_no_parent_is_refused():
    refused("^a merge needs at least one parent$", "linear", [])


def test_names_must_match_the_parents_and_differ(parents):
    refused("1 names given for 2 parents", "linear", parents, names=["dpo"])
    refused(r"parent names must be distinct, got \['a', 'a'\]", "linear", parents, names=["a", "a"])


def test_slerp_defaults_its_base_to_the_first_parent_and_linear_has_none(parents):
    slerp = mergekit_config("slerp", parents, names=NAMES, parameters={"t": 0.5})
    assert slerp["base_model"] == parents[0]
    swapped = mergekit_config("slerp", parents, names=NAMES, base=1, parameters={"t": 0.5})
    assert swapped["base_model"] == parents[1]
    linear = mergekit_config("linear", parents, names=NAMES, parameters={"weight": 1.0})
    assert "base_model" not in linear


@pytest.mark.parametrize("base", [-1, 2, True, "0", 0.0])
def test_base_must_be_a_parent_index(parents, base):
    message = refused("base must be the index of one of the 2 parents", "slerp", parents, names=NAMES, base=base, parameters={"t": 0.5})
    assert "(dpo, sft)" in message and repr(base) in message


def test_a_method_that_forbids_a_base_refuses_one(parents, monkeypatch):
    # No method mergekit 0.1.5 ships forbids a base; a registered one may.
    from dataclasses import replace

    from mergekit import merge_methods
    from mergekit.merge_methods.base import BasePolicy

    linear = merge_methods.get("linear")
    spec = replace(linear.spec, contract=replace(linear.spec.contract, base=BasePolicy.FORBIDDEN))

    class NoBase:
        pass

    no_base = NoBase()
    no_base.spec = spec
    monkeypatch.setattr(BUILDER, "_merge_method", lambda name: no_base)
    refused("merge method 'linear' takes no base model, got base=1", "linear", parents, names=NAMES, base=1)


def test_a_method_that_takes_one_input_refuses_two_parents_naming_them(parents):
    message = refused("merge method 'passthrough' cannot merge parents dpo, sft", "passthrough", parents, names=NAMES)
    assert "with base" not in message


def test_a_base_is_named_when_the_method_refuses_the_parents(parents, monkeypatch):
    from dataclasses import replace

    from mergekit import merge_methods

    slerp = merge_methods.get("slerp")
    spec = replace(slerp.spec, contract=replace(slerp.spec.contract, min_inputs=1, max_inputs=1))

    class OneInput:
        pass

    one = OneInput()
    one.spec = spec
    monkeypatch.setattr(BUILDER, "_merge_method", lambda name: one)
    refused("cannot merge parents dpo, sft with base 'sft'", "slerp", parents, names=NAMES, base=1, parameters={"t": 0.5})


def test_an_unknown_method_that_is_not_a_string_is_named(parents):
    message = refused(r"^unknown merge method \['slerp'\]; mergekit knows: ", ["slerp"], parents)
    assert message.endswith("mergekit knows: " + ", ".join(known_methods()))


# ----------------------------------------------------------------------------- the mapping


def test_slerp_slices_cover_every_layer_and_carry_per_model_parameters(parents):
    cfg = mergekit_config("slerp", parents, names=NAMES, parameters={"t": 0.3}, dtype="bfloat16", tokenizer_source="base")
    assert cfg == {
        "merge_method": "slerp",
        "base_model": parents[0],
        "slices": [{"sources": [{"model": p, "layer_range": [0, LAYERS]} for p in parents]}],
        "parameters": {"t": 0.3},
        "dtype": "bfloat16",
        "tokenizer_source": "base",
    }
    assert list(cfg) == ["merge_method", "base_model", "slices", "parameters", "dtype", "tokenizer_source"]


def test_the_models_form_with_and_without_parameters(parents):
    cfg = mergekit_config("task_arithmetic", parents, names=NAMES, model_parameters={"sft": {"weight": 0.7}})
    assert cfg == {
        "merge_method": "task_arithmetic",
        "base_model": parents[0],
        "models": [{"model": parents[0]}, {"model": parents[1], "parameters": {"weight": 0.7}}],
        "dtype": "float32",
    }


def test_a_gradient_mapping_puts_the_catch_all_last(parents):
    cfg = mergekit_config("slerp", parents, names=NAMES, parameters={"t": {"default": 0.5, "mlp": [0, 1], "self_attn": 0.2}})
    assert cfg["parameters"]["t"] == [
        {"filter": "mlp", "value": [0, 1]},
        {"filter": "self_attn", "value": 0.2},
        {"value": 0.5},
    ]


def test_mergekits_own_condition_form_is_kept(parents):
    given = [{"filter": "mlp", "value": [0.1, 0.9]}, {"filter": None, "value": 0.4}]
    cfg = mergekit_config("slerp", parents, names=NAMES, parameters={"t": given})
    assert cfg["parameters"]["t"] == [{"filter": "mlp", "value": [0.1, 0.9]}, {"value": 0.4}]
    assert list(cfg["parameters"]["t"][0]) == ["filter", "value"]


def test_a_plain_anchor_list_is_kept(parents):
    cfg = mergekit_config("slerp", parents, names=NAMES, parameters={"t": (0, 0.5, 1)})
    assert cfg["parameters"]["t"] == [0, 0.5, 1]


@pytest.mark.parametrize(
    ("t", "message"),
    [
        ({}, r"^parameters.t: an empty gradient mapping$"),
        ({"default": []}, r"^parameters.t.default: a gradient needs at least one anchor value$"),
        ({"mlp": [0, "x"], "default": 0.5}, r"^parameters.t.mlp\[1\]: 'x' is not a valid t"),
        ({"mlp": [0, None], "default": 0.5}, r"^parameters.t.mlp\[1\]: expected a number, got None$"),
        ([{"filter": "mlp"}], r"^parameters.t\[0\]: a condition has keys 'filter' \(optional\) and 'value', got \['filter'\]$"),
        ([{"value": 0.5, "filters": "mlp"}], r"^parameters.t\[0\]: a condition has keys .* got \['filters', 'value'\]$"),
        ([{"value": [None]}], r"^parameters.t\[0\].value\[0\]: expected a number, got None$"),
        ({"mlp": [0, 1]}, r"^parameters.t: a gradient by filter needs a 'default' entry"),
        ([{"filter": "mlp", "value": 0.5}], r"^parameters.t: a gradient by filter needs a 'default' entry"),
        ([{"filter": "*", "value": 0.5}, {"value": "x"}], r"^parameters.t\[1\].value: 'x' is not a valid t"),
    ],
)
def test_bad_gradients_name_the_place(parents, t, message):
    refused(message, "slerp", parents, names=NAMES, parameters={"t": t})


def test_a_star_filter_covers_every_tensor(parents):
    cfg = mergekit_config("slerp", parents, names=NAMES, parameters={"t": [{"filter": "*", "value": 0.5}]})
    assert cfg["parameters"]["t"] == [{"filter": "*", "value": 0.5}]


def test_a_per_model_gradient_needs_a_default_too(parents):
    message = refused(
        "merge method 'linear' needs parameter 'weight' for parent 'sft'",
        "linear",
        parents,
        names=NAMES,
        model_parameters={"dpo": {"weight": 1.0}, "sft": {"weight": {"mlp": [0, 1]}}},
    )
    assert "model_parameters['sft']" in message and "'default' entry" in message
    # A method-level value covers a parent that has none of its own.
    cfg = mergekit_config("linear", parents, names=NAMES, parameters={"weight": 1.0}, model_parameters={"sft": {"weight": {"mlp": [0, 1]}}})
    assert cfg["models"][1]["parameters"]["weight"] == [{"filter": "mlp", "value": [0, 1]}]


def test_the_base_needs_no_weight_in_task_arithmetic(parents):
    cfg = mergekit_config("ties", parents, names=NAMES, base=1, model_parameters={"dpo": {"weight": 0.5}})
    assert cfg["base_model"] == parents[1]
    refused("needs parameter 'weight' for parent 'dpo'", "ties", parents, names=NAMES, base=1, model_parameters={"dpo": {"density": 0.5}})


def test_a_folder_without_config_json_is_not_a_parent(parents, tmp_path):
    refused(r"parent 'empty' \(.*empty\) is not a model folder: config.json is missing", "slerp", [str(tmp_path / "empty"), parents[1]], names=["empty", "sft"], parameters={"t": 0.5})


# ----------------------------------------------------------------------------- files


def test_validate_refuses_what_is_not_a_mergekit_config():
    with pytest.raises(MergeInputError, match="^merge config must be a mapping, got list$"):
        validate_merge_config([1])
    with pytest.raises(MergeInputError, match=r"^x.yml: unknown merge method 'slurp'"):
        validate_merge_config({"merge_method": "slurp", "models": [{"model": "/a"}]}, source="x.yml")
    with pytest.raises(MergeInputError, match=r"^merge config is not a valid mergekit config: merge_method: "):
        validate_merge_config({"models": [{"model": "/a"}]})


def test_yaml_text_has_the_command_in_its_header_and_parses_back(parents):
    cfg = mergekit_config("slerp", parents, names=NAMES, parameters={"t": (0.1, 0.9)})
    text = mergekit_yaml_text(cfg)
    lines = text.splitlines()
    assert lines[0] == "# Written by AlloyLM. Reproduce the merge with mergekit:"
    assert lines[1] == "#   mergekit-yaml THIS_FILE OUTPUT_FOLDER"
    assert "!!" not in text  # tuples written as plain lists
    assert yaml.safe_load(text) == cfg | {"parameters": {"t": [0.1, 0.9]}}
    assert list(yaml.safe_load(text)) == list(cfg)  # key order kept
    seeded = mergekit_yaml_text(cfg, random_seed=0).splitlines()[1]
    assert seeded == "#   mergekit-yaml THIS_FILE OUTPUT_FOLDER --random-seed 0"


def test_write_and_read_round_trip_with_stage_names(parents, tmp_path):
    cfg = mergekit_config("slerp", parents, names=NAMES, parameters={"t": 0.5})
    path = tmp_path / "nested" / "merge.yml"
    write_mergekit_yaml(cfg, str(path), random_seed=3)
    assert "--random-seed 3" in path.read_text().splitlines()[1]
    assert read_mergekit_yaml(str(path)) == cfg

    user = tmp_path / "user.yml"
    user.write_text(
        "merge_method: linear\ntokenizer_source: sft\n"
        "models:\n  - {model: dpo, parameters: {weight: 1.0}}\n  - {model: sft, parameters: {weight: 1.0}}\n"
        "dtype: float32\n"
    )
    read = read_mergekit_yaml(str(user), stage_dirs={"dpo": parents[0], "sft": parents[1], "float32": "/nope"})
    assert [m["model"] for m in read["models"]] == parents
    assert read["tokenizer_source"] == parents[1]
    assert read["dtype"] == "float32"  # only model keys are stage names
    unresolved = read_mergekit_yaml(str(user))
    assert [m["model"] for m in unresolved["models"]] == ["dpo", "sft"]


def test_a_user_yaml_on_s3_or_under_home_is_read_as_the_config_check_reads_it(parents, s3_bucket, tmp_path, monkeypatch):
    """The bug this guards: `alloylm validate` and the fingerprint read `mergekit_config` through
    storage (s3://, ~), the merge itself with open(), which failed after the parents had trained."""
    from alloylm import storage

    cfg = mergekit_config("slerp", parents, names=NAMES, parameters={"t": 0.5})
    text = mergekit_yaml_text(cfg)
    storage.write_text(f"s3://{s3_bucket}/merges/m.yml", text)
    assert read_mergekit_yaml(f"s3://{s3_bucket}/merges/m.yml") == cfg
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "m.yml").write_text(text)
    assert read_mergekit_yaml("~/m.yml") == cfg


def test_a_bad_file_is_named(tmp_path):
    with pytest.raises(MergeInputError, match="cannot read mergekit YAML .*missing.yml"):
        read_mergekit_yaml(str(tmp_path / "missing.yml"))
    listed = tmp_path / "list.yml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(MergeInputError, match=rf"^{listed} must hold a mapping \(a mergekit config\), got list$"):
        read_mergekit_yaml(str(listed))
    out = tmp_path / "out.yml"
    with pytest.raises(MergeInputError, match=rf"^{out}: merge config is not a valid mergekit config"):
        write_mergekit_yaml({"merge_method": "linear"}, str(out))
    assert not out.exists()


# ----------------------------------------------------------------------------- messages, in full


def test_every_unknown_model_and_every_parent_is_listed(parents):
    refused(
        r"^model_parameters names 'base', 'orpo', which is not a parent; the parents are 'dpo', 'sft'$",
        "linear", parents, names=NAMES, model_parameters={"orpo": {"weight": 1.0}, "base": {"weight": 1.0}},
    )


def test_an_unknown_parameter_lists_the_methods_parameters(parents):
    refused(r"^parameters: merge method 'linear' has no parameter 'wieght'; its parameters are normalize, weight$", "linear", parents, names=NAMES, parameters={"wieght": 1.0})
    refused(r"^model_parameters\['sft'\].t: merge method 'linear' has no parameter 't'; its parameters are normalize, weight$", "linear", parents, names=NAMES, parameters={"weight": 1.0}, model_parameters={"sft": {"t": 1.0}})


def test_per_model_errors_name_the_parent_and_parameter(parents):
    refused(
        r"^model_parameters\['sft'\].t: 't' is a method-level parameter of 'slerp'; give it in parameters, not per model$",
        "slerp", parents, names=NAMES, parameters={"t": 0.5}, model_parameters={"sft": {"t": 0.2}},
    )
    refused(
        r"^model_parameters\['sft'\].weight: 'x' is not a valid weight",
        "linear", parents, names=NAMES, model_parameters={"dpo": {"weight": 1.0}, "sft": {"weight": "x"}},
    )
    refused(
        r"^model_parameters\['dpo'\].density: 'density' does not apply to the base model 'dpo' in 'ties' \(mergekit ignores it there\)$",
        "ties", parents, names=NAMES, model_parameters={"dpo": {"density": 0.5}, "sft": {"weight": 1.0}},
    )
    # The same non-base parameter on a parent that is not the base is fine.
    cfg = mergekit_config("ties", parents, names=NAMES, model_parameters={"sft": {"weight": 1.0, "density": 0.5}})
    assert cfg["models"][1]["parameters"] == {"weight": 1.0, "density": 0.5}
    # A per-model parameter that is not non-base applies to the base too.
    cfg = mergekit_config("linear", parents, names=NAMES, base=0, model_parameters={"dpo": {"weight": 2.0}, "sft": {"weight": 1.0}})
    assert cfg["models"][0]["parameters"] == {"weight": 2.0}


def test_every_parent_after_the_base_is_checked_for_required_parameters(parents):
    refused(r"needs parameter 'weight' for parent 'sft' \(give it in model_parameters\['sft'\] or parameters", "ties", parents, names=NAMES, base=0, model_parameters={"sft": {"density": 0.5}})
    refused(r"^merge method 'slerp' needs parameter 't' \(give it in parameters\)$", "slerp", parents, names=NAMES)


def test_slices_take_the_base_models_layer_count_and_per_model_parameters(parents, tmp_path):
    from transformers import LlamaConfig

    deeper = tmp_path / "deeper"
    LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=5, num_attention_heads=2, architectures=["LlamaForCausalLM"]).save_pretrained(deeper)
    cfg = mergekit_config("slerp", [parents[0], str(deeper)], names=["dpo", "deeper"], base=1, parameters={"t": 0.5})
    assert [s["layer_range"] for s in cfg["slices"][0]["sources"]] == [[0, 5], [0, 5]]
    cfg = mergekit_config("slerp", [str(deeper), parents[0]], names=["deeper", "dpo"], parameters={"t": 0.5})
    assert cfg["slices"][0]["sources"][0]["layer_range"] == [0, 5]
    # nuslerp takes per-model weights: the models form keeps them on each model.
    cfg = mergekit_config("nuslerp", parents, names=NAMES, model_parameters={"dpo": {"weight": 0.3}, "sft": {"weight": 0.7}})
    assert [m["parameters"] for m in cfg["models"]] == [{"weight": 0.3}, {"weight": 0.7}]


def test_a_single_parent_is_enough_for_a_method_that_takes_one(parents):
    cfg = mergekit_config("passthrough", parents[:1], names=["dpo"])
    assert cfg["models"] == [{"model": parents[0]}]
    message = refused("cannot merge parents dpo, sft: ", "passthrough", parents, names=NAMES)
    assert message.startswith("merge method 'passthrough' cannot merge parents dpo, sft: ")


def test_schema_errors_list_every_problem_with_its_location():
    with pytest.raises(MergeInputError) as err:
        validate_merge_config({"merge_method": "linear", "models": [{"model": "/a", "parameters": 5}], "dtype": 3})
    message = str(err.value)
    assert message.startswith("merge config is not a valid mergekit config: ")
    assert "models.0.parameters" in message and "; " in message and "XX" not in message


def test_the_yaml_is_block_style_in_the_configs_own_key_order(parents, tmp_path):
    cfg = mergekit_config("linear", parents, names=NAMES, parameters={"weight": 1.0}, dtype="float32")
    body = mergekit_yaml_text(cfg).split("\n", 2)[2]
    assert body.startswith("merge_method: linear\nmodels:\n")  # not sorted: merge_method first
    path = tmp_path / "exists" / "merge.yml"
    path.parent.mkdir()
    write_mergekit_yaml(cfg, str(path))  # an existing folder is fine
    write_mergekit_yaml(cfg, str(path))  # and so is rewriting the file
    assert yaml.safe_load(path.read_text(encoding="utf-8")) == cfg


def test_a_user_yaml_names_its_file_in_errors_and_resolves_lists_of_models(tmp_path, parents):
    broken = tmp_path / "broken.yml"
    broken.write_text("merge_method: [unclosed\n")
    with pytest.raises(MergeInputError, match=rf"^{broken} is not valid YAML: "):
        read_mergekit_yaml(str(broken))
    unknown = tmp_path / "unknown.yml"
    unknown.write_text("merge_method: slurp\nmodels:\n  - model: dpo\n")
    with pytest.raises(MergeInputError, match=rf"^{unknown}: unknown merge method 'slurp'"):
        read_mergekit_yaml(str(unknown), stage_dirs={"dpo": parents[0]})
    sources = tmp_path / "sources.yml"
    sources.write_text(
        "merge_method: slerp\nbase_model: dpo\n"
        "slices:\n  - sources:\n      - {model: dpo, layer_range: [0, 3]}\n      - {model: sft, layer_range: [0, 3]}\n"
        "parameters:\n  t: [{filter: dpo, value: 0.5}, {value: 0.5}]\n"
    )
    cfg = read_mergekit_yaml(str(sources), stage_dirs={"dpo": parents[0], "sft": parents[1]})
    assert cfg["parameters"]["t"][0]["filter"] == "dpo"  # a filter named like a stage is not a model
    assert cfg["slices"][0]["sources"][1]["model"] == parents[1]


def test_a_missing_config_names_the_base_it_reads_the_layers_from(parents, tmp_path):
    refused(r"^parent 'empty' \(.*empty\) is not a model folder", "slerp", [parents[0], str(tmp_path / "empty")], names=["dpo", "empty"], base=1, parameters={"t": 0.5})


# ----------------------------------------------------------------------------- paths no shipped method takes


def _patched_slerp(monkeypatch):
    """mergekit's slerp with a base made optional and a required per-model `weight` (linear's spec)
    after its shared `t`: no method mergekit 0.1.5 ships has per-model parameters with slices."""
    from dataclasses import replace

    from mergekit import merge_methods
    from mergekit.merge_methods.base import BasePolicy

    slerp, linear = merge_methods.get("slerp"), merge_methods.get("linear")
    (t,) = slerp.spec.parameters
    weight = next(p for p in linear.spec.parameters if p.name == "weight")
    spec = replace(slerp.spec, parameters=(t, weight), contract=replace(slerp.spec.contract, base=BasePolicy.OPTIONAL))

    class Patched:
        pass

    patched = Patched()
    patched.spec = spec
    monkeypatch.setattr(BUILDER, "_merge_method", lambda name: patched)


def test_slices_without_a_base_read_the_first_parent_and_carry_per_model_parameters(parents, tmp_path, monkeypatch):
    from transformers import LlamaConfig

    _patched_slerp(monkeypatch)
    deeper = tmp_path / "deeper"
    LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=5, num_attention_heads=2, architectures=["LlamaForCausalLM"]).save_pretrained(deeper)
    cfg = mergekit_config("slerp", [parents[0], str(deeper)], names=["dpo", "deeper"], parameters={"t": 0.5}, model_parameters={"deeper": {"weight": 0.7}, "dpo": {"weight": 0.3}})
    assert "base_model" not in cfg
    # No base: the layer count is the first parent's (3), not the second's (5).
    assert cfg["slices"] == [
        {
            "sources": [
                {"model": parents[0], "layer_range": [0, LAYERS], "parameters": {"weight": 0.3}},
                {"model": str(deeper), "layer_range": [0, LAYERS], "parameters": {"weight": 0.7}},
            ]
        }
    ]


def test_a_required_parameter_after_a_shared_one_is_still_checked(parents, monkeypatch):
    _patched_slerp(monkeypatch)
    refused(r"^merge method 'slerp' needs parameter 'weight' for parent 'dpo' ", "slerp", parents, names=NAMES, parameters={"t": 0.5})


def test_a_method_without_parameters_lists_none(parents):
    refused(r"^parameters: merge method 'arcee_fusion' has no parameter 't'; its parameters are \(none\)$", "arcee_fusion", parents, names=NAMES, parameters={"t": 0.5})


def test_an_architecture_mergekit_does_not_know_gets_the_models_form(tmp_path):
    from transformers import LlamaConfig

    folders = []
    for name in NAMES:
        LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=LAYERS, num_attention_heads=2, architectures=["UnknownForCausalLM"]).save_pretrained(tmp_path / name)
        folders.append(str(tmp_path / name))
    cfg = mergekit_config("slerp", folders, names=NAMES, parameters={"t": 0.5})
    assert "slices" not in cfg
    assert cfg["models"] == [{"model": folders[0]}, {"model": folders[1]}]


def test_default_names_keep_a_trailing_space_of_the_folder(tmp_path):
    """Names are the folders' basenames, whitespace included (only a path separator is stripped)."""
    refused(r"needs parameter 'weight' for parent 'a ' ", "linear", [str(tmp_path / "a "), str(tmp_path / "b")], parameters={"normalize": True})


def test_leaf_lists_and_mappings_are_written_in_flow_style(parents):
    cfg = mergekit_config("slerp", parents, names=NAMES, parameters={"t": {"mlp": [0, 1], "default": 0.5}})
    body = mergekit_yaml_text(cfg).split("\n", 2)[2]
    assert body == (
        f"merge_method: slerp\nbase_model: {parents[0]}\nslices:\n- sources:\n"
        f"  - model: {parents[0]}\n    layer_range: [0, {LAYERS}]\n"
        f"  - model: {parents[1]}\n    layer_range: [0, {LAYERS}]\n"
        "parameters:\n  t:\n  - filter: mlp\n    value: [0, 1]\n  - {value: 0.5}\ndtype: float32\n"
    )


def test_files_are_utf8_whatever_the_locale(tmp_path, monkeypatch):
    """Under an ASCII locale (simulated: open() without an encoding gets ascii) a user's YAML with a
    non-ASCII folder name is still read; the YAML written is ASCII (non-ASCII escaped) anyway."""
    import builtins

    cfg = {"merge_method": "linear", "models": [{"model": "/modèles/dpo", "parameters": {"weight": 1.0}}], "dtype": "float32"}
    monkeypatch.setattr(BUILDER, "open", lambda file, mode="r", encoding=None, **kw: builtins.open(file, mode, encoding=encoding or "ascii", **kw), raising=False)
    user = tmp_path / "user.yml"
    user.write_text("merge_method: linear\nmodels:\n  - {model: /modèles/dpo, parameters: {weight: 1.0}}\ndtype: float32\n", encoding="utf-8")
    assert read_mergekit_yaml(str(user)) == cfg
    written = tmp_path / "merge.yml"
    write_mergekit_yaml(cfg, str(written))
    assert written.read_bytes().isascii() and '"/mod\\xE8les/dpo"' in written.read_text(encoding="ascii")
    assert read_mergekit_yaml(str(written)) == cfg
