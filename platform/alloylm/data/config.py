"""The schema of data sets, data preparation and the tokenizer; the code is `alloylm.data.prepare`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from alloylm.corpus import BUILTIN_FORMATS
from alloylm.generate.config import GenerateConfig
from alloylm.schema import Frozen as _Frozen


class ColumnMapping(_Frozen):
    """Which source column holds each field AlloyLM reads. Unset fields use the field's own name."""

    id: str | None = Field(None, description="Column with a stable record id (default: derived from file and row).")
    text: str | None = Field(None, description="Text column, for `format: text` (default `text`).")
    messages: str | None = Field(
        None, description="Column holding a list of {role, content} messages, for `format: chat` (default `messages`)."
    )
    user: str | None = Field(
        None, description="For chat data stored as question/answer columns: the column with the user turn."
    )
    assistant: str | None = Field(
        None, description="For chat data stored as question/answer columns: the column with the assistant turn."
    )
    system: str | None = Field(None, description="Optional column with a system prompt for each chat.")
    prompt: str | None = Field(None, description="Prompt column for `format: preference` (default `prompt`).")
    chosen: str | None = Field(None, description="Chosen-answer column for `format: preference` (default `chosen`).")
    rejected: str | None = Field(
        None, description="Rejected-answer column for `format: preference` (default `rejected`)."
    )

    @model_validator(mode="after")
    def _user_assistant_together(self) -> ColumnMapping:
        if (self.user is None) != (self.assistant is None):
            raise ValueError("`user` and `assistant` columns must be given together")
        if self.user is not None and self.messages is not None:
            raise ValueError("give either `messages` or `user`/`assistant`, not both")
        return self


class DatasetConfig(_Frozen):
    """One named data set of the run: where it is read from, or which teacher writes it, and its shape."""

    source: str | list[str] | None = Field(
        None,
        description=(
            "Where the data is: `builtin:NAME` (the generated corpus), `hf:ORG/NAME` or `hf:/path/saved_to_disk` "
            "(Hugging Face datasets), or local/`s3://` files: a folder, a glob or a file "
            "(.txt, .md, .pdf, .jsonl, .parquet). A list reads several sources into one data set. "
            "Not given when `generate` is."
        ),
    )
    generate: GenerateConfig | None = Field(
        None, description="Write this data set with a teacher model from a text data set of the run, instead of reading a source."
    )
    format: Literal["text", "chat", "preference", "benchmark"] | None = Field(
        None,
        description=(
            "text (CPT), chat (SFT), preference (DPO/ORPO) or benchmark. Inferred for `builtin:` sources and "
            "from the task of `generate`. A text data set may also read chat `builtin:` sources: each chat becomes "
            "one document, rendered with the run's chat template (mixed training: Q&A beside the documents in CPT)."
        ),
    )
    columns: ColumnMapping = Field(default_factory=ColumnMapping, description="Source column names per field.")
    hf_split: str = Field("train", description="Split to read from a Hugging Face data set.")
    hf_config: str | None = Field(None, description="Configuration (subset) name of a Hugging Face data set.")
    hf_revision: str | None = Field(
        None,
        description=(
            "Hub revision (commit, tag or branch) of an `hf:ORG/NAME` data set, passed to `load_dataset` and part of "
            "the data set's fingerprint. Without it a Hub data set is known by its name: the prepared data is reused "
            "after the data set changes upstream, until a revision is given (or `overwrite`)."
        ),
    )
    max_records: int | None = Field(None, gt=0, description="Read at most this many records (for quick trials).")

    @property
    def sources(self) -> list[str]:
        if self.source is None:
            return []
        return [self.source] if isinstance(self.source, str) else list(self.source)

    @field_validator("source")
    @classmethod
    def _check_sources(cls, value: str | list[str] | None) -> str | list[str] | None:
        if value is None:
            return value
        for item in [value] if isinstance(value, str) else value:
            if not item.strip():
                raise ValueError("a source must not be empty")
            if item.startswith("builtin:") and item.removeprefix("builtin:") not in BUILTIN_FORMATS:
                raise ValueError(
                    f"unknown built-in source {item!r}; known: "
                    + ", ".join(f"builtin:{name}" for name in sorted(BUILTIN_FORMATS))
                )
        if isinstance(value, list) and not value:
            raise ValueError("at least one source is needed")
        return value

    @model_validator(mode="after")
    def _check_format(self) -> DatasetConfig:
        if self.generate is not None:
            if self.source is not None:
                raise ValueError("give either `source` or `generate`, not both")
            if "columns" in self.model_fields_set:
                raise ValueError("`columns` do not apply to a generated data set")
            if self.format is not None and self.format != self.generate.format:
                raise ValueError(f"format {self.format!r} does not match task {self.generate.task!r}, which writes {self.generate.format!r}")
            object.__setattr__(self, "format", self.generate.format)
            return self
        if self.source is None:
            raise ValueError("give `source` (where the data is) or `generate` (a teacher writes it)")
        builtin = {BUILTIN_FORMATS.get(s.removeprefix("builtin:")) for s in self.sources if s.startswith("builtin:")}
        every_builtin = all(s.startswith("builtin:") for s in self.sources)
        if self.format is None:
            if not (every_builtin and len(builtin) == 1):
                raise ValueError(
                    "`format` is required (text, chat, preference or benchmark) unless every source is a builtin: one of one format"
                )
            # Frozen model: filling the inferred default is the one write we allow, during validation.
            object.__setattr__(self, "format", builtin.pop())
        elif builtin and builtin != {self.format} and not (self.format == "text" and builtin <= {"text", "chat"}):
            raise ValueError(
                f"format {self.format!r} does not match the built-in source's format {sorted(builtin)}"
                + ("" if self.format != "text" else " (a text data set may read text and chat built-in sources)")
            )
        return self

    def generation_problems(self, name: str, datasets: dict[str, DatasetConfig]) -> list[str]:
        """What is wrong with this data set's `generate` given the run's other data sets (empty: nothing).

        `generate.from` must name a text data set that is read, not generated; every generated data set
        reading the same documents must hold out the same ones, or a benchmark question could come
        from a document that trained the model.
        """
        if self.generate is None:
            return []
        source = self.generate.from_
        where = f"datasets.{name}.generate.from"
        if source not in datasets:
            return [f"{where}: {source!r} is not a data set (known: {', '.join(sorted(datasets)) or 'none'})"]
        if datasets[source].generate is not None or datasets[source].format != "text":
            return [f"{where}: data set {source!r} must be a `format: text` data set read from files or a source"]
        problems = []
        for other_name, other in sorted(datasets.items()):
            if other.generate is None or other.generate.from_ != source:
                continue
            mine, theirs = self.generate.heldout, other.generate.heldout
            if (mine.fraction, mine.seed) != (theirs.fraction, theirs.seed):
                problems.append(
                    f"datasets.{name}.generate.heldout: fraction and seed differ from datasets.{other_name}.generate.heldout, "
                    f"which reads the same documents ({source!r}); held-out documents must be the same for both"
                )
                break
        return problems


class NearDedupConfig(_Frozen):
    """Near-duplicate removal by MinHash signatures and locality-sensitive hashing."""

    enabled: bool = Field(True, description="Remove near-duplicate documents (text data sets only).")
    threshold: float = Field(0.8, gt=0, lt=1, description="Estimated Jaccard similarity above which a document is a near duplicate.")
    num_perm: int = Field(64, ge=8, le=512, description="MinHash signature length: the bins of one-permutation hashing, like as many permutations.")
    shingle_chars: int = Field(5, ge=2, le=32, description="Character n-gram length used as shingles.")


class DataPrepConfig(_Frozen):
    """How every data set is cleaned, tokenized and packed."""

    block_size: int = Field(256, ge=8, description="Tokens per packed CPT block (EOS separates documents).")
    min_chars: int = Field(16, ge=0, description="Drop text documents shorter than this after normalisation.")
    max_chars: int = Field(2_000_000, gt=0, description="Drop text documents longer than this after normalisation.")
    exact_dedup: bool = Field(True, description="Drop records whose normalised content was already seen.")
    near_dedup: NearDedupConfig = Field(default_factory=NearDedupConfig, description="Near-duplicate removal.")
    tokenizer_actors: int = Field(2, ge=1, description="At most this many tokenizer actors in the Ray Data actor pool (fewer for small data sets, and no more than leave the pipeline's map tasks one CPU of the cluster).")
    cpus_per_tokenizer_actor: float = Field(
        0.5,
        gt=0,
        description=(
            "CPUs reserved per tokenizer actor. Fractional on purpose: whole-CPU actors on a 2-CPU "
            "cluster leave nothing for the read tasks and the pipeline stalls."
        ),
    )
    batch_size: int = Field(256, ge=1, description="Records per batch sent to a tokenizer actor.")
    rows_per_shard: int = Field(4096, ge=1, description="Target rows per output parquet shard.")
    tail: Literal["drop", "pad"] = Field(
        "drop",
        description=(
            "What happens to the last partial block of a text data set: `drop` discards it (its token count "
            "is reported in the manifest as tokens_dropped_tail) or `pad` pads it with the pad token and "
            "marks the padding in `attention_mask`."
        ),
    )

    @model_validator(mode="after")
    def _chars_order(self) -> DataPrepConfig:
        if self.min_chars >= self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) must be below max_chars ({self.max_chars})")
        return self


class TrainTokenizerConfig(_Frozen):
    """Train a byte-level BPE tokenizer on the run's own data (for models built from a preset)."""

    vocab_size: int = Field(2048, ge=300, le=262144, description="Vocabulary size, special tokens included.")
    min_frequency: int = Field(2, ge=1, description="Minimum pair frequency for a BPE merge.")
    datasets: list[str] | None = Field(
        None, description="Data sets whose text trains the tokenizer (default: every text and chat data set)."
    )
    max_documents: int = Field(20000, gt=0, description="Train on at most this many documents per data set.")


class TokenizerConfig(_Frozen):
    """Where the run's tokenizer comes from: trained here, or taken from a model."""

    train: TrainTokenizerConfig | None = Field(None, description="Train a new byte-level BPE tokenizer.")
    from_: str | None = Field(
        None, alias="from", description="Use the tokenizer of this model (local path, s3:// URI or Hugging Face id)."
    )
    model_max_length: int = Field(4096, gt=0, description="Longest sequence the tokenizer admits.")

    @model_validator(mode="after")
    def _one_of(self) -> TokenizerConfig:
        if (self.train is None) == (self.from_ is None):
            raise ValueError("give exactly one of `train` or `from`")
        return self
