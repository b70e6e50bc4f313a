"""The schema of teacher-generated data sets (`datasets.<name>.generate`); the code is `alloylm.generate.run`."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from alloylm.schema import NAME_PATTERN, SEED_MAX
from alloylm.schema import Frozen as _Frozen

# What each `generate` task produces: the format of the generated data set.
GENERATE_TASK_FORMATS = {"qa": "chat", "preference": "preference", "benchmark": "benchmark"}
_PROMPT_PLACEHOLDER = "{chunk}"
# The teacher's settings that say where it is and how hard it is driven, not what it answers: in
# neither a batch id nor the generated data set's fingerprint.
TRANSPORT_FIELDS = ("base_url", "api_key_env", "max_concurrency", "requests_per_second", "max_retries", "retry_backoff_s", "timeout_s", "actors", "cpus_per_actor")


class TeacherConfig(_Frozen):
    """The teacher model: any OpenAI-compatible chat completions endpoint, and how hard to drive it."""

    base_url: str = Field(
        description=(
            "API base URL, up to and including /v1: vLLM, Ray Serve LLM, `alloylm serve`, or a hosted API "
            "(e.g. http://127.0.0.1:8000/v1). Requests go to <base_url>/chat/completions."
        )
    )
    model: str = Field(description="The `model` field of each request: the teacher's name at that endpoint.")
    api_key_env: str | None = Field(
        None,
        description=(
            "Name of the environment variable (on the machine that runs `alloylm data`) holding the API key, "
            "sent as a Bearer token. The key itself never goes into a config or an artifact."
        ),
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
    )
    max_concurrency: int = Field(4, ge=1, le=1024, description="Most requests in flight at once, over all actors.")
    requests_per_second: float | None = Field(
        None, gt=0, description="Most requests started per second, over all actors (null: no rate limit)."
    )
    max_retries: int = Field(
        3,
        ge=0,
        le=20,
        description=(
            "Retries of one request after a connection error, a timeout, or HTTP 408/409/429/5xx. Other 4xx "
            "answers are not retried. A request still failing after its retries fails its batch only."
        ),
    )
    retry_backoff_s: float = Field(
        1.0, ge=0, le=60, description="Wait before the first retry; doubled at each retry. A Retry-After header (up to 60 s) wins."
    )
    timeout_s: float = Field(120.0, gt=0, description="Seconds one request may take (connect and each read).")
    temperature: float = Field(0.7, ge=0, le=2, description="Sampling temperature of the teacher.")
    max_tokens: int = Field(1024, ge=1, description="Most tokens the teacher may write per answer.")
    extra_body: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "Further request fields, sent as given: e.g. {response_format: {type: json_object}} for endpoints "
            "that constrain output to JSON, or vLLM's guided decoding options."
        ),
    )
    actors: int = Field(
        1, ge=1, description="Ray Data actors sending requests; each has max_concurrency / actors requests in flight."
    )
    cpus_per_actor: float = Field(
        0.1, gt=0, description="CPUs reserved per sending actor (it mostly waits on the network)."
    )

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"base_url must be an http:// or https:// URL, got {value!r}")
        return value.rstrip("/")

    @field_validator("extra_body")
    @classmethod
    def _no_reserved_fields(cls, value: dict[str, Any]) -> dict[str, Any]:
        reserved = sorted({"model", "messages", "temperature", "max_tokens", "stream", "n"} & value.keys())
        if reserved:
            raise ValueError(f"{', '.join(reserved)} cannot be set in extra_body (they are fields of teacher, or fixed)")
        return value

    @model_validator(mode="after")
    def _actors_within_concurrency(self) -> TeacherConfig:
        if self.actors > self.max_concurrency:
            raise ValueError(f"actors ({self.actors}) must not exceed max_concurrency ({self.max_concurrency})")
        return self


class HeldoutConfig(_Frozen):
    """Which source documents are held out: benchmark questions come only from them, training items never."""

    fraction: float = Field(
        0.1,
        ge=0,
        lt=1,
        description=(
            "Share of the source documents held out (rounded, at least one when above 0 and there are two "
            "or more documents, never all). Every `generate` data set reading the same documents must agree."
        ),
    )
    seed: int = Field(0, ge=0, le=SEED_MAX, description="Seed of the draw of held-out documents.")
    validation_fraction: float = Field(
        0.5,
        ge=0,
        le=1,
        description="For task `benchmark`: share of held-out documents whose questions go to split `validation` (the rest: `test`).",
    )


class GenerateConfig(_Frozen):
    """A data set written by a teacher model from the chunks of a text data set of this run."""

    from_: str = Field(
        alias="from", pattern=NAME_PATTERN, description="A `format: text` data set of this run: its prepared documents are chunked and sent."
    )
    task: Literal["qa", "preference", "benchmark"] = Field(
        description=(
            "qa: question-answer chats (format chat, for SFT); preference: a question with a chosen and a "
            "rejected answer (format preference, for DPO/ORPO); benchmark: held-out questions (format benchmark)."
        )
    )
    teacher: TeacherConfig = Field(description="The teacher endpoint and its request settings.")
    prompt: str | None = Field(
        None,
        description=(
            "The user prompt template instead of the built-in one of the task. `{chunk}` is replaced by the "
            "chunk's text, `{n}` by items_per_chunk, `{choices}` by num_choices; other braces are left as they are."
        ),
    )
    prompt_file: str | None = Field(None, description="A file (local or s3://) holding the prompt template; read when generation starts.")
    system_prompt: str | None = Field(None, description="The system message of every request (null: the built-in one).")
    items_per_chunk: int = Field(1, ge=1, le=20, description="Items asked for in one request about one chunk.")
    question_type: Literal["short_answer", "multiple_choice"] = Field(
        "short_answer", description="For task `benchmark`: short-answer or multiple-choice questions."
    )
    num_choices: int = Field(4, ge=2, le=8, description="For multiple-choice benchmark questions: options per question.")
    chunk_chars: int = Field(
        3000, ge=200, le=100_000, description="Longest chunk, in characters; documents are cut at paragraph, then sentence ends."
    )
    min_chunk_chars: int = Field(200, ge=1, description="Chunks shorter than this (a document's short tail) are not sent.")
    max_chunks: int | None = Field(None, gt=0, description="Send at most this many chunks, drawn with the held-out seed (quick trials).")
    batch_chunks: int = Field(
        8,
        ge=1,
        le=10_000,
        description="Chunks per batch: the unit that is written when finished and, after a failure, sent again.",
    )
    heldout: HeldoutConfig = Field(default_factory=HeldoutConfig, description="Held-out source documents.")

    @model_validator(mode="after")
    def _check(self) -> GenerateConfig:
        if self.prompt is not None and self.prompt_file is not None:
            raise ValueError("give either `prompt` or `prompt_file`, not both")
        if self.prompt is not None and _PROMPT_PLACEHOLDER not in self.prompt:
            raise ValueError(f"prompt must contain {_PROMPT_PLACEHOLDER}, where the chunk's text goes")
        if self.min_chunk_chars >= self.chunk_chars:
            raise ValueError(f"min_chunk_chars ({self.min_chunk_chars}) must be below chunk_chars ({self.chunk_chars})")
        if self.task != "benchmark":
            misplaced = sorted({"question_type", "num_choices"} & self.model_fields_set)
            if misplaced:
                raise ValueError(f"{', '.join(misplaced)} only apply to task `benchmark`")
        elif self.heldout.fraction == 0:
            raise ValueError("task `benchmark` asks about held-out documents only: heldout.fraction must be above 0")
        return self

    @property
    def format(self) -> str:
        return GENERATE_TASK_FORMATS[self.task]

