"""`alloylm plan`: parameter counts on the meta device, DeepSpeed's model-state estimates, activations, fits and fixes.

No Ray, no weights: models are built on the meta device from presets and the shipped shapes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from alloylm.cli import main
from alloylm.config import load_config
from alloylm.errors import StageError
from alloylm.models.presets import PRESETS, preset_config
from alloylm.plan import (
    ParameterCount,
    Shape,
    activation_bytes,
    check_stages_fit,
    count_parameters,
    model_config_from_source,
    model_states,
    plan_run,
    plan_stage,
    shipped_shape,
)
from alloylm.plan_config import ClusterConfig
from alloylm.train.options import LoraOptions

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "configs" / "paper"
LLAMA = PAPER / "llama-3.1-8b-base.yaml"
GIB = 1024**3


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_counts_on_the_meta_device_equal_the_built_model(name):
    config = preset_config(name, vocab_size=2048)
    model = AutoModelForCausalLM.from_config(config)
    count = count_parameters(config)
    assert count.total == count.trainable == sum(p.numel() for p in model.parameters())
    assert count.largest_layer == max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())


def test_lora_adapters_are_counted_as_peft_builds_them():
    from peft import LoraConfig, get_peft_model

    config = preset_config("tiny-llama", vocab_size=2048)
    lora = LoraOptions(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(
        AutoModelForCausalLM.from_config(config),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    trainable, total = model.get_nb_trainable_parameters()
    count = count_parameters(config, lora)
    assert (count.trainable, count.total) == (trainable, total)
    # q_proj (64 -> 64) and v_proj (64 -> 32) in 2 layers: r x (in + out) each.
    assert count.trainable == 2 * (4 * (64 + 64) + 4 * (64 + 32))


def test_paper_models_are_counted_offline_from_their_shipped_shapes():
    llama = count_parameters(model_config_from_source("meta-llama/Llama-3.1-8B"))
    assert llama.total == 8_030_261_248  # Llama-3.1-8B's published 8.03B
    assert llama.largest_layer == 128_256 * 4096  # the (untied) embedding
    mistral = count_parameters(model_config_from_source("mistralai/Mistral-7B-v0.3"))
    assert mistral.total == 7_248_023_552
    smol = count_parameters(model_config_from_source("HuggingFaceTB/SmolLM-1.7B"))
    # Tied embeddings are counted once: 49152 x 2048 + 24 layers + the final norm.
    assert smol.total == 49152 * 2048 + 24 * (4 * 2048 * 2048 + 3 * 2048 * 8192 + 2 * 2048) + 2048


def test_every_model_named_in_the_paper_configs_has_a_shipped_shape():
    ids = set()
    for path in PAPER.glob("*.yaml"):
        ids |= set(re.findall(r"(?:meta-llama|mistralai|HuggingFaceTB)/[A-Za-z0-9._-]+", path.read_text()))
    models = {i for i in ids if re.search(r"Llama-3\.1-8B|Mistral-7B|SmolLM-1\.7B", i)}
    assert len(models) == 6
    assert [m for m in models if shipped_shape(m) is None] == []
    assert 'alloylm = ["models/shapes/*.json"]' in (REPO / "pyproject.toml").read_text()  # shipped in the wheel


def test_a_local_model_folder_uses_its_own_config(tmp_path):
    config = preset_config("small-llama", vocab_size=1000)
    config.save_pretrained(tmp_path)
    assert count_parameters(model_config_from_source(str(tmp_path))) == count_parameters(config)


LLAMA_8B = ParameterCount(total=8_030_261_248, trainable=8_030_261_248, largest_layer=128_256 * 4096)


def test_zero3_model_states_are_deepspeeds_estimate_and_shrink_with_more_gpus():
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    per_gpu = {}
    for workers in (8, 32):
        memory = model_states(LLAMA_8B, zero_stage=3, precision="bf16", workers=workers, gpus_per_node=8)
        _, expected, _ = estimate_zero3_model_states_mem_needs(
            LLAMA_8B.total, LLAMA_8B.largest_layer, 8, workers // 8, cpu_offload=False, cpu_offload_params=False
        )
        assert memory.parameters + memory.gradients + memory.optimizer == pytest.approx(expected)
        assert memory.optimizer == pytest.approx(12 * LLAMA_8B.total / workers)  # fp32 master + Adam, sharded
        per_gpu[workers] = memory.total
    assert per_gpu[32] < per_gpu[8] / 2


def test_zero2_and_ddp_shard_what_they_should():
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    zero2 = model_states(LLAMA_8B, zero_stage=2, precision="bf16", workers=8)
    assert zero2.total == pytest.approx(estimate_zero2_model_states_mem_needs(LLAMA_8B.total, 8, 1, cpu_offload=False)[1])
    assert zero2.parameters == 2 * LLAMA_8B.total  # ZeRO-2 keeps every 16-bit weight on every GPU
    zero1 = model_states(LLAMA_8B, zero_stage=1, precision="bf16", workers=8)
    assert zero1.gradients > zero2.gradients and zero1.optimizer == zero2.optimizer
    ddp = model_states(LLAMA_8B, zero_stage=None, precision="bf16", workers=8)
    assert ddp.total == 16 * LLAMA_8B.total  # fp32 weights, gradients and Adam under AMP, nothing sharded
    # fp32: ZeRO keeps an fp32 master partition of its own besides Adam's states; ZeRO 0 does not.
    assert model_states(LLAMA_8B, zero_stage=2, precision="fp32", workers=2).optimizer == 12 * LLAMA_8B.total / 2
    assert model_states(LLAMA_8B, zero_stage=3, precision="fp32", workers=2).optimizer == 12 * LLAMA_8B.total / 2
    assert model_states(LLAMA_8B, zero_stage=0, precision="fp32", workers=2).optimizer == 8 * LLAMA_8B.total


def test_offload_moves_optimizer_states_to_cpu():
    on_gpu = model_states(LLAMA_8B, zero_stage=3, precision="bf16", workers=8)
    offloaded = model_states(LLAMA_8B, zero_stage=3, precision="bf16", workers=8, offload_optimizer=True)
    assert on_gpu.optimizer > 0 and on_gpu.cpu < offloaded.cpu
    assert offloaded.optimizer == 0 and offloaded.gradients < on_gpu.gradients
    both = model_states(LLAMA_8B, zero_stage=3, precision="bf16", workers=8, offload_optimizer=True, offload_params=True)
    assert both.total == pytest.approx(4 * LLAMA_8B.largest_layer)  # DeepSpeed: only the largest layer stays


def test_lora_keeps_optimizer_states_for_the_adapters_only():
    lora = ParameterCount(total=LLAMA_8B.total + 41_943_040, trainable=41_943_040, largest_layer=LLAMA_8B.largest_layer)
    memory = model_states(lora, zero_stage=3, precision="bf16", workers=8)
    assert memory.optimizer == pytest.approx(12 * 41_943_040 / 8)
    assert memory.total < model_states(LLAMA_8B, zero_stage=3, precision="bf16", workers=8).total / 4


def test_gradient_checkpointing_shrinks_activations():
    shape = Shape.of(model_config_from_source("meta-llama/Llama-3.1-8B"))
    kwargs = dict(seq_len=3072, micro_batch=6, precision="bf16")
    full = activation_bytes(shape, checkpointing=False, **kwargs)
    checkpointed = activation_bytes(shape, checkpointing=True, **kwargs)
    logits = 3072 * 6 * 128_256 * 10
    # Korthikanti et al.: 34·s·b·h per layer without recomputation, 2·s·b·h (+ one layer) with it.
    assert full == 34 * 3072 * 6 * 4096 * 32 + logits
    assert checkpointed == 2 * 3072 * 6 * 4096 * 32 + 34 * 3072 * 6 * 4096 + logits
    assert activation_bytes(shape, checkpointing=False, attention="eager", **kwargs) > full  # the s² scores


def test_paper_llama_plan_fits_on_eight_80gb_gpus():
    plan = plan_run(load_config(LLAMA), ClusterConfig(gpus=8, gpu_memory_gib=80))
    rows = {row.name: row for row in plan.stages}
    assert set(rows) >= {"cpt", "sft", "dpo", "orpo", "dpo-slerp", "orpo-slerp", "merged", "serve:merged"}
    assert all(row.fits for row in plan.stages), [(r.name, r.why) for r in plan.stages if not r.fits]
    assert rows["cpt"].parameters == LLAMA_8B.total
    # The DPO reference model adds a sharded copy of the weights; its forward pass adds 2·N per token.
    assert rows["dpo"].memory_gib["parameters"] > rows["orpo"].memory_gib["parameters"]
    assert rows["dpo"].hours_per_billion_tokens == pytest.approx(rows["orpo"].hours_per_billion_tokens * 8 / 6)


def test_a_stage_that_cannot_fit_is_reported_with_settings_that_would_fit():
    overrides = ["stages.cpt.deepspeed.stage=0", "stages.cpt.training.gradient_checkpointing=false"]
    config = load_config(LLAMA, overrides)
    cluster = ClusterConfig(gpus=8, gpu_memory_gib=80)
    row = plan_stage(config, "cpt", cluster)
    assert row.fits is False and "GiB per GPU" in row.why
    assert row.fixes, "no fix suggested"
    fix = row.fixes[0].split("  (")[0].split()
    assert plan_stage(load_config(LLAMA, overrides + fix), "cpt", cluster).fits is True
    with pytest.raises(StageError, match=r"stage 'cpt' does not fit: .* Settings that would fit: stages\.cpt\."):
        check_stages_fit(config, ["cpt"], cluster)
    check_stages_fit(config, ["cpt"], ClusterConfig(gpus=8))  # GPU memory unknown: not checked


def test_tokens_come_from_a_prepared_data_sets_manifest(tmp_path):
    config = load_config(REPO / "configs" / "quickstart.yaml", [f"storage={tmp_path}"])
    data = tmp_path / config.experiment / "data" / config.stages["cpt"].data
    data.mkdir(parents=True)
    (data / "manifest.json").write_text(json.dumps({"counts": {"tokens_out": 1000}}))
    row = plan_stage(config, "cpt", ClusterConfig(gpus=0))
    assert row.tokens == int(1000 * config.stages["cpt"].training.epochs) and "manifest" in row.tokens_from
    steps = plan_stage(load_config(REPO / "configs" / "quickstart.yaml", ["stages.cpt.training.max_steps=10"]), "cpt", ClusterConfig(gpus=0))
    tr = config.stages["cpt"].training
    assert steps.tokens == 10 * tr.batch_size * tr.gradient_accumulation_steps * config.stages["cpt"].resources.workers * config.data.block_size


def test_cli_plan_prints_every_stage_and_json(capsys):
    assert main(["-q", "plan", str(LLAMA), "--gpus", "8", "--gpu-memory-gib", "80"]) == 0
    out = capsys.readouterr().out
    for name in load_config(LLAMA).stages:
        assert re.search(rf"^\| {re.escape(name)} \|", out, re.M), name
    assert "8 GPU(s) of 80 GiB" in out
    assert main(["-q", "plan", str(LLAMA), "--gpus", "8", "--gpu-memory-gib", "80", "--nodes", "4", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["cluster"]["nodes"] == 4 and {s["name"] for s in plan["stages"]} >= set(load_config(LLAMA).stages)
    assert main(["-q", "plan", str(LLAMA), "--mfu", "2"]) == 2  # a bad flag is a usage error


def test_cluster_section_is_read_and_flags_override_it(capsys):
    assert main(["-q", "plan", str(LLAMA), "cluster.gpus=4", "cluster.gpu_memory_gib=40", "--gpu-memory-gib", "24", "--json"]) == 0
    cluster = json.loads(capsys.readouterr().out)["cluster"]
    assert (cluster["gpus"], cluster["gpu_memory_gib"]) == (4, 24)


def test_run_refuses_a_stage_that_cannot_fit_only_where_gpu_memory_is_known():
    from alloylm.pipeline import check_stage_memory

    too_big = ["stages.cpt.deepspeed.stage=0", "stages.cpt.training.gradient_checkpointing=false"]
    config = load_config(LLAMA, too_big + ["cluster.gpu_memory_gib=80"])
    with pytest.raises(StageError, match=r"stage 'cpt' does not fit: \d+\.\d GiB per GPU > 72\.0 GiB usable"):
        check_stage_memory(config, ["cpt", "sft"], gpus=8)
    check_stage_memory(config, ["sft"], gpus=8)  # the others fit
    check_stage_memory(config, ["cpt"], gpus=0)  # a CPU cluster: skipped
    check_stage_memory(load_config(LLAMA, too_big), ["cpt"], gpus=8)  # no cluster.gpu_memory_gib: skipped


@pytest.mark.slow
@pytest.mark.parametrize("stage", [None, 1, 2, 3])
def test_model_state_estimate_is_within_10_percent_of_a_real_deepspeed_engine(stage, monkeypatch):
    """small-llama, 2 gloo workers, fp32 on CPU: the bytes of weights and optimizer states rank 0 holds after a step."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import plan_accuracy

    held = plan_accuracy.measure(stage, preset="small-llama", workers=2)
    estimated = plan_accuracy.estimate(stage, preset="small-llama", workers=2)
    for key in ("weights", "optimizer"):
        assert estimated[key] == pytest.approx(held[key], rel=0.10), (key, held, estimated)


def test_alloylm_plan_json_on_stdout_is_clean_json():
    """DeepSpeed logs to stdout at import: `alloylm plan --json | jq` must still parse."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(REPO / "platform")}
    result = subprocess.run(
        [sys.executable, "-m", "alloylm.cli", "-q", "plan", str(LLAMA), "--gpus", "8", "--gpu-memory-gib", "80", "--json"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert {s["name"] for s in json.loads(result.stdout)["stages"]} >= set(load_config(LLAMA).stages)
