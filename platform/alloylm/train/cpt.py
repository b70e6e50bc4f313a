"""Continued pretraining: causal-LM loss on packed token blocks streamed from Ray Data shards."""

from __future__ import annotations

from typing import Any

import numpy as np

from alloylm.train.data import steps_for


def max_steps(stage, job, world_size: int) -> int:
    # Ray Data's split gives every worker an equal share of the blocks; a step is one micro-batch
    # per worker times the accumulation steps.
    return steps_for(job.data_rows, stage, world_size)


def _collate(batch: dict[str, np.ndarray]) -> dict[str, Any]:
    import torch

    input_ids = torch.as_tensor(np.stack(batch["input_ids"]).astype(np.int64))
    if "attention_mask" in batch and batch["attention_mask"] is not None:
        mask = torch.as_tensor(np.stack([m if m is not None else np.ones(input_ids.shape[1]) for m in batch["attention_mask"]]).astype(np.int64))
    else:
        mask = torch.ones_like(input_ids)
    labels = input_ids.masked_fill(mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def build_trainer(stage, job, model, tokenizer, arguments: dict[str, Any]):
    import ray.train
    from transformers import Trainer, TrainingArguments

    shard = ray.train.get_dataset_shard("train")
    batches = shard.iter_torch_batches(batch_size=stage.training.batch_size, collate_fn=_collate, drop_last=True)
    return Trainer(model=model, args=TrainingArguments(**arguments), train_dataset=batches, processing_class=tokenizer)
