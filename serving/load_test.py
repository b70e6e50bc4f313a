"""Load-test a running OpenAI-compatible endpoint (AlloyLM's or any other) at several concurrencies.

    .venv/bin/python serving/load_test.py --url http://127.0.0.1:8000/v1 --model merged
    ALLOYLM_API_KEY=... .venv/bin/python serving/load_test.py --url http://host:8000/v1 --levels 1,8,32 --chat

Sends `--requests-per-slot` x concurrency requests per level, closed loop, and prints tokens/s,
requests/s and p50/p99 latency per level, then one JSON line with every figure. The key, if the
server needs one, is read from $ALLOYLM_API_KEY (never from the command line, which `ps` shows).
To compare batched and unbatched deployments of one model, see benchmarks/serve_load.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

from alloylm.serve.loadgen import run_load


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1", help="the API's base URL (ending in /v1)")
    parser.add_argument("--model", default=None, help="variant to load (default: the server's default)")
    parser.add_argument("--levels", default="1,8,32", help="concurrency levels, comma-separated")
    parser.add_argument("--requests-per-slot", type=int, default=4, help="requests per level = this x concurrency (>= 8)")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens of every request")
    parser.add_argument("--fixed-length", action="store_true", help="also send min_tokens = max_tokens (vLLM/AlloyLM extension)")
    parser.add_argument("--chat", action="store_true", help="use /chat/completions instead of /completions")
    parser.add_argument("--prompt", default="The toughness of nacre comes from", help="prompt (or user message)")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="a request unanswered this long counts as an error (default 600)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    figures = {}
    for concurrency in (int(level) for level in args.levels.split(",")):
        result = asyncio.run(
            run_load(
                args.url,
                model=args.model,
                concurrency=concurrency,
                requests=max(8, args.requests_per_slot * concurrency),
                max_tokens=args.max_tokens,
                min_tokens=args.max_tokens if args.fixed_length else None,
                prompt=args.prompt,
                chat=args.chat,
                api_key=os.environ.get("ALLOYLM_API_KEY"),
                timeout_s=args.timeout_s,
            )
        )
        figures[str(concurrency)] = result.as_dict()
        print(
            f"c={concurrency:3d}  {result.tokens_per_s:9.1f} tok/s  {result.requests_per_s:7.2f} req/s  "
            f"p50 {result.latency_p50_s * 1000:8.1f} ms  p99 {result.latency_p99_s * 1000:8.1f} ms  errors {result.errors}",
            flush=True,
        )
    print(json.dumps({"url": args.url, "model": args.model, "levels": figures}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
