"""Continuous batching for a transformers causal LM: the generation engine of a model replica.

One background thread owns the model. At every decoding step it admits waiting requests into the
running batch (their prompts are prefilled together, left-padded, and their KV cache is joined to
the batch's), runs one forward pass for every running sequence, and samples each sequence's next
token with that sequence's own temperature, top_p and seed. A sequence leaves the batch the step
it ends (its own `max_tokens`, a stop token or a stop string), so no request waits for another's
`max_tokens`, and a request that arrives mid-batch starts at the next step instead of waiting for
the batch to drain.

Scoring rides the same batch. A sequence that asks for its prompt's logprobs (`echo` with
`logprobs`) is prefilled with the logits of every prompt position kept, in a prefill of its own
with the other scoring requests admitted at that step (so that generation-only rows do not pay
for those logits), and one that asks for no new tokens (`max_tokens: 0`) leaves the batch right
after that prefill. Logprobs are the model's own distribution (log-softmax of the raw logits,
before temperature, top_p or min_tokens), as OpenAI and vLLM report them.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from alloylm.serve.detokenizer import CONTEXT_TOKENS, IncrementalText, decode_continuation
from alloylm.serve.protocol import SamplingParams, TokenLogprob

log = logging.getLogger("alloylm.serve")


@dataclass(frozen=True)
class GenerationEvent:
    """New text of one sequence; the last event of a sequence has `finish_reason` set."""

    text: str
    completion_tokens: int
    finish_reason: str | None = None  # "stop" or "length"; "error" if generation failed
    logprobs: tuple[TokenLogprob, ...] = ()  # of the tokens generated since the previous event
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None  # once per sequence, where asked for


class EngineStoppedError(RuntimeError):
    """Generation failed inside the engine (the message says why)."""


@dataclass
class _Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    deliver: Callable[[GenerationEvent], None]
    stream: bool
    text: IncrementalText
    rng: random.Random
    generated: list[int] = field(default_factory=list)
    pending: int = -1  # last sampled token, fed to the model at the next step
    token_logprobs: list[TokenLogprob] = field(default_factory=list)
    sent_logprobs: int = 0  # how many of token_logprobs earlier events carried
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None

    @property
    def decode_as_you_go(self) -> bool:
        """Text is needed before the end: to stream it, or to find a stop string in it."""
        return self.stream or bool(self.params.stop)
    cancelled: bool = False
    done: bool = False


@dataclass
class EngineStats:
    """Counters of one engine, for health reports, tests and benchmarks."""

    steps: int = 0  # decoding steps (one forward pass for every running sequence)
    prefills: int = 0  # prefill forward passes (one for every group of prompts admitted together)
    sequences_started: int = 0
    sequences_finished: int = 0
    tokens_generated: int = 0
    largest_batch: int = 0
    busy_s: float = 0.0  # time spent in forward passes and sampling
    running: int = 0
    waiting: int = 0


class GenerationEngine:
    """Continuously batched sampling from `model`; `generate()` is called from an asyncio loop."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        stop_token_ids: list[int],
        max_batch_size: int = 32,
        batch_wait_timeout_s: float = 0.0,
        name: str = "engine",
        max_scoring_logits: int = 1 << 28,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout_s = batch_wait_timeout_s
        # Scoring rows keep every position's logits (rows x positions x vocabulary): prompts admitted
        # together are prefilled in parts that keep at most this many (1 GiB of float32 by default;
        # 32 prompts of 2,048 tokens over a 128k vocabulary would be 33 GB in one tensor).
        self.max_scoring_logits = max_scoring_logits
        self.stop_token_ids = sorted(set(stop_token_ids))
        self._stop_ids = torch.tensor(self.stop_token_ids, dtype=torch.long, device=self.device)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._pad_id = pad if pad is not None else 0
        self._stats = EngineStats()
        self._waiting: deque[_Sequence] = deque()
        self._wake = threading.Condition()
        self._closed = False
        self._fatal: BaseException | None = None
        # The running batch: rows of `_running`, their KV cache and attention mask (left-padded).
        self._running: list[_Sequence] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None
        self._thread = threading.Thread(target=self._loop, name=f"alloylm-{name}", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------------------------------
    # The asyncio side
    # ---------------------------------------------------------------------------------------

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, *, stream: bool = True
    ) -> AsyncIterator[GenerationEvent]:
        """Events of one sequence, the last with `finish_reason`; with `stream=False`, only that one.

        Leaving the iteration early (the client went away) removes the sequence at the next step.
        """
        if not prompt_ids:
            raise ValueError("the prompt must hold at least one token")
        if params.max_tokens < 0:
            raise ValueError("max_tokens must not be negative")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[GenerationEvent] = asyncio.Queue()

        def deliver(event: GenerationEvent) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        seed = params.seed if params.seed is not None else secrets.randbits(64)
        sequence = _Sequence(
            prompt_ids=list(prompt_ids),
            params=params,
            deliver=deliver,
            stream=stream,
            text=IncrementalText(self.tokenizer, params.stop, params.min_tokens, context=list(prompt_ids)[-CONTEXT_TOKENS:]),
            rng=random.Random(seed),
        )
        self._submit(sequence)
        try:
            while True:
                event = await events.get()
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            # Read by the engine thread at its next step; a plain bool write is atomic in CPython.
            sequence.cancelled = True

    def _submit(self, sequence: _Sequence) -> None:
        with self._wake:
            if self._closed:
                raise EngineStoppedError("the engine is shut down")
            if self._fatal is not None:
                # Its kind only: the text (a CUDA error, a path) is for the server's log, where it is.
                raise EngineStoppedError(f"the engine stopped after an error ({type(self._fatal).__name__}); retry")
            self._waiting.append(sequence)
            self._wake.notify()

    def stats(self) -> EngineStats:
        with self._wake:
            self._stats.waiting = len(self._waiting)
        self._stats.running = len(self._running)
        return EngineStats(**vars(self._stats))

    def healthy(self) -> bool:
        return self._thread.is_alive() and self._fatal is None

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=30)

    # ---------------------------------------------------------------------------------------
    # The engine thread
    # ---------------------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    admitted = self._take_waiting()
                    if admitted is None:
                        for sequence in [*self._running, *self._waiting]:
                            self._finish(sequence, "error", message="the model server is shutting down")
                        return
                    started = time.perf_counter()
                    if admitted:
                        self._run_guarded(self._prefill, admitted)
                    self._drop_finished()
                    if self._running:
                        self._run_guarded(self._decode_step)
                        self._drop_finished()
                    self._stats.busy_s += time.perf_counter() - started
        except BaseException as err:  # noqa: BLE001 - the thread must report, never die silently
            self._fatal = err
            log.exception("generation engine stopped")
            for sequence in [*self._running, *self._waiting]:
                self._finish(sequence, "error")

    def _take_waiting(self) -> list[_Sequence] | None:
        """Requests to admit now (up to the free batch slots); None once the engine is closed."""
        with self._wake:
            while not self._closed and not self._waiting and not self._running:
                self._wake.wait()
            if self._closed:
                return None
            if not self._running and self.batch_wait_timeout_s > 0:
                # Idle until now: give simultaneous requests a moment to arrive, so that their
                # prompts go through one prefill instead of one each.
                deadline = time.monotonic() + self.batch_wait_timeout_s
                while len(self._waiting) < self.max_batch_size and not self._closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._wake.wait(left)
            admitted = []
            while self._waiting and len(self._running) + len(admitted) < self.max_batch_size:
                sequence = self._waiting.popleft()
                if not sequence.cancelled:
                    admitted.append(sequence)
            return admitted

    def _run_guarded(self, step: Callable, *args) -> None:
        """Run one step; if it fails, fail the sequences it touched and keep serving the others."""
        try:
            step(*args)
        except Exception as err:
            log.exception("generation step failed")
            touched = args[0] if args else list(self._running)
            # The client gets the kind of failure, not its text (a CUDA error or a path is for the
            # server's log, where the traceback is).
            message = f"generation failed ({type(err).__name__}); the server's log has the details"
            for sequence in touched:
                self._finish(sequence, "error", message=message)
            if not args:
                self._running, self._cache, self._mask = [], None, None

    def _prefill(self, admitted: list[_Sequence]) -> None:
        # Rows that score their prompt keep every position's logits; the others keep only the last.
        scoring = [s for s in admitted if s.params.prompt_logprobs is not None]
        plain = [s for s in admitted if s.params.prompt_logprobs is None]
        if plain:
            self._prefill_group(plain, keep=1)
        for part in self._scoring_parts(scoring):
            self._prefill_group(part, keep=max(len(s.prompt_ids) for s in part))

    def _scoring_parts(self, rows: list[_Sequence]) -> list[list[_Sequence]]:
        """`rows` in order, in parts whose kept logits (rows x longest prompt x vocabulary) stay
        within max_scoring_logits; a row that alone exceeds it is a part of its own."""
        vocab = self.model.get_output_embeddings().weight.shape[0]
        parts: list[list[_Sequence]] = []
        width = 0
        for row in rows:
            wider = max(width, len(row.prompt_ids))
            if parts and parts[-1] and (len(parts[-1]) + 1) * wider * vocab <= self.max_scoring_logits:
                parts[-1].append(row)
                width = wider
            else:
                parts.append([row])
                width = len(row.prompt_ids)
        return parts

    def _prefill_group(self, admitted: list[_Sequence], *, keep: int) -> None:
        width = max(len(s.prompt_ids) for s in admitted)
        ids = torch.full((len(admitted), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(admitted), width), dtype=torch.long)
        for row, sequence in enumerate(admitted):
            ids[row, width - len(sequence.prompt_ids) :] = torch.tensor(sequence.prompt_ids)
            mask[row, width - len(sequence.prompt_ids) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=keep
        )
        self._stats.prefills += 1
        self._stats.sequences_started += len(admitted)
        if keep > 1:
            self._score_prompts(admitted, out.logits)
        for sequence in admitted:
            if sequence.params.max_tokens == 0:
                self._finish(sequence, "length")
        tokens = self._next_tokens(out.logits[:, -1, :], admitted)
        self._join(admitted, out.cache, mask)
        self._accept(admitted, tokens)

    def _score_prompts(self, rows: list[_Sequence], logits: torch.Tensor) -> None:
        """Each row's prompt tokens' logprobs from the prefill's logits (the prompts are left-padded,
        so a prompt of L tokens ends at the last column: token i is predicted at column keep - L + i - 1)."""
        keep = logits.shape[1]
        for row, sequence in enumerate(rows):
            prompt = sequence.prompt_ids
            entries = [TokenLogprob(prompt[0], None)]
            if len(prompt) > 1:
                logprobs = torch.log_softmax(logits[row, keep - len(prompt) : keep - 1].float(), -1)
                targets = torch.tensor(prompt[1:], device=logprobs.device).unsqueeze(1)
                chosen = logprobs.gather(1, targets).squeeze(1).tolist()
                top = _top(logprobs, sequence.params.prompt_logprobs)
                entries += [TokenLogprob(t, lp, alt) for t, lp, alt in zip(prompt[1:], chosen, top)]
            sequence.prompt_logprobs = tuple(entries)
            if sequence.stream:
                sequence.deliver(GenerationEvent("", 0, prompt_logprobs=sequence.prompt_logprobs))

    def _decode_step(self) -> None:
        rows = self._running
        ids = torch.tensor([[s.pending] for s in rows], dtype=torch.long, device=self.device)
        positions = self._mask.sum(-1, keepdim=True)  # real tokens so far = position of this one
        self._mask = torch.cat([self._mask, torch.ones((len(rows), 1), dtype=self._mask.dtype, device=self.device)], -1)
        out = self.model(
            input_ids=ids,
            attention_mask=self._mask,
            position_ids=positions,
            cache=self._cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self._cache = out.cache
        self._stats.steps += 1
        self._stats.largest_batch = max(self._stats.largest_batch, len(rows))
        self._accept(rows, self._next_tokens(out.logits[:, -1, :], rows))

    def _next_tokens(self, logits: torch.Tensor, rows: list[_Sequence]) -> list[int]:
        """Sample one token per row and record its logprob for the rows that asked for them."""
        wanted = [i for i, s in enumerate(rows) if s.params.logprobs is not None and not s.done]
        # Before sampling: _sample masks stop tokens in place for min_tokens.
        logprobs = torch.log_softmax(logits.float(), -1) if wanted else None
        tokens = self._sample(logits, rows)
        for i in wanted:
            row = logprobs[i]
            (top,) = _top(row.unsqueeze(0), rows[i].params.logprobs)
            rows[i].token_logprobs.append(TokenLogprob(tokens[i], float(row[tokens[i]]), top))
        return tokens

    def _sample(self, logits: torch.Tensor, rows: list[_Sequence]) -> list[int]:
        """One token per row, each with its row's temperature, top_p, seed and min_tokens."""
        logits = logits.float()
        early = [i for i, s in enumerate(rows) if len(s.generated) < s.params.min_tokens]
        if early and len(self._stop_ids):
            index = torch.tensor(early, device=logits.device)
            logits[index.unsqueeze(1), self._stop_ids.unsqueeze(0)] = float("-inf")
        greedy = logits.argmax(-1)
        temperature = torch.tensor([s.params.temperature for s in rows], device=logits.device)
        if bool((temperature == 0).all()):
            return greedy.tolist()
        probs = torch.softmax(logits / temperature.clamp(min=1e-5).unsqueeze(1), dim=-1)
        sorted_probs, order = probs.sort(-1, descending=True)
        cumulative = sorted_probs.cumsum(-1)
        top_p = torch.tensor([s.params.top_p for s in rows], device=logits.device).unsqueeze(1)
        # Keep the smallest head of the distribution whose mass reaches top_p (always its first token).
        sorted_probs = sorted_probs.masked_fill(cumulative - sorted_probs >= top_p, 0.0)
        cumulative = sorted_probs.cumsum(-1)
        # Inverse-CDF sampling with one uniform number per row from the row's own generator, so a
        # seeded request draws the same numbers whatever else shares its batch.
        uniform = torch.tensor([s.rng.random() for s in rows], device=logits.device).unsqueeze(1)
        picked = torch.searchsorted(cumulative, uniform * cumulative[:, -1:]).clamp(max=order.shape[1] - 1)
        sampled = order.gather(1, picked).squeeze(1)
        return torch.where(temperature == 0, greedy, sampled).tolist()

    def _accept(self, rows: list[_Sequence], tokens: list[int]) -> None:
        stop_ids = set(self.stop_token_ids)
        for sequence, token in zip(rows, tokens):
            if sequence.done:
                continue
            sequence.generated.append(token)
            sequence.pending = token
            self._stats.tokens_generated += 1
            if sequence.cancelled:
                sequence.done = True
                continue
            if token in stop_ids:
                self._finish(sequence, "stop")
                continue
            if not sequence.decode_as_you_go:
                if len(sequence.generated) >= sequence.params.max_tokens:
                    self._finish(sequence, "length")
                continue
            piece = sequence.text.push(token)
            if sequence.text.stopped:
                self._finish(sequence, "stop", piece)
            elif len(sequence.generated) >= sequence.params.max_tokens:
                self._finish(sequence, "length", piece)
            elif piece and sequence.stream:
                sequence.deliver(GenerationEvent(piece, len(sequence.generated), logprobs=self._unsent(sequence)))

    def _finish(self, sequence: _Sequence, reason: str, piece: str = "", *, message: str = "") -> None:
        if sequence.done:
            return
        sequence.done = True
        self._stats.sequences_finished += 1
        if reason == "error":
            sequence.deliver(GenerationEvent(message or "generation failed", len(sequence.generated), "error"))
            return
        if not sequence.decode_as_you_go:
            # One decode of the whole answer instead of one per token: nothing needed it earlier.
            answer = [t for t in sequence.generated if t not in self.stop_token_ids]
            text = decode_continuation(self.tokenizer, sequence.prompt_ids[-CONTEXT_TOKENS:], answer)
        else:
            rest = piece + sequence.text.finish()
            # Without streaming, the one event carries the whole text.
            text = rest if sequence.stream else sequence.text.text
        sequence.deliver(
            GenerationEvent(
                text,
                len(sequence.generated),
                reason,
                logprobs=self._unsent(sequence),
                # A stream got its prompt's logprobs in an event of their own, right after the prefill.
                prompt_logprobs=None if sequence.stream else sequence.prompt_logprobs,
            )
        )

    @staticmethod
    def _unsent(sequence: _Sequence) -> tuple[TokenLogprob, ...]:
        entries = tuple(sequence.token_logprobs[sequence.sent_logprobs :])
        sequence.sent_logprobs = len(sequence.token_logprobs)
        return entries

    def _join(self, admitted: list[_Sequence], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Add freshly prefilled rows to the running batch, left-padding whichever is shorter."""
        if not self._running:
            self._running, self._cache, self._mask = list(admitted), cache, mask
            return
        old_len, new_len = self._mask.shape[1], mask.shape[1]
        width = max(old_len, new_len)
        layers = []
        for old, new in zip(self._cache.layers, cache.layers):
            keys = torch.cat([_left_pad(old.keys, width), _left_pad(new.keys, width)], 0)
            values = torch.cat([_left_pad(old.values, width), _left_pad(new.values, width)], 0)
            layers.append((keys, values))
        self._cache = DynamicCache(ddp_cache_data=layers)
        self._mask = torch.cat([_left_pad(self._mask, width), _left_pad(mask, width)], 0)
        self._running = self._running + list(admitted)

    def _drop_finished(self) -> None:
        keep = [i for i, s in enumerate(self._running) if not (s.done or s.cancelled)]
        for sequence in self._running:
            if sequence.cancelled and not sequence.done:
                sequence.done = True
                self._stats.sequences_finished += 1
        if len(keep) == len(self._running):
            return
        if not keep:
            self._running, self._cache, self._mask = [], None, None
            return
        index = torch.tensor(keep, device=self.device)
        self._running = [self._running[i] for i in keep]
        self._mask = self._mask.index_select(0, index)
        # Columns that are padding in every remaining row hold nothing: cut them off.
        first = int(self._mask.any(0).nonzero()[0])
        self._mask = self._mask[:, first:]
        layers = [
            (layer.keys.index_select(0, index)[:, :, first:], layer.values.index_select(0, index)[:, :, first:])
            for layer in self._cache.layers
        ]
        self._cache = DynamicCache(ddp_cache_data=layers)


def _top(logprobs: torch.Tensor, k: int | None) -> list[tuple[tuple[int, float], ...]]:
    """The k most likely (token id, logprob) of each row of `logprobs`, best first."""
    k = min(k or 0, logprobs.shape[-1])
    if k == 0:
        return [() for _ in range(logprobs.shape[0])]
    values, ids = logprobs.topk(k, -1)
    return [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]


def _left_pad(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad the sequence axis (dim 1 of a mask, dim 2 of a KV tensor) on the left to `width`."""
    axis = 1 if tensor.dim() == 2 else 2
    missing = width - tensor.shape[axis]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[axis] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], axis)
