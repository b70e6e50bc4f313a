"""How many optimizer steps a stage trains for (`steps_for`), against hand counts.

Every paper config and the quickstart train by `epochs`; a wrong count trains for a fraction (or a
multiple) of the data without any training test noticing, since those all set `max_steps`.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from alloylm.train.data import steps_for
from alloylm.train.options import TrainingOptions


def stage(**training) -> SimpleNamespace:
    return SimpleNamespace(training=TrainingOptions(**training))


def test_one_worker_one_epoch_is_rows_over_batch_size():
    # 64 rows / 8 per step = 8 steps.
    assert steps_for(64, stage(epochs=1, batch_size=8), 1) == 8


def test_epochs_workers_and_accumulation_multiply_out():
    # 2 epochs over 100 rows = 200 sequences; a step takes 4 per worker x 2 workers x 3 micro-batches
    # = 24 sequences; 200 / 24 = 8.33 -> 9 steps (the last one partial rather than dropped).
    assert steps_for(100, stage(epochs=2, batch_size=4, gradient_accumulation_steps=3), 2) == 9


def test_an_exact_fit_has_no_extra_step():
    # 96 rows / (4 x 2 x 3) = 4 steps exactly.
    assert steps_for(96, stage(epochs=1, batch_size=4, gradient_accumulation_steps=3), 2) == 4
    # 3 epochs of it: 12.
    assert steps_for(96, stage(epochs=3, batch_size=4, gradient_accumulation_steps=3), 2) == 12


def test_more_workers_take_fewer_steps_for_the_same_data():
    one = steps_for(240, stage(epochs=1, batch_size=5, gradient_accumulation_steps=2), 1)
    four = steps_for(240, stage(epochs=1, batch_size=5, gradient_accumulation_steps=2), 4)
    assert (one, four) == (24, 6)  # 240 / 10 and 240 / 40


def test_accumulation_divides_the_steps():
    assert steps_for(120, stage(batch_size=3, gradient_accumulation_steps=1), 2) == 20
    assert steps_for(120, stage(batch_size=3, gradient_accumulation_steps=4), 2) == 5


def test_fractional_epochs():
    # Half an epoch of 100 rows at 10 per step: 5 steps; 1.5 epochs of 10 rows at 4 per step: 15/4 -> 4.
    assert steps_for(100, stage(epochs=0.5, batch_size=10), 1) == 5
    assert steps_for(10, stage(epochs=1.5, batch_size=4), 1) == 4


def test_tiny_data_still_trains_one_step():
    assert steps_for(5, stage(epochs=1, batch_size=8), 1) == 1  # 5/8 -> 1
    assert steps_for(0, stage(epochs=1, batch_size=8), 1) == 1


def test_max_steps_overrides_epochs():
    assert steps_for(10_000, stage(epochs=3, batch_size=1, max_steps=7), 4) == 7


@pytest.mark.parametrize("kind", ["cpt", "sft", "dpo", "orpo"])
def test_every_method_counts_its_steps_from_the_prepared_rows(kind):
    from alloylm.train import STAGE_TRAINERS

    job = SimpleNamespace(data_rows=100)
    # 2 epochs x 100 rows / (4 x 2 workers x 3) = 8.33 -> 9, as above.
    assert STAGE_TRAINERS[kind].max_steps(stage(epochs=2, batch_size=4, gradient_accumulation_steps=3), job, 2) == 9


def test_the_worker_count_is_part_of_a_stage_fingerprint_and_its_cpus_are_not(tmp_path):
    """More workers, a bigger global batch: another model, so a finished stage is not reused for it
    (and an interrupted one does not resume checkpoints written at another world size)."""
    from alloylm.config import validate_config
    from alloylm.train.launcher import stage_fingerprint

    def fp(resources: dict, **training) -> str:
        config = validate_config({
            "experiment": "fp", "storage": str(tmp_path), "tokenizer": {"train": {"vocab_size": 300}},
            "datasets": {"text": {"source": "builtin:general-text"}},
            "stages": {"cpt": {"kind": "cpt", "from": {"init": "pico-llama"}, "data": "text", "resources": resources, "training": training}},
        })
        return stage_fingerprint(config, "cpt", {"init": "pico-llama", "seed": 0}, "data", "tokenizer")

    one = fp({"workers": 1})
    assert fp({"workers": 2}) != one
    assert fp({"workers": 1, "cpus_per_worker": 2}) == one
    assert fp({"workers": 1}, logging_steps=1) == one  # logging, not learning


def test_cosine_with_min_lr_needs_its_floor_and_the_trainer_gets_it(tmp_path):
    """The bug this guards: `lr_scheduler: cosine_with_min_lr` was accepted and then failed inside
    train() on every worker, since transformers needs its floor and none was passed."""
    from pydantic import ValidationError
    from transformers import TrainingArguments
    from transformers.optimization import get_scheduler

    from alloylm.train.worker import StageJob, common_arguments

    with pytest.raises(ValidationError, match="cosine_with_min_lr needs min_lr_rate"):
        TrainingOptions(lr_scheduler="cosine_with_min_lr")
    with pytest.raises(ValidationError, match="min_lr_rate is used by lr_scheduler cosine_with_min_lr only"):
        TrainingOptions(min_lr_rate=0.1)
    raw = {"kind": "cpt", "from": {"init": "pico-llama"}, "data": "text",
           "training": {"lr_scheduler": "cosine_with_min_lr", "min_lr_rate": 0.1, "learning_rate": 1.0}}
    from alloylm.config import TRAIN_STAGES

    cpt = TRAIN_STAGES["cpt"].model_validate(raw)
    job = StageJob(stage_name="cpt", stage=raw, seed=0, trust_remote_code=False, tokenizer_uri="t", data_uri="d",
                   parent_kind="preset", parent="pico-llama", output_uri=str(tmp_path / "out"), data_rows=10)
    arguments = common_arguments(job, cpt, str(tmp_path), 10)
    args = TrainingArguments(**{**arguments, "deepspeed": None, "ddp_backend": None, "report_to": []})
    import torch

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = get_scheduler(
        args.lr_scheduler_type, optimizer, num_warmup_steps=0, num_training_steps=10, scheduler_specific_kwargs=args.lr_scheduler_kwargs
    )
    for _ in range(10):
        optimizer.step()
        schedule.step()
    assert schedule.get_last_lr()[0] == pytest.approx(0.1)


def test_lora_adapters_start_from_the_stage_seed():
    """The bug this guards: the adapters were initialised before anything was seeded."""
    import torch

    from alloylm.config import TRAIN_STAGES
    from alloylm.models.presets import build_model
    from alloylm.models.tokenizer import train_tokenizer
    from alloylm.train.worker import apply_lora

    tokenizer = train_tokenizer(["some text to learn a few merges from"] * 20, vocab_size=300)
    stage = TRAIN_STAGES["cpt"].model_validate({"kind": "cpt", "from": {"init": "pico-llama"}, "data": "text", "lora": {"r": 2}})

    def adapters(seed: int, state_before: int) -> dict:
        model = build_model("pico-llama", tokenizer, seed=0)
        torch.manual_seed(state_before)  # whatever state the process is in when the stage starts
        model = apply_lora(model, stage, seed)
        return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_A" in k}

    first, again, other = adapters(1, 100), adapters(1, 200), adapters(2, 100)
    assert first and all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_a_bf16_parent_is_fully_fine_tuned_in_float32(tmp_path):
    """transformers 5 loads a bf16 checkpoint (the Hub's Llama, a DeepSpeed bf16 stage) as bf16 and
    nothing cast it back: `precision: fp32` (or DDP's bf16 autocast) trained bf16 weights. DeepSpeed
    bf16 casts and keeps fp32 master weights itself, and LoRA's base is frozen: saved dtype."""
    import torch

    from alloylm.config import TRAIN_STAGES
    from alloylm.models.loading import save_model
    from alloylm.models.presets import build_model
    from alloylm.models.tokenizer import train_tokenizer
    from alloylm.train.worker import StageJob, _load_parent

    tokenizer = train_tokenizer(["some text to learn a few merges from"] * 20, vocab_size=300)
    save_model(build_model("pico-llama", tokenizer, seed=0).to(torch.bfloat16), tokenizer, str(tmp_path / "parent"))

    def loaded_dtype(**options) -> torch.dtype:
        raw = {"kind": "sft", "from": str(tmp_path / "parent"), "data": "chat", **options}
        TRAIN_STAGES["sft"].model_validate(raw)
        job = StageJob(stage_name="s", stage=raw, seed=0, trust_remote_code=False, tokenizer_uri="unused", data_uri="unused", parent_kind="model",
                       parent=str(tmp_path / "parent"), output_uri="unused", data_rows=1)
        return {p.dtype for p in _load_parent(job, tokenizer).parameters()}.pop()

    assert loaded_dtype() == torch.float32
    assert loaded_dtype(deepspeed={"stage": None, "precision": "bf16"}, resources={"gpus_per_worker": 1}) == torch.float32  # DDP autocast: fp32 weights
    assert loaded_dtype(deepspeed={"stage": 2, "precision": "bf16"}) == torch.bfloat16
    assert loaded_dtype(lora={"r": 2}) == torch.bfloat16
