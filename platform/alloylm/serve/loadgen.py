"""A closed-loop HTTP load generator for any OpenAI-compatible endpoint (AlloyLM's or another).

`run_load` keeps `concurrency` requests in flight until `requests` have been answered and reports
throughput (completion tokens/s, requests/s) and latency percentiles. With `scoring=True` each
request is a log-likelihood request as lm-evaluation-harness sends one (`echo`, `logprobs: 1`,
`max_tokens: 0`), and throughput counts the prompt tokens scored. `serving/load_test.py` is its
command line; `benchmarks/serve_load.py` uses it to compare batched and unbatched deployments.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class LoadResult:
    """What one load level measured."""

    concurrency: int
    requests: int
    errors: int
    wall_s: float
    completion_tokens: int
    tokens_per_s: float
    prompt_tokens: int
    prompt_tokens_per_s: float
    requests_per_s: float
    latency_p50_s: float
    latency_p99_s: float
    latency_max_s: float

    def as_dict(self) -> dict:
        return asdict(self)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), linear between the closest ranks, as numpy's default."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


async def run_load(
    base_url: str,
    *,
    model: str | None,
    concurrency: int,
    requests: int,
    max_tokens: int,
    prompt: str = "The toughness of nacre comes from",
    chat: bool = False,
    api_key: str | None = None,
    temperature: float = 1.0,
    min_tokens: int | None = None,
    scoring: bool = False,
    timeout_s: float | None = 600.0,
) -> LoadResult:
    """Send `requests` requests, `concurrency` at a time, and measure them.

    `min_tokens` (vLLM's extension, which AlloyLM honours) makes every answer equally long, so
    levels and deployments compare like with like. A request unanswered after `timeout_s` seconds
    (None: no limit), a refused or dropped connection, and an answer other than 200 count as
    `errors` and leave the latencies alone: a server that hangs ends the load with errors, not
    never.
    """
    import aiohttp

    if concurrency < 1 or requests < 1:
        raise ValueError("concurrency and requests must be at least 1")
    if scoring and chat:
        raise ValueError("scoring requests are completions (echo with logprobs); chat has no echo")
    path = "/chat/completions" if chat else "/completions"
    body: dict = {"max_tokens": max_tokens, "temperature": temperature}
    if scoring:
        body = {"max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0}
    if model:
        body["model"] = model
    if min_tokens is not None:
        body["min_tokens"] = min_tokens
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    payload = json.dumps(body)
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    latencies: list[float] = []
    tokens = 0
    prompt_tokens = 0
    errors = 0
    remaining = requests

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal remaining, tokens, errors, prompt_tokens
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            try:
                async with session.post(base_url.rstrip("/") + path, data=payload, headers=headers) as response:
                    answer = await response.read()
            except (TimeoutError, aiohttp.ClientError):
                errors += 1
                continue
            if response.status != 200:
                errors += 1
                continue
            latencies.append(time.perf_counter() - started)
            counts = json.loads(answer)["usage"]
            tokens += counts["completion_tokens"]
            prompt_tokens += counts["prompt_tokens"]

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        wall = time.perf_counter() - started
    answered = len(latencies)
    return LoadResult(
        concurrency=concurrency,
        requests=answered,
        errors=errors,
        wall_s=round(wall, 4),
        completion_tokens=tokens,
        tokens_per_s=round(tokens / wall, 2),
        prompt_tokens=prompt_tokens,
        prompt_tokens_per_s=round(prompt_tokens / wall, 2),
        requests_per_s=round(answered / wall, 3),
        latency_p50_s=round(percentile(latencies, 50), 4),
        latency_p99_s=round(percentile(latencies, 99), 4),
        latency_max_s=round(max(latencies, default=math.nan), 4),
    )
