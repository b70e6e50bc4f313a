"""The load generator against a real HTTP server on loopback that misbehaves on purpose."""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from alloylm.serve.loadgen import run_load


async def _serve(handler) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_post("/v1/completions", handler)
    runner = web.AppRunner(app, handler_cancellation=True)  # cleanup cancels the held handlers
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, shutdown_timeout=0.1)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}/v1"


def test_requests_a_server_never_answers_end_as_errors_not_a_hang():
    answered = []

    async def handler(request: web.Request) -> web.Response:
        body = await request.json()
        if len(answered) % 2:  # every other request: held until the client gives up
            answered.append(False)
            await asyncio.sleep(3600)
        answered.append(True)
        usage = {"completion_tokens": body["max_tokens"], "prompt_tokens": 3}
        return web.json_response({"choices": [{"text": "x"}], "usage": usage})

    async def main():
        runner, url = await _serve(handler)
        try:
            return await run_load(url, model="m", concurrency=2, requests=6, max_tokens=4, timeout_s=0.5)
        finally:
            await runner.cleanup()

    result = asyncio.run(main())
    assert (result.requests, result.errors) == (3, 3), result
    assert result.completion_tokens == 12 and result.latency_max_s < 0.5, result


def test_a_refused_connection_counts_as_an_error():
    async def main():
        runner, url = await _serve(lambda request: web.json_response({}))
        await runner.cleanup()  # nothing listens there any more
        return await run_load(url, model=None, concurrency=1, requests=2, max_tokens=1)

    result = asyncio.run(main())
    assert (result.requests, result.errors) == (0, 2), result
    assert json.dumps(result.as_dict(), allow_nan=True)
