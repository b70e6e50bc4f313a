"""Checks a training stage makes on the driver, before any worker starts (no Ray cluster)."""

from __future__ import annotations

import pytest

from alloylm.config import validate_config
from alloylm.errors import StageError
from alloylm.layout import RunLayout
from alloylm.train.launcher import _check_parent_and_tokenizer

# A template of the kind many Hub models ship: no {% generation %} markers, and not one of those
# TRL knows how to mark.
UNMARKED = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"


@pytest.fixture(scope="module")
def tokenizer():
    from alloylm.models.tokenizer import train_tokenizer

    return train_tokenizer(["Nacre is tougher than aragonite. " * 20, "Silk is strong. " * 20], vocab_size=300)


def _config(tmp_path, tokenizer, template: str, assistant_only_loss: bool):
    config = validate_config({
        "experiment": "checks",
        "storage": str(tmp_path / "runs"),
        "tokenizer": {"train": {"vocab_size": 300}},
        "datasets": {"qa": {"source": "builtin:biomaterials-qa"}},
        "stages": {"sft": {"kind": "sft", "from": {"init": "pico-llama"}, "data": "qa", "assistant_only_loss": assistant_only_loss}},
    })
    tokenizer.chat_template = template
    tokenizer.save_pretrained(RunLayout.of(config).tokenizer)
    return config


def test_assistant_only_loss_with_a_template_that_marks_no_assistant_tokens_is_refused_naming_the_key(tmp_path, tokenizer):
    """TRL's SFTTrainer raises for such a template inside every worker, after the model loaded."""
    config = _config(tmp_path, tokenizer, UNMARKED, assistant_only_loss=True)
    with pytest.raises(StageError, match=r"stages\.sft\.assistant_only_loss is true, but .* marks no assistant tokens"):
        _check_parent_and_tokenizer(config, "sft", "preset", "pico-llama")


def test_named_templates_without_a_default_are_refused_naming_the_key_not_a_key_error(tmp_path, tokenizer):
    config = _config(tmp_path, tokenizer, {"tool_use": UNMARKED}, assistant_only_loss=True)
    with pytest.raises(StageError, match=r"stages\.sft\.assistant_only_loss is true, but the run's tokenizer has no chat template"):
        _check_parent_and_tokenizer(config, "sft", "preset", "pico-llama")


def test_assistant_only_loss_takes_a_template_trl_can_mark_or_one_marked_already(tmp_path, tokenizer):
    from trl.chat_template_utils import llama3_chat_template

    from alloylm.models.tokenizer import CHAT_TEMPLATE

    for index, template in enumerate((llama3_chat_template, CHAT_TEMPLATE)):
        _check_parent_and_tokenizer(_config(tmp_path / str(index), tokenizer, template, assistant_only_loss=True), "sft", "preset", "pico-llama")
    # and without assistant_only_loss, any template
    _check_parent_and_tokenizer(_config(tmp_path / "whole", tokenizer, UNMARKED, assistant_only_loss=False), "sft", "preset", "pico-llama")


def test_a_run_refuses_it_at_its_tokenizer_step_before_preparing_or_training_anything(ray_cluster, tmp_path, tokenizer, capsys):
    """Not only when the SFT stage's turn comes, after hours of CPT."""
    import yaml

    from alloylm.cli import main

    tokenizer.chat_template = UNMARKED
    tokenizer.save_pretrained(str(tmp_path / "hub-like"))
    raw = {
        "experiment": "checks",
        "storage": str(tmp_path / "runs"),
        "tokenizer": {"from": str(tmp_path / "hub-like")},
        "datasets": {"text": {"source": "builtin:biomaterials-corpus"}, "qa": {"source": "builtin:biomaterials-qa"}},
        "stages": {
            "cpt": {"kind": "cpt", "from": {"init": "pico-llama"}, "data": "text", "training": {"max_steps": 2}},
            "sft": {"kind": "sft", "from": "cpt", "data": "qa", "training": {"max_steps": 2}},
        },
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    assert main(["-q", "run", str(tmp_path / "run.yaml")]) == 1
    assert "stages.sft.assistant_only_loss is true" in capsys.readouterr().err
    run = tmp_path / "runs" / "checks"
    assert not (run / "data").exists() and not (run / "stages").exists()
