"""Ray Data UDFs that tokenize: packing text into fixed-length blocks, and rendering chats and
preference pairs with the model's chat template. Each is a class that loads the tokenizer once:
an actor pool's actor, or, for a small data set, built once per worker process (`run_built`).

The driver loads the run's tokenizer once and hands it to the actors (the Rust tokenizer as JSON
for packing, the pickled tokenizer for chat templates), so an actor starts in about a second
instead of importing torch through `transformers.AutoTokenizer` and fetching the tokenizer again.
Given only `tokenizer_uri`, an actor loads the tokenizer itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])
MESSAGES_TYPE = pa.list_(MESSAGE_TYPE)
TOKENS_TYPE = pa.list_(pa.int32())


def _load_tokenizer(tokenizer_uri: str, trust_remote_code: bool):
    from alloylm.models.loading import load_tokenizer

    return load_tokenizer(tokenizer_uri, trust_remote_code=trust_remote_code)


_PROBE_TEXT = "Hello,  world!\n\tTabs, \u00fcn\u00efc\u00f6d\u00e9, \u4e2d\u6587, \U0001f642 and 12345.67 \r\n  "


@dataclass(frozen=True)
class BackendTokenizerState:
    """The Rust tokenizer that `tokenizer(texts, add_special_tokens=False)` runs, as JSON, plus
    the settings transformers applies around it: enough to encode the same ids without transformers."""

    json: str
    split_special_tokens: bool
    eos_id: int

    @classmethod
    def of(cls, tokenizer) -> BackendTokenizerState | None:
        """The state of a fast (Rust-backed) transformers tokenizer with an EOS token, else None.

        None too if the Rust tokenizer alone does not reproduce the tokenizer's ids on a probe
        text (a tokenizer class that rewrites text in Python first): its actors load it instead.
        """
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None or tokenizer.eos_token_id is None:
            return None
        state = cls(backend.to_str(), bool(getattr(tokenizer, "split_special_tokens", False)), int(tokenizer.eos_token_id))
        probe = [_PROBE_TEXT + " ".join(tokenizer.all_special_tokens)]
        expected = tokenizer(probe, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        return state if _backend_ids(state.load(), probe) == expected else None

    def load(self):
        """A `tokenizers.Tokenizer` that encodes exactly as the transformers tokenizer did."""
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(self.json)
        # transformers turns both off for a call without truncation or padding.
        backend.no_truncation()
        backend.no_padding()
        backend.encode_special_tokens = self.split_special_tokens
        return backend


def _backend_ids(backend, texts: list[str]) -> list[list[int]]:
    # encode_batch_fast: the ids of encode_batch without computing character offsets (unused here).
    return [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=False)]


def pack_token_ids(sequences: list[list[int]], eos_id: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate sequences, each followed by EOS, and cut into full blocks.

    Returns (blocks of shape (n, block_size), the leftover tail shorter than block_size).
    """
    lengths = np.fromiter((len(s) + 1 for s in sequences), dtype=np.int64, count=len(sequences))
    flat = np.empty(int(lengths.sum()), dtype=np.int32)
    ends = np.cumsum(lengths)
    for seq, end, size in zip(sequences, ends, lengths):
        flat[end - size : end - 1] = seq
        flat[end - 1] = eos_id
    full = (flat.size // block_size) * block_size
    return flat[:full].reshape(-1, block_size), flat[full:]


def blocks_table(blocks: np.ndarray, tail: np.ndarray) -> pa.Table:
    """Blocks plus the tail (flagged `is_tail`) as an Arrow table with a list<int32> `input_ids`."""
    values = np.concatenate([blocks.ravel(), tail]).astype(np.int32, copy=False)
    rows, width = blocks.shape
    offsets = np.arange(rows + 1, dtype=np.int32) * width
    is_tail = [False] * rows
    if tail.size:
        offsets = np.append(offsets, offsets[-1] + tail.size)
        is_tail.append(True)
    ids = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, pa.int32()))
    return pa.table({"input_ids": ids, "is_tail": pa.array(is_tail, pa.bool_())})


class PackTokenBlocks:
    """Tokenize a batch of text records and pack them into blocks of `block_size` tokens.

    Documents are joined with EOS; what is left over after the last full block of the batch is
    returned as one `is_tail` row, so the driver can pack all tails together at the end.
    `backend` (from the driver) spares the actor loading the tokenizer from `tokenizer_uri`.
    With `documents`, the batch's documents come back too, after its blocks, one row each with
    `document_id` and `document_text` (null in the block rows, and `input_ids` null in theirs):
    the driver writes them as the data set's `documents/` from the same pass.
    """

    def __init__(
        self,
        tokenizer_uri: str,
        block_size: int,
        trust_remote_code: bool = False,
        *,
        backend: BackendTokenizerState | None = None,
        documents: bool = False,
    ):
        self.block_size = block_size
        self.documents = documents
        if backend is not None:
            self.backend = backend.load()
            self.eos_id = backend.eos_id
        else:
            self.tokenizer = _load_tokenizer(tokenizer_uri, trust_remote_code)
            self.backend = None
            self.eos_id = self.tokenizer.eos_token_id

    def _encode(self, texts: list[str]) -> list[list[int]]:
        if self.backend is None:
            return self.tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        return _backend_ids(self.backend, texts)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        texts = [json.loads(record)["text"] for record in batch["record"]]
        blocks, tail = pack_token_ids(self._encode(texts), self.eos_id, self.block_size)
        table = blocks_table(blocks, tail)
        if not self.documents:
            return table
        rows = table.num_rows
        table = table.append_column("document_id", pa.nulls(rows, pa.string())).append_column("document_text", pa.nulls(rows, pa.string()))
        documents = pa.table(
            {
                "input_ids": pa.nulls(len(texts), TOKENS_TYPE),
                "is_tail": pa.array([False] * len(texts), pa.bool_()),
                "document_id": pa.array([str(i) for i in batch["id"]], pa.string()),
                "document_text": pa.array(texts, pa.string()),
            }
        )
        return pa.concat_tables([table, documents])


# Tokenizer UDFs built in this worker process, by key (`run_built`): newest last, a few kept.
_BUILT: dict[str, Any] = {}
_BUILT_KEPT = 3  # one per tokenizer UDF class: a run renders chats and preferences between text sets


def run_built(batch, *, cls: type, key: str, arguments) -> Any:
    """Ray Data task UDF: `cls(**arguments)(batch)`, with `cls` built once per worker process.

    For a data set too small to keep an actor pool busy (`prepare._tokenizer_udf`): each actor is
    a process started for the pass, which imports and builds the tokenizer for one or two tasks
    (2.6-4 s of every quickstart data set's 3-4.4 s), where a Ray task runs in one of the job's
    worker processes that are already up and keeps what it built for the next data set.
    `arguments` is an object ref to the pickled constructor arguments (`ray.put` on the driver),
    fetched and unpickled only when `key`, a hash of the class and of those bytes, was not built
    in this process before.
    """
    built = _BUILT.pop(key, None)
    if built is None:
        import ray
        from ray import cloudpickle

        built = cls(**cloudpickle.loads(ray.get(arguments)))
    _BUILT[key] = built
    while len(_BUILT) > _BUILT_KEPT:
        _BUILT.pop(next(iter(_BUILT)))
    return built(batch)


def _messages(value: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{"role": m["role"], "content": m["content"]} for m in value]


class TemplateRefusal(Exception):
    """The chat template raised for one record (a Jinja `raise_exception`, e.g. roles that do not
    alternate or a system message the template does not take): that record is skipped."""


def _refusal(exc: Exception) -> str:
    return f"the chat template refused it: {type(exc).__name__}: {exc}"


class RenderChats:
    """Render chat records with the chat template; keeps the messages for TRL and the token count.

    `tokenizer` (the driver's, pickled) spares the actor loading it from `tokenizer_uri`.

    A record the template refuses (it raises, as Llama's and Mistral's templates do for roles out
    of order) is not rendered: its row keeps the refusal in `render_error`, with its `origin`, and
    the driver lists it in problems.jsonl and drops it (`alloylm.data.prepare`), as it does a
    record without its fields, instead of failing the whole data set on one record.
    """

    def __init__(self, tokenizer_uri: str, trust_remote_code: bool = False, *, tokenizer=None):
        self.tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(tokenizer_uri, trust_remote_code)
        if not self.tokenizer.chat_template:
            raise ValueError(f"the tokenizer at {tokenizer_uri} has no chat template; chat data cannot be formatted")

    def _counts(self, texts: list[str]) -> list[int]:
        """Tokens in each text, encoded in one batch call."""
        if not texts:
            return []
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]]

    def _template(self, messages: list[dict[str, str]], **kwargs) -> str:
        from jinja2 import TemplateError  # what the template's raise_exception raises (transformers')

        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
        except TemplateError as exc:
            raise TemplateRefusal(_refusal(exc)) from exc

    @staticmethod
    def _origins(batch: dict[str, np.ndarray]) -> list[str]:
        return [str(o) for o in batch["origin"]] if "origin" in batch else [""] * len(batch["id"])

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        ids, messages, texts, errors = [], [], [], []
        for id_, record in zip(batch["id"], batch["record"]):
            chat = _messages(json.loads(record)["messages"])
            ids.append(str(id_))
            messages.append(chat)
            try:
                texts.append(self._template(chat))
                errors.append("")
            except TemplateRefusal as exc:
                texts.append("")
                errors.append(str(exc))
        return pa.table(
            {
                "id": pa.array(ids, pa.string()),
                "messages": pa.array(messages, MESSAGES_TYPE),
                "text": pa.array(texts, pa.string()),
                "num_tokens": pa.array(self._counts(texts), pa.int32()),
                "origin": pa.array(self._origins(batch), pa.string()),
                "render_error": pa.array(errors, pa.string()),
            }
        )


class RenderPreferences(RenderChats):
    """Render preference pairs: the prompt with the generation prompt, each answer as its continuation."""

    def _pair(self, prompt: list[dict[str, str]], pair: dict) -> tuple[str, dict[str, str]]:
        prompt_text = self._template(prompt, add_generation_prompt=True)
        answers = {}
        for key in ("chosen", "rejected"):
            full = self._template(prompt + _messages(pair[key]))
            answers[key] = full[len(prompt_text):] if full.startswith(prompt_text) else full
        return prompt_text, answers

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        columns: dict[str, list[Any]] = {k: [] for k in ("id", "prompt", "chosen", "rejected", "prompt_text", "chosen_text", "rejected_text")}
        errors = []
        for id_, record in zip(batch["id"], batch["record"]):
            pair = json.loads(record)
            prompt = _messages(pair["prompt"])
            try:
                prompt_text, answers = self._pair(prompt, pair)
                errors.append("")
            except TemplateRefusal as exc:
                prompt_text, answers = "", {"chosen": "", "rejected": ""}
                errors.append(str(exc))
            columns["id"].append(str(id_))
            columns["prompt"].append(prompt)
            columns["chosen"].append(_messages(pair["chosen"]))
            columns["rejected"].append(_messages(pair["rejected"]))
            columns["prompt_text"].append(prompt_text)
            columns["chosen_text"].append(answers["chosen"])
            columns["rejected_text"].append(answers["rejected"])
        prompt_counts = self._counts(columns["prompt_text"])
        chosen_counts = self._counts(columns["chosen_text"])
        rejected_counts = self._counts(columns["rejected_text"])
        columns["num_tokens"] = [p + max(c, r) for p, c, r in zip(prompt_counts, chosen_counts, rejected_counts)]
        columns["origin"] = self._origins(batch)
        columns["render_error"] = errors
        types = {"prompt": MESSAGES_TYPE, "chosen": MESSAGES_TYPE, "rejected": MESSAGES_TYPE, "num_tokens": pa.int32()}
        return pa.table({k: pa.array(v, types.get(k, pa.string())) for k, v in columns.items()})


BENCHMARK_COLUMNS = {
    "id": pa.string(),
    "split": pa.string(),
    "type": pa.string(),
    "question": pa.string(),
    "choices": pa.list_(pa.string()),
    "answer_index": pa.int32(),
    "answer": pa.string(),
    "answer_value": pa.float64(),
    "unit": pa.string(),
    "material": pa.string(),
    "property": pa.string(),
    "fact_id": pa.string(),
    "answer_prefix": pa.string(),
    "metadata": pa.string(),
}


def benchmark_rows(batch: dict[str, np.ndarray]) -> pa.Table:
    """Ray Data UDF: benchmark records -> typed columns; keys we do not know go to `metadata` (JSON)."""
    columns: dict[str, list[Any]] = {k: [] for k in BENCHMARK_COLUMNS}
    for id_, record in zip(batch["id"], batch["record"]):
        item = json.loads(record)
        item["id"] = str(id_)
        item.setdefault("choices", [])
        item.setdefault("answer_index", -1)
        extra = {k: v for k, v in item.items() if k not in BENCHMARK_COLUMNS}
        if isinstance(item.get("metadata"), dict):  # the item's own metadata, with the unknown keys
            extra = {**item["metadata"], **extra}
        for key in BENCHMARK_COLUMNS:
            columns[key].append(json.dumps(extra, sort_keys=True) if key == "metadata" else item.get(key))
    return pa.table({k: pa.array(v, BENCHMARK_COLUMNS[k]) for k, v in columns.items()})
