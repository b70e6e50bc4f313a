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
