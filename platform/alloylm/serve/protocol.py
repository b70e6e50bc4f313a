"""OpenAI's HTTP protocol as AlloyLM serves it: request and response bodies, chunks and errors.

Requests ignore fields they do not know (clients add new ones all the time) but reject, with a
400 naming the field, the known fields AlloyLM cannot honour (`n` > 1, `logprobs`, `echo`, tools,
penalties...), so that no client silently gets something other than what it asked for.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class APIError(Exception):
    """An error answered in OpenAI's JSON shape with its HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",  # noqa: A002 - OpenAI's field name
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:  # noqa: A002
    """`{"error": {"message", "type", "param", "code"}}`, as OpenAI answers every error."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# -------------------------------------------------------------------------------------------
# Requests
# -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingParams:
    """What one request asks of generation; checked against the server's limits before it gets here."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    min_tokens: int = 0  # vLLM's extension: stop tokens are masked until this many tokens exist


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class StreamOptions(_Request):
    include_usage: bool = Field(False, description="Send a last chunk with the token counts.")


class _SamplingFields(_Request):
    """Fields completions and chat share."""

    model: str | None = Field(None, description="Variant to use; the server's default variant when absent.")
    temperature: float = Field(1.0, ge=0, le=2, description="0 is greedy decoding.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    n: int = Field(1, ge=1, description="Choices per prompt; only 1 is supported.")
    stream: bool = Field(False, description="Answer as server-sent events, one chunk per piece of text.")
    stream_options: StreamOptions | None = Field(None, description="Streaming options.")
    stop: str | list[str] | None = Field(None, description="Strings that end the text (not included in it).")
    seed: int | None = Field(None, description="Seed of this request's sampling: same seed, same text.")
    min_tokens: int = Field(0, ge=0, description="vLLM's extension: generate at least this many tokens.")
    user: str | None = Field(None, description="End-user id (accepted, unused).")
    presence_penalty: float = Field(0.0, description="Unsupported unless 0.")
    frequency_penalty: float = Field(0.0, description="Unsupported unless 0.")
    logit_bias: dict[str, float] | None = Field(None, description="Unsupported unless empty.")

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def _unsupported_common(self) -> str | None:
        if self.n != 1:
            return "n"
        if self.presence_penalty:
            return "presence_penalty"
        if self.frequency_penalty:
            return "frequency_penalty"
        if self.logit_bias:
            return "logit_bias"
        return None


class CompletionRequest(_SamplingFields):
    """`POST /v1/completions`."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(description="Text, or token ids.")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate.")
    logprobs: int | None = Field(None, description="Unsupported.")
    echo: bool = Field(False, description="Unsupported.")
    best_of: int | None = Field(None, description="Unsupported unless 1.")
    suffix: str | None = Field(None, description="Unsupported.")

    def unsupported(self) -> str | None:
        """The first field set to something this server cannot do, or None."""
        if self.logprobs is not None:
            return "logprobs"
        if self.echo:
            return "echo"
        if self.best_of not in (None, 1):
            return "best_of"
        if self.suffix:
            return "suffix"
        return self._unsupported_common()

    def single_prompt(self) -> str | list[int]:
        """The one prompt of the request: a string or a list of token ids."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise bad_request("only one prompt per request is supported", "prompt")
            prompt = prompt[0]
        if (isinstance(prompt, list) and not prompt) or prompt == "":
            raise bad_request("the prompt is empty", "prompt")
        return prompt


class TextPart(_Request):
    type: Literal["text"] = Field(description="Only text parts are supported.")
    text: str = Field(description="The text.")


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"] = Field(description="Who speaks.")
    content: str | list[TextPart] | None = Field(None, description="What is said: text or text parts.")
    name: str | None = Field(None, description="Participant name (accepted, unused).")

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate (older name).")
    max_completion_tokens: int | None = Field(None, ge=1, description="Most tokens to generate.")
    logprobs: bool = Field(False, description="Unsupported.")
    top_logprobs: int | None = Field(None, description="Unsupported.")
    tools: list[Any] | None = Field(None, description="Unsupported.")
    tool_choice: Any = Field(None, description="Unsupported unless 'none'.")
    response_format: dict[str, Any] | None = Field(None, description="Only {type: text}.")

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def unsupported(self) -> str | None:
        if self.logprobs or self.top_logprobs is not None:
            return "logprobs"
        if self.tools:
            return "tools"
        if self.tool_choice not in (None, "none"):
            return "tool_choice"
        if self.response_format and self.response_format.get("type", "text") != "text":
            return "response_format"
        return self._unsupported_common()

    def conversation(self) -> list[dict[str, str]]:
        """Messages as the chat template takes them; `developer` is OpenAI's newer name for system."""
        return [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages
        ]


_TYPE_TAG = re.compile(r"^(str|int|float|bool|list\[.*\]|dict\[.*\]|function-.*|[A-Z]\w*)$")


def parse_request(model: type[BaseModel], body: bytes) -> Any:
    """Validate a JSON body into `model`; a 400 naming the first bad field otherwise."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise bad_request(f"the request body is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        # pydantic adds union members' type tags ("str", "list[int]", "TextPart") to locations.
        param = ".".join(str(p) for p in first["loc"] if not _TYPE_TAG.match(str(p))) or None
        # Input values are left out of the message: a prompt can be long, or private.
        message = f"{param}: {first['msg']}" if param else first["msg"]
        raise bad_request(message, param=param) from None


# -------------------------------------------------------------------------------------------
# Responses
# -------------------------------------------------------------------------------------------


def completion_id(kind: Literal["completion", "chat"]) -> str:
    return ("cmpl-" if kind == "completion" else "chatcmpl-") + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_response(
    *, request_id: str, model: str, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chat_response(
    *, request_id: str, model: str, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        ],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def completion_chunk(
    *, request_id: str, model: str, created: int, text: str, finish_reason: str | None
) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}],
    }


def chat_chunk(
    *, request_id: str, model: str, created: int, delta: dict[str, str], finish_reason: str | None
) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
    }


def usage_chunk(
    *, kind: Literal["completion", "chat"], request_id: str, model: str, created: int, prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    """The last chunk of a stream asked for `stream_options.include_usage`: no choices, the counts."""
    return {
        "id": request_id,
        "object": "text_completion" if kind == "completion" else "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event: `data: <json>` and a blank line."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


SSE_DONE = sse("[DONE]")


def model_list(names: list[str], created: int, *, default: str | None = None, chosen: dict | None = None) -> dict[str, Any]:
    """OpenAI's model list; `alloylm` says which model is the default and, for `model: best`, why."""

    def entry(name: str) -> dict[str, Any]:
        item = {"id": name, "object": "model", "created": created, "owned_by": "alloylm"}
        if default is not None:
            item["alloylm"] = {"default": name == default}
            if chosen and chosen.get("variant") == name:
                item["alloylm"]["chosen"] = {**chosen, "alias": "best"}
        return item

    return {"object": "list", "data": [entry(name) for name in names]}
