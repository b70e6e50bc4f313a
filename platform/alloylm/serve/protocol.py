"""OpenAI's HTTP protocol as AlloyLM serves it: request and response bodies, chunks and errors.

Requests ignore fields they do not know (clients add new ones all the time) but reject, with a
400 naming the field, the known fields AlloyLM cannot honour (tools, penalties, `best_of`, `echo` on
chat...), so that no client silently gets something other than what it asked for.

Scoring follows OpenAI's legacy completions API, as vLLM serves it and lm-evaluation-harness's
`local-completions` model calls it: `logprobs: k` gives each token's log-probability and the k most
likely alternatives (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`), `echo: true` puts
the prompt and its tokens' logprobs before the completion (the first prompt token's is null), and
`max_tokens: 0` with `echo` scores the prompt without generating. Chat takes `logprobs: true` and
`top_logprobs` in OpenAI's chat shape. `n` asks for several choices per prompt.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from alloylm.serve.config import LimitsConfig


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
    logprobs: int | None = None  # None: none; k: each generated token's logprob and the top k
    prompt_logprobs: int | None = None  # the same for every prompt token (echo); None: not scored
    # The request field that set max_tokens; None: the request gave none and the server's default
    # applies, which a long prompt may shorten to what the context has room for (as vLLM does).
    max_tokens_param: str | None = "max_tokens"

    def for_choice(self, index: int) -> SamplingParams:
        """The parameters of choice `index` of `n`: a seeded request gets seed, seed + 1, ... so its
        choices differ from one another and repeat from one request to the next."""
        if index == 0 or self.seed is None:
            return self
        return replace(self, seed=self.seed + index)


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability under the model (null for a prompt's first token) and the most
    likely alternatives at its position, as (token id, logprob), best first."""

    token: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data: Any) -> Any:
        # OpenAI documents these fields as "or null", and its client sends `temperature=None` as
        # null: an explicit null means "not given", not a type error.
        if isinstance(data, dict):
            fields = cls.model_fields
            return {k: v for k, v in data.items() if not (v is None and k in fields and not fields[k].is_required())}
        return data


class StreamOptions(_Request):
    include_usage: bool = Field(False, description="Send a last chunk with the token counts.")


class _SamplingFields(_Request):
    """Fields completions and chat share."""

    model: str | None = Field(None, description="Variant to use; the server's default variant when absent.")
    temperature: float = Field(1.0, ge=0, le=2, description="0 is greedy decoding.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    n: int = Field(1, ge=1, description="Choices per prompt (at most the server's limits.max_n).")
    stream: bool = Field(False, description="Answer as server-sent events, one chunk per piece of text.")
    stream_options: StreamOptions | None = Field(None, description="Streaming options.")
    stop: str | list[str] | None = Field(None, description="Strings that end the text (not included in it).")
    seed: int | None = Field(None, description="Seed of this request's sampling: same seed, same text.")
    min_tokens: int = Field(0, ge=0, description="vLLM's extension: generate at least this many tokens.")
    user: str | None = Field(None, description="End-user id (accepted, unused).")
    presence_penalty: float = Field(0.0, description="Unsupported unless 0.")
    frequency_penalty: float = Field(0.0, description="Unsupported unless 0.")
    logit_bias: dict[str, float] | None = Field(None, description="Unsupported unless empty.")
    # vLLM's sampling extensions that clients (vLLM's own benchmarks, lm-eval) send: refused unless
    # neutral, rather than ignored, so a client never believes it got what it asked for.
    top_k: Any = Field(None, description="vLLM's extension: unsupported unless -1 or 0 (off).")
    min_p: Any = Field(None, description="vLLM's extension: unsupported unless 0.")
    repetition_penalty: Any = Field(None, description="vLLM's extension: unsupported unless 1.")
    ignore_eos: Any = Field(None, description="vLLM's extension: unsupported unless false.")
    stop_token_ids: Any = Field(None, description="vLLM's extension: unsupported unless empty.")
    guided_json: Any = Field(None, description="vLLM's extension: unsupported.")
    guided_regex: Any = Field(None, description="vLLM's extension: unsupported.")
    guided_choice: Any = Field(None, description="vLLM's extension: unsupported.")
    guided_grammar: Any = Field(None, description="vLLM's extension: unsupported.")
    structured_outputs: Any = Field(None, description="vLLM's extension: unsupported.")
    include_stop_str_in_output: Any = Field(None, description="vLLM's extension: unsupported unless false.")
    skip_special_tokens: Any = Field(None, description="vLLM's extension: unsupported unless true.")
    spaces_between_special_tokens: Any = Field(None, description="vLLM's extension: unsupported unless true.")
    use_beam_search: Any = Field(None, description="vLLM's extension: unsupported unless false.")
    length_penalty: Any = Field(None, description="vLLM's extension: unsupported unless 1.")
    allowed_token_ids: Any = Field(None, description="vLLM's extension: unsupported unless empty.")
    bad_words: Any = Field(None, description="vLLM's extension: unsupported unless empty.")
    prompt_logprobs: Any = Field(None, description="vLLM's extension: unsupported (completions: echo with logprobs).")
    truncate_prompt_tokens: Any = Field(None, description="vLLM's extension: unsupported.")

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def _unsupported_common(self) -> str | None:
        if self.presence_penalty:
            return "presence_penalty"
        if self.frequency_penalty:
            return "frequency_penalty"
        if self.logit_bias:
            return "logit_bias"
        neutral = {
            "top_k": (-1, 0), "min_p": (0,), "repetition_penalty": (1,), "ignore_eos": (False,), "stop_token_ids": ([],),
            "include_stop_str_in_output": (False,), "skip_special_tokens": (True,), "spaces_between_special_tokens": (True,),
            "use_beam_search": (False,), "length_penalty": (1,), "allowed_token_ids": ([],), "bad_words": ([],),
        }  # fmt: skip
        for name in ("top_k", "min_p", "repetition_penalty", "ignore_eos", "stop_token_ids", "guided_json", "guided_regex",
                     "guided_choice", "guided_grammar", "structured_outputs", "include_stop_str_in_output", "skip_special_tokens",
                     "spaces_between_special_tokens", "use_beam_search", "length_penalty", "allowed_token_ids", "bad_words",
                     "prompt_logprobs", "truncate_prompt_tokens"):  # fmt: skip
            value = getattr(self, name)
            # true is not 1 and 0 is not false here: a neutral value of the field's own kind only.
            if value is not None and not any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in neutral.get(name, ())):
                return name
        return None


class CompletionRequest(_SamplingFields):
    """`POST /v1/completions`."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="Text or token ids; a list of them is a batch (one set of choices per prompt)."
    )
    max_tokens: int | None = Field(None, ge=0, description="Most tokens to generate; 0 (with echo) only scores the prompt.")
    logprobs: int | None = Field(
        None, ge=0, description="Log-probability of each token and of the `logprobs` most likely alternatives."
    )
    echo: bool = Field(False, description="Return the prompt (and its logprobs) before the completion.")
    best_of: int | None = Field(None, description="Unsupported unless 1.")
    suffix: str | None = Field(None, description="Unsupported.")
    max_completion_tokens: Any = Field(None, description="A chat field: completions take max_tokens.")

    def unsupported(self) -> str | None:
        """The first field set to something this server cannot do, or None."""
        if self.best_of not in (None, 1):
            return "best_of"
        if self.suffix:
            return "suffix"
        if self.max_completion_tokens is not None:  # else silently the default length
            return "max_completion_tokens"
        return self._unsupported_common()

    def prompts(self) -> list[str | list[int]]:
        """The request's prompts, each a string or a list of token ids (a batch is a list of them)."""
        prompt = self.prompt
        batch = prompt if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)) else [prompt]
        for index, one in enumerate(batch):
            if (isinstance(one, list) and not one) or one == "":
                where = "the prompt is empty" if len(batch) == 1 else f"prompt {index} of the batch is empty"
                raise bad_request(where, "prompt")
        return batch


class TextPart(_Request):
    type: Literal["text"] = Field(description="Only text parts are supported.")
    text: str = Field(description="The text.")


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"] = Field(description="Who speaks.")
    content: str | list[TextPart] | None = Field(None, description="What is said: text or text parts.")
    name: str | None = Field(None, description="Participant name (accepted, unused).")

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, value: Any) -> Any:
        # Without this, an image part is reported as pydantic's first union member's complaint
        # ("Input should be a valid string"), which names the wrong problem.
        if isinstance(value, list):
            for index, part in enumerate(value):
                if isinstance(part, dict) and part.get("type") not in (None, "text"):
                    raise ValueError(f"part {index}: only text parts are supported (got type {part.get('type')!r})")
        return value

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
    logprobs: bool = Field(False, description="Log-probability of each generated token.")
    top_logprobs: int | None = Field(
        None, ge=0, le=20, description="With logprobs: the most likely alternatives at each position (0-20)."
    )
    echo: bool = Field(False, description="Unsupported on chat (completions only).")
    tools: list[Any] | None = Field(None, description="Unsupported.")
    tool_choice: Any = Field(None, description="Unsupported unless 'none'.")
    response_format: dict[str, Any] | None = Field(None, description="Only {type: text}.")
    functions: Any = Field(None, description="Legacy function calling: unsupported.")
    function_call: Any = Field(None, description="Legacy function calling: unsupported unless 'none'.")
    modalities: Any = Field(None, description="Only ['text'].")
    audio: Any = Field(None, description="Unsupported.")
    prediction: Any = Field(None, description="Predicted outputs: unsupported.")
    reasoning_effort: Any = Field(None, description="For reasoning models: unsupported.")
    # vLLM's chat-template extensions: the template is applied as the model gives it, with a new
    # assistant turn opened; anything else is refused rather than ignored.
    chat_template: Any = Field(None, description="vLLM's extension: unsupported.")
    chat_template_kwargs: Any = Field(None, description="vLLM's extension: unsupported unless empty.")
    add_generation_prompt: Any = Field(None, description="vLLM's extension: unsupported unless true.")
    continue_final_message: Any = Field(None, description="vLLM's extension: unsupported unless false.")

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def unsupported(self) -> str | None:
        if self.echo:
            return "echo"
        if self.tools:
            return "tools"
        if self.tool_choice not in (None, "none"):
            return "tool_choice"
        if self.response_format and self.response_format.get("type", "text") != "text":
            return "response_format"
        if self.functions:
            return "functions"
        if self.function_call not in (None, "none"):
            return "function_call"
        if self.modalities not in (None, ["text"]):
            return "modalities"
        for name in ("audio", "prediction", "reasoning_effort", "chat_template"):
            if getattr(self, name) is not None:
                return name
        if self.chat_template_kwargs not in (None, {}):
            return "chat_template_kwargs"
        if self.add_generation_prompt not in (None, True) or not isinstance(self.add_generation_prompt, (bool, type(None))):
            return "add_generation_prompt"
        if self.continue_final_message not in (None, False) or not isinstance(self.continue_final_message, (bool, type(None))):
            return "continue_final_message"
        return self._unsupported_common()

    def conversation(self) -> list[dict[str, str]]:
        """Messages as the chat template takes them; `developer` is OpenAI's newer name for system."""
        return [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages
        ]


_TYPE_TAG = re.compile(r"^(str|int|float|bool|list\[.*\]|dict\[.*\]|function-.*|[A-Z]\w*)$")


def _not_unicode(value: Any, path: tuple) -> tuple | None:
    """The path of the first string (key or value) in `value` that is not valid Unicode text."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            found = _not_unicode(key, (*path, "<key>")) or _not_unicode(item, (*path, key))
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = _not_unicode(item, (*path, index))
            if found is not None:
                return found
    return None


def parse_request(model: type[BaseModel], body: bytes) -> Any:
    """Validate a JSON body into `model`; a 400 naming the first bad field otherwise."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise bad_request(f"the request body is not valid JSON: {err}") from None
    except RecursionError:
        raise bad_request("the request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object")
    try:
        where = _not_unicode(data, ())
    except RecursionError:
        raise bad_request("the request body is nested too deeply") from None
    if where is not None:
        # JSON's \ud800-style escapes can spell a lone surrogate, which no tokenizer can encode.
        param = ".".join(map(str, where)) or None
        raise bad_request(f"{param}: the text holds an unpaired UTF-16 surrogate (a \\ud800-\\udfff escape): not Unicode text", param=param)
    try:
        return model.model_validate(data)
    except RecursionError:
        raise bad_request("the request body is nested too deeply") from None
    except ValidationError as err:
        first = err.errors()[0]
        # pydantic adds union members' type tags ("str", "list[int]", "TextPart") to locations.
        param = ".".join(str(p) for p in first["loc"] if not _TYPE_TAG.match(str(p))) or None
        # Input values are left out of the message: a prompt can be long, or private.
        msg = first["msg"].removeprefix("Value error, ")
        message = f"{param}: {msg}" if param else msg
        raise bad_request(message, param=param) from None


def check_choice_fields(
    *,
    chat: bool,
    limits: LimitsConfig,
    n: int | None = 1,
    logprobs: int | bool | None = None,
    top_logprobs: int | None = None,
    echo: bool | None = False,
    max_tokens: int | None = None,
) -> None:
    """The bounds on `n`, logprobs, `echo` and `max_tokens: 0`, for AlloyLM's requests and for the
    vLLM backend's (whose request classes carry the same fields); a 400 naming the field."""
    if n is not None and n > limits.max_n:
        raise bad_request(f"n is {n}; this server allows at most {limits.max_n}", "n")
    if chat:
        if echo:
            raise bad_request("'echo' is not supported by this server", "echo", "unsupported_parameter")
        if top_logprobs is not None and not logprobs:
            raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
        return
    if logprobs is not None and logprobs > limits.max_logprobs:
        raise bad_request(f"logprobs is {logprobs}; this server allows at most {limits.max_logprobs}", "logprobs")
    if max_tokens == 0 and not echo:
        raise bad_request("max_tokens: 0 generates nothing; it is allowed only with echo: true, to score the prompt", "max_tokens")


def sampling_params(body: CompletionRequest | ChatCompletionRequest, limits: LimitsConfig) -> SamplingParams:
    """What `body` asks of generation, checked against the server's `limits`; a 400 naming the field."""
    unsupported = body.unsupported()
    if unsupported:
        raise bad_request(f"{unsupported!r} is not supported by this server", unsupported, "unsupported_parameter")
    if isinstance(body, ChatCompletionRequest):
        check_choice_fields(chat=True, limits=limits, n=body.n, logprobs=body.logprobs, top_logprobs=body.top_logprobs)
        max_tokens = body.token_limit
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        prompt_logprobs = None
    else:
        check_choice_fields(
            chat=False, limits=limits, n=body.n, logprobs=body.logprobs, echo=body.echo, max_tokens=body.max_tokens
        )
        max_tokens, param = body.max_tokens, "max_tokens"
        logprobs = body.logprobs
        prompt_logprobs = body.logprobs if body.echo else None
    wanted = limits.default_max_tokens if max_tokens is None else max_tokens
    if wanted > limits.max_tokens:
        raise bad_request(f"{param} is {wanted}; this server allows at most {limits.max_tokens}", param)
    if body.stream_options is not None and not body.stream:
        raise bad_request("stream_options is allowed only with stream: true", "stream_options")
    stop = body.stop_strings
    if len(stop) > limits.max_stop_sequences:
        raise bad_request(f"at most {limits.max_stop_sequences} stop sequences are allowed", "stop")
    if any(not s for s in stop):
        raise bad_request("stop sequences must not be empty", "stop")
    if any(len(s) > limits.max_stop_chars for s in stop):
        # Each generated token is checked against every stop string's possible overlap with the
        # text's end: a very long one costs the whole replica's engine thread.
        raise bad_request(f"a stop sequence may be at most {limits.max_stop_chars} characters long", "stop")
    if body.min_tokens > wanted:
        raise bad_request(f"min_tokens ({body.min_tokens}) exceeds max_tokens ({wanted})", "min_tokens")
    return SamplingParams(
        max_tokens=wanted,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stop=stop,
        min_tokens=body.min_tokens,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        max_tokens_param=None if max_tokens is None else param,
    )


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


def completion_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict[str, Any]:
    return {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}


def chat_choice(index: int, text: str, finish_reason: str, logprobs: dict | None = None) -> dict[str, Any]:
    return {
        "index": index,
        "message": {"role": "assistant", "content": text},
        "finish_reason": finish_reason,
        "logprobs": logprobs,
    }


def completion_response(
    *, request_id: str, model: str, choices: list[dict[str, Any]], prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    """A /v1/completions answer; `choices` from `completion_choice`, prompt-major (index = prompt * n + j)."""
    return {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chat_response(
    *, request_id: str, model: str, choices: list[dict[str, Any]], prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    """A /v1/chat/completions answer; `choices` from `chat_choice`."""
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens),
    }


def completion_chunk(
    *,
    request_id: str,
    model: str,
    created: int,
    text: str,
    finish_reason: str | None,
    index: int = 0,
    logprobs: dict | None = None,
) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [completion_choice(index, text, finish_reason, logprobs)],
    }


def chat_chunk(
    *,
    request_id: str,
    model: str,
    created: int,
    delta: dict[str, str],
    finish_reason: str | None,
    index: int = 0,
    logprobs: dict | None = None,
) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}],
    }


# The floor of a reported logprob: JSON has no -inf (vLLM reports the same floor).
LOGPROB_FLOOR = -9999.0


def _finite(value: float) -> float:
    return max(value, LOGPROB_FLOOR) if value == value else LOGPROB_FLOOR  # NaN too


# A token's text where it follows the tokens before it (`previous`: those of this choice so far,
# after the prompt's last ones): alone, a SentencePiece-style decoder drops a leading space.
TokenText = Callable[[int, Sequence[int]], str]


def completion_logprobs(
    entries: Sequence[TokenLogprob], token_text: TokenText, *, offset: int = 0, previous: Sequence[int] = ()
) -> dict[str, list]:
    """OpenAI's legacy `logprobs` object for `entries`: each token's text, logprob (null for a
    prompt's first token), its alternatives as {text: logprob} with the chosen token always among
    them (so up to k + 1 entries, as OpenAI documents), and where each token starts in the text
    (counted from `offset`, the characters of this choice already sent). `previous`: the token ids
    before the first entry, which its text is decoded after."""
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    before = list(previous)
    for entry in entries:
        text = token_text(entry.token, before)
        tokens.append(text)
        text_offset.append(offset)
        offset += len(text)
        if entry.logprob is None:
            token_logprobs.append(None)
            top_logprobs.append(None)
        else:
            token_logprobs.append(_finite(entry.logprob))
            top = {token_text(token, before): _finite(logprob) for token, logprob in entry.top}
            top.setdefault(text, _finite(entry.logprob))
            top_logprobs.append(top)
        before.append(entry.token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": text_offset}


def chat_logprobs(entries: Sequence[TokenLogprob], token_text: TokenText, *, previous: Sequence[int] = ()) -> dict[str, list]:
    """OpenAI's chat `logprobs` object: `content`, one entry per generated token with its UTF-8 bytes."""
    before = list(previous)

    def item(token: int, logprob: float) -> dict[str, Any]:
        text = token_text(token, before)
        return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode("utf-8", errors="replace"))}

    content = []
    for e in entries:
        if e.logprob is not None:
            content.append({**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]})
        before.append(e.token)
    return {"content": content}


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
