"""Learning guard: the method has to learn, not only run.

A small built-in world goes through the real stages (Ray Train, the HF/TRL trainers, the data
pipeline, the evaluation suite): CPT of a fresh tiny-llama on the domain documents, then SFT on Q&A
about the *training* facts; and the paper's ablation, the same SFT without CPT. The benchmark asks
about the held-out facts, which only the CPT documents state, with distractors that are other
held-out facts' values (equally exposed), scored in the cloze formulation.

A silent breakage (CPT data not reaching the model, SFT that overwrites what CPT stored, a
benchmark whose answers leak or whose options are unbalanced) moves one of the two numbers across
its bound: the chain far above chance, the ablation near it.

What this guard does not see: SFT that learns nothing. Scored in the cloze formulation, the CPT
model alone answers 0.730 of these 63 items (measured with this config, model seed 0), so a chain
whose SFT changed nothing would still pass. `test_direction.py::
test_sft_lowers_the_assistant_loss_and_the_paper_knobs_act` catches that one: SFT must lower the
loss on held-out chats' assistant tokens.
"""

from __future__ import annotations

import hashlib
import json

import pytest

from alloylm import storage
from alloylm.config import validate_config
from alloylm.pipeline import run_pipeline

pytestmark = pytest.mark.slow

CHANCE = 0.25


def _guard_config(storage_uri: str, cpt_epochs: int = 20):
    training = {"learning_rate": 2.0e-3, "batch_size": 8, "lr_scheduler": "cosine", "warmup_ratio": 0.05}
    # The quickstart's SFT: four question wordings per fact at 3e-4. With two wordings at 1e-3 the
    # chain scored 0.556 and 0.683 (model seeds 0 and 1) against the bound of 0.5; with these, 0.762
    # and 0.698, the ablation 0.175 both times, in the same time (63 items each).
    sft = {"epochs": 4, "learning_rate": 3.0e-4, "batch_size": 8}
    return validate_config(
        {
            "experiment": "guard",
            "storage": storage_uri,
            "builtin": {
                "materials": 12, "documents_per_material": 12, "benchmark_fraction": 0.5, "qa_per_fact": 4,
                "general_documents": 40, "general_chats": 20, "heldout_documents": 4, "general_heldout_documents": 4,
            },
            "tokenizer": {"train": {"vocab_size": 1024}},
            "datasets": {
                "domain-text": {"source": "builtin:biomaterials-corpus"},
                "domain-qa": {"source": "builtin:biomaterials-qa"},
                "domain-benchmark": {"source": "builtin:biomaterials-benchmark"},
            },
            "data": {"block_size": 128, "tokenizer_actors": 1},
            "stages": {
                "cpt": {
                    "kind": "cpt", "from": {"init": "tiny-llama"}, "data": "domain-text", "training": {"epochs": cpt_epochs, **training},
                    # as the quickstart's: 2 workers under ZeRO-2, each shuffling its own shard
                    "resources": {"workers": 2, "cpus_per_worker": 1}, "deepspeed": {"stage": 2},
                },
                "sft": {"kind": "sft", "from": "cpt", "data": "domain-qa", "training": sft},
                "sft-direct": {"kind": "sft", "from": {"init": "tiny-llama"}, "data": "domain-qa", "training": sft},
            },
            "evaluate": {
                "variants": ["sft", "sft-direct"],
                "suites": {
                    "multiple_choice": {"formulation": "cloze"},
                    "short_answer": {"enabled": False},
                    "domain_perplexity": {"enabled": False},
                    "general_perplexity": {"enabled": False},
                },
            },
        }
    )


def _digest(path: str) -> str:
    return hashlib.sha256(storage.read_bytes(path)).hexdigest()


def test_the_chain_learns_the_held_out_facts_the_ablation_does_not_and_a_rerun_is_identical(ray_cluster, tmp_path):
    config = _guard_config(str(tmp_path / "runs"))
    summary = run_pipeline(config)
    assert summary.ok, summary.to_json()
    results = {
        variant: json.loads(storage.read_text(storage.join(config.run_uri, "eval", variant, "results.json")))["suites"]["multiple_choice"]["metrics"]
        for variant in ("sft", "sft-direct")
    }
    chain, ablation = results["sft"], results["sft-direct"]
    assert chain["items"] >= 40 and chain["chance"] == pytest.approx(CHANCE)
    assert chain["accuracy"] >= 0.5, results
    assert ablation["accuracy"] <= 0.4, results

    # Determinism: the same config in two storages gives the same tokenizer, data and CPT weights,
    # byte for byte (2 workers, shuffled blocks, ZeRO-2), on one machine. Two epochs (each in
    # another block order) rather than twenty: the same code path, in a fraction of the time.
    first, again = (_guard_config(str(tmp_path / name), cpt_epochs=2) for name in ("first", "again"))
    assert run_pipeline(first, only=["cpt"]).ok and run_pipeline(again, only=["cpt"]).ok
    for part in ("tokenizer/tokenizer.json", "stages/cpt/model.safetensors"):
        assert _digest(storage.join(again.run_uri, part)) == _digest(storage.join(first.run_uri, part)), part
    losses = [
        [row.get("loss") for row in map(json.loads, storage.read_text(storage.join(run.run_uri, "stages/cpt/metrics.jsonl")).splitlines())]
        for run in (first, again)
    ]
    assert len(losses[0]) > 2 and losses[0] == losses[1]
