"""Model merging with mergekit: building and checking merge configs, merging candidate configs in
memory for a search, and writing the chosen merge as a complete model folder.

The stage schemas (`alloylm.merge.config`) load with every run config, so this package imports
mergekit only on first use of a name below.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "check_compatible": "compat",
    "tensor_shapes": "compat",
    "InMemoryMerger": "inmemory",
    "materialize": "materializer",
    "MergeInputError": "mergekit_builder",
    "known_methods": "mergekit_builder",
    "mergekit_config": "mergekit_builder",
    "mergekit_yaml_text": "mergekit_builder",
    "read_mergekit_yaml": "mergekit_builder",
    "validate_merge_config": "mergekit_builder",
    "write_mergekit_yaml": "mergekit_builder",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"alloylm.merge.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'alloylm.merge' has no attribute {name!r}")


__all__ = sorted(_LAZY)
