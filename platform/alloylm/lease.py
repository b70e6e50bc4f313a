"""One writer per run: a lease on `<storage>/<experiment>/.lease`.

Two `alloylm run` (or `train`, `merge`, `search`, `data`, `eval`) on the same run at once would
train the same stage into the same checkpoints. The first takes the lease; a second exits 1 at
once naming the holder (or waits, with `--wait`). The holder renews a heartbeat every TTL/4; a
lease whose heartbeat is older than its TTL belongs to a dead holder and is taken over (logged).

How each store makes "create if absent" and "replace if unchanged" atomic:
- local: `O_CREAT | O_EXCL` creates the file; takeover and renewal run under an `flock` on
  `.lease.lock` (released by the kernel if the process dies), so two takers cannot both win;
- S3: a conditional put, `If-None-Match: *` to create and `If-Match: <etag>` to renew or take
  over (S3's compare-and-swap; the moto server honours both, checked in tests/test_lease.py).

`serve`, `report` and `validate` only read, and take no lease.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

from alloylm.errors import RunError

log = logging.getLogger("alloylm.lease")
LEASE_NAME = ".lease"


class LeaseHeldError(RunError):
    """Another live process holds the run's lease."""


class LeaseLostError(RunError):
    """Our lease was taken over (our heartbeat stopped for longer than the TTL)."""


@dataclass(frozen=True)
class LeaseInfo:
    owner: str  # a random id per holder
    host: str
    pid: int
    command: str
    started_at: float  # unix seconds
    heartbeat_at: float
    ttl: float
    # Seconds since the last heartbeat as the store's own clock tells it (S3: the response's Date
    # less the object's LastModified), when it does; not written. Else this host's clock against
    # the holder's `heartbeat_at`: hosts whose clocks differ by more than the TTL would take a live
    # holder's lease, or wait for a dead one's far too long.
    age: float | None = field(default=None, compare=False)

    def seconds_since_heartbeat(self) -> float:
        return self.age if self.age is not None else time.time() - self.heartbeat_at

    def stale(self) -> bool:
        return self.seconds_since_heartbeat() > self.ttl

    def describe(self) -> str:
        since = datetime.datetime.fromtimestamp(self.started_at, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        return f"{self.host} pid {self.pid} (`alloylm {self.command}`) since {since}, last heartbeat {self.seconds_since_heartbeat():.0f} s ago"


def _encode(info: LeaseInfo) -> bytes:
    return json.dumps({k: v for k, v in asdict(info).items() if k != "age"}, indent=1).encode("utf-8")


def _decode(data: bytes, where: str, age: float | None = None) -> LeaseInfo | None:
    try:
        return LeaseInfo(**{k: v for k, v in json.loads(data.decode("utf-8")).items() if k != "age"}, age=age)
    except (ValueError, TypeError, AttributeError):  # AttributeError: JSON that is not an object
        log.warning("lease %s is unreadable; treating it as stale", where)
        return None


# ------------------------------------------------------------------------------ stores


class _LocalStore:
    def __init__(self, path: str) -> None:
        self.path = path  # its folder is made on the first write: reading a lease creates nothing

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.path + ".lock", "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def create(self, data: bytes) -> str | None:
        """Write the lease if there is none; its version token, or None when one exists."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        # Created and written under the lock that `replace` takes: a racer that reads the file
        # still empty takes it for an unreadable (stale) lease, but its takeover waits for the
        # lock and then finds another version, so it looks again and sees this holder.
        with self._locked():
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return None
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        return data.decode("utf-8")

    def read(self) -> tuple[bytes, str, float | None] | None:
        """The lease's bytes, its version token, and (locally: one host's clock) no age of its own."""
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return data, data.decode("utf-8", "replace"), None

    def replace(self, data: bytes, version: str) -> str | None:
        """Write the lease only if it still is `version`; the new version, or None."""
        with self._locked():
            current = self.read()
            if current is None or current[1] != version:
                return None
            tmp = f"{self.path}.{uuid.uuid4().hex}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        return data.decode("utf-8")

    def delete(self, version: str) -> None:
        with self._locked():
            current = self.read()
            if current is not None and current[1] == version:
                os.remove(self.path)


class _S3Store:
    def __init__(self, uri: str) -> None:
        from alloylm import storage

        self.fs, path = storage.fsspec_filesystem(uri)
        self.bucket, _, self.key = path.partition("/")
        self.uri = uri

    def _call(self, method: str, **kwargs):
        from alloylm import storage

        try:
            return self.fs.call_s3(method, Bucket=self.bucket, Key=self.key, **kwargs)
        except (FileExistsError, FileNotFoundError):  # s3fs: 412 PreconditionFailed, 404: expected outcomes
            raise
        except Exception as err:
            raise storage.StorageError(f"cannot {method} the lease {self.uri}: {type(err).__name__}: {err}") from err

    def create(self, data: bytes) -> str | None:
        try:
            return self._call("put_object", Body=data, IfNoneMatch="*")["ETag"]
        except FileExistsError:  # s3fs maps 412 PreconditionFailed here
            return None

    def read(self) -> tuple[bytes, str, float | None] | None:
        """The lease's bytes, its ETag, and its age by the S3 server's clock (None where the
        response has no Date header to tell it)."""
        try:
            response = self._call("get_object")
        except FileNotFoundError:
            return None
        body = response["Body"]
        return _read_body(self.fs, body), response["ETag"], _server_age(response)

    def replace(self, data: bytes, version: str) -> str | None:
        try:
            return self._call("put_object", Body=data, IfMatch=version)["ETag"]
        except (FileExistsError, FileNotFoundError):
            return None

    def delete(self, version: str) -> None:
        with contextlib.suppress(FileExistsError, FileNotFoundError):
            self._call("delete_object", IfMatch=version)


def _server_age(response: dict) -> float | None:
    """Seconds from an S3 object's LastModified to the response's Date: both the server's clock,
    both in whole seconds, so the true age may be up to a second less than their difference: the
    lower bound, so that no live holder's lease is taken a second early."""
    from email.utils import parsedate_to_datetime

    modified = response.get("LastModified")
    date = (response.get("ResponseMetadata") or {}).get("HTTPHeaders", {}).get("date")
    if not isinstance(modified, datetime.datetime) or not date:
        return None
    try:
        return max(0.0, (parsedate_to_datetime(date) - modified).total_seconds() - 1.0)
    except (TypeError, ValueError):
        return None


def _read_body(fs, body) -> bytes:
    from fsspec.asyn import sync

    async def read() -> bytes:
        async with body as stream:
            return await stream.read()

    return sync(fs.loop, read)


# ------------------------------------------------------------------------------ the lease


class RunLease:
    """The lease on one run; `with RunLease(run_uri, "run").held(wait=False):` around the writing work."""

    def __init__(self, run_uri: str, command: str, *, ttl: float = 120.0) -> None:
        from alloylm import storage

        self.uri = storage.join(run_uri, LEASE_NAME)
        self.command = command
        self.ttl = ttl
        self._store = _S3Store(self.uri) if storage.is_remote(self.uri) else _LocalStore(storage.resolve(self.uri))
        self._owner = uuid.uuid4().hex
        self._started = time.time()
        self._version: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    def _info(self) -> bytes:
        return _encode(LeaseInfo(self._owner, socket.gethostname(), os.getpid(), self.command, self._started, time.time(), self.ttl))

    def holder(self) -> LeaseInfo | None:
        current = self._store.read()
        return None if current is None else _decode(current[0], self.uri, current[2])

    def try_acquire(self) -> LeaseInfo | None:
        """Take the lease (creating it, or taking over a stale one); None when taken, else the live holder."""
        while True:
            self._version = self._store.create(self._info())
            if self._version is not None:
                return None
            current = self._store.read()
            if current is None:
                continue  # released between our create and our read: try again
            info = _decode(current[0], self.uri, current[2])
            if info is not None and not info.stale():
                return info
            self._version = self._store.replace(self._info(), current[1])
            if self._version is not None:
                log.warning(
                    "lease %s: took over from a holder that stopped renewing it (%s)",
                    self.uri, info.describe() if info else "unreadable lease",
                )
                return None
            # Someone else replaced it first: look again.

    def _held_error(self, holder: LeaseInfo) -> LeaseHeldError:
        return LeaseHeldError(
            f"another process is writing to this run ({self.uri}): {holder.describe()}; "
            "wait for it to finish, or add --wait to start when it does"
        )

    def refuse_if_held(self) -> None:
        """Raise LeaseHeldError now if a live process holds the lease (a read: nothing is taken).
        For a writer to fail at once, before work such as starting a Ray cluster; `acquire` still
        decides, since the lease can be taken between the two."""
        holder = self.holder()
        if holder is not None and not holder.stale():
            raise self._held_error(holder)

    def acquire(self, *, wait: bool = False, poll: float = 2.0) -> None:
        announced = False
        while True:
            holder = self.try_acquire()
            if holder is None:
                break
            if not wait:
                raise self._held_error(holder)
            if not announced:
                log.info("lease %s: held by %s; waiting (--wait)", self.uri, holder.describe())
                announced = True
            time.sleep(poll)
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, name="alloylm-lease", daemon=True)
        self._thread.start()
        log.info("lease %s: taken (ttl %g s)", self.uri, self.ttl)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                version = self._store.replace(self._info(), self._version)
            except Exception as exc:  # a storage outage: keep trying until the TTL runs out
                log.warning("lease %s: heartbeat failed: %s", self.uri, exc)
                continue
            if version is None:
                self.lost = True
                log.error("lease %s: lost: another process took it over (our heartbeat stalled past the TTL)", self.uri)
                return
            self._version = version

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._version is not None and not self.lost:
            with contextlib.suppress(Exception):
                self._store.delete(self._version)
        self._version = None

    @contextlib.contextmanager
    def held(self, *, wait: bool = False) -> Iterator[RunLease]:
        self.acquire(wait=wait)
        try:
            yield self
        finally:
            self.release()
