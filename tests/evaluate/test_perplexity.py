"""Perplexity as the evaluation computes it equals transformers' own causal-LM loss, exponentiated.

No Ray: a freshly built pico-llama and token blocks made here; transformers' `labels=` loss is the
reference, window by window (a block longer than max_length is scored in separate windows, and the
padding a block's mask marks is not scored).
"""

from __future__ import annotations

import math

import pytest
import torch

from alloylm.evaluate.perplexity import TextBlock, run_perplexity
from alloylm.evaluate.scorer import CausalLMScorer
from alloylm.models import build_model, train_tokenizer

MAX_LENGTH = 16


def test_perplexity_is_transformers_loss_exponentiated():
    tokenizer = train_tokenizer([f"block {i} of text about silk, chitin and collagen fibres" for i in range(40)], vocab_size=300)
    model = build_model("pico-llama", tokenizer, seed=0)
    ids = torch.randint(5, len(tokenizer), (3, 2 * MAX_LENGTH), generator=torch.Generator().manual_seed(0)).tolist()
    blocks = [
        TextBlock(0, tuple(ids[0][:12])),
        TextBlock(1, tuple(ids[1][:12]), mask=(1,) * 8 + (0,) * 4),  # a padded tail
        TextBlock(2, tuple(ids[2][: MAX_LENGTH + 4])),  # two windows: 16 tokens, then 4
    ]
    scorer = CausalLMScorer(model, tokenizer, batch_size=2, max_length=MAX_LENGTH, device="cpu")
    metrics, details = run_perplexity(scorer, blocks)

    expected = []  # (summed nll, predicted tokens) per block, from transformers' mean loss per window
    with torch.no_grad():
        for real in (ids[0][:12], ids[1][:8], ids[2][: MAX_LENGTH + 4]):
            nll, tokens = 0.0, 0
            for start in range(0, len(real), MAX_LENGTH):
                window = torch.tensor([real[start : start + MAX_LENGTH]])
                loss = model(input_ids=window, labels=window).loss.item()
                nll += loss * (window.shape[1] - 1)
                tokens += window.shape[1] - 1
            expected.append((nll, tokens))
    assert [d["tokens"] for d in details] == [t for _, t in expected] == [11, 7, 15 + 3]
    for detail, (nll, _) in zip(details, expected):
        assert detail["nll"] == pytest.approx(nll, rel=1e-5)
    total_nll, total_tokens = sum(n for n, _ in expected), sum(t for _, t in expected)
    assert metrics["tokens"] == total_tokens
    assert metrics["nll_per_token"] == pytest.approx(total_nll / total_tokens, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(total_nll / total_tokens), rel=1e-5)
