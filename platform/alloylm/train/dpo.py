"""Direct preference optimisation with TRL's DPOTrainer.

The reference model is the parent, loaded a second time as the policy was (with LoRA, TRL uses the
adapter-free base, so no second copy is needed).
"""

from __future__ import annotations

from typing import Any

from alloylm.train.data import read_prepared_table, steps_for

PREFERENCE_COLUMNS = ["prompt", "chosen", "rejected"]


def max_steps(stage, job, world_size: int) -> int:
    return steps_for(job.data_rows, stage, world_size)


def build_trainer(stage, job, model, tokenizer, arguments: dict[str, Any]):
    import datasets
    from trl import DPOConfig, DPOTrainer

    table = read_prepared_table(job.data_uri, PREFERENCE_COLUMNS)
    args = DPOConfig(
        **arguments, beta=stage.beta, loss_type=stage.losses, loss_weights=stage.loss_weights, max_length=stage.training.max_length
    )
    # Given, not left to TRL: TRL would load the reference from the policy's `_name_or_path`, without
    # the run's trust_remote_code, and a preset parent (`from: {init: ...}`) has no path to load.
    reference = None if stage.lora is not None else _reference_model(job, tokenizer)
    return DPOTrainer(model=model, ref_model=reference, args=args, train_dataset=datasets.Dataset(table), processing_class=tokenizer)


def _reference_model(job, tokenizer):
    from alloylm.train.worker import _load_parent  # the worker's own loading: presets seeded alike

    return _load_parent(job, tokenizer)
