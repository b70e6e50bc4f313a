"""Model merging with mergekit: building and checking merge configs, merging candidate configs in
memory for a search, and writing the chosen merge as a complete model folder."""

from alloylm.merge.compat import check_compatible, tensor_shapes
from alloylm.merge.inmemory import InMemoryMerger
from alloylm.merge.materialize import materialize
from alloylm.merge.mergekit_config import (
    MergeInputError,
    known_methods,
    mergekit_config,
    mergekit_yaml_text,
    read_mergekit_yaml,
    validate_merge_config,
    write_mergekit_yaml,
)

__all__ = [
    "InMemoryMerger",
    "MergeInputError",
    "check_compatible",
    "known_methods",
    "materialize",
    "mergekit_config",
    "mergekit_yaml_text",
    "read_mergekit_yaml",
    "tensor_shapes",
    "validate_merge_config",
    "write_mergekit_yaml",
]
