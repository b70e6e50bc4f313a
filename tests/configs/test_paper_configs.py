"""The paper's runs as configs (configs/paper/): each loads offline and carries the paper's chain,
hyperparameters, data sets and SLERP gradients, as taken from the authors' training files
(github.com/lamm-mit/LLM-finetuning; configs/paper/README.md says what is verified and what assumed).

They are checked here, never run: a run needs GPUs and the Hugging Face Hub.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import yaml

from alloylm.config import (
    MergeSearchStageConfig,
    MergeStageConfig,
    RunConfig,
    TrainStageConfig,
    load_config,
    stage_parents,
)

REPO = Path(__file__).resolve().parents[2]
PAPER_DIR = REPO / "configs" / "paper"
QUICKSTART = REPO / "configs" / "quickstart.yaml"

# The paper's SLERP gradients (the fine-tuned model merged with the Instruct model, which is
# mergekit's base_model, the t=0 end): t across the layers for attention and MLP, 0.5 elsewhere.
PAPER_T = {"self_attn": [0, 0.5, 0.3, 0.7, 1], "mlp": [1, 0.5, 0.7, 0.3, 0], "default": 0.5}

# The paper's data sets (all lamm-mit on the Hugging Face Hub).
CPT_SOURCES = [
    "hf:lamm-mit/bio-silk-mech-mix-80K",
    "hf:lamm-mit/raw_text_bio_marker",
    "hf:lamm-mit/raw_text_silk_marker",
    "hf:lamm-mit/bio-materials-text-60K",
]
SFT_SOURCES = ["hf:lamm-mit/HuggingFaceH4-ultrachat_200k", "hf:lamm-mit/bio-silk-mech-mix-q-a-35K"]
PREFERENCE_SOURCES = ["hf:lamm-mit/orpo-dpo-mix-40k", "hf:lamm-mit/bio-inspired-DPO", "hf:lamm-mit/spider-silk-DPO"]
# SmolLM's SFT: the domain chats in their H4 (train_sft) form, plus SmolLM-Instruct's general sets,
# the only sources of a training data set that are not lamm-mit's.
SMOLLM_SFT_SOURCES = [
    "hf:lamm-mit/bio-silk-mech-mix-q-a-35K-sft",
    "hf:HuggingFaceTB/Magpie-Pro-300K-Filtered-H4",
    "hf:HuggingFaceTB/self-oss-instruct-sc2-H4",
    "hf:HuggingFaceTB/everyday-conversations-llama3.1-2k",
    "hf:HuggingFaceTB/instruct-data-basics-smollm-H4",
]
GENERAL_SFT_SOURCES = set(SMOLLM_SFT_SOURCES[1:])

# The paper's hyperparameters per stage kind. `seq` is the packed block size for CPT and the
# longest sequence otherwise; `scheduler` the learning-rate schedule.
_8B_RECIPE = {
    "cpt": {"learning_rate": 2e-5, "epochs": 5, "seq": 3072, "scheduler": "cosine", "batch_size": 6, "accumulation": 2},
    "sft": {"learning_rate": 2e-5, "epochs": 1, "seq": 3072, "scheduler": "cosine", "batch_size": 6, "accumulation": 2},
    "dpo": {"learning_rate": 5e-7, "epochs": 1, "seq": 2048, "scheduler": "cosine", "beta": 0.05, "batch_size": 2, "accumulation": 2},
    "orpo": {"learning_rate": 3e-6, "epochs": 1, "seq": 2048, "scheduler": "cosine", "beta": 0.1, "batch_size": 3, "accumulation": 1},
}
_SMOLLM_RECIPE = {
    "cpt": {"learning_rate": 5e-5, "epochs": 2, "seq": 2048, "scheduler": "constant", "batch_size": 6, "accumulation": 2},
    "sft": {"learning_rate": 2e-5, "epochs": 5, "seq": 2048, "scheduler": "cosine", "batch_size": 6, "accumulation": 2},
    "dpo": {"learning_rate": 5e-7, "epochs": 1, "seq": 2048, "scheduler": "cosine", "beta": 0.05, "batch_size": 2, "accumulation": 2},
}


def _chain(start: str, instruct: str, *, orpo: bool = True) -> dict[str, list[str]]:
    """The paper's DAG: start -> CPT -> SFT -> DPO (and ORPO), each preference model merged with Instruct."""
    parents = {"cpt": [start], "sft": ["cpt"], "dpo": ["sft"], "dpo-slerp": ["dpo", instruct], "merged": ["dpo", instruct]}
    if orpo:
        parents |= {"orpo": ["sft"], "orpo-slerp": ["orpo", instruct]}
    return parents


PAPER = {
    "llama-3.1-8b-base.yaml": {
        "instruct": "meta-llama/Llama-3.1-8B-Instruct",
        "chain": _chain("meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B-Instruct"),
        "recipe": _8B_RECIPE,
        "workers": 8,
        "sft_sources": SFT_SOURCES,
    },
    "llama-3.1-8b-instruct.yaml": {
        "instruct": "meta-llama/Llama-3.1-8B-Instruct",
        "chain": _chain("meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.1-8B-Instruct"),
        # The Instruct chain's ORPO file allows longer pairs (max_length 2500).
        "recipe": _8B_RECIPE | {"orpo": _8B_RECIPE["orpo"] | {"seq": 2500}},
        "workers": 8,
        "sft_sources": SFT_SOURCES,
    },
    "mistral-7b-v0.3.yaml": {
        "instruct": "mistralai/Mistral-7B-Instruct-v0.3",
        "chain": _chain("mistralai/Mistral-7B-v0.3", "mistralai/Mistral-7B-Instruct-v0.3"),
        "recipe": _8B_RECIPE,
        "workers": 8,
        "sft_sources": SFT_SOURCES,
    },
    "smollm-1.7b.yaml": {
        "instruct": "HuggingFaceTB/SmolLM-1.7B-Instruct",
        "chain": _chain("HuggingFaceTB/SmolLM-1.7B", "HuggingFaceTB/SmolLM-1.7B-Instruct", orpo=False),
        "recipe": _SMOLLM_RECIPE,
        "workers": 1,
        "sft_sources": SMOLLM_SFT_SOURCES,
    },
}


def _load(name: str) -> RunConfig:
    return load_config(PAPER_DIR / name)


def _train_stages(config: RunConfig) -> dict[str, TrainStageConfig]:
    return {name: s for name, s in config.stages.items() if isinstance(s, TrainStageConfig)}


def test_the_paper_folder_holds_exactly_the_four_runs():
    assert {p.name for p in PAPER_DIR.glob("*.yaml")} == set(PAPER)
    assert (PAPER_DIR / "README.md").is_file()


def test_every_paper_config_loads_without_touching_the_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("loading a config opened a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for name in PAPER:
        config = _load(name)
        assert isinstance(config, RunConfig)
        assert config.storage == "s3://YOUR-BUCKET/alloylm"  # a placeholder, never a real bucket
        assert config.experiment.startswith("paper-")


@pytest.mark.parametrize("name", sorted(PAPER))
def test_chain_is_the_papers(name):
    config, expected = _load(name), PAPER[name]
    assert {stage: stage_parents(s) for stage, s in config.stages.items()} == expected["chain"]
    order = config.stage_order()
    for stage, parents in expected["chain"].items():
        for parent in parents:
            if parent in config.stages:
                assert order.index(parent) < order.index(stage), (name, parent, stage)
    # Every variant the paper compares is evaluated, the Instruct model among them.
    evaluated = {v.split("=", 1)[-1] for v in config.evaluate.variants}
    assert set(expected["chain"]) | {expected["instruct"]} <= evaluated


@pytest.mark.parametrize("name", sorted(PAPER))
def test_hyperparameters_are_the_papers(name):
    config, expected = _load(name), PAPER[name]
    trained = _train_stages(config)
    assert {s.kind for s in trained.values()} == set(expected["recipe"])
    for stage_name, stage in trained.items():
        recipe, training = expected["recipe"][stage.kind], stage.training
        where = f"{name}: stages.{stage_name}"
        assert training.learning_rate == pytest.approx(recipe["learning_rate"]), where
        assert training.epochs == recipe["epochs"], where
        assert training.lr_scheduler == recipe["scheduler"], where
        assert training.batch_size == recipe["batch_size"], where
        assert training.gradient_accumulation_steps == recipe["accumulation"], where
        seq = config.data.block_size if stage.kind == "cpt" else training.max_length
        assert seq == recipe["seq"], where
        if "beta" in recipe:
            assert stage.beta == pytest.approx(recipe["beta"]), where
        # Full fine-tuning with DeepSpeed ZeRO-3 in bf16, gathered into a plain model on save.
        assert stage.lora is None, where
        assert (stage.deepspeed.stage, stage.deepspeed.precision) == (3, "bf16"), where
        assert stage.deepspeed.gather_16bit_weights_on_save, where
        assert not (stage.deepspeed.offload_optimizer or stage.deepspeed.offload_params), where
        assert training.gradient_checkpointing, where
        assert training.max_grad_norm == 1.0 and config.seed == 42 and training.seed is None, where
        assert (stage.resources.workers, stage.resources.gpus_per_worker) == (expected["workers"], 1), where
        if stage.kind == "sft":
            # The authors' SFT learns whole packed chats (no assistant-only mask).
            assert stage.packing and not stage.assistant_only_loss, where


@pytest.mark.parametrize("name", sorted(PAPER))
def test_data_sets_are_the_papers_lamm_mit_ones(name):
    config, expected = _load(name), PAPER[name]
    sources = {stage: config.datasets[s.data] for stage, s in _train_stages(config).items()}
    assert sources["cpt"].sources == CPT_SOURCES and sources["cpt"].format == "text"
    assert sources["sft"].sources == expected["sft_sources"] and sources["sft"].format == "chat"
    assert sources["dpo"].sources == PREFERENCE_SOURCES and sources["dpo"].format == "preference"
    if "orpo" in sources:
        assert sources["orpo"].sources == PREFERENCE_SOURCES
    for dataset in sources.values():
        for source in dataset.sources:
            assert source.startswith("hf:lamm-mit/") or source in GENERAL_SFT_SOURCES, (name, source)
    # The H4-layout SFT sources are read from their train_sft split; the others from train.
    assert sources["sft"].hf_split == ("train_sft" if name.startswith("smollm") else "train")
    assert sources["cpt"].hf_split == sources["dpo"].hf_split == "train"
    # Evaluation data the user supplies sits under the placeholder bucket, never a real one.
    for dataset in config.datasets.values():
        for source in dataset.sources:
            assert not source.startswith("s3://") or source.startswith("s3://YOUR-BUCKET/"), (name, source)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_merges_use_the_papers_slerp_gradients(name):
    config, instruct = _load(name), PAPER[name]["instruct"]
    merges = {n: s for n, s in config.stages.items() if type(s) is MergeStageConfig}
    assert merges, name
    for stage_name, stage in merges.items():
        assert stage.method == "slerp"
        assert stage.parameters == {"t": PAPER_T}, stage_name
        # The paper's mergekit base_model (t=0) and tokenizer source is the Instruct model.
        assert stage.base == stage.tokenizer_from == instruct, stage_name
        assert stage.parents[1] == instruct and stage.dtype == "bfloat16", stage_name
    searches = [s for s in config.stages.values() if isinstance(s, MergeSearchStageConfig)]
    assert len(searches) == 1, name
    search = searches[0]
    assert search.base == search.tokenizer_from == instruct
    assert search.search.points[0] == {"t": PAPER_T}  # the search starts from the paper's choice
    assert search.resources.num_gpus == 1
    for stage in [*merges.values(), search]:
        assert stage.resources.num_gpus == 1


@pytest.mark.parametrize("name", sorted(PAPER))
def test_search_points_fit_the_search_space(name):
    search = next(s for s in _load(name).stages.values() if isinstance(s, MergeSearchStageConfig)).search
    assert set(search.space) == {"t"}
    t = search.space["t"]
    # the tensors no filter matches (embeddings, norms, lm_head) have a t of their own, searched
    assert (t.anchors, t.filters, t.default) == (5, ["self_attn", "mlp"], "search")
    for point in search.points:
        gradient = point["t"]
        assert set(gradient) == {*t.filters, "default"} and t.low <= gradient["default"] <= t.high, point
        for tensor_filter in t.filters:
            anchors = gradient[tensor_filter]
            assert len(anchors) == t.anchors and all(t.low <= a <= t.high for a in anchors), point
    assert len({yaml.safe_dump(p, sort_keys=True) for p in search.points}) == len(search.points)  # none tried twice


def _merge_search_signature(config: RunConfig) -> set[tuple]:
    """What each merge search searches: the method and the shape of its space."""
    return {
        (s.kind, s.method, yaml.safe_dump({k: v.model_dump() for k, v in s.search.space.items()}, sort_keys=True))
        for s in config.stages.values()
        if isinstance(s, MergeSearchStageConfig)
    }


def test_paper_configs_search_the_same_slerp_gradients_as_the_quickstart():
    quickstart = _merge_search_signature(load_config(QUICKSTART))
    assert len(quickstart) == 1 and next(iter(quickstart))[:2] == ("merge_search", "slerp")
    for name in PAPER:
        assert _merge_search_signature(_load(name)) == quickstart, name


@pytest.mark.parametrize("name", sorted(PAPER))
def test_alloylm_validate_accepts_it(name, capsys):
    # In process: `python -m alloylm.cli validate` as a command is tested in tests/test_cli.py, and
    # each interpreter start here cost 6-7 s of imports (mergekit's, for the merge stages' checks).
    from alloylm.cli import main

    assert main(["validate", str(PAPER_DIR / name)]) == 0, capsys.readouterr().err
    # It prints the resolved config: every default filled in, the same as loading it here.
    assert yaml.safe_load(capsys.readouterr().out) == yaml.safe_load(_load(name).resolved_yaml())


# ---------------------------------------------------------------------------------------------
# configs/science.yaml: the paper's table in miniature, on the built-in world (docs/results/science.md)
# ---------------------------------------------------------------------------------------------

SCIENCE = REPO / "configs" / "science.yaml"


def test_science_config_runs_every_chain_of_the_papers_table():
    config = load_config(SCIENCE)
    chain = {name: stage_parents(stage) for name, stage in config.stages.items()}
    assert chain == {
        "base": [],
        "instruct": ["base"],
        "cpt": ["instruct"],
        "cpt-sft": ["cpt"],
        "cpt-sft-dpo": ["cpt-sft"],
        "cpt-sft-orpo": ["cpt-sft"],
        "cpt-orpo": ["cpt"],
        "sft-direct": ["instruct"],
        "merged-paper": ["cpt-sft-dpo", "instruct"],
        "merged": ["cpt-sft-dpo", "instruct"],
    }
    kinds = {name: stage.kind for name, stage in config.stages.items()}
    assert [kinds[n] for n in ("cpt", "cpt-sft", "cpt-sft-dpo", "cpt-sft-orpo", "cpt-orpo", "sft-direct")] == [
        "cpt", "sft", "dpo", "orpo", "orpo", "sft",
    ]
    # The ablation differs from cpt-sft only in its parent: the same data and training.
    assert config.stages["sft-direct"].training == config.stages["cpt-sft"].training
    assert config.stages["sft-direct"].data == config.stages["cpt-sft"].data
    # The paper's fixed merge (Instruct as t=0) and the search starting from the same gradients.
    paper = config.stages["merged-paper"]
    assert (paper.method, paper.base, paper.parameters) == ("slerp", "instruct", {"t": PAPER_T})
    search = config.stages["merged"].search
    mirrored = {k: ([round(1 - a, 6) for a in v] if isinstance(v, list) else round(1 - v, 6)) for k, v in PAPER_T.items()}
    assert config.stages["merged"].base == "cpt-sft-dpo" and search.points[0] == {"t": mirrored}
    # Larger than the quickstart in model and world, and every variant is evaluated.
    quickstart = load_config(QUICKSTART)
    assert config.builtin.materials > quickstart.builtin.materials
    assert config.stages["base"].from_.init != quickstart.stages["base"].from_.init
    assert set(config.evaluate.variants) == set(config.stages) - {"base"}
