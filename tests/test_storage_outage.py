"""Storage outages, caused for real: the S3 endpoint goes down mid-operation and comes back.

The endpoint the code talks to is `tests/outage_proxy.py`, a TCP forwarder in front of the session's
moto server. An outage is a SIGKILL of that process (connections through it drop, new ones are
refused) and the end of the outage is a new process on the same port. moto itself is not killed: its
objects live in its memory, and a restarted moto would come back empty, which no real S3 outage does
(the endpoint is unreachable, the stored objects survive). The proxy can hold one chosen upload
request so that the kill falls inside a checkpoint upload or an artifact commit, not before or after.

- An outage shorter than the retry window (ALLOYLM_STORAGE_RETRY_S) is ridden out: the operation,
  and the stage around it, go on.
- A longer one fails with a StorageError naming the operation, the URI and the endpoint.
- Either way no manifest is ever beside missing files, and the next run resumes from the last
  checkpoint that was whole.
- A full local disk (a small tmpfs, filled) fails the stage with a clear error and no manifest.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

import pytest

from alloylm import storage
from alloylm.config import validate_config

pytestmark = pytest.mark.s3

PROXY = str(Path(__file__).with_name("outage_proxy.py"))
WINDOW_ENV = "ALLOYLM_STORAGE_RETRY_S"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Endpoint:
    """The S3 endpoint under test: outage_proxy.py on a fixed port in front of moto."""

    def __init__(self, upstream_url: str) -> None:
        self.upstream_port = int(upstream_url.rsplit(":", 1)[1])
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.lines: queue.Queue[str] = queue.Queue()

    def start(self, hold: str | None = None, skip: int = 0) -> None:
        assert self.proc is None or self.proc.poll() is not None
        command = [sys.executable, PROXY, str(self.port), str(self.upstream_port)]
        if hold:
            command += ["--hold", hold, "--skip", str(skip)]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        self.lines = queue.Queue()
        proc, lines = self.proc, self.lines
        threading.Thread(target=lambda: [lines.put(line.strip()) for line in proc.stdout], daemon=True).start()
        assert self.lines.get(timeout=30) == "ready"

    def wait_held(self, timeout: float, while_alive: threading.Thread | None = None) -> str:
        """The request line the proxy holds, once it holds one."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                if while_alive is not None and not while_alive.is_alive():
                    raise AssertionError("the operation ended before the proxy held an upload")
                continue
            if line.startswith("held "):
                return line[len("held "):]
        raise AssertionError(f"the proxy held nothing within {timeout} s")

    def kill(self) -> None:
        """The outage: SIGKILL, no goodbye to any connection."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()


@pytest.fixture
def endpoint(s3_endpoint, monkeypatch):
    """Every S3 client of this process goes through the proxy (down until a test starts it)."""
    ep = Endpoint(s3_endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL", ep.url)
    yield ep
    ep.stop()


@pytest.fixture
def moto(s3_endpoint):
    """A boto3 client straight to moto: what is really stored, whatever the proxy does."""
    import boto3

    return boto3.client("s3", endpoint_url=s3_endpoint)


def _keys(moto, bucket: str, prefix: str = "") -> list[str]:
    pages = moto.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


def _held_key(line: str, bucket: str) -> str:
    path = line.split(" ")[1].split("?", 1)[0]
    return urllib.parse.unquote(path)[len(bucket) + 2:]


class Call(threading.Thread):
    """`fn()` in a thread: its result or its exception, and when it ended."""

    def __init__(self, fn) -> None:
        super().__init__(daemon=True)
        self.fn, self.result, self.error, self.ended = fn, None, None, None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            self.error = exc
        self.ended = time.monotonic()


# ----------------------------------------------------------------------------- storage calls


def test_a_write_rides_out_an_endpoint_that_is_down_within_the_window(endpoint, s3_bucket, moto, monkeypatch):
    monkeypatch.setenv(WINDOW_ENV, "60")
    uri = f"s3://{s3_bucket}/exp/note.txt"
    call = Call(lambda: storage.write_text(uri, "written after the outage"))
    call.start()  # the endpoint is down: nothing listens on its port
    time.sleep(4)
    assert call.is_alive(), f"gave up after less than 4 s of outage: {call.error!r}"
    endpoint.start()
    call.join(60)
    assert not call.is_alive() and call.error is None, repr(call.error)
    assert moto.get_object(Bucket=s3_bucket, Key="exp/note.txt")["Body"].read() == b"written after the outage"


def test_an_outage_past_the_window_names_the_operation_the_uri_and_the_endpoint(endpoint, s3_bucket, monkeypatch):
    monkeypatch.setenv(WINDOW_ENV, "3")
    uri = f"s3://{s3_bucket}/exp/note.txt"
    started = time.monotonic()
    with pytest.raises(storage.StorageError) as info:
        storage.read_text(uri)
    waited = time.monotonic() - started
    message = str(info.value)
    assert not isinstance(info.value, storage.StorageNotFoundError)
    assert f"cannot read {uri}" in message and endpoint.url in message, message
    assert WINDOW_ENV in message and "3 s" in message, message
    assert 3 <= waited < 60  # it retried for the window, and then it stopped


def test_an_artifact_commit_cut_by_an_outage_publishes_no_manifest(endpoint, s3_bucket, moto, monkeypatch):
    monkeypatch.setenv(WINDOW_ENV, "3")
    final = f"s3://{s3_bucket}/exp/art"
    # Hold the first copy into the final folder: the commit has begun, the manifest is not written.
    endpoint.start(hold=rf"PUT (/{s3_bucket}/exp/art)/[^ ]+ HTTP/1\.1")
    artifact = storage.begin_artifact(final)
    for name in ("a.bin", "b.bin", "c.bin", "d.bin"):
        storage.write_text(storage.join(artifact.staging_uri, name), name)
    commit = Call(lambda: artifact.commit({"kind": "test"}))
    commit.start()
    endpoint.wait_held(60, while_alive=commit)
    endpoint.kill()
    commit.join(120)
    assert isinstance(commit.error, storage.StorageError), repr(commit.error)
    assert endpoint.url in str(commit.error) and "commit" in str(commit.error)
    stored = _keys(moto, s3_bucket, "exp/art/")
    assert "exp/art/manifest.json" not in stored and len(stored) < 4, stored
    endpoint.start()
    assert not storage.is_complete(final)
    # Back up: the same commit, tried again, publishes the whole artifact, the manifest last.
    artifact.commit({"kind": "test"})
    assert _keys(moto, s3_bucket, "exp/art/") == [f"exp/art/{n}" for n in ("a.bin", "b.bin", "c.bin", "d.bin", "manifest.json")]


# ----------------------------------------------------------------------------- stages

STAGE = "base"


def _stage_config(storage_uri: str, **checkpoint) -> object:
    return validate_config(
        {
            "experiment": "outage",
            "storage": storage_uri,
            "builtin": {"materials": 2, "documents_per_material": 2, "general_documents": 40, "general_chats": 10},
            "tokenizer": {"train": {"vocab_size": 300}},
            "datasets": {"text": {"source": "builtin:general-text"}},
            "data": {"block_size": 32, "tokenizer_actors": 1},
            "stages": {
                STAGE: {
                    "kind": "cpt",
                    "from": {"init": "pico-llama"},
                    "data": "text",
                    "training": {"batch_size": 4, "learning_rate": 3e-3, "logging_steps": 1, "max_steps": 9},
                    "checkpoint": {"every_steps": 3, **checkpoint},
                }
            },
        }
    )


MODEL_FILES = {"model.safetensors", "config.json", "tokenizer.json", "train_summary.json", "resolved_config.yaml"}


def _assert_nothing_half_published(run_uri: str) -> None:
    """Every manifest under the run stands beside its artifact's files."""
    manifests = [f for f in storage.list_files(run_uri) if f.endswith("/" + storage.MANIFEST_NAME)]
    for manifest_uri in manifests:
        folder = manifest_uri.rsplit("/", 1)[0]
        files = {f[len(folder) + 1:] for f in storage.list_files(folder)}
        manifest = storage.read_manifest(folder)
        if manifest.get("kind") == "stage":
            assert MODEL_FILES <= files, (folder, sorted(files))
        assert files - {storage.MANIFEST_NAME}, folder


def _checkpoint_hold(bucket: str) -> str:
    """A file upload into a Ray Train checkpoint folder of the stage; group 1: the folder."""
    return rf"PUT (/{bucket}/[^ ]*/{STAGE}-[0-9a-f]+/checkpoint_[^/ ?]+)/[^ ?]+[^ ]* HTTP/1\.1"


def _wait_for_registered_checkpoints(moto, bucket: str, count: int, while_alive: threading.Thread) -> None:
    """Until Ray Train's checkpoint list in storage (its manager snapshot) names `count` checkpoints."""
    import json

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and while_alive.is_alive():
        for key in _keys(moto, bucket, "runs/outage/checkpoints/"):
            if key.endswith("/checkpoint_manager_snapshot.json") and f"/{STAGE}-" in key:
                snapshot = json.loads(moto.get_object(Bucket=bucket, Key=key)["Body"].read())
                if len(snapshot["checkpoint_results"]) >= count:
                    return
        time.sleep(0.2)
    raise AssertionError(f"Ray Train did not record {count} checkpoint(s) of the stage")


@pytest.mark.slow
def test_a_stage_goes_on_through_an_outage_during_a_checkpoint_upload(ray_cluster, endpoint, s3_bucket, moto, monkeypatch):
    from alloylm.train.launcher import stage_uri, train_stage

    monkeypatch.setenv(WINDOW_ENV, "60")
    config = _stage_config(f"s3://{s3_bucket}/runs")
    endpoint.start(hold=_checkpoint_hold(s3_bucket), skip=1)  # the second checkpoint's upload
    stage = Call(lambda: train_stage(config, STAGE))
    stage.start()
    held = endpoint.wait_held(600, while_alive=stage)
    endpoint.kill()
    key = _held_key(held, s3_bucket)
    assert key not in _keys(moto, s3_bucket), key  # cut mid-upload: that file never arrived
    time.sleep(5)  # the outage
    assert stage.is_alive(), f"the stage ended during a 5 s outage: {stage.error!r}"
    endpoint.start()
    stage.join(600)
    assert not stage.is_alive() and stage.error is None, repr(stage.error)
    metrics = stage.result["metrics"]
    assert metrics["global_step"] == 9
    assert metrics["resumed_from_step"] is None  # waited out, not restarted from a checkpoint
    assert key in _keys(moto, s3_bucket)  # the interrupted checkpoint was uploaded whole
    assert storage.read_manifest(stage_uri(config, STAGE)) == stage.result
    _assert_nothing_half_published(config.run_uri)


@pytest.mark.slow
def test_a_stage_fails_past_the_window_and_the_next_run_resumes(ray_cluster, endpoint, s3_bucket, moto, monkeypatch):
    from alloylm.train.launcher import stage_uri, train_stage

    monkeypatch.setenv(WINDOW_ENV, "4")
    config = _stage_config(f"s3://{s3_bucket}/runs", max_failures=1)
    endpoint.start(hold=_checkpoint_hold(s3_bucket), skip=1)  # the second checkpoint's upload
    stage = Call(lambda: train_stage(config, STAGE))
    stage.start()
    endpoint.wait_held(600, while_alive=stage)
    # The first checkpoint is whole; the outage starts once Ray Train's controller has recorded it
    # (its list of checkpoints in storage is what a new run resumes from).
    _wait_for_registered_checkpoints(moto, s3_bucket, 1, while_alive=stage)
    endpoint.kill()
    killed_at = time.monotonic()
    stage.join(600)  # no restart of the endpoint: the outage outlasts every retry
    assert not stage.is_alive()
    assert isinstance(stage.error, storage.StorageError), repr(stage.error)
    message = str(stage.error)
    assert f"stage {STAGE!r}" in message and endpoint.url in message and "cannot " in message, message
    assert WINDOW_ENV in message, message
    assert stage.ended - killed_at >= 4
    endpoint.start()
    assert storage.read_manifest(stage_uri(config, STAGE)) is None
    _assert_nothing_half_published(config.run_uri)

    # The next run resumes from the last checkpoint that was uploaded whole: step 3.
    manifest = train_stage(config, STAGE)
    assert manifest["metrics"]["resumed_from_step"] == 3, manifest["metrics"]
    assert manifest["metrics"]["global_step"] == 9
    _assert_nothing_half_published(config.run_uri)


# ----------------------------------------------------------------------------- a full local disk


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs mounted for the test, or a skip saying why it cannot be."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no `mount` command to make a small tmpfs with")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount_point)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs for a full disk (needs root or CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield str(mount_point)
    finally:
        if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def _fill(folder: str, leave: int) -> None:
    """Fill the file system holding `folder` until `leave` bytes are free."""
    free = shutil.disk_usage(folder).free
    with open(os.path.join(folder, "filler"), "wb") as f:
        f.write(b"\0" * max(free - leave, 0))


def test_a_write_to_a_full_disk_names_the_file_and_the_cause(small_disk):
    _fill(small_disk, leave=0)
    uri = os.path.join(small_disk, "exp", "note.json")
    with pytest.raises(storage.StorageError) as info:
        storage.write_json(uri, {"x": "y" * 100_000})
    assert uri in str(info.value) and "no space left" in str(info.value).lower(), str(info.value)
    assert sorted(os.listdir(os.path.join(small_disk, "exp"))) == []  # no temporary file left behind


@pytest.mark.slow
def test_a_stage_on_a_full_disk_fails_with_a_clear_error_and_no_manifest(ray_cluster, small_disk, monkeypatch):
    from alloylm.data.prepare import prepare_dataset, prepare_tokenizer
    from alloylm.train.launcher import stage_uri, train_stage

    config = _stage_config(small_disk, max_failures=0)
    # The data fits; then the disk is filled. data/prepare.py moves the saved tokenizer from the
    # temp folder into storage with os.replace, which fails across file systems (EXDEV): the temp
    # folder is put on the small disk while the data is prepared.
    scratch = os.path.join(small_disk, "scratch")
    os.makedirs(scratch)
    with monkeypatch.context() as patch:
        patch.setattr(tempfile, "tempdir", scratch)
        prepare_dataset(config, "text", prepare_tokenizer(config))
    shutil.rmtree(scratch)
    _fill(small_disk, leave=64 * 1024)
    with pytest.raises(storage.StorageError) as info:
        train_stage(config, STAGE)
    message = str(info.value)
    assert f"stage {STAGE!r}" in message and "no space left" in message.lower() and small_disk in message, message
    assert storage.read_manifest(stage_uri(config, STAGE)) is None
    _assert_nothing_half_published(config.run_uri)
