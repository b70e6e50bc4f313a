"""Supervised fine-tuning on chats with TRL's SFTTrainer (assistant-only loss by default)."""

from __future__ import annotations

from typing import Any

from alloylm.train.data import read_prepared_table, steps_for


def max_steps(stage, job, world_size: int) -> int:
    return steps_for(job.data_rows, stage, world_size)


def build_trainer(stage, job, model, tokenizer, arguments: dict[str, Any]):
    import datasets
    from trl import SFTConfig, SFTTrainer

    table = read_prepared_table(job.data_uri, ["messages"])
    args = SFTConfig(
        **arguments,
        max_length=stage.training.max_length,
        assistant_only_loss=stage.assistant_only_loss,
        packing=stage.packing,
        dataset_num_proc=None,
    )
    return SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset(table), processing_class=tokenizer)
