"""Every read and write of an AlloyLM artifact, on a local path or an ``s3://`` URI.

This module owns the filesystem clients (fsspec/s3fs for file operations, pyarrow for Ray Data),
their bounded timeouts and retries, and the atomic artifact protocol: an artifact is a folder
whose ``manifest.json`` is written last, so a folder without one is incomplete and never a result.

The S3 endpoint is read from ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` on every call (tests
start moto on a random port); credentials come from the usual AWS environment/config chain.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import posixpath
import shutil
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec
import pyarrow.fs
import s3fs
from fsspec.implementations.local import LocalFileSystem

from alloylm import __version__
from alloylm.errors import RunError

__all__ = [
    "MANIFEST_NAME",
    "STAGING_DIR_NAME",
    "ArtifactExistsError",
    "CorruptFileError",
    "StagedArtifact",
    "StorageError",
    "StorageNotFoundError",
    "arrow_filesystem",
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
    "upload_dir",
    "write_json",
    "write_text",
]

MANIFEST_NAME = "manifest.json"
STAGING_DIR_NAME = ".staging"

# Bounded so that an unreachable endpoint fails in seconds instead of hanging a stage: a refused
# connection fails at once, a black-holed one after connect_timeout per attempt.
_CONNECT_TIMEOUT_S = 5.0
# Per socket read, not per request: a stalled transfer fails, a long one does not.
_READ_TIMEOUT_S = 30.0
_MAX_ATTEMPTS = 2  # botocore / AWS SDK attempts per request, the first one included
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


def _where(uri: str) -> str:
    """The URI, with the S3 endpoint it was tried against: what an error message needs."""
    if _is_s3(uri):
        return f"{uri} (S3 endpoint {_s3_endpoint() or 'AWS default'})"
    return uri


@contextlib.contextmanager
def _storage_errors(action: str, uri: str) -> Iterator[None]:
    """Re-raise any underlying error as a StorageError whose message names the URI."""
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError as err:
        raise StorageNotFoundError(f"cannot {action} {_where(uri)}: not found ({err})") from err
    except Exception as err:
        raise StorageError(
            f"cannot {action} {_where(uri)}: {type(err).__name__}: {err}"
        ) from err


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
    with _storage_errors("open a pyarrow filesystem for", uri):
        if not _is_s3(uri):
            fs, path = fsspec_filesystem(uri)
            return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)), path
        s3_uri = "s3://" + uri.split("://", 1)[1]
        # from_uri finds the bucket's region (or takes it from the environment when an
        # endpoint is set); the filesystem is then rebuilt with bounded timeouts and retries,
        # which from_uri cannot set.
        found, path = pyarrow.fs.FileSystem.from_uri(s3_uri)
        endpoint = _s3_endpoint()
        fs = pyarrow.fs.S3FileSystem(
            region=getattr(found, "region", None),
            endpoint_override=endpoint,
            connect_timeout=_CONNECT_TIMEOUT_S,
            request_timeout=_READ_TIMEOUT_S,
            retry_strategy=pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=_MAX_ATTEMPTS),
        )
        return fs, path.rstrip("/")


# ----------------------------------------------------------------------------- files


def exists(uri: str) -> bool:
    """Whether a file, a folder or (on S3) any object under the prefix exists at ``uri``."""
    if not is_remote(uri):
        return os.path.exists(resolve(uri))
    fs, path = fsspec_filesystem(uri)
    with _storage_errors("check whether this exists:", uri):
        if _is_s3(uri):
            # s3fs.exists turns every error (an unreachable endpoint too) into "no"; info
            # raises FileNotFoundError only for a real absence.
            try:
                fs.info(path)
            except FileNotFoundError:
                return False
            return True
        return bool(fs.exists(path))


def read_bytes(uri: str) -> bytes:
    """The whole content of the file at ``uri``."""
    fs, path = fsspec_filesystem(uri)
    with _storage_errors("read", uri):
        return fs.cat_file(path)


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
    with _storage_errors("write", uri):
        # One PUT: S3 makes the object visible whole or not at all.
        fs.pipe_file(path, data)
        fs.invalidate_cache(path)


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
    fs, path = fsspec_filesystem(uri)
    if pattern is None and any(c in _GLOB_CHARS for c in uri):
        pattern_path, glob = path, True
    elif pattern is not None:
        pattern_path, glob = posixpath.join(path, pattern.lstrip("/")), True
    else:
        pattern_path, glob = path, False
    with _storage_errors("list", uri):
        if glob:
            found = fs.glob(pattern_path, detail=True)
        else:
            found = fs.find(path, detail=True)
    # Keys ending in "/" are S3 "folder" marker objects (pyarrow writes them), not files.
    files = [name for name, info in found.items() if info.get("type") == "file" and not name.endswith("/")]
    return sorted(_full_uri(uri, fs, name) for name in files)


def _relative_files(uri: str) -> list[tuple[str, str]]:
    """(path on the filesystem, path relative to ``uri`` with ``/``) for every file below it."""
    fs, root = fsspec_filesystem(uri)
    with _storage_errors("list", uri):
        found = fs.find(root)
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


def upload_dir(local_dir: str, uri: str) -> None:
    """Copy every file below ``local_dir`` to the same relative path under ``uri``."""
    src = resolve(local_dir)
    if not os.path.isdir(src):
        raise StorageNotFoundError(f"cannot upload {src} to {_where(uri)}: not a directory")
    if not is_remote(uri):
        with _storage_errors("upload to", uri):
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
    with _storage_errors("upload to", uri):
        fs.put(lpaths, rpaths)
        fs.invalidate_cache(root)


def download_dir(uri: str, local_dir: str) -> str:
    """Copy every file below ``uri`` to the same relative path under ``local_dir``; returns it."""
    dest = resolve(local_dir)
    if not is_remote(uri):
        src = resolve(uri)
        if not os.path.isdir(src):
            raise StorageNotFoundError(f"cannot download {src}: not a directory")
        with _storage_errors("download", uri):
            shutil.copytree(src, dest, dirs_exist_ok=True)
        return local_dir
    fs, _ = fsspec_filesystem(uri)
    files = _relative_files(uri)
    if not files:
        raise StorageNotFoundError(f"cannot download {_where(uri)}: no files under it")
    rpaths, lpaths = [], []
    for name, rel in files:
        lpath = os.path.normpath(os.path.join(dest, rel))
        if not lpath.startswith(dest + os.sep):
            raise StorageError(f"cannot download {uri}: object {name} would land outside {dest}")
        rpaths.append(name)
        lpaths.append(lpath)
    with _storage_errors("download", uri):
        os.makedirs(dest, exist_ok=True)
        fs.get(rpaths, lpaths)
    return local_dir


def _s3_delete_prefix(uri: str) -> None:
    """Delete every object at ``uri`` or below ``uri/``, never one that merely shares the prefix."""
    fs, root = fsspec_filesystem(uri)
    if "/" not in root:
        raise StorageError(f"refusing to delete the whole bucket {uri}")
    with _storage_errors("remove", uri):
        found = fs.find(root)
        doomed = [n for n in found if (n == root or n.startswith(root + "/")) ]
        if doomed:
            fs.rm(doomed)
        fs.invalidate_cache(root)


def remove(uri: str) -> None:
    """Delete the file or folder at ``uri`` and everything below it; a missing one is fine."""
    if not is_remote(uri):
        path = resolve(uri)
        with _storage_errors("remove", uri):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            elif os.path.lexists(path):
                os.remove(path)
        return
    if _is_s3(uri):
        _s3_delete_prefix(uri)
        return
    fs, path = fsspec_filesystem(uri)
    with _storage_errors("remove", uri):
        if fs.exists(path):
            fs.rm(path, recursive=True)


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
            self.abort()

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
        with _storage_errors("commit the artifact", self.final_uri):
            # No rename on S3: first make readers see the old artifact as incomplete, then
            # replace its objects, and only then publish the new manifest.
            if fs.exists(manifest_path):
                fs.rm_file(manifest_path)
                fs.invalidate_cache(final_root)
            _s3_delete_prefix(self.final_uri)
            if staged:
                fs.copy([n for n, _ in staged], [f"{final_root}/{rel}" for _, rel in staged])
            fs.pipe_file(manifest_path, manifest_data)
            fs.invalidate_cache(final_root)
        _s3_delete_prefix(self.staging_uri)

    def abort(self) -> None:
        """Delete the staging location; the final URI is never touched."""
        if self._state == "committed":
            return
        self._state = "aborted"
        remove(self.staging_uri)
        if not is_remote(self.staging_uri):
            _remove_empty_staging_parent(resolve(self.staging_uri))


def _remove_empty_staging_parent(staging: str) -> None:
    with contextlib.suppress(OSError):  # not empty: another artifact is being staged there
        os.rmdir(os.path.dirname(staging))


def begin_artifact(uri: str, *, overwrite: bool = False) -> StagedArtifact:
    """Start writing the artifact at ``uri``; the caller writes into ``staging_uri`` then commits.

    Raises ArtifactExistsError if ``uri`` holds a complete artifact and ``overwrite`` is False.
    An incomplete folder there (no manifest: a crashed earlier attempt) is replaced on commit.
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
