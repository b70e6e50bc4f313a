"""Continued pretraining: causal-LM loss on packed token blocks streamed from Ray Data shards."""

from __future__ import annotations

import itertools
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


def block_collate():
    """`_collate` as Ray Data's `iter_torch_batches` takes it since Ray 2.47: a `NumpyBatchCollateFn`
    (a plain function still works but is deprecated, with a warning in every CPT worker)."""
    from ray.data.collate_fn import NumpyBatchCollateFn

    class BlockCollate(NumpyBatchCollateFn):
        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
            return _collate(batch)

    return BlockCollate()


# Blocks a worker shuffles at a time (Ray Data's local shuffle buffer): every block of a shard up
# to this many, so a small corpus is fully reshuffled each epoch; a bigger one in windows this
# size (a window of 4096 blocks of 2048 tokens is 32 MiB of int32).
SHUFFLE_BUFFER_BLOCKS = 4096


def epoch_shuffled_batches(shard, batch_size: int, seed: int):
    """The shard's blocks in batches, epoch after epoch without end, each epoch reshuffled with seed
    `seed + epoch`; the Trainer stops at its `max_steps`.

    Packed blocks come in document order, so unshuffled every batch holds consecutive blocks of one
    or two documents, in the same order each epoch; on the built-in corpus that alone left a
    tiny-llama's CPT loss at 0.47 where shuffled training reaches 0.24, and its knowledge of the facts
    at chance (docs/results/world-tuning.md). Ray's `prepare_trainer` only hands Ray iterables of
    `_IterableFromIterator` to the Trainer, hence that class.

    One stream for the whole training, not one `iter()` per epoch: the Trainer sees a data set
    without a length as one epoch of `max_steps` steps, and a run resumed from a checkpoint at
    step S skips the stream's first S x gradient_accumulation_steps batches. Over one stream that
    lands where the interrupted run was (epoch k, its order, batch r); with an `iter()` per epoch it
    replayed the first epoch's order from its start and counted on from there. It also keeps every
    optimizer step at `gradient_accumulation_steps` batches: an epoch's end no longer cuts one short.
    """
    from ray.data.iterator import _IterableFromIterator

    collate = block_collate()

    def batches():
        for epoch in itertools.count():
            empty = True
            for batch in shard.iter_torch_batches(
                batch_size=batch_size,
                collate_fn=collate,
                drop_last=True,
                local_shuffle_buffer_size=SHUFFLE_BUFFER_BLOCKS,
                local_shuffle_seed=seed + epoch,
            ):
                empty = False
                yield batch
            if empty:  # the stage checks this before training; an endless stream must not spin on it
                raise ValueError(f"this worker's share of the CPT data holds less than one batch of {batch_size} blocks")

    return _IterableFromIterator(batches)


def data_epoch_callback(batches_per_epoch: int, accumulation: int):
    """A Trainer callback that sets `state.epoch` (what `epoch` in the logs and checkpoints says) to
    the passes over the data so far. Over one stream of unknown length the Trainer counts its
    `max_steps` as one epoch, so it would log the fraction of training done instead."""
    from transformers import TrainerCallback

    class DataEpoch(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # before the step's log and save
            state.epoch = state.global_step * accumulation / max(1, batches_per_epoch)

    return DataEpoch()


def build_trainer(stage, job, model, tokenizer, arguments: dict[str, Any]):
    import ray.train
    from transformers import Trainer, TrainingArguments

    shard = ray.train.get_dataset_shard("train")
    batches = epoch_shuffled_batches(shard, stage.training.batch_size, int(arguments["data_seed"]))
    trainer = Trainer(model=model, args=TrainingArguments(**arguments), train_dataset=batches, processing_class=tokenizer)
    # Ray Data's split gives each worker rows // world_size blocks (equal=True); drop_last batches them.
    per_worker = job.data_rows // ray.train.get_context().get_world_size()
    trainer.add_callback(data_epoch_callback(per_worker // stage.training.batch_size, stage.training.gradient_accumulation_steps))
    return trainer
