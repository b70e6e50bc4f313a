"""A TCP forwarder in front of moto's S3 server: the S3 endpoint the storage-outage tests take down.

    python tests/outage_proxy.py LISTEN_PORT UPSTREAM_PORT [--hold REGEX] [--skip N]

It forwards bytes both ways, unchanged, and prints ``ready`` once it listens. The tests SIGKILL it
(every connection through it drops, new ones are refused) and start it again on the same port:
a real outage of the endpoint, while moto behind it keeps the objects it stored, as S3 keeps
them when its front end is unreachable.

``--hold REGEX``: the first request line (``PUT /bucket/key HTTP/1.1``) that matches REGEX is
not forwarded; the proxy prints ``held <request line>`` and forwards nothing more on that
connection. The test then kills the proxy, so the outage starts while that upload is under way,
not before or after it. With a group in REGEX, ``--skip N`` lets the first N distinct values of
group 1 through (e.g. the first N checkpoint folders) and holds the first request of the next.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys


class Hold:
    def __init__(self, pattern: str | None, skip: int) -> None:
        self.pattern = re.compile(pattern.encode()) if pattern else None
        self.skip = skip
        self.seen: list[bytes] = []
        self.done = False

    def find(self, data: bytes) -> re.Match | None:
        """The request line to hold in `data`, if any (only ever one)."""
        if self.pattern is None or self.done:
            return None
        for match in self.pattern.finditer(data):
            unit = match.group(1) if self.pattern.groups else match.group(0)
            if unit not in self.seen:
                self.seen.append(unit)
            if len(self.seen) > self.skip and unit == self.seen[self.skip]:
                self.done = True
                return match
        return None


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, hold: Hold | None) -> None:
    tail = b""
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            if hold is not None:
                # A request line cut between two reads is found in the tail of the previous one.
                window = tail + data
                match = hold.find(window)
                if match is not None:
                    start = max(match.start() - len(tail), 0)
                    writer.write(data[:start])
                    await writer.drain()
                    print("held", match.group(0).split(b"\r\n")[0].decode("latin-1"), flush=True)
                    await asyncio.Event().wait()  # until the test kills the process
                tail = window[-2048:]
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        try:
            writer.close()
        except Exception:
            pass


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("listen", type=int)
    parser.add_argument("upstream", type=int)
    parser.add_argument("--hold")
    parser.add_argument("--skip", type=int, default=0)
    args = parser.parse_args()
    hold = Hold(args.hold, args.skip)

    async def connection(client_reader, client_writer):
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", args.upstream)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(pump(client_reader, up_writer, hold), pump(up_reader, client_writer, None))

    server = await asyncio.start_server(connection, "127.0.0.1", args.listen, reuse_address=True)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
