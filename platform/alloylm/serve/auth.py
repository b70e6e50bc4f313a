"""API keys: where they come from, and checking a request's `Authorization: Bearer <key>` header.

Keys come from `$ALLOYLM_API_KEYS` (comma-separated) and from the file named by `api_keys_file`
(one key per line). Only their SHA-256 digests are kept, compared in constant time; no key, whole
or in part, is ever logged or echoed in an error. A configured key file that cannot be read stops
the server rather than leaving it open.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from alloylm.serve.config import API_KEYS_ENV


def key_digest(key: str) -> str:
    """The SHA-256 hex digest under which a key is kept."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def keys_from_env(environ: Mapping[str, str] | None = None) -> list[str]:
    """The keys in `$ALLOYLM_API_KEYS`, comma-separated, blanks dropped."""
    raw = (os.environ if environ is None else environ).get(API_KEYS_ENV, "")
    return [key.strip() for key in raw.split(",") if key.strip()]


def keys_from_file(path: str) -> list[str]:
    """The keys in `path`, one a line; blank lines and `#` comments are skipped.

    Raises ValueError when the file is missing, unreadable or holds no key: a server told to use
    a key file must not start open.
    """
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"api_keys_file {path!r} cannot be read ({type(err).__name__}); refusing to start") from None
    keys = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    if not keys:
        raise ValueError(f"api_keys_file {path!r} holds no API key; refusing to start an open server")
    return keys


class APIKeyCheck:
    """Decides whether a request's Authorization header carries one of the configured keys."""

    def __init__(self, digests: Iterable[str]) -> None:
        self._digests = sorted(set(digests))

    @classmethod
    def from_sources(
        cls,
        api_keys_file: str | None,
        *,
        extra_digests: Iterable[str] = (),
        environ: Mapping[str, str] | None = None,
    ) -> APIKeyCheck:
        """Keys of `$ALLOYLM_API_KEYS`, of `api_keys_file` and the digests given (from the driver)."""
        keys = keys_from_env(environ)
        if api_keys_file:
            keys += keys_from_file(api_keys_file)
        return cls([*map(key_digest, keys), *extra_digests])

    @property
    def is_open(self) -> bool:
        """True when no key is configured: every request is let in."""
        return not self._digests

    @property
    def key_count(self) -> int:
        return len(self._digests)

    def allows(self, authorization: str | None) -> bool:
        if self.is_open:
            return True
        if not authorization:
            return False
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        digest = key_digest(token.strip())
        # Compare against every key, so the time taken does not tell which one came close.
        matches = [hmac.compare_digest(digest, known) for known in self._digests]
        return any(matches)
