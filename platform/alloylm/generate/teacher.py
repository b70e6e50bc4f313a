"""Talking to the teacher: one OpenAI-compatible chat completion with bounded retries and a rate
limit (`TeacherClient`), and the Ray Data actor that sends whole batches and writes each finished
one (`SendBatches`).

Not `ray.data.llm`'s HTTP request processor (Ray 2.60), because generation needs what it lacks:
  - it sends the requests of a batch one after another (each is awaited in turn), so concurrency
    would come only from more actors, each a process;
  - it retries only 408/429/502/503/504 and hands any other answer (a 500's error body, too) on as a
    response, while exhausted retries or a non-JSON body raise inside the Dataset and fail the whole
    execution, so finished batches could not be told from unfinished ones;
  - its rate limit is an integer per actor and per batch, and it has no per-request timeout.
Here each actor holds a thread pool (the concurrency bound), a shared rate limiter, and returns a
status per batch instead of raising, so one failed batch never costs the others.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from alloylm.config import TeacherConfig

log = logging.getLogger("alloylm.generate")

# Worth another try: timeouts, conflicts, rate limits, server errors. Other 4xx answers (bad
# request, unauthorised, unknown model) would fail the same way again.
RETRYABLE_STATUS = frozenset({408, 409, 429})
# The endpoint refuses this one request as it is (vLLM's 400 for a prompt plus max_tokens past
# max_model_len, a 413 body too large): the same chunk is refused on every run, so it is that
# chunk's problem (`rejected_request`), not its batch's, unless the whole batch is refused.
REJECTED_STATUS = frozenset({400, 413, 422})
MAX_RETRY_AFTER_S = 60.0
MAX_ERROR_SHOWN = 300


class TeacherCallError(Exception):
    """A request that got no answer: a 4xx that is not worth retrying, or every retry failed."""


@dataclass(frozen=True)
class TeacherReply:
    """One answer of the teacher, or why its response could not be read (`problem`)."""

    content: str | None
    finish_reason: str | None
    retries: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    problem: str = ""
    problem_reason: str = "bad_response"  # the malformed reason `problem` is counted under


class RateLimiter:
    """At most `rate` starts per second over every thread that shares it (null rate: no limit)."""

    def __init__(self, rate: float | None, *, clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        self._interval = 1.0 / rate if rate else 0.0
        self._next = 0.0
        self._lock = threading.Lock()
        self._clock, self._sleep = clock, sleep

    def wait(self) -> None:
        """Return when the caller may start its request: each start takes the next free slot."""
        if not self._interval:
            return
        with self._lock:
            now = self._clock()
            start = max(now, self._next)
            self._next = start + self._interval
        if start > now:
            self._sleep(start - now)


def _retry_after(headers: Any) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    try:
        return min(MAX_RETRY_AFTER_S, max(0.0, float(value))) if value is not None else None
    except ValueError:  # an HTTP date: rare from model servers; use our own backoff
        return None


class TeacherClient:
    """Chat completions at `teacher.base_url`, each retried up to `teacher.max_retries` times."""

    def __init__(self, teacher: TeacherConfig, api_key: str | None, limiter: RateLimiter):
        self.teacher = teacher
        self.url = f"{teacher.base_url}/chat/completions"
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._limiter = limiter

    def _post(self, body: bytes) -> tuple[int, Any, bytes]:
        request = urllib.request.Request(self.url, data=body, headers=self._headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.teacher.timeout_s) as response:
                return response.status, response.headers, response.read()
        except urllib.error.HTTPError as err:  # a status >= 400 still has a body worth showing
            with err:
                return err.code, err.headers, err.read()

    def complete(self, messages: list[dict[str, str]]) -> TeacherReply:
        """The teacher's answer to `messages`; raises TeacherCallError when no answer came."""
        teacher = self.teacher
        payload = {
            "model": teacher.model,
            "messages": messages,
            "temperature": teacher.temperature,
            "max_tokens": teacher.max_tokens,
            **teacher.extra_body,
        }
        body = json.dumps(payload).encode("utf-8")
        failure = ""
        for attempt in range(teacher.max_retries + 1):
            self._limiter.wait()
            wait_s: float | None = None
            try:
                status, headers, raw = self._post(body)
            except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:  # refused, reset, timed out
                failure = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
            else:
                if status == 200:
                    reply = _reply(raw, attempt)
                    if not reply.problem or attempt == teacher.max_retries:
                        return reply  # after the retries, a body that is still no chat completion: bad_response
                    failure = reply.problem  # not a chat completion (a proxy's or gateway's page): asked again, as a 5xx
                else:
                    shown = raw[:MAX_ERROR_SHOWN].decode("utf-8", "replace")
                    failure = f"HTTP {status}: {shown}"
                    if status in REJECTED_STATUS:
                        return TeacherReply(None, None, attempt, problem=f"{self.url} refused the request: {failure}", problem_reason="rejected_request")
                    if status not in RETRYABLE_STATUS and status < 500:
                        raise TeacherCallError(f"{self.url} answered {failure} (not retried)")
                    wait_s = _retry_after(headers)
            if attempt < teacher.max_retries:
                time.sleep(wait_s if wait_s is not None else teacher.retry_backoff_s * 2**attempt)
        raise TeacherCallError(f"{self.url}: no answer after {teacher.max_retries} retries; last: {failure}")


def _reply(raw: bytes, retries: int) -> TeacherReply:
    """A 200 response -> its first choice's text; a body that is not a chat completion is a problem."""
    try:
        data = json.loads(raw)
        choice = data["choices"][0]
        content = choice["message"].get("content")
        if content is not None and not isinstance(content, str):
            raise TypeError(f"message content is {type(content).__name__}")
        usage = data.get("usage") or {}
        return TeacherReply(
            content=content,
            finish_reason=choice.get("finish_reason"),
            retries=retries,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
        )
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        shown = raw[:MAX_ERROR_SHOWN].decode("utf-8", "replace")
        return TeacherReply(None, None, retries, problem=f"not a chat completion ({type(exc).__name__}: {exc}): {shown!r}")


class SendBatches:
    """Ray Data actor: each input row is one batch of requests; the batch is sent, checked, and
    written to `<batches_uri>/<batch_id>.json` once every request has an answer.

    Returns one status row per batch (`error` empty when written): a failed request fails its
    batch, which is not written and is sent again by the next run, and the pending requests of
    that batch are cancelled.
    """

    def __init__(
        self,
        teacher: TeacherConfig,
        api_key: str | None,
        threads: int,
        requests_per_second: float | None,
        task: str,
        items_wanted: int,
        question_type: str,
        num_choices: int,
        batches_uri: str,
        chunks_uri: str | None = None,
    ):
        self.client = TeacherClient(teacher, api_key, RateLimiter(requests_per_second))
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="teacher")
        self.options = {"task": task, "items_wanted": items_wanted, "question_type": question_type, "num_choices": num_choices}
        self.batches_uri = batches_uri
        self.chunks_uri = chunks_uri

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        out: dict[str, list] = {"batch_id": [], "error": [], "seconds": []}
        for batch_id, requests_json in zip(batch["batch_id"], batch["requests"]):
            started = time.monotonic()
            try:
                error = self._send(str(batch_id), json.loads(str(requests_json)))
            except Exception as exc:  # anything else (storage, a bug) fails this batch, not the run
                error = f"{type(exc).__name__}: {exc}"
            if error:
                log.warning("batch %s failed: %s", batch_id, error)
            out["batch_id"].append(str(batch_id))
            out["error"].append(error)
            out["seconds"].append(round(time.monotonic() - started, 3))
        return out

    def _send(self, batch_id: str, requests: list[dict]) -> str:
        from alloylm import storage
        from alloylm.generate.parse import ChunkRequest, parse_answer

        futures = [self.pool.submit(self.client.complete, request["messages"]) for request in requests]
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f for f in done if f.exception() is not None]
        if failed:
            for future in pending:
                future.cancel()
            wait(pending)
            return str(failed[0].exception())
        replies: list[TeacherReply] = [f.result() for f in futures]
        if len(replies) > 1 and all(r.problem_reason == "rejected_request" for r in replies):
            # every request of several refused: the endpoint or the settings, not a chunk; fail the
            # batch (sent again next run). A batch of one chunk cannot tell: that chunk is recorded.
            return f"every request of the batch was refused; the first: {replies[0].problem}"
        items, malformed, per_chunk = [], [], []
        for request, reply in zip(requests, replies):
            # Counted per chunk, so that a later run grouping the chunks otherwise reuses this answer.
            counts = {"requests": 1, "answers": 0, "items": 0, "extra_items": 0, "retries": reply.retries,
                      "prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens}
            per_chunk.append(counts)
            chunk = ChunkRequest(request["chunk_id"], request["document_id"], request.get("split", ""))
            if reply.problem:
                malformed.append({"chunk_id": chunk.chunk_id, "reason": reply.problem_reason, "detail": reply.problem})
                continue
            counts["answers"] = 1
            records, problems, extra = parse_answer(reply.content, reply.finish_reason, request=chunk, **self.options)
            items += records
            counts["items"], counts["extra_items"] = len(records), extra
            malformed += [{"chunk_id": chunk.chunk_id, "reason": p.reason, "detail": p.detail} for p in problems]
        document = {"batch_id": batch_id, "chunks": [r["chunk_id"] for r in requests],
                    "chunk_keys": [r.get("chunk_key") for r in requests], "per_chunk": per_chunk,
                    "counts": batch_counts(per_chunk), "items": items, "malformed": malformed}
        # One atomic write per batch: the file exists exactly when the batch is finished.
        storage.write_json(storage.join(self.batches_uri, f"{batch_id}.json"), document)
        if self.chunks_uri is not None:
            index_chunks(self.chunks_uri, batch_id, document["chunk_keys"])
        return ""


def index_chunks(chunks_uri: str, batch_id: str, keys: list[str | None]) -> None:
    """Name each chunk answered in batch `batch_id` in the chunk index, an empty file
    `<chunk key>.<batch id>` per chunk: one listing of the folder tells a later run, grouping the
    chunks otherwise, which batch file holds which answer. Written after the batch's file, so an
    entry always names a finished batch."""
    from alloylm import storage

    for key in keys:
        if key:
            storage.write_text(storage.join(chunks_uri, f"{key}.{batch_id}"), "")


# What a chunk's answer counts, and a batch's the sums of its chunks'.
COUNTS = ("requests", "answers", "items", "extra_items", "retries", "prompt_tokens", "completion_tokens")


def batch_counts(per_chunk: list[dict]) -> dict[str, int]:
    """A batch's counts: the sums of its chunks'."""
    return {key: sum(int(counts.get(key, 0)) for counts in per_chunk) for key in COUNTS}


def threads_per_actor(max_concurrency: int, actors: int) -> int:
    """Request threads of each actor so that all actors together stay within max_concurrency."""
    return max(1, math.floor(max_concurrency / actors))
