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


def test_a_key_given_twice_names_both_lines(tmp_path):
    # PyYAML would keep the second `inst:` silently and drop the first.
    text = MINIMAL + "  inst: {kind: sft, from: {init: tiny-llama}, data: chat}\n"
    message = error_of(tmp_path, text)
    assert "run.yaml:12:" in message and "key 'inst' is given twice (first on line 11)" in message, message
    assert "given twice" in error_of(tmp_path, MINIMAL, ["stages.x={a: 1, a: 2}"])


def test_a_date_like_value_is_text_and_binary_or_set_values_name_their_line(tmp_path):
    """YAML reads `2024-06-01` as a date, and a date (or `!!binary` bytes) crashed loading with a
    traceback when the config was copied through JSON."""
    config = load_config(write(tmp_path, MINIMAL + "storage: 2024-06-01\n"), ["seed=3"])
    assert config.storage == "2024-06-01"
    assert load_config(write(tmp_path, MINIMAL), ["storage=2024-06-01T10:00:00"]).storage == "2024-06-01T10:00:00"
    message = error_of(tmp_path, MINIMAL.replace("experiment: demo", "experiment: !!binary aGVsbG8="))
    assert "run.yaml:1:" in message and "a binary value has no meaning in a config" in message, message
    assert "a set value" in error_of(tmp_path, MINIMAL, ["storage=!!set {a: null}"])
    assert main(["validate", str(write(tmp_path, MINIMAL.replace("experiment: demo", "experiment: !!binary aGVsbG8=")))]) == 2


def test_bytes_that_are_not_utf8_or_yaml_name_the_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(MINIMAL.encode() + b"# caf\xe9\n")
    with pytest.raises(ConfigError, match=r"run\.yaml:12: not UTF-8 text \(byte 0xe9\)"):
        load_config(path)
    path.write_bytes(MINIMAL.encode().replace(b"experiment: demo", b"experiment: d\x01emo"))
    with pytest.raises(ConfigError, match=r"run\.yaml:1: not valid YAML: character U\+0001"):
        load_config(path)
    # In an override: a message, not a traceback (a ReaderError has no `problem`).
    assert "character U+0001 is not allowed" in error_of(tmp_path, MINIMAL, ["storage=runs\x01"])


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("stages.base.training.epochs=.inf", "stages.base.training.epochs: Input should be a finite number"),
        ("stages.base.training.learning_rate=-.inf", "stages.base.training.learning_rate: Input should be a finite number"),
        ("stages.base.deepspeed.stage=false", "stages.base.deepspeed.stage: expected a number, got the boolean false"),
        ("stages.base.training.batch_size=true", "stages.base.training.batch_size: expected a number, got the boolean true"),
        ("builtin.materials=true", "builtin.materials: expected a number, got the boolean true"),
        ("seed=-5", "seed: Input should be greater than or equal to 0"),
        ("seed=4294967296", "seed: Input should be less than or equal to 4294967295"),
        ("stages.base.training.seed=4294967296", "stages.base.training.seed: Input should be less than or equal to 4294967295"),
        ("storage=", "storage: is empty"),
        ("storage=' runs'", "storage: ' runs' has leading or trailing spaces"),
        ("storage=s3://", "storage: 's3://' names no location"),
        ("storage=s3:///prefix", "storage: 's3:///prefix' has no bucket"),
    ],
)
def test_values_that_would_fail_only_at_run_time_are_refused_at_load(tmp_path, override, expected):
    # inf epochs overflow math.ceil in the worker, seed -5 fails numpy's set_seed after data
    # preparation, `stage: false` would mean ZeRO-0, and an empty storage writes into the cwd.
    assert f"override {override!r}: {expected}" in error_of(tmp_path, MINIMAL, [override])


def test_booleans_stay_booleans_and_good_values_still_load(tmp_path):
    config = load_config(
        write(tmp_path, MINIMAL),
        ["stages.base.training.gradient_checkpointing=true", "stages.base.deepspeed.stage=3", "seed=4294967295", "storage=s3://bucket/runs"],
    )
    assert config.stages["base"].training.gradient_checkpointing is True and config.stages["base"].deepspeed.stage == 3
    assert config.seed == 2**32 - 1 and config.storage == "s3://bucket/runs"


def test_errors_point_at_the_override_or_key_that_caused_them(tmp_path):
    path = write(tmp_path, MINIMAL + "evaluate: {variants: [inst], suites: {short_answer: {enabled: false}, multiple_choice: {enabled: false}}}\nserve:\n  variants: []\n  model: nope\n")
    # An override that replaced a list: the override, not the file's line of the old list.
    with pytest.raises(ConfigError) as info:
        load_config(path, ["evaluate.variants=[nope]"])
    assert "override 'evaluate.variants=[nope]': evaluate.variants.0: 'nope' is neither" in str(info.value)
    # serve.model names a missing variant: serve.model, at its own line.
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "run.yaml:15: serve.model: 'nope' is neither a stage" in str(info.value)
    # A typo of a stage name in an override says so rather than asking for a `kind`.
    message = error_of(tmp_path, MINIMAL, ["stages.inst2.training.epochs=1"])
    assert "stages.inst2: no stage 'inst2' in" in message and "(stages: base, inst)" in message, message
    # A cycle names the stage key it closes at, so it gets a line.
    message = error_of(tmp_path, MINIMAL, ["stages.base.from=inst"])
    assert "override 'stages.base.from=inst': stages.base.from: stages form a cycle" in message or (
        "run.yaml:11: stages.inst.from: stages form a cycle" in message
    ), message


def test_a_stage_check_points_at_its_key_and_spaces_around_the_override_equals_are_dropped(tmp_path):
    text = MINIMAL + "  m:\n    kind: merge\n    parents: [base, inst]\n    base: text\n"
    assert "run.yaml:15: stages.m.base: 'text' is not one of parents ['base', 'inst']" in error_of(tmp_path, text)
    message = error_of(tmp_path, MINIMAL + "  m: {kind: merge, parents: [base, inst]}\n", ["stages.m.base=text"])
    assert "override 'stages.m.base=text': stages.m.base: 'text' is not one of parents" in message, message
    # `a.b = 1` quoted as one shell argument: the key is `a.b`, not `a.b ` (an "unknown key").
    assert load_config(write(tmp_path, MINIMAL), ["stages.base.training.epochs = 2"]).stages["base"].training.epochs == 2


def test_a_message_with_a_semicolon_stays_one_line(tmp_path):
    message = error_of(
        tmp_path,
        MINIMAL + "evaluate:\n  variants: [inst]\n  suites:\n    multiple_choice: {dataset: nope}\n    short_answer: {enabled: false}\n"
        "    domain_perplexity: {enabled: false}\n    general_perplexity: {enabled: false}\n",
    )
    lines = message.splitlines()[1:]
    assert len(lines) == 1 and lines[0].endswith("; disable the suite or declare it"), message


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


@pytest.mark.parametrize("gpus", ["0.5", "2"])
def test_a_training_worker_uses_no_gpu_or_one(tmp_path, gpus):
    """Each worker is one DDP/DeepSpeed rank on one device: two ranks sharing a GPU failed in NCCL
    (a fractional share was accepted), and a worker's second GPU sat idle."""
    message = error_of(tmp_path, MINIMAL, [f"stages.base.resources.gpus_per_worker={gpus}"])
    assert "stages.base.resources.gpus_per_worker" in message and "raise `workers`" in message, message
    assert load_config(write(tmp_path, MINIMAL), ["stages.base.resources.gpus_per_worker=1"]).stages["base"].resources.use_gpu
