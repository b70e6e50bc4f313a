"""`serve.model: best`: the variant the run's validation comparison chose is served, and says so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alloylm.config import ConfigError, load_config
from alloylm.errors import ServeError
from alloylm.layout import RunLayout
from alloylm.pipeline import resolve_best
from alloylm.serve.config import ChosenVariant, ServeConfig
from alloylm.serve.protocol import model_list

QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"


def test_best_is_replaced_by_the_chosen_variant():
    config = ServeConfig(model="best", variants=["best", "dpo", "instruct"])
    resolved = config.with_chosen(ChosenVariant(variant="dpo", score=0.61, within_noise=["merged"]))
    assert resolved.model == "dpo" and resolved.variant_names == ["dpo", "instruct"]
    assert resolved.chosen.variant == "dpo" and resolved.chosen.split == "validation"


def test_models_list_names_the_default_and_why_it_was_chosen():
    chosen = {"variant": "dpo", "score": 0.61, "split": "validation"}
    listed = model_list(["dpo", "instruct"], 0, default="dpo", chosen=chosen)["data"]
    assert listed[0]["alloylm"] == {"default": True, "chosen": {**chosen, "alias": "best"}}
    assert listed[1]["alloylm"] == {"default": False}
    assert model_list(["x"], 0)["data"][0] == {"id": "x", "object": "model", "created": 0, "owned_by": "alloylm"}


def test_resolve_best_reads_the_runs_choice(tmp_path):
    config = load_config(QUICKSTART, [f"storage={tmp_path}", "serve.model=best", "serve.variants=[best, instruct]"])
    with pytest.raises(ServeError, match=r"eval/best.json does not exist yet; run `alloylm run CONFIG` first"):
        resolve_best(config, config.serve)
    best = Path(RunLayout.of(config).best)
    best.parent.mkdir(parents=True)
    best.write_text(json.dumps({"variant": "sft", "score": 0.7, "split": "validation", "within_noise": ["dpo"]}))
    resolved = resolve_best(config, config.serve)
    assert resolved.model == "sft" and resolved.variant_names == ["sft", "instruct"] and resolved.chosen.within_noise == ["dpo"]


def test_a_model_from_outside_the_run_that_won_is_served_from_where_it_was_scored(tmp_path):
    """`evaluate.variants: [instruct=<folder or hub id>]` and that model chosen: serving looked for a
    stage folder `<run>/stages/instruct` that no run writes."""
    from alloylm.serve.run import variant_sources

    outside = str(tmp_path / "models" / "general-instruct")
    config = load_config(QUICKSTART, [f"storage={tmp_path}", "serve.model=best", "serve.variants=[best, dpo]"])
    config.stages.pop("instruct")  # as the paper configs: the Instruct model is not trained by the run
    storage_best = Path(RunLayout.of(config).best)
    storage_best.parent.mkdir(parents=True)
    storage_best.write_text(json.dumps({"variant": "instruct", "score": 0.7, "split": "validation", "model": outside}))
    resolved = resolve_best(config, config.serve)
    assert resolved.model == "instruct" and resolved.sources == {"instruct": outside}
    assert variant_sources(resolved, config.run_uri, require_complete=False)["instruct"] == outside


def test_a_choice_among_models_that_changed_since_is_stale(tmp_path):
    # `alloylm train CONFIG sft` (or `run --only sft`) after the run: best.json was chosen among
    # the old sft; serving it as "best" would claim a validation score nobody measured.
    from alloylm import storage

    config = load_config(QUICKSTART, [f"storage={tmp_path}", "serve.model=best", "serve.variants=[best, instruct]"])
    layout = RunLayout.of(config)
    for stage, fingerprint in (("sft", "a" * 16), ("dpo", "b" * 16)):
        storage.write_json(storage.join(layout.stage(stage), storage.MANIFEST_NAME), {"fingerprint": fingerprint})
    choice = {"variant": "sft", "score": 0.7, "split": "validation", "fingerprints": {"sft": "a" * 16, "dpo": "b" * 16}}
    storage.write_json(layout.best, choice)
    assert resolve_best(config, config.serve).model == "sft"
    storage.write_json(storage.join(layout.stage("dpo"), storage.MANIFEST_NAME), {"fingerprint": "c" * 16})
    with pytest.raises(ServeError, match=r"best.json is stale: it was chosen among models that have changed since \(dpo\)"):
        resolve_best(config, config.serve)
    # Trained again under the same fingerprint (deleted, then `alloylm train`): on a GPU, other weights.
    built = {"sft": "2026-12-05T01:00:00+00:00", "dpo": "2026-12-05T02:00:00+00:00"}
    for stage, fingerprint in (("sft", "a" * 16), ("dpo", "b" * 16)):
        storage.write_json(storage.join(layout.stage(stage), storage.MANIFEST_NAME), {"fingerprint": fingerprint, "created_at": built[stage]})
    storage.write_json(layout.best, {**choice, "builds": built})
    assert resolve_best(config, config.serve).model == "sft"
    storage.write_json(storage.join(layout.stage("sft"), storage.MANIFEST_NAME), {"fingerprint": "a" * 16, "created_at": "2026-12-06T00:00:00+00:00"})
    with pytest.raises(ServeError, match=r"changed since \(sft\)"):
        resolve_best(config, config.serve)


def test_best_needs_an_evaluation(tmp_path):
    text = QUICKSTART.read_text(encoding="utf-8").split("\nevaluate:")[0] + "\nserve: {model: best}\n"
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match="serve.model: `best` is chosen by the run's evaluation on validation"):
        load_config(path)
