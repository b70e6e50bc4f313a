"""The run config: loading, overrides, DAG checks and error messages, and every shipped config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from alloylm.cli import main
from alloylm.config import ConfigError, RunConfig, apply_overrides, load_config

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"

MINIMAL = """\
experiment: demo
tokenizer:
  train: {vocab_size: 512}
datasets:
  text:
    source: builtin:general-text
  chat:
    source: builtin:general-chat
stages:
  base: {kind: cpt, from: {init: tiny-llama}, data: text}
  inst: {kind: sft, from: base, data: chat}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str, overrides: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), overrides)
    return str(info.value)


def test_shipped_configs_all_validate():
    configs = sorted((REPO / "configs").rglob("*.yaml"))
    assert QUICKSTART in configs
    for path in configs:
        config = load_config(path)
        assert isinstance(config, RunConfig), path
        assert config.stage_order(), path


def test_minimal_config_fills_defaults_and_orders_stages(tmp_path):
    config = load_config(write(tmp_path, MINIMAL))
    assert config.storage == "./runs" and config.overwrite is False and config.trust_remote_code is False
    assert config.datasets["text"].format == "text"  # inferred from the built-in source
    assert config.datasets["chat"].format == "chat"
    assert config.stage_order() == ["base", "inst"]
    assert config.data.block_size == 256


def test_config_is_frozen(tmp_path):
    config = load_config(write(tmp_path, MINIMAL))
    with pytest.raises(Exception):
        config.seed = 3  # type: ignore[misc]


def test_overrides_change_values_and_types(tmp_path):
    config = load_config(write(tmp_path, MINIMAL), ["data.block_size=64", "seed=7", "datasets.text.max_records=10", "overwrite=true"])
    assert config.data.block_size == 64
    assert config.seed == 7
    assert config.datasets["text"].max_records == 10
    assert config.overwrite is True


def test_override_of_unknown_key_names_the_dotted_path_and_allowed_keys(tmp_path):
    message = error_of(tmp_path, MINIMAL, ["data.blok_size=64"])
    assert "data.blok_size" in message
    assert "unknown key" in message and "block_size" in message


def test_unknown_key_in_file_names_file_line_and_path(tmp_path):
    text = MINIMAL.replace("  text:\n    source:", "  text:\n    sorce: x\n    source:")
    message = error_of(tmp_path, text)
    assert "datasets.text.sorce" in message
    assert f"{tmp_path / 'run.yaml'}:6" in message
    assert "allowed here" in message and "source" in message


def test_wrong_type_names_path_and_value(tmp_path):
    message = error_of(tmp_path, MINIMAL, ["data.block_size=many"])
    assert "data.block_size" in message and "'many'" in message


def test_unknown_stage_key_inside_tagged_union(tmp_path):
    message = error_of(tmp_path, MINIMAL, ["stages.inst.lr=3"])
    assert "stages.inst.lr" in message and "unknown key" in message


def test_bad_stage_kind_lists_allowed_kinds(tmp_path):
    message = error_of(tmp_path, MINIMAL, ["stages.inst.kind=distill"])
    assert "stages.inst" in message
    for kind in ("cpt", "sft", "dpo", "orpo", "merge"):
        assert kind in message


def test_dpo_loss_weights_must_match_its_loss_types(tmp_path):
    text = MINIMAL.replace("stages:", "  prefs:\n    source: builtin:biomaterials-preferences\nstages:") + (
        "  pref: {kind: dpo, from: inst, data: prefs, loss_type: [sigmoid, sft], loss_weights: [1.0]}\n"
    )
    message = error_of(tmp_path, text)
    assert "stages.pref" in message and "loss_weights has 1 entries for 2 loss_type entries" in message
    message = error_of(tmp_path, text.replace("[sigmoid, sft]", "[sigmoid, nll]"))
    assert "stages.pref" in message and "unknown TRL DPO loss type(s) ['nll']" in message and "sigmoid_norm" in message
    # One weight per loss type is a valid config, with the list kept as given.
    config = load_config(write(tmp_path, text), ["stages.pref.loss_weights=[1.0, 0.5]"])
    assert config.stages["pref"].loss_type == ["sigmoid", "sft"] and config.stages["pref"].loss_weights == [1.0, 0.5]


def test_dpo_loss_types_are_the_ones_trl_documents():
    import re

    from trl import DPOConfig

    from alloylm.train.config import DPO_LOSS_TYPES

    documented = re.findall(r"`'(\w+)'`", DPOConfig.__dataclass_fields__["loss_type"].metadata["help"])
    assert documented and sorted(documented) == sorted(DPO_LOSS_TYPES)


def test_unknown_parent_is_rejected(tmp_path):
    message = error_of(tmp_path, MINIMAL, ["stages.inst.from=bsae"])
    assert "stages.inst.from" in message and "'bsae'" in message and "base" in message


def test_model_source_parents_are_accepted(tmp_path):
    config = load_config(write(tmp_path, MINIMAL), ["stages.inst.from=meta-llama/Llama-3.1-8B"])
    assert config.stage_order() == ["base", "inst"] or set(config.stage_order()) == {"base", "inst"}


def test_cycle_is_rejected_with_the_cycle_named(tmp_path):
    text = MINIMAL + "  a: {kind: sft, from: b, data: chat}\n  b: {kind: sft, from: a, data: chat}\n"
    message = error_of(tmp_path, text)
    # The path closes on itself; graphlib may start it at either stage.
    assert "stages form a cycle: a -> b -> a" in message or "stages form a cycle: b -> a -> b" in message, message


def test_a_longer_cycle_is_named_parent_to_child(tmp_path):
    # a is b's parent, b is c's, c is a's: the message follows that direction, from any start.
    text = MINIMAL + "  a: {kind: sft, from: c, data: chat}\n  b: {kind: sft, from: a, data: chat}\n  c: {kind: sft, from: b, data: chat}\n"
    message = error_of(tmp_path, text)
    rotations = ("a -> b -> c -> a", "b -> c -> a -> b", "c -> a -> b -> c")
    assert any(f"stages form a cycle: {path}" in message for path in rotations), message


def test_stage_data_format_must_fit_the_stage(tmp_path):
    message = error_of(tmp_path, MINIMAL, ["stages.inst.data=text"])
    assert "stages.inst.data" in message and "'text'" in message and "chat" in message


def test_unknown_dataset_reference(tmp_path):
    message = error_of(tmp_path, MINIMAL, ["stages.inst.data=nope"])
    assert "stages.inst.data" in message and "'nope'" in message


def test_unknown_builtin_source_lists_known_ones(tmp_path):
    message = error_of(tmp_path, MINIMAL, ["datasets.text.source=builtin:nope"])
    assert "builtin:nope" in message and "builtin:general-text" in message


def test_file_source_needs_a_format(tmp_path):
    message = error_of(tmp_path, MINIMAL, ["datasets.text.source=./corpus"])
    assert "datasets.text" in message and "format" in message


def test_a_text_data_set_may_mix_chat_builtins_but_nothing_else_mixes(tmp_path):
    config = load_config(write(tmp_path, MINIMAL), ["datasets.text={source: [builtin:general-text, builtin:general-chat], format: text}"])
    assert config.datasets["text"].format == "text"
    message = error_of(tmp_path, MINIMAL, ["datasets.text={source: [builtin:general-text, builtin:general-chat]}"])
    assert "datasets.text" in message and "`format` is required" in message  # a mix is never guessed
    message = error_of(tmp_path, MINIMAL, ["datasets.text={source: [builtin:general-text, builtin:biomaterials-preferences], format: text}"])
    assert "datasets.text" in message and "preference" in message and "text and chat built-in sources" in message
    message = error_of(tmp_path, MINIMAL, ["datasets.chat={source: [builtin:general-chat, builtin:general-text], format: chat}"])
    assert "datasets.chat" in message and "does not match" in message


def test_unknown_preset(tmp_path):
    message = error_of(tmp_path, MINIMAL, ["stages.base.from.init=huge-llama"])
    assert "huge-llama" in message and "tiny-llama" in message


def test_tokenizer_needs_exactly_one_source(tmp_path):
    message = error_of(tmp_path, MINIMAL, ["tokenizer.from=gpt2"])
    assert "tokenizer" in message and "exactly one" in message


def test_bad_yaml_reports_line(tmp_path):
    message = error_of(tmp_path, "experiment: x\nstages: [\n")
    assert "run.yaml:" in message and "not valid YAML" in message


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_apply_overrides_does_not_touch_the_input():
    raw = {"a": {"b": 1}}
    out = apply_overrides(raw, ["a.b=2", "a.c.d=[1, 2]"])
    assert raw == {"a": {"b": 1}}
    assert out == {"a": {"b": 2, "c": {"d": [1, 2]}}}
    with pytest.raises(ConfigError, match="not a mapping"):
        apply_overrides(raw, ["a.b.c=1"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides(raw, ["novalue"])


def test_cli_validate_prints_the_resolved_config(tmp_path, capsys):
    assert main(["validate", str(write(tmp_path, MINIMAL)), "data.block_size=32"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["data"]["block_size"] == 32
    assert resolved["stages"]["base"]["from"] == {"init": "tiny-llama", "seed": None}
    # The resolved config validates again to the same thing.
    assert RunConfig.model_validate(resolved).model_dump() == load_config(write(tmp_path, MINIMAL), ["data.block_size=32"]).model_dump()
