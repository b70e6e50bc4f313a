"""The tokenizer of the built-in models: byte-level BPE trained in-process, with a ChatML template.

End of sequence, decided here once for every stage:
- `<|end_of_text|>` is the tokenizer's `eos_token`. It ends a *document*: TRL appends
  `eos_token` to non-chat text (CPT, plain-text SFT/DPO), and packing separates documents with it.
- `<|im_end|>` ends a *chat turn*. The chat template writes it after every message, and inside the
  `{% generation %}` block of assistant messages, so SFT/DPO train the model to emit it (TRL adds
  no `eos_token` to conversational data). Generation must therefore stop at either id: the model's
  `generation_config.eos_token_id` is `stop_token_ids(tokenizer)` = [`<|end_of_text|>`,
  `<|im_end|>`], the same arrangement as Llama-3.1-Instruct (`eos_token_id` is a list there too).
  Making `<|im_end|>` the `eos_token` instead would put chat markers between CPT documents.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
PAD_TOKEN = "<|pad|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
# Order fixes their ids: 0..4, the same in every tokenizer this module trains.
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IM_START_TOKEN, IM_END_TOKEN)

# ChatML. The assistant's content and its closing <|im_end|> sit inside {% generation %}, which
# is what `return_assistant_tokens_mask=True` (TRL's `assistant_only_loss=True`) marks; the "\n"
# after it is outside, so the mask is exactly what the model should learn to produce. A
# conversation rendered with `add_generation_prompt=True` is a prefix of the same conversation
# with the answer appended, which TRL's prompt/completion split relies on.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# 256 byte-level symbols plus the special tokens: a smaller vocabulary cannot hold the alphabet.
_MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


def train_tokenizer(
    texts: Iterable[str],
    *,
    vocab_size: int = 2048,
    min_frequency: int = 2,
    model_max_length: int = 2048,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts`; the same texts always give the same vocabulary.

    Any text round-trips through encode/decode (byte-level), every encoding starts with
    `<|begin_of_text|>` (as Llama 3's does), and `chat_template` is `CHAT_TEMPLATE`.
    """
    if vocab_size < _MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be at least {_MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} "
            f"special tokens), got {vocab_size}"
        )
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be at least 1, got {min_frequency}")
    if model_max_length < 1:
        raise ValueError(f"model_max_length must be positive, got {model_max_length}")

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        # The full byte alphabet, even bytes absent from `texts`, so no text is ever unknown.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    bos_id = backend.token_to_id(BOS_TOKEN)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START_TOKEN, IM_END_TOKEN],
        model_max_length=model_max_length,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids that end generation: `eos_token` and, when the vocabulary has it, `<|im_end|>`.

    Works for any tokenizer (a Hub model's too); a ChatML tokenizer without `<|im_end|>` as its
    `eos_token` would otherwise generate past the end of its turn.
    """
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    im_end_id = tokenizer.get_vocab().get(IM_END_TOKEN)
    if im_end_id is not None and im_end_id not in ids:
        ids.append(im_end_id)
    return ids
