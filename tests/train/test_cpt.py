"""CPT's batches: every block once per epoch, in an order that changes from epoch to epoch.

Packed blocks arrive in document order. Fed in that order, each batch held consecutive blocks of
one document, the same every epoch, and the quickstart's CPT learned none of the facts; so the
shuffle is a decision a test must pin, not a detail.
"""

from __future__ import annotations

import numpy as np
import pytest

from alloylm.train.cpt import epoch_shuffled_batches


def _epochs(iterable, count: int, blocks: int = 64, batch_size: int = 8) -> list[list[int]]:
    """The first token of every block, batch after batch, for the stream's first `count` epochs."""
    stream = iter(iterable)
    return [[int(row[0]) for _ in range(blocks // batch_size) for row in next(stream)["input_ids"]] for _ in range(count)]


def test_blocks_are_reshuffled_every_epoch_and_the_same_seed_repeats_the_orders(ray_cluster):
    import ray.data

    blocks = [{"input_ids": np.full(4, i, dtype=np.int32)} for i in range(64)]
    dataset = ray.data.from_items(blocks, override_num_blocks=4)
    first = _epochs(epoch_shuffled_batches(dataset.iterator(), batch_size=8, seed=3), 3)
    for order in first:
        assert sorted(order) == list(range(64))  # every block once (64 divides into batches of 8)
        assert order != list(range(64))  # not the order they were packed in
    assert len({tuple(order) for order in first}) == 3  # another order each epoch
    again = _epochs(epoch_shuffled_batches(dataset.iterator(), batch_size=8, seed=3), 3)
    assert again == first  # the run's seed fixes them
    other = _epochs(epoch_shuffled_batches(dataset.iterator(), batch_size=8, seed=4), 1)
    assert other[0] != first[0]


def test_a_resumed_run_continues_the_stream_where_the_interrupted_one_was(ray_cluster):
    """The Trainer resumes from a checkpoint at step S by skipping the first S x accumulation
    batches of a fresh `iter()`. One stream across the epochs makes that the interrupted run's
    position: epoch 1, batch 3 here. With an `iter()` per epoch, the skip ran out at the end of the
    first epoch's order and training went on with the second epoch's from its start."""
    import itertools

    import ray.data

    blocks = [{"input_ids": np.full(4, i, dtype=np.int32)} for i in range(64)]
    dataset = ray.data.from_items(blocks, override_num_blocks=4)
    batches = epoch_shuffled_batches(dataset.iterator(), batch_size=8, seed=3)
    first = lambda batch: [int(row[0]) for row in batch["input_ids"]]  # noqa: E731
    whole = [first(batch) for batch in itertools.islice(iter(batches), 16)]  # two epochs of 8 batches
    assert len(whole) == 16  # one stream: the second epoch follows the first
    resumed = [first(batch) for batch in itertools.islice(iter(batches), 11, 16)]  # skip 11: epoch 1, batch 3
    assert resumed == whole[11:16]
    assert sorted(x for batch in whole[8:] for x in batch) == list(range(64))  # the second epoch, whole
    # A share of less than one batch ends the stream with an error instead of looping on nothing.
    few = epoch_shuffled_batches(ray.data.from_items(blocks[:5]).iterator(), batch_size=8, seed=3)
    with pytest.raises(ValueError, match="less than one batch of 8"):
        next(iter(few))


def test_blocks_reach_the_trainer_in_file_order_when_a_later_file_is_read_first(ray_cluster, tmp_path):
    """The launcher's CPT data set and Ray Train ingest options keep the files' order. The shuffle
    permutes blocks in the order they arrive, so a packed tail overtaking the blocks before it gave a
    run another epoch order than the last run. Here the first file's read is made slow: without the
    order kept, the tail came first in 2 of 3 reads (measured)."""
    import time

    import pyarrow as pa
    import pyarrow.parquet as pq

    from alloylm.train.launcher import cpt_blocks, ingest_config

    shards = tmp_path / "data" / "shards"
    shards.mkdir(parents=True)
    pq.write_table(pa.table({"input_ids": [[i] * 128 for i in range(150)]}), shards / "part-000000.parquet")
    pq.write_table(pa.table({"input_ids": [[150] * 128]}), shards / "tail.parquet")

    def slow_first_file(batch):
        if len(batch["input_ids"]) > 1:
            time.sleep(1)
        return batch

    for _ in range(3):
        dataset = cpt_blocks(str(tmp_path / "data")).map_batches(slow_first_file, batch_size=None)
        (split,) = ingest_config().configure({"train": dataset}, world_size=1, worker_handles=None, worker_node_ids=None)
        order = [int(row[0]) for batch in split["train"].iter_batches(batch_size=None) for row in batch["input_ids"]]
        assert order == list(range(151))


def test_a_padded_tail_block_trains_on_its_text_only(ray_cluster, tmp_path):
    """`data.tail: pad` pads the last block and marks the padding in `attention_mask` (in the tail
    file alone). CPT read only `input_ids`, so it trained on the padding as text; the mask now reaches
    the collator and the padded positions get no loss."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from alloylm.train.cpt import block_collate
    from alloylm.train.launcher import cpt_blocks

    shards = tmp_path / "data" / "shards"
    shards.mkdir(parents=True)
    pq.write_table(pa.table({"input_ids": pa.array([[i + 1] * 8 for i in range(3)], pa.list_(pa.int32()))}), shards / "part-000000.parquet")
    mask = [1, 1, 1, 0, 0, 0, 0, 0]
    tail = pa.table({"input_ids": pa.array([[7, 7, 7, 0, 0, 0, 0, 0]], pa.list_(pa.int32())), "attention_mask": pa.array([mask], pa.list_(pa.int8()))})
    pq.write_table(tail, shards / "tail.parquet")
    (batch,) = cpt_blocks(str(tmp_path / "data")).iter_torch_batches(batch_size=4, collate_fn=block_collate())
    assert batch["attention_mask"].tolist()[:3] == [[1] * 8] * 3 and batch["attention_mask"].tolist()[3] == mask
    assert batch["labels"].tolist()[3] == [7, 7, 7, -100, -100, -100, -100, -100]
    assert batch["labels"].tolist()[:3] == batch["input_ids"].tolist()[:3]
    # A data set without a padded tail reads as before: input_ids alone, every token trained on.
    (tmp_path / "data" / "shards" / "tail.parquet").unlink()
    (batch,) = cpt_blocks(str(tmp_path / "data")).iter_torch_batches(batch_size=4, collate_fn=block_collate())
    assert batch["labels"].tolist() == batch["input_ids"].tolist()


def test_a_cpt_stage_trained_on_a_padded_tail_before_the_mask_is_not_up_to_date():
    """The mask changed what CPT learns from a padded tail, not the data set: a CPT stage on data
    with padding gets a new fingerprint, so one trained before (on the padding) is retrained, not
    reused. Every other stage, and CPT on data without padding, keeps its fingerprint."""
    from alloylm.config import validate_config
    from alloylm.train.launcher import stage_fingerprint

    def fingerprints(tail: str, padded: bool) -> dict[str, str]:
        config = validate_config({
            "experiment": "fp", "storage": "/tmp/unused", "tokenizer": {"train": {"vocab_size": 400}},
            "datasets": {"text": {"source": "builtin:general-text"}, "chat": {"source": "builtin:general-chat"}},
            "data": {"tail": tail},
            "stages": {"cpt": {"kind": "cpt", "from": {"init": "pico-llama"}, "data": "text"},
                       "sft": {"kind": "sft", "from": "cpt", "data": "chat"}},
        })
        # the data and tokenizer fingerprints held equal: only the stage's own inputs differ
        return {name: stage_fingerprint(config, name, {"parent": "same"}, "data-fp", "tok-fp", padded) for name in ("cpt", "sft")}

    dropped, padded = fingerprints("drop", False), fingerprints("pad", True)
    assert padded["cpt"] != dropped["cpt"]
    assert padded["sft"] == dropped["sft"]
    assert fingerprints("pad", False) == dropped  # a data set whose blocks came out whole: nothing padded
