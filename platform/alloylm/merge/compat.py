"""Whether parents can be merged at all: same architecture, same tensors and shapes, same vocabulary.

Checked once before any trial, from config.json, the safetensors headers and the tokenizer, never
by loading weights, so that a search fails in seconds with a message naming the two parents and
the mismatch instead of deep inside mergekit on its first trial.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoTokenizer

from alloylm.merge.mergekit_builder import MergeInputError

_SAFETENSORS_INDEX = "model.safetensors.index.json"
_SINGLE_FILE = "model.safetensors"
_SHOWN_NAMES = 5


def tensor_shapes(folder: str) -> dict[str, list[int]]:
    """Every tensor of the safetensors model in `folder` and its shape, read from the headers only."""
    index = os.path.join(folder, _SAFETENSORS_INDEX)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(folder, _SINGLE_FILE)):
        shards = [_SINGLE_FILE]
    else:
        raise MergeInputError(
            f"{folder} holds no safetensors weights ({_SINGLE_FILE} or {_SAFETENSORS_INDEX})"
        )
    shapes: dict[str, list[int]] = {}
    for shard in shards:
        path = os.path.join(folder, shard)
        # safe_open reads the JSON header and maps the file; get_slice touches no tensor data.
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    shapes[name] = list(f.get_slice(name).get_shape())
        except (SafetensorError, OSError) as err:
            raise MergeInputError(f"{path} is truncated, corrupt or missing (safetensors: {err})") from None
    return shapes


def check_compatible(
    parents: Sequence[str], names: Sequence[str], *, trust_remote_code: bool = False
) -> None:
    """Raise MergeInputError unless every parent matches the first one.

    Compared: `model_type` and `architectures` (config.json), parameter names and shapes
    (safetensors headers), `vocab_size` (config.json) and, when both folders have a tokenizer, its
    length and its token-to-id mapping. The message names both parents, e.g. "parents 'dpo' and 'other' differ:
    model.layers.0.mlp.up_proj.weight has shape [128, 64] vs [256, 64]".
    """
    if len(parents) != len(names):
        raise MergeInputError(f"{len(names)} names given for {len(parents)} parents")
    if not parents:
        raise MergeInputError("no parents to merge")
    facts = [_facts(str(folder), name, trust_remote_code) for folder, name in zip(parents, names)]
    first = facts[0]
    for other in facts[1:]:
        _compare(first, other)


def _facts(folder: str, name: str, trust_remote_code: bool) -> dict:
    if not os.path.isdir(folder):
        raise MergeInputError(f"parent {name!r}: {folder} is not a folder")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise MergeInputError(f"parent {name!r}: {folder} is not a model folder (config.json is missing)")
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    try:
        shapes = tensor_shapes(folder)
    except MergeInputError as err:
        raise MergeInputError(f"parent {name!r}: {err}") from None
    tokenizer_length = vocabulary = None
    if os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        tokenizer_length = len(tokenizer)
        vocabulary = tokenizer.get_vocab()
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return {
        "name": name,
        "model_type": config.model_type,
        "architectures": list(config.architectures or []),
        "vocab_size": getattr(text_config, "vocab_size", None),
        "tokenizer_length": tokenizer_length,
        "vocabulary": vocabulary,
        "shapes": shapes,
    }


def _compare(a: dict, b: dict) -> None:
    prefix = f"parents {a['name']!r} and {b['name']!r} differ:"
    if a["model_type"] != b["model_type"] or a["architectures"] != b["architectures"]:
        raise MergeInputError(
            f"{prefix} architecture {a['model_type']} {a['architectures']} vs "
            f"{b['model_type']} {b['architectures']}"
        )
    if a["vocab_size"] != b["vocab_size"]:
        raise MergeInputError(f"{prefix} vocabulary size (config vocab_size) {a['vocab_size']} vs {b['vocab_size']}")
    if None not in (a["tokenizer_length"], b["tokenizer_length"]) and a["tokenizer_length"] != b["tokenizer_length"]:
        raise MergeInputError(
            f"{prefix} tokenizer length {a['tokenizer_length']} vs {b['tokenizer_length']} "
            "(the same token id would mean different tokens)"
        )
    if None not in (a["vocabulary"], b["vocabulary"]) and a["vocabulary"] != b["vocabulary"]:
        tokens_a = {i: t for t, i in a["vocabulary"].items()}
        tokens_b = {i: t for t, i in b["vocabulary"].items()}
        first = min(i for i in set(tokens_a) | set(tokens_b) if tokens_a.get(i) != tokens_b.get(i))
        raise MergeInputError(
            f"{prefix} vocabulary: token id {first} is {tokens_a.get(first)!r} vs "
            f"{tokens_b.get(first)!r} (same size, different tokenizers)"
        )
    only_a = sorted(set(a["shapes"]) - set(b["shapes"]))
    only_b = sorted(set(b["shapes"]) - set(a["shapes"]))
    if only_a or only_b:
        parts = []
        for who, missing in ((a["name"], only_a), (b["name"], only_b)):
            if missing:
                shown = ", ".join(missing[:_SHOWN_NAMES]) + (f" and {len(missing) - _SHOWN_NAMES} more" if len(missing) > _SHOWN_NAMES else "")
                parts.append(f"only {who!r} has {shown}")
        raise MergeInputError(f"{prefix} parameter names: {'; '.join(parts)}")
    for tensor in sorted(a["shapes"]):
        if a["shapes"][tensor] != b["shapes"][tensor]:
            raise MergeInputError(f"{prefix} {tensor} has shape {a['shapes'][tensor]} vs {b['shapes'][tensor]}")
