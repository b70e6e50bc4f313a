"""Turning generated token ids into text as they arrive, and cutting the text at `stop` strings.

Decoding the whole sequence at every step costs O(n) per token; instead, as in vLLM and TGI, only a
short window of recent tokens is decoded, and text is released once it no longer ends in half a
UTF-8 character and can no longer be the start of a stop string.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

# A byte-level BPE token can end inside a multi-byte UTF-8 character; decoding then ends in U+FFFD.
_REPLACEMENT = "\ufffd"
# Prompt tokens an answer is decoded after (vLLM's initial incremental detokenization offset, 5).
CONTEXT_TOKENS = 5


def _decode(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def decode_continuation(tokenizer: PreTrainedTokenizerBase, context: list[int], ids: list[int]) -> str:
    """The text of `ids` where they follow `context` (the prompt's last tokens).

    SentencePiece-style decoders (Llama 2's, Mistral's: Metaspace with prepend_scheme "first")
    drop the leading space of a text's first token, so an answer decoded alone lost the space
    between the prompt and it ("The capital of France is" + "Paris"). Decoded after the prompt's
    last tokens, as vLLM does, the answer keeps it; byte-level BPE decodes the same either way.
    """
    if not context:
        return _decode(tokenizer, ids)
    head = _decode(tokenizer, context)
    full = _decode(tokenizer, list(context) + list(ids))
    return full[len(head):] if full.startswith(head) else _decode(tokenizer, ids)


class IncrementalText:
    """The text of one generated sequence, fed a token at a time.

    `push(token_id)` returns the text that may be sent now; `stopped` is True once a stop string
    was found (the text is cut before it); `finish()` returns whatever was held back.

    Stop strings are looked for only in the text of tokens after the first `min_tokens`, as vLLM
    does: "generate at least this many tokens" holds for stop strings as for stop tokens.
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...] = (), min_tokens: int = 0, context: list[int] = ()
    ) -> None:
        self._tokenizer = tokenizer
        self._min_tokens = min_tokens
        self._stop_from = 0  # where in `text` a stop string may start: after the first min_tokens tokens
        self._stop = tuple(s for s in stop if s)
        self._longest_stop = max((len(s) for s in self._stop), default=0)
        # The prompt's last tokens come first, already read: the answer is decoded after them
        # (`decode_continuation`), and only the answer's text is ever returned.
        self._ids: list[int] = list(context)
        self._context = len(self._ids)
        self._prefix_offset = 0
        self._read_offset = self._context
        self.text = ""  # everything decoded so far (cut at a stop string once one is found)
        self._sent = 0  # characters of `text` already returned
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return _decode(self._tokenizer, ids)

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self._ids.append(token_id)
        return self._advance(final=False)

    def finish(self) -> str:
        """The rest of the text: tokens not yet decoded and a held-back possible stop start."""
        if not self.stopped and self._read_offset < len(self._ids):
            self._advance(final=True)
        return self._release(len(self.text))

    def _advance(self, *, final: bool) -> str:
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) <= len(prefix) or (full.endswith(_REPLACEMENT) and not final):
            return ""  # nothing new, or half a character: wait for the next token
        new_text = full[len(prefix) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        searched_from = max(self._stop_from, len(self.text) - self._longest_stop + 1)
        self.text += new_text
        if len(self._ids) - self._context <= self._min_tokens:
            self._stop_from = len(self.text)
            return self._release(len(self.text))
        if self._stop:
            hits = [i for i in (self.text.find(s, searched_from) for s in self._stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
                return self._release(len(self.text))
        return self._release(len(self.text) - self._held_back())

    def _held_back(self) -> int:
        """Length of the longest end of `text` that could be the start of a stop string."""
        for length in range(min(self._longest_stop - 1, len(self.text)), 0, -1):
            tail = self.text[-length:]
            if any(s.startswith(tail) for s in self._stop):
                return length
        return 0

    def _release(self, upto: int) -> str:
        if upto <= self._sent:
            return ""
        piece = self.text[self._sent : upto]
        self._sent = upto
        return piece

