"""Perplexity on held-out text: domain text (did CPT teach the domain?) and general text (did it make
the model forget? the paper's warning about continued pretraining).

The held-out data sets are packed token blocks written by `alloylm data` with the run's tokenizer.
A variant with another vocabulary (a Hub model) gets the same text decoded and re-encoded with its
own tokenizer; its per-token perplexity is then not comparable with the others, which is why
bits per byte (tokenizer-independent) is reported next to it. Blocks are split in two in file
order: the first half is `validation`, the second `test`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from alloylm.evaluate.prepared import EvaluationInputError, read_prepared_table
from alloylm.evaluate.scorer import CausalLMScorer, perplexity_from


@dataclass(frozen=True)
class TextBlock:
    """One packed block of token ids; `mask` marks real tokens (None: all of them are)."""

    index: int
    input_ids: tuple[int, ...]
    mask: tuple[int, ...] | None = None


def load_text_blocks(uri: str) -> list[TextBlock]:
    """Every block of the prepared text data set at `uri`, in the order it was written."""
    table, manifest = read_prepared_table(uri)
    if manifest.get("format") not in (None, "text"):
        raise EvaluationInputError(f"{uri} is a {manifest.get('format')!r} data set, perplexity needs a `text` one")
    if "input_ids" not in table.column_names:
        raise EvaluationInputError(f"{uri}: its shards have no input_ids column")
    ids = table.column("input_ids").to_pylist()
    masks = table.column("attention_mask").to_pylist() if "attention_mask" in table.column_names else [None] * len(ids)
    blocks = [TextBlock(i, tuple(row), tuple(mask) if mask else None) for i, (row, mask) in enumerate(zip(ids, masks)) if row]
    if not blocks:
        raise EvaluationInputError(f"{uri} holds no token blocks")
    return blocks


def split_blocks(blocks: Sequence[TextBlock], split: str, max_items: int | None) -> list[TextBlock]:
    """The blocks of `split`: the first half of the file is validation, the second test.

    Contiguous halves rather than alternate blocks, so a document cut across two blocks rarely
    lands in both splits.
    """
    half = len(blocks) // 2
    if split == "validation":
        chosen = list(blocks[:half])
    elif split == "test":
        chosen = list(blocks[half:])
    else:
        raise ValueError(f"split must be validation or test, got {split!r}")
    return chosen[:max_items] if max_items is not None else chosen


def same_vocabulary(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> bool:
    """Whether two tokenizers map every token to the same id (so token blocks mean the same to both)."""
    return a.get_vocab() == b.get_vocab()


def _reencode(block: TextBlock, source: PreTrainedTokenizerBase, target: PreTrainedTokenizerBase) -> list[int]:
    """A block of `source` ids as `target` ids: documents decoded, re-encoded, joined by target's EOS."""
    ids = [t for t, m in zip(block.input_ids, block.mask or [1] * len(block.input_ids)) if m]
    documents, current = [], []
    for token in ids:
        if token == source.eos_token_id:
            documents.append(current)
            current = []
        else:
            current.append(token)
    documents.append(current)
    out: list[int] = []
    for k, document in enumerate(documents):
        if k and target.eos_token_id is not None:
            out.append(target.eos_token_id)
        text = source.decode(document, skip_special_tokens=True)
        if text:
            out.extend(target(text, add_special_tokens=False)["input_ids"])
    return out


def run_perplexity(
    scorer: CausalLMScorer, blocks: Sequence[TextBlock], *, data_tokenizer: PreTrainedTokenizerBase | None = None
) -> tuple[dict, list[dict]]:
    """Perplexity and bits per byte of `scorer`'s model on `blocks`.

    `data_tokenizer` is the tokenizer that wrote the blocks; None means the model's own.
    """
    tokenizer = scorer.tokenizer
    reencoded = data_tokenizer is not None and not same_vocabulary(data_tokenizer, tokenizer)
    if reencoded:
        sequences = [_reencode(block, data_tokenizer, tokenizer) for block in blocks]
        masks: list[list[int] | None] = [None] * len(sequences)
    else:
        vocab = len(tokenizer)
        for block in blocks:
            if max(block.input_ids) >= vocab:
                raise EvaluationInputError(
                    f"text block {block.index} holds token id {max(block.input_ids)} but the model's tokenizer has "
                    f"{vocab} tokens: the data was tokenized with another tokenizer; pass the run's tokenizer"
                )
        sequences = [list(block.input_ids) for block in blocks]
        masks = [list(block.mask) if block.mask else None for block in blocks]
    results = scorer.sequence_nll(sequences, masks)
    details = []
    total_nll, total_tokens, total_bytes = 0.0, 0, 0
    for block, sequence, mask, (nll, tokens) in zip(blocks, sequences, masks, results):
        real = [t for t, m in zip(sequence, mask or [1] * len(sequence)) if m]
        windows = [real[s : s + scorer.max_length] for s in range(0, len(real), scorer.max_length)]
        # The bytes of the predicted tokens: every token but the first of each window.
        predicted_bytes = sum(
            len(tokenizer.decode(window[1:], skip_special_tokens=True).encode("utf-8")) for window in windows if len(window) > 1
        )
        total_nll += nll
        total_tokens += tokens
        total_bytes += predicted_bytes
        details.append({"block": block.index, "nll": nll, "tokens": tokens, "bytes": predicted_bytes})
    metrics = {
        "perplexity": perplexity_from(total_nll, total_tokens),
        "bits_per_byte": total_nll / math.log(2) / total_bytes if total_bytes else None,
        "nll_per_token": total_nll / total_tokens if total_tokens else None,
        "tokens": total_tokens,
        "bytes": total_bytes,
        "items": len(blocks),
        "reencoded": reencoded,
    }
    return metrics, details
