"""The Ray Serve application: one model deployment per variant behind an OpenAI-compatible ingress.

`build_app(args)` is the `import_path` target of `serve deploy` and KubeRay RayService configs
(`alloylm.serve.app:build_app`); its `args` are a `ServeConfig`. The ingress authenticates,
checks each request against the configured bounds, picks the variant named by the request's
`model` field and forwards to that variant's `ModelServer`, whose `GenerationEngine` batches
requests continuously. Variants scale independently; Ray Serve's `max_ongoing_requests` and
`max_queued_requests` on each model deployment are the backpressure, answered as 503.
"""

# No `from __future__ import annotations` here: FastAPI evaluates the endpoints' annotations in the
# replica, where the ingress class arrives pickled by value with only the globals it names, so
# string annotations such as "Request" would not resolve.
import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from alloylm.serve.auth import APIKeyCheck
from alloylm.serve.config import ServeConfig
from alloylm.serve.protocol import (
    SSE_DONE,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingParams,
    bad_request,
    chat_choice,
    chat_chunk,
    chat_logprobs,
    chat_response,
    completion_choice,
    completion_chunk,
    completion_id,
    completion_logprobs,
    completion_response,
    error_body,
    model_list,
    parse_request,
    sampling_params,
    sse,
    usage_chunk,
)

log = logging.getLogger("alloylm.serve")

OPEN_SERVER_WARNING = (
    "\n" + "!" * 78 + "\n"
    "!!  THIS ALLOYLM SERVER IS OPEN: no API key is configured, so anyone who can reach it\n"
    "!!  can use it. Set ALLOYLM_API_KEYS (comma-separated) or serve.api_keys_file.\n" + "!" * 78
)


@dataclass(frozen=True)
class GenerationRequest:
    """What the ingress hands a model replica: the prompts (texts or token ids) or a chat, and sampling.

    A completions request may hold a batch of prompts; each gets `n` choices, numbered prompt-major
    (choice index = prompt index * n + j), as OpenAI numbers them.
    """

    kind: Literal["completion", "chat"]
    params: SamplingParams
    prompts: tuple[str | list[int], ...] = ()
    messages: list[dict[str, str]] | None = None
    n: int = 1
    echo: bool = False

    @property
    def choices(self) -> int:
        return (len(self.prompts) if self.messages is None else 1) * self.n


# -------------------------------------------------------------------------------------------
# Helpers. Defined before the deployments: `@serve.deployment` pickles a class when it is
# decorated, and the ingress class by value, so whatever it refers to must exist by then.
# -------------------------------------------------------------------------------------------


def _context_length(model_config: Any, tokenizer: Any) -> int:
    lengths = [getattr(model_config, "max_position_embeddings", None)]
    # Tokenizers without a limit report a huge sentinel (int(1e30)); only a real one counts.
    if getattr(tokenizer, "model_max_length", None) and tokenizer.model_max_length < 10**7:
        lengths.append(tokenizer.model_max_length)
    known = [n for n in lengths if isinstance(n, int) and n > 0]
    return min(known) if known else 2048


def _error_fields(err: APIError) -> dict[str, Any]:
    # Plain data crosses the process boundary; an exception would arrive wrapped by Ray.
    return {"status": err.status, "message": err.message, "type": err.type, "param": err.param, "code": err.code}


def _error_from_fields(fields: dict[str, Any]) -> APIError:
    # Every 503 of ours means "a replica will take it shortly": say when to retry, as OpenAI does.
    headers = {"Retry-After": "1"} if fields["status"] == 503 else None
    return APIError(
        fields["status"], fields["message"], type=fields["type"], param=fields["param"], code=fields["code"], headers=headers
    )


def _stopped(err: Exception) -> APIError:
    """A replica whose engine has stopped (Serve's health check replaces it): a 503 to retry."""
    return APIError(503, str(err), type="server_error", code="overloaded")


# No interactive docs: they would be reachable without a key.
api = FastAPI(title="AlloyLM", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(APIError)
async def _api_error(_: Request, err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
    return JSONResponse(error_body(str(err.detail), type=kind), status_code=err.status_code)


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
    return JSONResponse(error_body(str(err), type="invalid_request_error"), status_code=400)


@api.exception_handler(Exception)
async def _unexpected_error(_: Request, err: Exception) -> JSONResponse:
    # Still OpenAI's shape, so clients report it; the details stay in the replica's log.
    log.error("request failed: %s: %s", type(err).__name__, err)
    return JSONResponse(
        error_body(f"internal error ({type(err).__name__})", type="server_error"), status_code=500
    )


@contextmanager
def _busy_as_503(model: str) -> Iterator[None]:
    """Serve's backpressure (queue full), a deployment with no replica up, or a replica that died
    with the request in flight (Serve starts another), as OpenAI's 503 with Retry-After."""
    try:
        yield
    except BackPressureError:
        raise _overloaded(f"model {model!r} is overloaded; retry later") from None
    except DeploymentUnavailableError:
        raise _overloaded(f"model {model!r} is not available right now; retry later") from None
    except RayActorError:  # ActorDiedError, ActorUnavailableError: the replica process is gone
        log.warning("a replica of model %r failed with a request in flight", model)
        raise _overloaded(f"the replica serving model {model!r} failed; retry (a new one is starting)") from None


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")


def _overloaded(message: str) -> APIError:
    return APIError(503, message, type="server_error", code="overloaded", headers={"Retry-After": "1"})


async def _sse_chunks(
    events: AsyncIterator[dict[str, Any]],
    *,
    kind: Literal["completion", "chat"],
    request_id: str,
    model: str,
    prompt_tokens: int,
    choices: int,
    include_usage: bool,
) -> AsyncIterator[bytes]:
    """OpenAI's chunks for one streamed answer (each chunk one choice's piece), then `data: [DONE]`."""
    created = int(time.time())

    def chunk(index: int, text: str | None, finish_reason: str | None, logprobs: dict | None = None, *, role: bool = False) -> bytes:
        if kind == "completion":
            return sse(
                completion_chunk(
                    request_id=request_id, model=model, created=created, text=text or "",
                    finish_reason=finish_reason, index=index, logprobs=logprobs,
                )
            )  # fmt: skip
        delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
        return sse(
            chat_chunk(
                request_id=request_id, model=model, created=created, delta=delta,
                finish_reason=finish_reason, index=index, logprobs=logprobs,
            )
        )  # fmt: skip

    completion_tokens: dict[int, int] = {}
    finished = False
    try:
        # Inside the try: a client that leaves at the first chunk also stops the replica's side.
        if kind == "chat":
            for index in range(choices):
                yield chunk(index, None, None, role=True)
        async for event in _failures_as_errors(events, model):
            if "error" in event:
                fields = event["error"]
                yield sse(error_body(fields["message"], type=fields["type"], code=fields["code"]))
                break
            index = event["index"]
            completion_tokens[index] = event["completion_tokens"]
            if event["text"] or event["logprobs"]:
                yield chunk(index, event["text"], None, event["logprobs"])
            if event["finish_reason"] is not None:
                yield chunk(index, None, event["finish_reason"])
        finished = True
    finally:
        if not finished:  # the client left mid-stream (or an error ended it): stop the replica's side
            events.cancel()
    if include_usage:
        yield sse(
            usage_chunk(
                kind=kind,
                request_id=request_id,
                model=model,
                created=created,
                prompt_tokens=prompt_tokens,
                completion_tokens=sum(completion_tokens.values()),
            )
        )
    yield SSE_DONE


async def _failures_as_errors(events: AsyncIterator[dict[str, Any]], model: str) -> AsyncIterator[dict[str, Any]]:
    """The replica's events; a replica that dies mid-stream ends the stream with an error event
    (the status line, 200, is already sent) instead of a cut connection."""
    try:
        async for event in events:
            yield event
    except RayActorError:
        log.warning("a replica of model %r failed while streaming", model)
        yield {"error": {"message": f"the replica serving model {model!r} failed; retry", "type": "server_error", "code": "overloaded"}}


# -------------------------------------------------------------------------------------------
# The model replica
# -------------------------------------------------------------------------------------------


@serve.deployment
class ModelServer:
    """One variant: its tokenizer, its model and the continuous-batching engine around them."""

    def __init__(self, variant: str, source: str, config: ServeConfig) -> None:
        import torch

        # Imported here, not at the top: the ingress imports this module too and needs no torch.
        from alloylm.models.loading import load_model, load_tokenizer
        from alloylm.models.tokenizer import stop_token_ids
        from alloylm.serve.engine import GenerationEngine

        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        self.variant = variant
        self.limits = config.limits
        # trust_remote_code stays False: a served model runs no code shipped with its weights.
        self.tokenizer = load_tokenizer(source, trust_remote_code=False)
        model = load_model(source, trust_remote_code=False, dtype=config.dtype)
        use_gpu = config.deployment.num_gpus > 0 and torch.cuda.is_available()
        model = model.to("cuda" if use_gpu else "cpu")
        stops = set(stop_token_ids(self.tokenizer))
        eos = model.generation_config.eos_token_id
        stops.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.context_length = _context_length(model.config, self.tokenizer)
        self.vocab_size = len(self.tokenizer)
        self._token_texts: dict[int, str] = {}
        self._context_text: tuple[tuple[int, ...], str] = ((), "")  # the last context _token_text decoded
        self.engine = GenerationEngine(
            model,
            self.tokenizer,
            stop_token_ids=sorted(stops),
            max_batch_size=config.batching.max_batch_size,
            batch_wait_timeout_s=config.batching.batch_wait_timeout_s,
            name=variant,
        )
        log.info(
            "variant %s loaded on %s: context %d tokens, batches of up to %d",
            variant,
            "cuda" if use_gpu else "cpu",
            self.context_length,
            config.batching.max_batch_size,
        )

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _token_text(self, token: int, previous: Sequence[int] = ()) -> str:
        """The text of `token` in a logprob, where it follows `previous` (the tokens before it):
        decoded after their last CONTEXT_TOKENS, as the answer itself is (`decode_continuation`), so
        that a SentencePiece-style decoder keeps the leading space it drops at a text's start and
        the tokens' texts add up to the text (`text_offset`). Decoded alone (cached) at the start."""
        from alloylm.serve.detokenizer import CONTEXT_TOKENS

        if not previous:
            text = self._token_texts.get(token)
            if text is None:
                text = self._token_texts[token] = self._decode([token])
            return text
        context = tuple(previous[-CONTEXT_TOKENS:])
        # One position's token and its alternatives follow the same tokens: their text, decoded once.
        if self._context_text[0] != context:
            self._context_text = (context, self._decode(list(context)))
        head = self._context_text[1]
        full = self._decode([*context, token])
        return full[len(head):] if full.startswith(head) else self._token_text(token)

    def _prompt_ids(self, request: GenerationRequest) -> list[tuple[list[int], str]]:
        """Each prompt's token ids and its text (what `echo` returns)."""
        if request.messages is not None:
            if not getattr(self.tokenizer, "chat_template", None):
                raise bad_request(f"model {self.variant!r} has no chat template; use /v1/completions", "messages")
            try:
                text = self.tokenizer.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=False)
            except Exception as err:  # jinja raises its own errors for conversations a template refuses
                raise bad_request(f"the chat template rejected the messages: {err}", "messages") from None
            prompts = [(self.tokenizer(text, add_special_tokens=False)["input_ids"], text)]
        else:
            prompts = []
            for prompt in request.prompts:
                if isinstance(prompt, str):
                    prompts.append((self.tokenizer(prompt)["input_ids"], prompt))
                    continue
                # Token ids are scored and continued exactly as given.
                ids = list(prompt)
                if any(not isinstance(i, int) or not 0 <= i < self.vocab_size for i in ids):
                    raise bad_request(f"prompt token ids must lie in [0, {self.vocab_size})", "prompt")
                text = self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False) if request.echo else ""
                prompts.append((ids, text))
        param = "messages" if request.messages is not None else "prompt"
        for ids, _ in prompts:
            if not ids:
                raise bad_request("the prompt is empty", param)
            if len(ids) > self.limits.max_prompt_tokens:
                raise bad_request(
                    f"the prompt has {len(ids)} tokens; this server accepts at most {self.limits.max_prompt_tokens}",
                    param,
                    "context_length_exceeded",
                )
            given = request.params.max_tokens_param
            # A prompt that fills the context leaves room for nothing, which is all that scoring it
            # (echo with max_tokens 0, lm-eval's rolling windows of max_length tokens) asks for.
            scoring_only = given is not None and request.params.max_tokens == 0
            if len(ids) > self.context_length or (len(ids) == self.context_length and not scoring_only):
                raise bad_request(
                    f"this model's context is {self.context_length} tokens; the prompt has {len(ids)}, which leaves no room",
                    param,
                    "context_length_exceeded",
                )
            if given is not None and len(ids) + request.params.max_tokens > self.context_length:
                raise bad_request(
                    f"this model's context is {self.context_length} tokens; the prompt ({len(ids)}) plus "
                    f"{given} ({request.params.max_tokens}) exceed it",
                    given,
                    "context_length_exceeded",
                )
            if given is None and self.context_length - len(ids) < request.params.min_tokens:
                raise bad_request(
                    f"this model's context is {self.context_length} tokens; after the prompt ({len(ids)}) it has no room "
                    f"for min_tokens ({request.params.min_tokens})",
                    "min_tokens",
                    "context_length_exceeded",
                )
        return prompts

    def _sequences(self, request: GenerationRequest, prompts: list[tuple[list[int], str]]):
        """(choice index, prompt ids, prompt text, sampling) of every choice, prompt-major."""
        return [
            (p * request.n + j, ids, text, self._room_for(request.params, len(ids)).for_choice(j))
            for p, (ids, text) in enumerate(prompts)
            for j in range(request.n)
        ]

    def _room_for(self, params: SamplingParams, prompt_tokens: int) -> SamplingParams:
        """`params`, its default max_tokens (none was asked for) cut to what the context has room for."""
        room = self.context_length - prompt_tokens
        if params.max_tokens_param is None and params.max_tokens > room:
            return dataclasses.replace(params, max_tokens=room)
        return params

    def _logprobs(self, request: GenerationRequest, entries, *, offset: int = 0, previous: Sequence[int] = ()) -> dict | None:
        """`entries` in the request's logprobs shape; `previous`: the token ids before the first
        entry (the prompt's, then the choice's so far; none when `echo` starts at the prompt)."""
        if request.params.logprobs is None:
            return None
        if request.kind == "chat":
            return chat_logprobs(entries, self._token_text, previous=previous)
        return completion_logprobs(entries, self._token_text, offset=offset, previous=previous)

    async def complete(self, request: GenerationRequest) -> dict[str, Any]:
        """The whole answer: `{choices, prompt_tokens, completion_tokens}` or `{error}`."""
        try:
            prompts = self._prompt_ids(request)
        except APIError as err:
            return {"error": _error_fields(err)}

        async def last_event(ids: list[int], params: SamplingParams):
            async for event in self.engine.generate(ids, params, stream=False):
                if event.finish_reason is not None:
                    return event
            raise RuntimeError("generation ended without a finish event")

        from alloylm.serve.engine import EngineStoppedError

        sequences = self._sequences(request, prompts)
        # Every choice of every prompt enters the engine at once, so they share its batches.
        try:
            events = await asyncio.gather(*(last_event(ids, params) for _, ids, _, params in sequences))
        except EngineStoppedError as err:
            return {"error": _error_fields(_stopped(err))}
        choices = []
        for (index, ids, prompt_text, _), event in zip(sequences, events):
            if event.finish_reason == "error":
                return {"error": _error_fields(APIError(500, event.text, type="server_error"))}
            text, entries, previous = event.text, event.logprobs, ids
            if request.echo:
                text, entries, previous = prompt_text + text, (*(event.prompt_logprobs or ()), *entries), ()
            logprobs = self._logprobs(request, entries, previous=previous)
            build = completion_choice if request.kind == "completion" else chat_choice
            choices.append(build(index, text, event.finish_reason, logprobs))
        return {
            "choices": choices,
            "prompt_tokens": sum(len(ids) for ids, _ in prompts),
            "completion_tokens": sum(event.completion_tokens for event in events),
        }

    async def stream(self, request: GenerationRequest) -> AsyncIterator[dict[str, Any]]:
        """`{prompt_tokens}` (or `{error}`) first, then `{index, text, logprobs, completion_tokens,
        finish_reason}` pieces of the choices as they come."""
        try:
            prompts = self._prompt_ids(request)
        except APIError as err:
            yield {"error": _error_fields(err)}
            return
        yield {"prompt_tokens": sum(len(ids) for ids, _ in prompts)}
        from alloylm.serve.engine import EngineStoppedError

        sequences = self._sequences(request, prompts)
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, ids: list[int], params: SamplingParams) -> None:
            try:
                async for event in self.engine.generate(ids, params, stream=True):
                    queue.put_nowait((index, event))
            except Exception as err:  # noqa: BLE001 - reported to the client as the stream's error
                queue.put_nowait((index, err))

        tasks = [asyncio.create_task(pump(index, ids, params)) for index, ids, _, params in sequences]
        prompt_text = {index: text for index, _, text, _ in sequences}
        from alloylm.serve.detokenizer import CONTEXT_TOKENS

        sent = dict.fromkeys(prompt_text, 0)  # characters of each choice's token texts sent so far
        # The token ids each choice's next logprobs follow: the prompt's (none with echo, whose
        # logprobs start at the prompt's first token), then the choice's own as they are sent.
        before = {index: [] if request.echo else list(ids[-CONTEXT_TOKENS:]) for index, ids, _, _ in sequences}
        echoed: set[int] = set()
        left = len(tasks)
        try:
            while left:
                index, event = await queue.get()
                if isinstance(event, EngineStoppedError):
                    yield {"error": _error_fields(_stopped(event))}
                    return
                if isinstance(event, Exception) or event.finish_reason == "error":
                    if isinstance(event, Exception):  # its kind for the client, its text for the log
                        log.error("streaming a choice of model %r failed", self.variant, exc_info=event)
                        message = f"generation failed ({type(event).__name__}); the server's log has the details"
                    else:
                        message = event.text
                    yield {"error": _error_fields(APIError(500, message, type="server_error"))}
                    return
                text, entries = event.text, (*(event.prompt_logprobs or ()), *event.logprobs)
                if request.echo and index not in echoed:
                    echoed.add(index)
                    text = prompt_text[index] + text
                logprobs = self._logprobs(request, entries, offset=sent[index], previous=before[index])
                if logprobs is not None and "tokens" in logprobs:
                    sent[index] += sum(len(t) for t in logprobs["tokens"])
                before[index] = [*before[index], *(e.token for e in entries)][-CONTEXT_TOKENS:]
                if event.finish_reason is not None:
                    left -= 1
                yield {
                    "index": index,
                    "text": text,
                    "logprobs": logprobs,
                    "completion_tokens": event.completion_tokens,
                    "finish_reason": event.finish_reason,
                }
        finally:
            # The client left, or all is sent: a cancelled generation leaves the batch at the next step.
            for task in tasks:
                task.cancel()

    def stats(self) -> dict[str, float]:
        """The engine's counters (steps, largest batch, running and waiting sequences...)."""
        return vars(self.engine.stats())

    def check_health(self) -> None:
        # Called by Serve every health_check_period_s; raising marks the replica unhealthy and
        # Serve replaces it.
        if not self.engine.healthy():
            raise RuntimeError(f"the generation engine of variant {self.variant!r} has stopped")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()


# -------------------------------------------------------------------------------------------
# The HTTP ingress
# -------------------------------------------------------------------------------------------

@serve.deployment
@serve.ingress(api)
class OpenAIIngress:
    """Authentication, request checks and routing by `model`; holds no model itself."""

    def __init__(self, models: dict[str, DeploymentHandle], config: ServeConfig, key_digests: list[str]) -> None:
        self._models = models
        self._default = config.model
        self._chosen = config.chosen.model_dump() if config.chosen else None
        self._limits = config.limits
        self._created = int(time.time())
        self._auth = APIKeyCheck.from_sources(config.api_keys_file, extra_digests=key_digests)
        if self._auth.is_open:
            log.warning(OPEN_SERVER_WARNING)
        else:
            log.info("API key check on: %d key(s) configured", self._auth.key_count)

    def auth_status(self) -> dict[str, Any]:
        """Whether the API is open and how many keys it knows (never the keys)."""
        return {"open": self._auth.is_open, "keys": self._auth.key_count}

    def _authorize(self, request: Request) -> None:
        if not self._auth.allows(request.headers.get("authorization")):
            raise APIError(
                401,
                "Missing or invalid API key: send it as 'Authorization: Bearer <key>'.",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    async def _body(self, request: Request) -> bytes:
        limit = self._limits.max_request_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise _too_large(limit)
        body = b""
        async for piece in request.stream():
            body += piece
            if len(body) > limit:
                raise _too_large(limit)
        return body

    def _handle(self, model: str | None) -> tuple[str, DeploymentHandle]:
        name = model or self._default
        if name == "best" and self._chosen:  # `model: best`: the alias of the chosen variant
            name = self._chosen["variant"]
        handle = self._models.get(name)
        if handle is None:
            raise APIError(
                404,
                f"The model {name!r} does not exist; this server has: {', '.join(self._models)}",
                param="model",
                code="model_not_found",
            )
        return name, handle

    @api.get("/health")
    async def health(self) -> dict[str, str]:
        # Unauthenticated on purpose: load balancers and Kubernetes probes carry no key.
        return {"status": "ok"}

    @api.get("/v1/models")
    async def list_models(self, request: Request) -> JSONResponse:
        self._authorize(request)
        return JSONResponse(model_list(list(self._models), self._created, default=self._default, chosen=self._chosen))

    @api.get("/v1/models/{model:path}")
    async def get_model(self, model: str, request: Request) -> JSONResponse:
        self._authorize(request)
        name, _ = self._handle(model)
        return JSONResponse(model_list([name], self._created, default=self._default, chosen=self._chosen)["data"][0])

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        self._authorize(request)
        body: CompletionRequest = parse_request(CompletionRequest, await self._body(request))
        name, handle = self._handle(body.model)
        params = sampling_params(body, self._limits)
        prompts = body.prompts()
        if len(prompts) > self._limits.max_prompts:
            raise bad_request(f"the request has {len(prompts)} prompts; this server accepts at most {self._limits.max_prompts}", "prompt")
        generation = GenerationRequest(kind="completion", params=params, prompts=tuple(prompts), n=body.n, echo=body.echo)
        return await self._answer(generation, name, handle, stream=body.stream, include_usage=body.include_usage)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        self._authorize(request)
        body: ChatCompletionRequest = parse_request(ChatCompletionRequest, await self._body(request))
        name, handle = self._handle(body.model)
        params = sampling_params(body, self._limits)
        generation = GenerationRequest(kind="chat", params=params, messages=body.conversation(), n=body.n)
        return await self._answer(generation, name, handle, stream=body.stream, include_usage=body.include_usage)

    async def _answer(
        self, generation: GenerationRequest, name: str, handle: DeploymentHandle, *, stream: bool, include_usage: bool
    ):
        request_id = completion_id(generation.kind)
        if not stream:
            with _busy_as_503(name):
                result = await handle.complete.remote(generation)
            if "error" in result:
                raise _error_from_fields(result["error"])
            build = completion_response if generation.kind == "completion" else chat_response
            return JSONResponse(build(request_id=request_id, model=name, **result))
        events = handle.options(stream=True).stream.remote(generation)
        with _busy_as_503(name):
            first = await events.__anext__()
        if "error" in first:
            events.cancel()
            raise _error_from_fields(first["error"])
        chunks = _sse_chunks(
            events,
            kind=generation.kind,
            request_id=request_id,
            model=name,
            prompt_tokens=first["prompt_tokens"],
            choices=generation.choices,
            include_usage=include_usage,
        )
        return StreamingResponse(
            chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )


# -------------------------------------------------------------------------------------------
# Building the application
# -------------------------------------------------------------------------------------------


def build_serve_app(config: ServeConfig, *, key_digests: list[str] | tuple[str, ...] = ()) -> serve.Application:
    """The application for `config`: every variant's deployment and the ingress in front.

    `key_digests` are SHA-256 digests of further API keys (`serve_run` passes those of the
    driver's `$ALLOYLM_API_KEYS`, so a remote cluster enforces them without seeing the keys).
    """
    if config.backend == "vllm":
        from alloylm.serve.llm_backend import build_vllm_app

        return build_vllm_app(config, key_digests=key_digests)
    missing = config.missing_sources()
    if missing:
        raise ValueError(
            f"no model folder for variant(s) {', '.join(missing)}: name each under `sources` "
            "(variant: local path, s3:// URI or Hugging Face id)"
        )
    models = {
        name: ModelServer.options(name=f"model-{name}", **config.deployment.to_serve()).bind(
            name, config.sources[name], config
        )
        for name in config.variant_names
    }
    ingress = OpenAIIngress.options(
        name="ingress",
        num_replicas=config.ingress.num_replicas,
        max_ongoing_requests=config.ingress.max_ongoing_requests,
        ray_actor_options={"num_cpus": config.ingress.num_cpus},
    )
    return ingress.bind(models, config, list(key_digests))


def build_app(args: dict[str, Any]) -> serve.Application:
    """`import_path` target (`alloylm.serve.app:build_app`): `args` is a `ServeConfig` mapping."""
    try:
        config = ServeConfig.model_validate(args or {})
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in err.errors()
        )
        raise ValueError(f"invalid AlloyLM serve args: {problems}") from None
    return build_serve_app(config)
