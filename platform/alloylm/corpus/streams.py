"""Named random streams derived from the corpus seed.

Each source draws from its own stream, so a source's rows do not depend on which other sources were
generated, or in which order. Seeds come from SHA-256, never from Python's `hash()` (randomised per
process), so the same options give the same rows in every process and on every machine.
"""

from __future__ import annotations

import hashlib
import random


def stream_seed(seed: int, stream: str) -> int:
    """A 128-bit integer seed for the stream called `stream` under the corpus seed `seed`."""
    digest = hashlib.sha256(f"alloylm.corpus/{seed}/{stream}".encode()).digest()
    return int.from_bytes(digest[:16], "big")


def random_stream(seed: int, stream: str) -> random.Random:
    """A private `random.Random` for one stream (never the global one)."""
    return random.Random(stream_seed(seed, stream))
