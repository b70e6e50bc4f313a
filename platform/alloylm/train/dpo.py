"""Direct preference optimisation with TRL's DPOTrainer.

The reference model is the parent: TRL copies the model it is given before training (or, with
LoRA, uses the adapter-free base, so no copy is needed).
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
    return DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset(table), processing_class=tokenizer)
