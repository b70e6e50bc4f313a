"""Where models come from and go to: a local folder, an ``s3://`` URI or a Hugging Face Hub id.

This module owns turning a model source into something ``from_pretrained`` can read (S3 folders
are downloaded into a local cache first), the rule that weights are loaded from safetensors only
and remote code is never run unless asked for, the check that a folder's weights and tokenizer are
whole (a truncated file is refused naming it, not deep inside transformers), and saving a model
with its tokenizer to a local folder or to S3.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Literal

import torch
from huggingface_hub import constants as hub_constants
from safetensors import SafetensorError, safe_open
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from alloylm import storage
from alloylm.storage import CorruptFileError

log = logging.getLogger("alloylm")

SourceKind = Literal["local", "s3", "hub"]

DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "alloylm", "models")

# The Hub's repo id rule: "org/name", each part letters, digits, "-", "_", "." (not first or
# last, no "--" or ".."), at most 96 characters in all.
_HUB_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
_HUB_ID = re.compile(rf"{_HUB_PART}/{_HUB_PART}")
_LOCAL_PREFIXES = ("/", "./", "../", "~", "file://")
_SAFETENSORS_INDEX = "model.safetensors.index.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_COMPLETE_MARKER = ".alloylm-download-complete"
# The model cache's size budget on a node, in GB (1e9 bytes): past it, the least recently used
# copies are removed (never the one just asked for, one a live process holds, one used within
# CACHE_GRACE_S, or one being downloaded). Unset or 0: no limit. A long-lived GPU pod otherwise keeps every parent it has ever
# loaded, some 16 GB per 8B model.
CACHE_BUDGET_ENV = "ALLOYLM_MODEL_CACHE_GB"
# How long after its last use a copy is not removed even when no process holds it: the moment
# between a download and its process taking the copy (`_hold`), and a clock that jumps.
CACHE_GRACE_S = 60.0
# Files a tokenizer is built from: the fast tokenizer's own, or a slow tokenizer's vocabulary.
_TOKENIZER_FILE = "tokenizer.json"
_SLOW_VOCABULARIES = ("tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json", "vocab.txt")


def classify_source(source: str) -> SourceKind:
    """"local" (a path, or anything that exists on disk), "s3" (``s3://``) or "hub" (``org/name``).

    Raises ValueError for anything else, e.g. a bare name that is neither a folder nor a Hub id.
    """
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"a model source must be a non-empty string, got {source!r}")
    if source.startswith("s3://"):
        return "s3"
    if source.startswith(_LOCAL_PREFIXES) or os.path.exists(source):
        return "local"
    if "://" in source:
        raise ValueError(
            f"unsupported model source {source!r}: the URI schemes supported are s3:// and file://"
        )
    if (
        len(source) <= 96
        and _HUB_ID.fullmatch(source)
        and "--" not in source
        and ".." not in source
    ):
        return "hub"
    raise ValueError(
        f"model source {source!r} is not an existing local path, not an s3:// URI and not a "
        "Hugging Face Hub id of the form 'org/name' (letters, digits, '-', '_', '.'); "
        "write a relative path as './name'"
    )


def model_source_id(source: str) -> str | list:
    """What identifies a model from outside the run (a parent or tokenizer given as a path, URI or
    Hub id) in a fingerprint. A Hub id is itself. A local folder or s3:// URI is its files with
    their sizes and modification times (ETags on S3), as a data set's files are: a model replaced
    in place makes what was built on it stale instead of being silently reused. A source that is
    not there is its name (loading it names the problem)."""
    try:
        kind = classify_source(source)
    except ValueError:
        return source
    if kind == "hub":
        return source
    listing = storage.file_signatures(source if kind == "s3" else storage.resolve(source))
    return [source, listing] if listing else source


def materialize_model_dir(source: str, *, cache_dir: str | None = None) -> str:
    """Something ``from_pretrained`` can read: a local folder with config.json, or the Hub id.

    An ``s3://`` folder is downloaded once into ``cache_dir`` (default ``~/.cache/alloylm/models``)
    and reused afterwards; a Hub id is returned unchanged (transformers fetches and caches it).
    """
    return _materialize(source, cache_dir=cache_dir, required_file="config.json")


# What mergekit reads of a Hub model: config, weights, tokenizer files (not other formats' weights).
HUB_MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]


def local_model_dir(source: str, *, cache_dir: str | None = None) -> str:
    """A local folder with the model's files, for tools that read folders only (mergekit): a Hub id
    is downloaded into the Hugging Face cache (`huggingface_hub.snapshot_download`, config, weights
    and tokenizer files; offline, the cached snapshot), any other source as `materialize_model_dir`."""
    if classify_source(source) != "hub":
        return materialize_model_dir(source, cache_dir=cache_dir)
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo_id=source, allow_patterns=HUB_MODEL_FILES)
    except Exception as exc:  # offline without a cached copy, unknown repo, gated model, network
        raise OSError(f"cannot get {source} from the Hugging Face Hub: {type(exc).__name__}: {exc}") from None
    _require_file(folder, "config.json", shown_as=source)
    return folder


def _materialize(source: str, *, cache_dir: str | None, required_file: str) -> str:
    kind = classify_source(source)
    if kind == "hub":
        return source
    if kind == "s3":
        local = _download_cached(source, cache_dir=cache_dir)
        try:
            _require_file(local, required_file, shown_as=source)
        except BaseException:
            release_cached(local)
            raise
        return local
    path = Path(source.removeprefix("file://")).expanduser().absolute()
    if not path.exists():
        raise FileNotFoundError(f"model folder {path} does not exist")
    if not path.is_dir():
        raise FileNotFoundError(
            f"model source {path} is a file; expected a Hugging Face model folder"
        )
    _require_file(str(path), required_file, shown_as=str(path))
    return str(path)


def _require_file(folder: str, name: str, *, shown_as: str) -> None:
    if not os.path.isfile(os.path.join(folder, name)):
        found = sorted(os.listdir(folder))
        raise FileNotFoundError(
            f"{shown_as} is not a Hugging Face model folder: {name} is missing "
            f"(it holds: {', '.join(found) if found else 'nothing'})"
        )


def _download_cached(uri: str, *, cache_dir: str | None) -> str:
    """The local copy of the S3 folder ``uri``, downloaded unless a complete copy is cached; this
    process holds it (`_hold`) until it ends or calls `release_cached`."""
    cache = Path(cache_dir or DEFAULT_CACHE_DIR).expanduser().absolute()
    # An artifact rewritten at the same URI gets a new manifest (its created_at changes), hence a
    # new cache entry; a folder without a manifest (a model from outside the run) by its files'
    # sizes and ETags, which is what its stage's fingerprint counts too (`model_source_id`): keyed
    # by the URI alone, new weights uploaded in place retrained the stage on the old cached copy.
    key_material = uri.rstrip("/")
    manifest = storage.read_manifest(uri)
    identity = manifest if manifest is not None else storage.file_signatures(uri)
    key_material += "\n" + json.dumps(identity, sort_keys=True)
    key = hashlib.sha256(key_material.encode("utf-8")).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9._-]", "_", uri.rstrip("/").rsplit("/", 1)[-1]) or "model"
    final = cache / f"{name}-{key}"
    with _entry_lock(final):  # one thread of this process at a time: another's hold would block our download lock
        return _hold_or_download(uri, cache, final)


def _hold_or_download(uri: str, cache: Path, final: Path) -> str:
    for _ in range(3):
        if _hold(cache, final):
            _evict_over_budget(cache, keep=final)
            return str(final)
        cache.mkdir(parents=True, exist_ok=True)
        # One download per node: the workers of a node (8 ranks on an 8-GPU node) wait for the first,
        # then find its copy complete. Without the lock each downloaded the whole model.
        with open(cache / f".{final.name}.lock", "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX)
            except OSError:  # a file system without locks (NFS without lockd, some FUSE mounts)
                _download_into(uri, cache, final)  # each worker downloads; the first rename wins
                return str(final)
            try:
                if not (final / _COMPLETE_MARKER).is_file():
                    _download_into(uri, cache, final)
                _record_use(final)  # within CACHE_GRACE_S: not removed before `_hold` above takes it
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    if _hold(cache, final):
        _evict_over_budget(cache, keep=final)
        return str(final)
    raise OSError(f"the copy of {uri} in the model cache {cache} was removed each time it was downloaded (see {CACHE_BUDGET_ENV})")


# The cached copies this process uses: each entry's lock file, held open with a shared lock until the
# process ends or calls `release_cached`. A removal takes the lock exclusively without waiting, so it
# passes over every copy a live process holds: a merge reads its parents' files for many minutes
# after `_download_cached` returned, and a Serve replica may read its model again.
# Counted: each `_download_cached` call adds one hold, each `release_cached` takes one away, and the
# lock file is closed (its lock released) at zero. On NFS, Linux emulates flock with per-process
# POSIX locks, so this process never opens the lock file of a copy it holds for anything else
# (closing it would drop the hold) and never removes a copy it holds (`_evict_over_budget`).
_held: dict[str, list] = {}  # str(final) -> [open lock file, holds]
_held_lock = threading.Lock()  # guards _held and _entry_locks; never held while waiting on a file lock
_entry_locks: dict[str, threading.Lock] = {}


def _entry_lock(final: Path) -> threading.Lock:
    with _held_lock:
        return _entry_locks.setdefault(str(final), threading.Lock())


def _hold(cache: Path, final: Path) -> bool:
    """True when `final` is a complete copy, now held by this process once more and its use recorded.
    Called under the entry's thread lock (`_download_cached`)."""
    marker = final / _COMPLETE_MARKER
    with _held_lock:
        if str(final) in _held:
            _held[str(final)][1] += 1
            _record_use(final)
            return True
    if not marker.is_file():
        return False
    try:
        handle = open(cache / f".{final.name}.lock", "a")  # noqa: SIM115 - held until release_cached
    except OSError:
        return marker.is_file()
    try:
        fcntl.flock(handle, fcntl.LOCK_SH)  # waits while a removal (exclusive) is under way
    except OSError:  # a file system without locks: nothing is ever removed there
        handle.close()
        return marker.is_file()
    if not marker.is_file():  # removed before the lock was ours
        handle.close()
        return False
    with _held_lock:
        _held[str(final)] = [handle, 1]
    _record_use(final)
    return True


def release_cached(path: str) -> None:
    """One user of the cached copy at `path` in this process is done with it; when none is left,
    other processes may remove it again. A path that is not a held copy is ignored."""
    with _held_lock:
        entry = _held.get(str(Path(path)))
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _held[str(Path(path))]
    entry[0].close()  # closing the file releases its lock


def _held_here(entry_name: str, cache: Path) -> bool:
    with _held_lock:
        return str(cache / entry_name) in _held


def _record_use(final: Path) -> None:
    try:
        os.utime(final / _COMPLETE_MARKER)  # the marker's mtime orders the budget's removals
    except OSError:
        pass  # a file system that refuses it: the copy is used all the same


_budget_warned: set[str] = set()


def _cache_budget_bytes() -> float | None:
    """ALLOYLM_MODEL_CACHE_GB in bytes; None for no limit. A value that is not a number >= 0 is
    reported once and means no limit: it must not fail the loads it would only have bounded."""
    value = os.environ.get(CACHE_BUDGET_ENV, "").strip()
    if not value:
        return None
    try:
        budget = float(value)
    except ValueError:
        budget = -1.0
    if budget < 0 or math.isnan(budget):
        if value not in _budget_warned:
            _budget_warned.add(value)
            log.warning("%s=%r is not a number of GB >= 0; the model cache is not bounded", CACHE_BUDGET_ENV, value)
        return None
    return budget * 1e9 if budget > 0 else None


def _folder_bytes(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def _try_exclusive(cache: Path, entry_name: str) -> Any:
    """The entry's lock file, locked exclusively, or None when a process holds or downloads it (or
    the file system has no locks)."""
    try:
        handle = open(cache / f".{entry_name}.lock", "a")  # noqa: SIM115 - closed by the caller
    except OSError:
        return None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None
    return handle


def _evict_over_budget(cache: Path, *, keep: Path) -> list[str]:
    """Remove the least recently used complete copies until the cache fits its budget; returns
    their names. A copy a live process holds (`_hold`), is downloading, or used within
    CACHE_GRACE_S stays, even when the cache is then over its budget. Also removes what a
    download or a removal cut short left behind."""
    budget = _cache_budget_bytes()
    if budget is None:
        return []
    entries = []
    for entry in cache.iterdir():
        if ".evicting-" in entry.name:
            shutil.rmtree(entry, ignore_errors=True)  # left by a removal cut short: no one can reach it
            continue
        if ".partial-" in entry.name:  # a download's; left behind when its process died
            owner = entry.name[1:].split(".partial-", 1)[0]
            handle = None if _held_here(owner, cache) else _try_exclusive(cache, owner)
            if handle is not None:  # no download of that entry under way
                with handle:
                    shutil.rmtree(entry, ignore_errors=True)
            continue
        marker = entry / _COMPLETE_MARKER
        if entry.name.startswith(".") or not marker.is_file():
            continue
        try:
            entries.append((marker.stat().st_mtime, entry, _folder_bytes(entry)))
        except OSError:
            continue  # removed meanwhile
    total = sum(size for _, _, size in entries)
    removed = []
    for used, entry, size in sorted(entries, key=lambda e: e[0]):
        if total <= budget:
            break
        if entry == keep or time.time() - used < CACHE_GRACE_S or _held_here(entry.name, cache):
            continue
        handle = _try_exclusive(cache, entry.name)
        if handle is None:
            continue  # held by a process that reads it, or being downloaded again
        with handle:
            marker = entry / _COMPLETE_MARKER
            if not marker.is_file():
                total -= size  # another process removed it meanwhile
                continue
            if time.time() - marker.stat().st_mtime < CACHE_GRACE_S:
                continue  # used since it was listed
            doomed = cache / f".{entry.name}.evicting-{os.getpid()}-{threading.get_ident()}"
            try:
                os.rename(entry, doomed)  # no longer complete to anyone, at once
            except OSError as exc:
                log.warning("model cache: could not remove %s: %s", entry, exc)
                continue
        shutil.rmtree(doomed, ignore_errors=True)
        total -= size
        removed.append(entry.name)
        log.info("model cache %s: removed %s (%.1f GB, last used %s) to stay under %s=%s", cache, entry.name, size / 1e9,
                 time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(used)), CACHE_BUDGET_ENV, os.environ.get(CACHE_BUDGET_ENV))
    return removed


def _download_into(uri: str, cache: Path, final: Path) -> None:
    # Downloaded beside the final folder and renamed into place, so that a crash never leaves a
    # half-downloaded folder that looks complete (and a node without working locks still never
    # mixes two workers' files: the first rename wins, the others drop their copy).
    partial = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=cache))
    try:
        storage.download_dir(uri, str(partial))
        (partial / _COMPLETE_MARKER).write_text(uri + "\n", encoding="utf-8")
        if final.exists() and not (final / _COMPLETE_MARKER).is_file():
            shutil.rmtree(final, ignore_errors=True)  # left by an older, interrupted layout
        try:
            os.rename(partial, final)
        except OSError:
            if not (final / _COMPLETE_MARKER).is_file():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _hub_error(what: str, source: str, err: Exception) -> OSError:
    offline = (
        " HF_HUB_OFFLINE=1 is set, so only models already in the local Hugging Face cache can be "
        "loaded; download it beforehand (`hf download`) or unset HF_HUB_OFFLINE."
        if hub_constants.HF_HUB_OFFLINE
        else ""
    )
    return OSError(
        f"cannot load the {what} of Hugging Face Hub model {source!r}: {err}{offline} "
        "A local folder or an s3:// URI needs no network."
    )


def load_tokenizer(
    source: str, *, trust_remote_code: bool = False, cache_dir: str | None = None
) -> PreTrainedTokenizerBase:
    """The tokenizer saved at ``source`` (local folder, ``s3://`` folder or Hub id)."""
    kind = classify_source(source)
    location = _materialize(source, cache_dir=cache_dir, required_file="tokenizer_config.json")
    shown_as = source if kind == "s3" else location
    try:
        if kind != "hub":
            check_tokenizer_folder(location, shown_as=shown_as)
        return AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
    except OSError as err:
        if kind == "hub":
            raise _hub_error("tokenizer", source, err) from err
        raise
    except Exception:
        if kind != "hub":
            _check_tokenizer_json(location, shown_as)  # a truncated tokenizer.json, named
        raise
    finally:
        if kind == "s3":
            release_cached(location)  # loaded (or failed): the copy may go once the cache is over budget


def check_tokenizer_folder(uri: str, *, shown_as: str | None = None) -> None:
    """Raise CorruptFileError unless the folder ``uri`` (local or ``s3://``) holds a file a
    tokenizer is built from.

    That is ``tokenizer.json`` (what AlloyLM and every fast tokenizer save) or a slow tokenizer's
    vocabulary (``tokenizer.model``, ``vocab.json``, ...). Without one, transformers fails with a
    message about sentencepiece that names no file.
    """
    shown_as = shown_as or uri
    if storage.is_remote(uri):
        prefix = uri.rstrip("/") + "/"
        files = sorted(f.removeprefix(prefix) for f in storage.list_files(uri))
    else:
        files = sorted(os.listdir(storage.resolve(uri)))
    if _TOKENIZER_FILE in files or any(name in files for name in _SLOW_VOCABULARIES) or any(
        name.endswith(".tiktoken") for name in files
    ):
        return
    raise CorruptFileError(
        f"{storage.join(shown_as, _TOKENIZER_FILE)} is missing: the tokenizer folder {shown_as} holds "
        f"{', '.join(files) or 'nothing'} but no {_TOKENIZER_FILE} (nor a slow tokenizer's vocabulary "
        f"such as {', '.join(_SLOW_VOCABULARIES[:2])}), so no tokenizer can be built from it"
    )


def _check_tokenizer_json(folder: str, shown_as: str) -> None:
    path = os.path.join(folder, _TOKENIZER_FILE)
    if not os.path.isfile(path):
        return
    try:
        with open(path, encoding="utf-8") as f:
            json.load(f)
    except ValueError as err:
        raise CorruptFileError(
            f"{storage.join(shown_as, _TOKENIZER_FILE)} is truncated or corrupt (not valid JSON: {err})"
        ) from None


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str | None:
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(
            f"unknown dtype {dtype!r}; use 'auto' or a torch dtype name such as 'float32', "
            "'bfloat16' or 'float16'"
        )
    return resolved


def _require_safetensors(folder: str, shown_as: str) -> None:
    files = os.listdir(folder)
    if any(f.endswith(".safetensors") for f in files) or _SAFETENSORS_INDEX in files:
        return
    pickled = sorted(f for f in files if f.endswith(_PICKLE_SUFFIXES))
    if pickled:
        # Pickle checkpoints can run arbitrary code when unpickled; safetensors cannot.
        raise FileNotFoundError(
            f"{shown_as} holds only PyTorch pickle weights ({', '.join(pickled)}); AlloyLM loads "
            "safetensors only (model.safetensors), because a pickle file can run code when "
            "loaded. Re-save the model with save_pretrained() from a trusted environment."
        )
    raise FileNotFoundError(
        f"{shown_as} holds no model weights: model.safetensors (or {_SAFETENSORS_INDEX} and its "
        f"shards) is missing (it holds: {', '.join(sorted(files))})"
    )


def check_safetensors(folder: str, *, shown_as: str | None = None) -> None:
    """Raise CorruptFileError naming the first safetensors file of the local ``folder`` that is
    truncated or unreadable, or a shard its index lists that is missing.

    Reads the headers only: safetensors refuses a file whose length differs from what its header
    declares, so a file cut short anywhere is caught before any weight is loaded.
    """
    shown_as = shown_as or folder
    files = sorted(os.listdir(folder))
    index = os.path.join(folder, _SAFETENSORS_INDEX)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise CorruptFileError(
                f"{storage.join(shown_as, _SAFETENSORS_INDEX)} is corrupt ({type(err).__name__}: {err})"
            ) from None
        missing = [shard for shard in shards if shard not in files]
        if missing:
            raise CorruptFileError(
                f"{storage.join(shown_as, missing[0])} is missing: {_SAFETENSORS_INDEX} lists it as a shard"
            )
    for name in files:
        if not name.endswith(".safetensors"):
            continue
        try:
            with safe_open(os.path.join(folder, name), framework="pt"):
                pass
        except (SafetensorError, OSError) as err:
            raise CorruptFileError(
                f"{storage.join(shown_as, name)} is truncated or corrupt (safetensors: {err})"
            ) from None


def load_model(
    source: str,
    *,
    trust_remote_code: bool = False,
    dtype: torch.dtype | str | None = None,
    cache_dir: str | None = None,
) -> PreTrainedModel:
    """The causal LM saved at ``source``, from safetensors; remote code runs only if trusted.

    ``dtype`` None keeps transformers' default; "auto" uses the dtype the weights were saved in.
    """
    kind = classify_source(source)
    torch_dtype = _resolve_dtype(dtype)
    location = materialize_model_dir(source, cache_dir=cache_dir)
    kwargs = {} if torch_dtype is None else {"dtype": torch_dtype}
    try:
        if kind != "hub":
            _require_safetensors(location, shown_as=source if kind == "s3" else location)
            check_safetensors(location, shown_as=source if kind == "s3" else location)
        return AutoModelForCausalLM.from_pretrained(
            location, use_safetensors=True, trust_remote_code=trust_remote_code, **kwargs
        )
    except OSError as err:
        if kind == "hub":
            raise _hub_error("model", source, err) from err
        raise
    finally:
        if kind == "s3":
            release_cached(location)  # loaded (or failed): its files may go once the cache is over budget


def _save_pretrained(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, folder: str
) -> None:
    # transformers 5 always writes safetensors (it has no safe_serialization switch any more).
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    _require_safetensors(folder, shown_as=folder)


def save_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, uri: str
) -> None:
    """Save ``model`` (safetensors) and ``tokenizer`` as one Hugging Face folder at ``uri``.

    A local folder is written beside its destination and then swapped in, replacing whatever was
    there; a remote one (``s3://``) is written to a temporary folder and uploaded.
    """
    if storage.is_remote(uri):
        with tempfile.TemporaryDirectory(prefix="alloylm-save-") as folder:
            _save_pretrained(model, tokenizer, folder)
            storage.upload_dir(folder, uri)
        return
    dest = Path(uri.removeprefix("file://")).expanduser().absolute()
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.saving-", dir=dest.parent))
    try:
        _save_pretrained(model, tokenizer, str(staging))
        replace_folder(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def replace_folder(staging: Path, dest: Path) -> None:
    """Move the finished folder `staging` to `dest`, replacing whatever was there (same file system)."""
    if dest.is_dir() and not dest.is_symlink():
        shutil.rmtree(dest)
    elif dest.exists() or dest.is_symlink():
        dest.unlink()
    os.rename(staging, dest)
