"""CPT's batches: every block once per epoch, in an order that changes from epoch to epoch.

Packed blocks arrive in document order. Fed in that order, each batch held consecutive blocks of
one document, the same every epoch, and the quickstart's CPT learned none of the facts; so the
shuffle is a decision a test must pin, not a detail.
"""

from __future__ import annotations

import numpy as np

from alloylm.train.cpt import epoch_shuffled_batches


def _epochs(iterable, count: int) -> list[list[int]]:
    """The first token of every block, batch after batch, for `count` passes."""
    return [[int(row[0]) for batch in iterable for row in batch["input_ids"]] for _ in range(count)]


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
