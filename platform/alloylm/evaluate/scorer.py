"""One variant under evaluation: a causal LM and its tokenizer, with the three operations the suites
need: the log-likelihood of a continuation, greedy generation, and the loss of token blocks.

Tokenization of a (context, continuation) pair follows lm-evaluation-harness (encode the whole,
split at the context's length, trailing spaces of the context move to the continuation), so a
`plain` multiple-choice score here equals the exported lm-eval task's score on the same model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

PLAIN_PROMPT = "Question: {question}\nAnswer:"
# Where a plain prompt's answer ends: a model without a chat turn to close goes on past its answer,
# typically inventing the next "Question: ...\nAnswer: ..." of the pattern, and an answer matched
# anywhere in the output would be credited for that. lm-evaluation-harness cuts the same
# question/answer format at these (`until` of its generation tasks).
PLAIN_STOP = ("\n\n", "Question:")


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to the earliest occurrence of any of the `stop` strings (all of it if none occurs).

    Cut after decoding, as lm-evaluation-harness's HF model does: greedy decoding makes the text
    before a stop string the same whether generation stopped there or went on.
    """
    ends = [found for s in stop if s and (found := text.find(s)) >= 0]
    return text[: min(ends)] if ends else text


@dataclass(frozen=True)
class LogLikelihood:
    """The log-probability of a continuation given its context."""

    logprob: float  # sum over the continuation's tokens, natural log
    tokens: int  # how many tokens the continuation has
    greedy: bool  # whether greedy decoding would have produced exactly this continuation


class CausalLMScorer:
    """Scores and generates with one model; every call is deterministic for a given model and input."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        batch_size: int = 8,
        max_length: int | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        from alloylm.models.tokenizer import stop_token_ids

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length or getattr(model.config, "max_position_embeddings", None) or 2048
        self.stop_ids = stop_token_ids(tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.stop_ids[0] if self.stop_ids else 0)

    @classmethod
    def load(
        cls,
        source: str,
        *,
        dtype: str = "float32",
        batch_size: int = 8,
        max_length: int | None = None,
        device: str | None = None,
        trust_remote_code: bool = False,
    ) -> CausalLMScorer:
        """The model and tokenizer saved at `source` (local folder, s3:// URI or Hugging Face id)."""
        from alloylm.models.loading import load_model, load_tokenizer

        tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code)
        model = load_model(source, trust_remote_code=trust_remote_code, dtype=dtype)
        return cls(model, tokenizer, batch_size=batch_size, max_length=max_length, device=device)

    # ------------------------------------------------------------------------------ prompts

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def uses_chat(self, prompt: str) -> bool:
        """Whether a suite's `prompt` setting (auto, chat, plain) means the chat template here."""
        if prompt == "chat" and not self.has_chat_template:
            raise ValueError("prompt is `chat` but the model's tokenizer has no chat template; use `plain` or `auto`")
        return prompt == "chat" or (prompt == "auto" and self.has_chat_template)

    def prompt(self, user: str, *, chat: bool) -> str:
        """The text put before the model's answer to `user`."""
        if chat:
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
            )
        return PLAIN_PROMPT.format(question=user)

    def _encode(self, text: str, *, chat: bool) -> list[int]:
        # A chat prompt already holds the BOS text; a plain one gets the tokenizer's own specials
        # (what lm-eval's HF model does by default).
        return self.tokenizer(text, add_special_tokens=not chat)["input_ids"]

    def encode_pair(self, context: str, continuation: str, *, chat: bool) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids), split as lm-evaluation-harness splits them."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self._encode(context + continuation, chat=chat)
        context_ids = self._encode(context, chat=chat)
        continuation_ids = whole[len(context_ids) :]
        if not continuation_ids:
            continuation_ids = self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        return context_ids, continuation_ids

    # ------------------------------------------------------------------------------ scoring

    def _batches(self, order: list[int]) -> list[list[int]]:
        return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def _forward_left_padded(self, rows: list[list[int]], keep: int) -> torch.Tensor:
        """Logits of the last `keep` positions of each row, rows padded on the left."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = 1
        # Positions counted from each row's first real token, so padding does not shift them.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        inputs = {
            "input_ids": ids.to(self.device),
            "attention_mask": mask.to(self.device),
            "position_ids": positions.to(self.device),
        }
        with torch.inference_mode():
            try:
                logits = self.model(**inputs, logits_to_keep=keep).logits
            except TypeError:  # a remote-code model without logits_to_keep
                logits = self.model(**inputs).logits
        return logits[:, -keep:, :].float()

    def loglikelihood(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[LogLikelihood]:
        """The log-likelihood of each continuation after its context (token ids, as `encode_pair` gives)."""
        results: list[LogLikelihood | None] = [None] * len(pairs)
        # Longest first, ties by position: the same input always gives the same batches.
        order = sorted(range(len(pairs)), key=lambda i: (-(len(pairs[i][0]) + len(pairs[i][1])), i))
        for batch in self._batches(order):
            rows, conts = [], []
            for i in batch:
                context, continuation = pairs[i]
                if not continuation:
                    raise ValueError(f"pair {i}: the continuation has no tokens")
                # The model sees every token but the last; at most max_length of them (lm-eval's rule).
                full = (list(context) + list(continuation))[-(self.max_length + 1) :]
                rows.append(full[:-1])
                conts.append(full[len(full) - min(len(continuation), len(full) - 1) :])
            keep = max(len(c) for c in conts)
            logits = self._forward_left_padded(rows, keep)
            for row, i, continuation in zip(logits, batch, conts):
                logprobs = torch.log_softmax(row[keep - len(continuation) :], dim=-1)
                target = torch.tensor(continuation, device=logprobs.device)
                picked = logprobs.gather(-1, target[:, None]).squeeze(-1)
                greedy = bool((logprobs.argmax(-1) == target).all())
                results[i] = LogLikelihood(float(picked.double().sum()), len(continuation), greedy)
        return results  # type: ignore[return-value]

    def generate(
        self, prompts: Sequence[str], *, chat: bool, max_new_tokens: int, seed: int = 0, stop: Sequence[str] = ()
    ) -> list[str]:
        """Greedy continuations of `prompts`, cut at a stop token and before the first of the `stop`
        strings, special tokens removed."""
        outputs: list[str | None] = [None] * len(prompts)
        encoded = [self._encode(p, chat=chat) for p in prompts]
        room = max(1, self.max_length - max_new_tokens)
        order = sorted(range(len(prompts)), key=lambda i: (-len(encoded[i]), i))
        torch.manual_seed(seed)
        for batch in self._batches(order):
            rows = [encoded[i][-room:] for i in batch]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for k, row in enumerate(rows):
                ids[k, width - len(row) :] = torch.tensor(row, dtype=torch.long)
                mask[k, width - len(row) :] = 1
            with torch.inference_mode():
                generated = self.model.generate(
                    input_ids=ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    eos_token_id=self.stop_ids or None,
                    pad_token_id=self.pad_id,
                )
            for k, i in enumerate(batch):
                new = generated[k, width:].tolist()
                cut = next((j for j, t in enumerate(new) if t in self.stop_ids), len(new))
                outputs[i] = cut_at_stop(self.tokenizer.decode(new[:cut], skip_special_tokens=True), stop).strip()
        return outputs  # type: ignore[return-value]

    def sequence_nll(self, sequences: Sequence[list[int]], masks: Sequence[list[int] | None] | None = None) -> list[tuple[float, int]]:
        """(summed negative log-likelihood in nats, predicted tokens) of each token sequence.

        Every token but the first of each window is predicted from those before it; a sequence
        longer than max_length is cut into windows of max_length. Masked (padding) tokens are
        neither predicted nor counted.
        """
        windows: list[tuple[int, list[int], list[int]]] = []
        for index, sequence in enumerate(sequences):
            mask = (masks[index] if masks is not None else None) or [1] * len(sequence)
            real = [t for t, m in zip(sequence, mask) if m]
            for start in range(0, len(real), self.max_length):
                window = real[start : start + self.max_length]
                if len(window) > 1:
                    windows.append((index, window, [1] * len(window)))
        totals = [[0.0, 0] for _ in sequences]
        order = sorted(range(len(windows)), key=lambda i: (-len(windows[i][1]), i))
        for batch in self._batches(order):
            rows = [windows[i][1] for i in batch]
            width = max(len(r) for r in rows)
            logits = self._forward_left_padded(rows, width)
            for row_logits, i in zip(logits, batch):
                index, window, _ = windows[i]
                predicted = row_logits[width - len(window) : -1]
                target = torch.tensor(window[1:], device=predicted.device)
                nll = torch.nn.functional.cross_entropy(predicted, target, reduction="sum")
                totals[index][0] += float(nll.double())
                totals[index][1] += len(window) - 1
        return [(nll, count) for nll, count in totals]


def perplexity_from(nll: float, tokens: int) -> float | None:
    """exp(mean NLL per token); None when nothing was predicted."""
    if tokens == 0:
        return None
    mean = nll / tokens
    return math.exp(mean) if mean < 700 else math.inf
