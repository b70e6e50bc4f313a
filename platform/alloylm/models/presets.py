"""Built-in tiny model architectures, built in-process from a transformers config (no download).

The presets exist so that every stage of a run (CPT, SFT, DPO/ORPO, merging, serving) can be
exercised on a CPU in seconds; they are Llama and Mistral in miniature, the two architectures the
paper adapts, so the same code paths (and mergekit's architecture definitions) apply to the real
models.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

# torch and transformers are imported where a config or model is built, not here: config
# validation reads PRESETS, and a command that only validates (or is refused by the run's lease)
# should not pay seconds of torch imports.
if TYPE_CHECKING:
    import torch
    from transformers import LlamaConfig, MistralConfig, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase


def _llama_config(
    *,
    hidden_size: int,
    num_hidden_layers: int,
    num_attention_heads: int,
    num_key_value_heads: int,
    intermediate_size: int,
    vocab_size: int,
    max_position_embeddings: int = 2048,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> LlamaConfig:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        # Untied like Llama-3.1-8B and Mistral-7B: mergekit merges a separate lm_head cleanly, and
        # SLERP on a tied matrix would merge the embedding and the output layer as one.
        tie_word_embeddings=False,
    )


def _mistral_config(
    *,
    hidden_size: int,
    num_hidden_layers: int,
    num_attention_heads: int,
    num_key_value_heads: int,
    intermediate_size: int,
    sliding_window: int,
    vocab_size: int,
    max_position_embeddings: int = 2048,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> MistralConfig:
    from transformers import MistralConfig

    return MistralConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        # Set (unlike Mistral-7B-v0.3, which has none) so the sliding-window attention path is
        # exercised by the tests whenever a sequence is longer than the window.
        sliding_window=min(sliding_window, max_position_embeddings),
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        tie_word_embeddings=False,
    )


# Each entry takes keyword arguments vocab_size, max_position_embeddings, bos_token_id,
# eos_token_id and pad_token_id, and returns a fresh config. Parameter counts at vocab 2048 are
# recorded (and checked) in tests/models/test_loading.py.
PRESETS: dict[str, Callable[..., PretrainedConfig]] = {
    # ~0.14M parameters: the smallest Llama, for merge tests that build many models.
    "pico-llama": partial(
        _llama_config,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=86,
    ),
    # ~0.35M parameters: the quickstart's default base model.
    "tiny-llama": partial(
        _llama_config,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=172,
    ),
    # ~1.25M parameters: the smallest preset measured to bind the built-in world's facts to their
    # materials well enough to answer lettered multiple choice (docs/results/world-tuning.md).
    "mini-llama": partial(
        _llama_config,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=344,
    ),
    # ~5.0M parameters: big enough to learn the built-in corpus's facts on a CPU in minutes.
    "small-llama": partial(
        _llama_config,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=1024,
    ),
    # ~0.35M parameters: Mistral's architecture (sliding-window attention) at tiny-llama's size.
    "tiny-mistral": partial(
        _mistral_config,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=172,
        sliding_window=128,
    ),
}


def preset_config(
    name: str,
    *,
    vocab_size: int,
    max_position_embeddings: int = 2048,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> PretrainedConfig:
    """The transformers config of preset `name`; a ValueError listing the known names otherwise."""
    try:
        make_config = PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}"
        ) from None
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if max_position_embeddings < 1:
        raise ValueError(f"max_position_embeddings must be positive, got {max_position_embeddings}")
    return make_config(
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )


def build_model(
    name: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    max_position_embeddings: int = 2048,
) -> PreTrainedModel:
    """A freshly initialised preset model sized to `tokenizer`; one seed, one set of weights.

    Vocabulary size and special token ids come from the tokenizer. The generation config stops at
    every id of `stop_token_ids(tokenizer)`, so a chat turn ends at `<|im_end|>`. `dtype`: float32
    unless given.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from alloylm.models.tokenizer import stop_token_ids

    config = preset_config(
        name,
        # len() counts added special tokens, which tokenizer.vocab_size leaves out.
        vocab_size=len(tokenizer),
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # fork_rng: seeding must not disturb the caller's global random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    generation = model.generation_config
    generation.bos_token_id = tokenizer.bos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    generation.eos_token_id = stop_token_ids(tokenizer)
    return model
