"""Every read and write of an AlloyLM artifact, on a local path or an ``s3://`` URI.

This module owns the filesystem clients (fsspec/s3fs for file operations, pyarrow for Ray Data),
their bounded timeouts and retries, and the atomic artifact protocol: an artifact is a folder
whose ``manifest.json`` is written last, so a folder without one is incomplete and never a result.

The S3 endpoint is read from ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` on every call (tests
start moto on a random port); credentials come from the usual AWS environment/config chain.

Storage outages. Every S3 operation is retried while its failure looks transient (the endpoint
refuses or drops connections, times out, or answers 5xx/SlowDown) for up to a *retry window* of
``ALLOYLM_STORAGE_RETRY_S`` seconds after its first failure (default 60; 0 keeps only the S3
clients' own few quick retries), with backoff from 0.5 s to 5 s between attempts. An attempt under way when the window
ends is finished first, so the wait is bounded by the window plus one attempt (connect and read
timeouts below). When the window is spent the error is a StorageError naming the operation, the
URI, the S3 endpoint and the window. Errors that retrying cannot fix (not found, access denied, a
full local disk) fail at once. Each retried operation is idempotent (a whole PUT, a copy, a
delete, a read), and artifacts stay atomic through any outage: the manifest is written only after
every file of the artifact is in place, so a commit cut short leaves no manifest.

Ray Train's storage (``train_filesystem``) gets the same window: its controller and workers run in
other processes, so the window and the endpoint are carried inside the pickled filesystem.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import io
import json
import logging
import math
import os
import posixpath
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import fsspec
import pyarrow.fs
import s3fs
from fsspec.implementations.local import LocalFileSystem

from alloylm import __version__
from alloylm.errors import InputError, RunError

log = logging.getLogger("alloylm.storage")
_T = TypeVar("_T")

__all__ = [
    "MANIFEST_NAME",
    "RETRY_WINDOW_ENV",
    "STAGING_DIR_NAME",
    "ArtifactExistsError",
    "CorruptFileError",
    "StagedArtifact",
    "StorageError",
    "StorageNotFoundError",
    "arrow_filesystem",
    "arrow_uri",
    "aside_uri",
    "begin_artifact",
    "download_dir",
    "exists",
    "fsspec_filesystem",
    "is_complete",
    "is_remote",
    "join",
    "list_files",
    "read_bytes",
    "read_json",
    "read_manifest",
    "read_text",
    "remove",
    "resolve",
    "retry_window_s",
    "retrying",
    "storage_environment",
    "train_filesystem",
    "upload_dir",
    "write_bytes",
    "write_json",
    "write_text",
]

MANIFEST_NAME = "manifest.json"
STAGING_DIR_NAME = ".staging"
# On S3, present in an artifact's folder while a commit replaces its objects: files there without a
# manifest are a commit cut short when it is present, and somebody's own files when it is not.
COMMIT_MARKER_NAME = ".alloylm-commit"

# Bounded so that an unreachable endpoint fails in seconds instead of hanging a stage: a refused
# connection fails at once, a black-holed one after connect_timeout per attempt.
_CONNECT_TIMEOUT_S = 5.0
# Per socket read, not per request: a stalled transfer fails, a long one does not.
_READ_TIMEOUT_S = 30.0
_MAX_ATTEMPTS = 2  # botocore / AWS SDK attempts per request, the first one included
# The retry window over those attempts: how long an S3 outage an operation rides out.
RETRY_WINDOW_ENV = "ALLOYLM_STORAGE_RETRY_S"
DEFAULT_RETRY_WINDOW_S = 60.0
_FIRST_BACKOFF_S = 0.5
_MAX_BACKOFF_S = 5.0
_GLOB_CHARS = frozenset("*?[")


class StorageError(RunError):
    """A storage operation failed; the message names the URI (and the S3 endpoint, for S3)."""


class StorageNotFoundError(StorageError, FileNotFoundError):
    """The file or folder a read asked for does not exist."""


class ArtifactExistsError(StorageError):
    """A complete artifact already exists at the URI and overwrite is off."""


class CorruptFileError(StorageError):
    """A file exists but cannot be read as what it must be (truncated weights or optimizer state,
    a manifest that is not JSON, a tokenizer folder without its tokenizer); the message names it."""


class _BoundedS3FileSystem(s3fs.S3FileSystem):
    """s3fs with fewer retries of its own: each of them is a full botocore retry loop."""

    retries = 2


# ----------------------------------------------------------------------------- paths


def _protocol(uri: str) -> str | None:
    if "://" not in uri:
        return None
    return uri.split("://", 1)[0].lower()


def is_remote(uri: str) -> bool:
    """True for ``s3://`` and other fsspec protocols; False for local paths and ``file://``."""
    return _protocol(uri) not in (None, "file", "local")


def _is_s3(uri: str) -> bool:
    return _protocol(uri) in ("s3", "s3a")


def join(uri: str, *parts: str) -> str:
    """Join path parts onto ``uri``; keeps ``s3://`` intact and uses ``/`` for remote URIs."""
    if not is_remote(uri):
        return os.path.join(uri, *parts)
    out = uri.rstrip("/") if not uri.endswith("://") else uri
    for part in parts:
        part = part.strip("/")
        if part:
            out = out + part if out.endswith("://") else f"{out}/{part}"
    return out


def resolve(uri: str) -> str:
    """Local: an absolute path (``~`` expanded, ``file://`` dropped). Remote: unchanged."""
    if is_remote(uri):
        return uri
    if _protocol(uri) is not None:
        uri = uri.split("://", 1)[1]
    return os.path.abspath(os.path.expanduser(uri))


def _s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _where(uri: str, endpoint: str | None = None) -> str:
    """The URI, with the S3 endpoint it was tried against: what an error message needs."""
    if _is_s3(uri):
        return f"{uri} (S3 endpoint {endpoint or _s3_endpoint() or 'AWS default'})"
    return uri


def _no_space(err: BaseException) -> bool:
    """A full disk: ENOSPC itself, or shutil.copytree's collected errors holding one."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(err, shutil.Error) and ("[Errno 28]" in str(err) or "No space left" in str(err))


def _free_space(uri: str) -> str:
    path = resolve(uri)
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    try:
        usage = shutil.disk_usage(path or "/")
    except OSError:
        return "free space unknown"
    return f"{usage.free / 2**20:.1f} MiB free of {usage.total / 2**20:.1f} MiB"


def _first_cause(err: BaseException) -> str:
    """shutil.copytree's Error lists every file it could not copy: the first one, and how many."""
    if isinstance(err, shutil.Error) and err.args and isinstance(err.args[0], list) and err.args[0]:
        failed = err.args[0]
        first = failed[0][2] if isinstance(failed[0], tuple) and len(failed[0]) == 3 else failed[0]
        return f"{first}" + (f"; {len(failed) - 1} more file(s) not copied" if len(failed) > 1 else "")
    return f"{type(err).__name__}: {err}"


def _describe(action: str, uri: str, err: BaseException, endpoint: str | None = None) -> StorageError:
    """The StorageError for ``err``: names the operation and the URI (and endpoint, on S3)."""
    if isinstance(err, FileNotFoundError):
        return StorageNotFoundError(f"cannot {action} {_where(uri, endpoint)}: not found ({err})")
    if not is_remote(uri) and _no_space(err):
        return StorageError(
            f"cannot {action} {_where(uri)}: no space left on the device ({_free_space(uri)} there); "
            f"free some space or point `storage` at a bigger disk ({_first_cause(err)})"
        )
    return StorageError(f"cannot {action} {_where(uri, endpoint)}: {type(err).__name__}: {err}")


@contextlib.contextmanager
def _storage_errors(action: str, uri: str) -> Iterator[None]:
    """Re-raise any underlying error as a StorageError whose message names the URI (no retries:
    for local files, whose errors retrying does not fix)."""
    try:
        yield
    except StorageError:
        raise
    except Exception as err:
        raise _describe(action, uri, err) from err


def storage_environment() -> dict[str, str]:
    """The storage settings of this process that other processes of a stage must share: the S3
    endpoint (when set) and the retry window in effect. Never credentials: those stay out of Ray's
    task specs, and each node takes them from its own AWS chain."""
    env = {name: os.environ[name] for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL") if os.environ.get(name)}
    env[RETRY_WINDOW_ENV] = f"{retry_window_s():g}"
    return env


def retry_window_s() -> float:
    """The storage retry window in seconds: ``ALLOYLM_STORAGE_RETRY_S``, else 60."""
    raw = os.environ.get(RETRY_WINDOW_ENV, "").strip()
    if not raw:
        return DEFAULT_RETRY_WINDOW_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value < 0:
        raise InputError(f"{RETRY_WINDOW_ENV}={raw!r}: the storage retry window must be a number of seconds >= 0")
    return value


# Substrings of transient failures as pyarrow's S3 client (AWS SDK for C++) words them.
_TRANSIENT_TEXT = (
    "NETWORK_CONNECTION", "Could not connect", "Couldn't connect", "Connection refused", "Connection reset",
    "Connection was reset", "connection was closed", "Timeout was reached", "timed out", "SLOW_DOWN",
    "SERVICE_UNAVAILABLE", "INTERNAL_FAILURE", "REQUEST_TIMEOUT", "THROTTLING", "Empty reply from server",
)
_TRANSIENT_CODES = {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "Throttling", "ThrottlingException"}


def _transient_types() -> tuple[type, ...]:
    types: list[type] = [ConnectionError, TimeoutError]
    with contextlib.suppress(ImportError):
        import botocore.exceptions as be

        types += [be.HTTPClientError, getattr(be, "ResponseStreamingError", be.HTTPClientError)]
    with contextlib.suppress(ImportError):
        import aiohttp

        types += [aiohttp.ClientConnectionError, aiohttp.ClientPayloadError]
    with contextlib.suppress(ImportError):
        from fsspec.exceptions import FSTimeoutError

        types.append(FSTimeoutError)
    return tuple(types)


def _transient(err: BaseException) -> bool:
    """Whether ``err`` (or an error it was raised from) is one that a later attempt may not get:
    the endpoint unreachable or overloaded, not a missing object or a refused permission."""
    types = _transient_types()
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (FileNotFoundError, PermissionError, FileExistsError)):
            return False
        if isinstance(current, types):
            return True
        response = getattr(current, "response", None)
        if isinstance(response, dict):  # botocore ClientError
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            code = response.get("Error", {}).get("Code", "")
            if status >= 500 or status == 429 or code in _TRANSIENT_CODES:
                return True
        if isinstance(current, OSError) and any(text in str(current) for text in _TRANSIENT_TEXT):
            return True
        current = current.__cause__ or current.__context__
    return False


def retrying(
    action: str, uri: str, fn: Callable[[], _T], *, window: float | None = None, endpoint: str | None = None
) -> _T:
    """``fn()``, retried while it fails transiently on remote storage, for up to the retry window
    after its first failure.

    ``action`` and ``uri`` name the operation in errors ("cannot {action} {uri} (S3 endpoint ...)").
    Local storage is not retried. ``window`` overrides ``ALLOYLM_STORAGE_RETRY_S`` (0: one attempt);
    ``endpoint`` names the endpoint when it is not this process's ``AWS_ENDPOINT_URL``.
    """
    if not is_remote(uri):
        with _storage_errors(action, uri):
            return fn()
    window = retry_window_s() if window is None else window
    first_failure: float | None = None  # the window runs from here: a long upload is not cut short
    delay, attempt = _FIRST_BACKOFF_S, 0
    while True:
        attempt += 1
        try:
            return fn()
        except StorageError:
            raise
        except Exception as err:
            if not _transient(err):
                raise _describe(action, uri, err, endpoint) from err
            now = time.monotonic()
            first_failure = now if first_failure is None else first_failure
            waited = now - first_failure
            if waited >= window:
                raise StorageError(
                    f"cannot {action} {_where(uri, endpoint)}: storage unreachable; gave up after {attempt} attempt(s), "
                    f"{waited:.1f} s after the first failed (retry window {window:g} s, set by {RETRY_WINDOW_ENV}): "
                    f"{type(err).__name__}: {err}"
                ) from err
            if attempt == 1:
                log.warning(
                    "storage: cannot %s %s: %s: %s; retrying for up to %g s (%s)",
                    action, _where(uri, endpoint), type(err).__name__, err, window, RETRY_WINDOW_ENV,
                )
            time.sleep(min(delay, max(window - waited, 0.0)))
            delay = min(delay * 2, _MAX_BACKOFF_S)


# ----------------------------------------------------------------------------- filesystems


def _s3_fsspec() -> s3fs.S3FileSystem:
    endpoint = _s3_endpoint()
    client_kwargs = {"endpoint_url": endpoint} if endpoint else {}
    # The endpoint is part of the arguments, so fsspec's instance cache gives a fresh instance
    # when AWS_ENDPOINT_URL changes. Listings are not cached: Ray workers in other processes
    # write artifacts, and a stale listing would hide them.
    return _BoundedS3FileSystem(
        client_kwargs=client_kwargs,
        config_kwargs={
            "connect_timeout": _CONNECT_TIMEOUT_S,
            "read_timeout": _READ_TIMEOUT_S,
            "retries": {"max_attempts": _MAX_ATTEMPTS, "mode": "standard"},
        },
        use_listings_cache=False,
    )


def fsspec_filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` and the path on it (no protocol, no trailing ``/``)."""
    if not is_remote(uri):
        return LocalFileSystem(), resolve(uri)
    with _storage_errors("open a filesystem for", uri):
        if _is_s3(uri):
            return _s3_fsspec(), uri.split("://", 1)[1].strip("/")
        fs, path = fsspec.core.url_to_fs(uri)
        return fs, path.rstrip("/")


def arrow_filesystem(uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """The pyarrow filesystem for ``uri`` and the path on it: for Ray Data's ``filesystem=``."""
    if not is_remote(uri):
        return pyarrow.fs.LocalFileSystem(), resolve(uri)
    if not _is_s3(uri):
        with _storage_errors("open a pyarrow filesystem for", uri):
            fs, path = fsspec_filesystem(uri)
            return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)), path
    s3_uri = "s3://" + uri.split("://", 1)[1]
    # from_uri finds the bucket's region (or takes it from the environment when an endpoint is
    # set); the filesystem is then rebuilt with bounded timeouts and retries, which from_uri
    # cannot set. The retry strategy is not pickled with the filesystem: in another process
    # (Ray tasks, Ray Train) pyarrow's default applies; Ray Data retries its Parquet reads on its own,
    # and a data set's own file reads retry through `retrying` (data/sources.py).
    found, path = retrying("open a pyarrow filesystem for", uri, lambda: pyarrow.fs.FileSystem.from_uri(s3_uri))
    endpoint = _s3_endpoint()
    fs = pyarrow.fs.S3FileSystem(
        region=getattr(found, "region", None),
        endpoint_override=endpoint,
        connect_timeout=_CONNECT_TIMEOUT_S,
        request_timeout=_READ_TIMEOUT_S,
        retry_strategy=pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=_MAX_ATTEMPTS),
    )
    return fs, path.rstrip("/")


def train_filesystem(uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """The pyarrow filesystem for Ray Train's ``storage_filesystem`` (checkpoints) at ``uri``.

    On S3 it retries every operation within the retry window, which it carries to the Ray Train
    controller and workers it is pickled to (with the endpoint): the controller writes its
    checkpoint list after each checkpoint, and an outage at that moment would otherwise end the
    stage with Ray's "controller error". Local paths get pyarrow's local filesystem.
    """
    fs, path = arrow_filesystem(uri)
    if not _is_s3(uri):
        return fs, path
    handler = _RetryingArrowHandler(fs, _s3_endpoint() or "AWS default", retry_window_s())
    return pyarrow.fs.PyFileSystem(handler), path


def arrow_uri(fs: pyarrow.fs.FileSystem, path: str) -> str:
    """A path on a pyarrow filesystem as AlloyLM names storage (pyarrow's S3 paths drop ``s3://``)."""
    name = getattr(fs, "type_name", "local")
    return f"s3://{path}" if name == "s3" or name.endswith("+s3") else path


class _RetryingArrowHandler(pyarrow.fs.FileSystemHandler):
    """A pyarrow S3 filesystem whose operations ride out outages within a retry window.

    Metadata operations, deletes and copies are retried whole. A file written through
    ``open_output_stream`` is spooled (in memory up to 64 MiB, then to a temporary file) and
    uploaded on close, retried whole. Reads retry the open; a read cut off mid-stream is retried by
    the caller (AlloyLM downloads checkpoints inside ``retrying``).
    """

    def __init__(self, fs: pyarrow.fs.FileSystem, endpoint: str, window: float) -> None:
        self.fs, self.endpoint, self.window = fs, endpoint, window

    def _call(self, action: str, path: str, fn: Callable[[], _T]) -> _T:
        # Named with the endpoint this filesystem was built for (this process may know another).
        return retrying(action, f"s3://{path}", fn, window=self.window, endpoint=self.endpoint)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _RetryingArrowHandler) and self.fs.equals(other.fs)

    def __ne__(self, other: object) -> bool:
        return not self == other

    def get_type_name(self) -> str:
        return "alloylm+" + self.fs.type_name

    def normalize_path(self, path: str) -> str:
        return self.fs.normalize_path(path)

    def get_file_info(self, paths: list[str]) -> list:
        return self._call("look up", ", ".join(paths), lambda: self.fs.get_file_info(paths))

    def get_file_info_selector(self, selector) -> list:
        return self._call("list", selector.base_dir, lambda: self.fs.get_file_info(selector))

    def create_dir(self, path: str, recursive: bool) -> None:
        self._call("create the folder", path, lambda: self.fs.create_dir(path, recursive=recursive))

    def _delete(self, action: str, path: str, fn: Callable[[], None]) -> None:
        def attempt() -> None:
            try:
                fn()
            except Exception:
                # A retry after an attempt whose answer was lost finds the path gone: deleted.
                if self.fs.get_file_info(path).type == pyarrow.fs.FileType.NotFound:
                    return
                raise

        self._call(action, path, attempt)

    def delete_dir(self, path: str) -> None:
        self._delete("delete the folder", path, lambda: self.fs.delete_dir(path))

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self._call("empty the folder", path, lambda: self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok))

    def delete_root_dir_contents(self) -> None:
        raise StorageError("refusing to delete every bucket of the S3 endpoint")

    def delete_file(self, path: str) -> None:
        self._delete("delete", path, lambda: self.fs.delete_file(path))

    def move(self, src: str, dest: str) -> None:
        self._call(f"move s3://{src} to", dest, lambda: self.fs.move(src, dest))

    def copy_file(self, src: str, dest: str) -> None:
        self._call(f"copy s3://{src} to", dest, lambda: self.fs.copy_file(src, dest))

    def open_input_stream(self, path: str):
        return self._call("open", path, lambda: self.fs.open_input_stream(path, compression=None))

    def open_input_file(self, path: str):
        return self._call("open", path, lambda: self.fs.open_input_file(path))

    def open_append_stream(self, path: str, metadata=None):
        return self.fs.open_append_stream(path, compression=None, metadata=metadata)

    def open_output_stream(self, path: str, metadata=None):
        return pyarrow.PythonFile(_SpooledUpload(self, path, metadata), mode="w")


class _SpooledUpload(io.RawIOBase):
    """A file being written to S3: spooled locally, uploaded whole on close (retried)."""

    def __init__(self, handler: _RetryingArrowHandler, path: str, metadata) -> None:
        super().__init__()
        self._handler, self._path, self._metadata = handler, path, metadata
        self._spool = tempfile.SpooledTemporaryFile(max_size=64 * 2**20)

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        return self._spool.write(data)

    def _upload(self) -> None:
        self._spool.seek(0)
        with self._handler.fs.open_output_stream(self._path, compression=None, metadata=self._metadata) as out:
            shutil.copyfileobj(self._spool, out, 8 * 2**20)

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._handler._call("write", self._path, self._upload)
        finally:
            self._spool.close()
            super().close()


# ----------------------------------------------------------------------------- files


def exists(uri: str) -> bool:
    """Whether a file, a folder or (on S3) any object under the prefix exists at ``uri``."""
    if not is_remote(uri):
        return os.path.exists(resolve(uri))
    fs, path = fsspec_filesystem(uri)

    def check() -> bool:
        if _is_s3(uri):
            # s3fs.exists turns every error (an unreachable endpoint too) into "no"; info
            # raises FileNotFoundError only for a real absence.
            try:
                fs.info(path)
            except FileNotFoundError:
                return False
            return True
        return bool(fs.exists(path))

    return retrying("check whether this exists:", uri, check)


def read_bytes(uri: str) -> bytes:
    """The whole content of the file at ``uri``."""
    fs, path = fsspec_filesystem(uri)
    return retrying("read", uri, lambda: fs.cat_file(path))


def read_text(uri: str) -> str:
    """The content of the file at ``uri``, decoded as UTF-8."""
    return read_bytes(uri).decode("utf-8")


def _write_bytes(uri: str, data: bytes) -> None:
    if not is_remote(uri):
        path = resolve(uri)
        with _storage_errors("write", uri):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            # A reader sees the old file or the new one, never a half-written one.
            tmp = os.path.join(
                os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp"
            )
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        return
    fs, path = fsspec_filesystem(uri)
    # One PUT: S3 makes the object visible whole or not at all; a retried PUT writes it again.
    retrying("write", uri, lambda: fs.pipe_file(path, data))
    fs.invalidate_cache(path)


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri`` atomically: tmp file then rename locally, one PUT on S3."""
    _write_bytes(uri, data)


def write_text(uri: str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``uri`` atomically: tmp file then rename locally, one PUT on S3."""
    _write_bytes(uri, text.encode("utf-8"))


def _json_bytes(obj: Any, uri: str) -> bytes:
    try:
        return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")
    except (TypeError, ValueError) as err:
        raise StorageError(f"cannot write {uri}: not JSON-serialisable: {err}") from err


def read_json(uri: str) -> Any:
    """The JSON document at ``uri``."""
    data = read_bytes(uri)
    try:
        return json.loads(data)
    except ValueError as err:
        raise StorageError(f"cannot read {_where(uri)}: not valid JSON: {err}") from err


def write_json(uri: str, obj: Any) -> None:
    """Write ``obj`` as JSON (indent=2, sorted keys) to ``uri``, atomically like write_text."""
    _write_bytes(uri, _json_bytes(obj, uri))


def _full_uri(uri: str, fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path returned by ``fs`` as a full URI of the same kind as ``uri``."""
    if not is_remote(uri):
        return path
    return fs.unstrip_protocol(path) if not _is_s3(uri) else f"{_protocol(uri)}://{path}"


def list_files(uri: str, pattern: str | None = None) -> list[str]:
    """Files under ``uri`` as full URIs, sorted.

    Without ``pattern``, every file below ``uri`` (recursive), or the files matching ``uri`` when
    it holds glob characters (``s3://b/p/*.txt``, ``/x/**/*.md``). With ``pattern``, the files
    matching ``pattern`` relative to ``uri``. A missing folder has no files.
    """
    return [file_uri for file_uri, _ in _listed_files(uri, pattern)]


def _listed_files(uri: str, pattern: str | None = None) -> list[tuple[str, dict]]:
    """(full URI, the listing's info: size, and mtime or ETag) of each file `list_files` names, sorted."""
    fs, path = fsspec_filesystem(uri)
    if pattern is None and any(c in _GLOB_CHARS for c in uri):
        pattern_path, glob = path, True
    elif pattern is not None:
        pattern_path, glob = posixpath.join(path, pattern.lstrip("/")), True
    else:
        pattern_path, glob = path, False
    if glob:
        found = retrying("list", uri, lambda: fs.glob(pattern_path, detail=True))
    else:
        found = retrying("list", uri, lambda: fs.find(path, detail=True))
    # Keys ending in "/" are S3 "folder" marker objects (pyarrow writes them), not files.
    files = [(_full_uri(uri, fs, name), info) for name, info in found.items() if info.get("type") == "file" and not name.endswith("/")]
    return sorted(files, key=lambda file: file[0])


def file_signatures(uri: str) -> list[list[Any]]:
    """[uri, size, modification time (ETag on S3)] of every file at or below ``uri`` (a glob is
    allowed): what identifies its content in a fingerprint without reading it. Empty if nothing is
    there. Taken from the listing itself: a request per file (an S3 HEAD each, one after another)
    took hours for a source of a million objects, at every fingerprint."""
    files = _listed_files(uri) if any(c in uri for c in "*?[") or exists(uri) else []
    # On S3 the ETag (a hash of the content) first: LastModified counts whole seconds, so a file of
    # the same size rewritten within the second it was written kept its signature.
    return [[file_uri, info.get("size"), str(info.get("ETag") or info.get("mtime") or info.get("LastModified"))] for file_uri, info in files]


def _relative_files(uri: str) -> list[tuple[str, str]]:
    """(path on the filesystem, path relative to ``uri`` with ``/``) for every file below it."""
    fs, root = fsspec_filesystem(uri)
    found = retrying("list", uri, lambda: fs.find(root))
    out = []
    for name in found:
        if name.endswith("/"):
            continue  # an S3 "folder" marker object (pyarrow writes them), not a file
        rel = posixpath.relpath(name, root) if is_remote(uri) else os.path.relpath(name, root)
        rel = rel.replace(os.sep, "/")
        if rel == "." or rel.startswith("../"):
            continue  # the prefix itself as an object, or a sibling sharing its name's prefix
        out.append((name, rel))
    return out


def upload_dir(local_dir: str, uri: str, *, action: str = "upload to") -> None:
    """Copy every file below ``local_dir`` to the same relative path under ``uri``.

    On S3 the whole upload is retried within the retry window (each file is one PUT, so a retry
    rewrites what an interrupted attempt wrote). ``action`` names the operation in errors.
    """
    src = resolve(local_dir)
    if not os.path.isdir(src):
        raise StorageNotFoundError(f"cannot upload {src} to {_where(uri)}: not a directory")
    if not is_remote(uri):
        with _storage_errors(action, uri):
            shutil.copytree(src, resolve(uri), dirs_exist_ok=True)
        return
    fs, root = fsspec_filesystem(uri)
    lpaths, rpaths = [], []
    for dirpath, _, filenames in os.walk(src):
        for filename in filenames:
            lpath = os.path.join(dirpath, filename)
            rel = os.path.relpath(lpath, src).replace(os.sep, "/")
            lpaths.append(lpath)
            rpaths.append(f"{root}/{rel}")
    if not lpaths:
        return
    retrying(action, uri, lambda: fs.put(lpaths, rpaths))
    fs.invalidate_cache(root)


def download_dir(uri: str, local_dir: str, *, wanted: Callable[[str], bool] | None = None) -> str:
    """Copy every file below ``uri`` to the same relative path under ``local_dir``; returns it.

    ``wanted``: given a file's path relative to ``uri`` (with ``/``), whether to copy it (default: all)."""
    dest = resolve(local_dir)
    if not is_remote(uri):
        src = resolve(uri)
        if not os.path.isdir(src):
            raise StorageNotFoundError(f"cannot download {src}: not a directory")

        def skipped(folder: str, names: list[str]) -> list[str]:
            if wanted is None:
                return []
            rel = os.path.relpath(folder, src)
            return [n for n in names if not os.path.isdir(os.path.join(folder, n))
                    and not wanted(n if rel == "." else f"{rel.replace(os.sep, '/')}/{n}")]

        with _storage_errors("download", uri):
            shutil.copytree(src, dest, dirs_exist_ok=True, ignore=skipped)
        return local_dir
    fs, _ = fsspec_filesystem(uri)
    files = _relative_files(uri)
    if not files:
        raise StorageNotFoundError(f"cannot download {_where(uri)}: no files under it")
    if wanted is not None:
        files = [(name, rel) for name, rel in files if wanted(rel)]
    rpaths, lpaths = [], []
    for name, rel in files:
        lpath = os.path.normpath(os.path.join(dest, rel))
        if not lpath.startswith(dest + os.sep):
            raise StorageError(f"cannot download {uri}: object {name} would land outside {dest}")
        rpaths.append(name)
        lpaths.append(lpath)
    with _storage_errors("create the folder", dest):
        os.makedirs(dest, exist_ok=True)
    retrying("download", uri, lambda: fs.get(rpaths, lpaths))
    return local_dir


def _s3_delete_prefix(uri: str, *, window: float | None = None, keep: str | None = None) -> None:
    """Delete every object at ``uri`` or below ``uri/``, never one that merely shares the prefix,
    nor ``uri/keep``."""
    fs, root = fsspec_filesystem(uri)
    if "/" not in root:
        raise StorageError(f"refusing to delete the whole bucket {uri}")
    kept = f"{root}/{keep}" if keep else None

    def delete() -> None:
        found = fs.find(root)
        doomed = [n for n in found if (n == root or n.startswith(root + "/")) and n != kept]
        if doomed:
            fs.rm(doomed)

    retrying("remove", uri, delete, window=window)
    fs.invalidate_cache(root)


def remove(uri: str, *, window: float | None = None) -> None:
    """Delete the file or folder at ``uri`` and everything below it; a missing one is fine.

    ``window`` overrides the retry window (0: one attempt, for best-effort clean-ups)."""
    if not is_remote(uri):
        path = resolve(uri)
        with _storage_errors("remove", uri):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            elif os.path.lexists(path):
                os.remove(path)
        return
    if _is_s3(uri):
        _s3_delete_prefix(uri, window=window)
        return
    fs, path = fsspec_filesystem(uri)

    def delete() -> None:
        if fs.exists(path):
            fs.rm(path, recursive=True)

    retrying("remove", uri, delete, window=window)


# ----------------------------------------------------------------------------- artifacts


def read_manifest(uri: str) -> dict | None:
    """The manifest of the artifact at ``uri``, or None if it has none (incomplete or absent).

    A manifest that is not a JSON object raises CorruptFileError naming it: the artifact is neither
    taken as complete nor silently rebuilt over, since its fingerprint cannot be known.
    """
    manifest_uri = join(uri, MANIFEST_NAME)
    try:
        data = read_bytes(manifest_uri)
    except StorageNotFoundError:
        return None
    try:
        manifest = json.loads(data)
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError alike
        raise _corrupt_manifest(manifest_uri, uri, f"not valid JSON: {err}") from None
    if not isinstance(manifest, dict):
        raise _corrupt_manifest(manifest_uri, uri, f"a JSON {type(manifest).__name__}, not an object")
    return manifest


def _corrupt_manifest(manifest_uri: str, uri: str, problem: str) -> CorruptFileError:
    return CorruptFileError(
        f"{_where(manifest_uri)} is corrupt ({problem}), so the artifact at {uri} is not taken as "
        f"complete; delete {uri} to rebuild it, or restore its {MANIFEST_NAME}"
    )


def is_complete(uri: str) -> bool:
    """Whether ``uri`` holds a complete artifact (its manifest exists)."""
    return read_manifest(uri) is not None


def _split_parent(uri: str) -> tuple[str, str]:
    """(parent, name) of an artifact URI; the name must be a real folder name."""
    if is_remote(uri):
        scheme, rest = uri.split("://", 1)
        rest = rest.strip("/")
        if "/" not in rest:
            raise StorageError(f"an artifact cannot be a bucket root: {uri}")
        parent, name = rest.rsplit("/", 1)
        return f"{scheme}://{parent}", name
    path = resolve(uri)
    parent, name = os.path.split(path)
    if not name:
        raise StorageError(f"an artifact cannot be the filesystem root: {uri}")
    return parent, name


def _exists_error(uri: str) -> ArtifactExistsError:
    return ArtifactExistsError(
        f"{uri} already holds a complete artifact ({MANIFEST_NAME} present); "
        "set `overwrite: true` in the run config to replace it"
    )


class StagedArtifact:
    """An artifact being written: files go to ``staging_uri``, ``commit`` publishes ``final_uri``.

    Use as a context manager: an exception inside the block aborts (removes the staging);
    leaving the block normally does not commit, the caller calls ``commit`` itself.
    """

    def __init__(self, final_uri: str, staging_uri: str, *, overwrite: bool) -> None:
        self.final_uri = final_uri
        self.staging_uri = staging_uri
        self.overwrite = overwrite
        self._state = "open"  # then "committed" or "aborted"

    def __repr__(self) -> str:
        return f"StagedArtifact(final_uri={self.final_uri!r}, staging_uri={self.staging_uri!r})"

    def __enter__(self) -> StagedArtifact:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self._state == "open":
            # Best effort, one attempt: the error that ended the block is the one to report (it
            # may be this very storage being down), and a leftover staging folder is never read
            # as a result.
            try:
                self.abort(window=0)
            except StorageError as err:
                log.warning("could not remove the staging folder %s (%s); it is never taken for a result", self.staging_uri, err)

    def commit(self, manifest: dict) -> dict:
        """Publish the staged files at ``final_uri``, the manifest last; returns it as written."""
        if self._state != "open":
            raise StorageError(f"artifact {self.final_uri} was already {self._state}")
        if not isinstance(manifest, dict):
            raise StorageError(f"the manifest of {self.final_uri} must be a dict")
        written = {
            **manifest,
            "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "alloylm_version": __version__,
        }
        data = _json_bytes(written, join(self.final_uri, MANIFEST_NAME))  # fail before moving
        # Checked again: another run may have completed the artifact since begin_artifact.
        if not self.overwrite and is_complete(self.final_uri):
            raise _exists_error(self.final_uri)
        if is_remote(self.final_uri):
            self._commit_remote(data)
        else:
            self._commit_local(data)
        self._state = "committed"
        return written

    def _commit_local(self, manifest_data: bytes) -> None:
        final = resolve(self.final_uri)
        staging = resolve(self.staging_uri)
        with _storage_errors("commit the artifact", self.final_uri):
            os.makedirs(staging, exist_ok=True)
            _write_bytes(os.path.join(staging, MANIFEST_NAME), manifest_data)
            os.makedirs(os.path.dirname(final), exist_ok=True)
            if os.path.lexists(final) and not os.path.exists(os.path.join(final, MANIFEST_NAME)):
                # A local commit is a rename, so a crashed attempt never leaves a folder here without
                # a manifest: this one is somebody's own files (e.g. a corpus kept inside the run
                # folder). Moved aside and kept, never deleted.
                aside = f"{final}.replaced-{_stamp()}"
                os.rename(final, aside)
                log.warning("%s held files that are not an AlloyLM artifact (no %s): moved to %s", final, MANIFEST_NAME, aside)
            if os.path.lexists(final):
                # Old aside, new in, old deleted: the final path never holds a half-written
                # folder, at worst (a crash between the renames) it is briefly absent.
                old = f"{staging}.old"
                os.rename(final, old)
                os.rename(staging, final)
                if os.path.isdir(old) and not os.path.islink(old):
                    shutil.rmtree(old)
                else:
                    os.remove(old)
            else:
                os.rename(staging, final)
        _remove_empty_staging_parent(staging)

    def _commit_remote(self, manifest_data: bytes) -> None:
        fs, final_root = fsspec_filesystem(self.final_uri)
        _, staging_root = fsspec_filesystem(self.staging_uri)
        staged = [
            (name, rel)
            for name, rel in _relative_files(self.staging_uri)
            if rel != MANIFEST_NAME  # the manifest is ours, and goes last
        ]
        manifest_path = f"{final_root}/{MANIFEST_NAME}"
        manifest_uri = join(self.final_uri, MANIFEST_NAME)
        marker_path = f"{final_root}/{COMMIT_MARKER_NAME}"
        action = "commit the artifact"

        def mark() -> None:
            retrying(f"{action} (mark it)", self.final_uri, lambda: fs.pipe_file(marker_path, b"commit in progress\n"))

        # No rename on S3: first make readers see the old artifact as incomplete, then replace its
        # objects, and only then publish the new manifest. Each step is retried on its own within
        # the retry window; if one gives up, the manifest is not written (and an old one is gone),
        # so the folder reads as incomplete, never as a finished artifact with files missing.
        # The marker, put first and removed last, tells such a commit cut short from a user's own
        # files at this path (a corpus kept in the run's folder), which are moved aside, as locally.
        # `exists`, not fs.exists, which says "no" when the endpoint is down.
        if exists(manifest_uri):
            mark()
            retrying(f"{action} (remove the old manifest)", self.final_uri, lambda: fs.rm_file(manifest_path))
            fs.invalidate_cache(final_root)
        elif not exists(join(self.final_uri, COMMIT_MARKER_NAME)) and (theirs := _relative_files(self.final_uri)):
            aside = f"{final_root}.replaced-{_stamp()}"
            retrying(f"{action} (move aside the files already there)", self.final_uri,
                     lambda: fs.copy([n for n, _ in theirs], [f"{aside}/{rel}" for _, rel in theirs]))
            log.warning("%s held files that are not an AlloyLM artifact (no %s): moved to %s",
                        self.final_uri, MANIFEST_NAME, f"{self.final_uri.split('://', 1)[0]}://{aside}")
            mark()
        else:
            mark()  # nothing there yet, or a commit cut short (marked): marked before anything changes
        _s3_delete_prefix(self.final_uri, keep=COMMIT_MARKER_NAME)
        if staged:
            sources, targets = [n for n, _ in staged], [f"{final_root}/{rel}" for _, rel in staged]
            retrying(f"{action} (copy its files)", self.final_uri, lambda: fs.copy(sources, targets))
        retrying(f"{action} (write its manifest last)", self.final_uri, lambda: fs.pipe_file(manifest_path, manifest_data))
        retrying(f"{action} (unmark it)", self.final_uri, lambda: fs.rm_file(marker_path))
        fs.invalidate_cache(final_root)
        _s3_delete_prefix(self.staging_uri)

    def abort(self, *, window: float | None = None) -> None:
        """Delete the staging location; the final URI is never touched. ``window``: see remove."""
        if self._state == "committed":
            return
        self._state = "aborted"
        remove(self.staging_uri, window=window)
        if not is_remote(self.staging_uri):
            _remove_empty_staging_parent(resolve(self.staging_uri))


def _stamp() -> str:
    """The suffix of a folder moved aside: UTC time to the microsecond."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")


def aside_uri(uri: str, why: str) -> str:
    """Where a file or folder at ``uri`` set aside for reason ``why`` goes: beside it, named
    ``<name>.<why>-<UTC time to the microsecond>``, as artifacts' replaced folders are."""
    return f"{uri}.{why}-{_stamp()}"


def _remove_empty_staging_parent(staging: str) -> None:
    with contextlib.suppress(OSError):  # not empty: another artifact is being staged there
        os.rmdir(os.path.dirname(staging))


def begin_artifact(uri: str, *, overwrite: bool = False) -> StagedArtifact:
    """Start writing the artifact at ``uri``; the caller writes into ``staging_uri`` then commits.

    Raises ArtifactExistsError if ``uri`` holds a complete artifact and ``overwrite`` is False.
    An incomplete folder there (no manifest) is replaced on commit: on S3 it is a crashed earlier
    commit and is deleted; on a local disk, where commits are renames, it cannot be one, so it is
    moved aside to ``<uri>.replaced-<time>`` and kept.
    """
    final_uri = resolve(uri).rstrip("/") if is_remote(uri) else resolve(uri)
    parent, name = _split_parent(final_uri)
    if not overwrite and is_complete(final_uri):
        raise _exists_error(final_uri)
    staging_uri = join(parent, STAGING_DIR_NAME, f"{name}-{uuid.uuid4().hex}")
    if not is_remote(staging_uri):
        with _storage_errors("create the staging folder", staging_uri):
            # Retried because another artifact's commit may remove the empty .staging folder
            # between makedirs creating it and creating our folder inside it.
            for attempt in range(3):
                try:
                    os.makedirs(staging_uri)
                    break
                except FileNotFoundError:
                    if attempt == 2:
                        raise
    return StagedArtifact(final_uri, staging_uri, overwrite=overwrite)
