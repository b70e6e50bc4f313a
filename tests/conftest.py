"""Session fixtures: a real S3 endpoint (moto's server on loopback) and a real local Ray cluster.

The S3 variables are set in this process before Ray starts, so every Ray worker inherits them.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

# Offline, deterministic, quiet: set before anything imports transformers or Ray.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# Fake credentials: moto accepts any; they must never be real ones.
os.environ["AWS_ACCESS_KEY_ID"] = "testing"
os.environ["AWS_SECRET_ACCESS_KEY"] = "testing"
os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
os.environ.pop("AWS_PROFILE", None)

REPO = Path(__file__).resolve().parents[1]


def free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports (all bound at once, so the OS cannot hand one out twice)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port() -> int:
    return free_ports(1)[0]


def stop_ray_processes(marker: str | None = None, pgid: int | None = None) -> None:
    """Stop only the processes of a Ray cluster a test started (never `ray stop`, which stops every
    cluster on the machine): those whose command line names `marker` (the cluster's temp dir), those
    in process group `pgid` (a `ray start` run with start_new_session), and everything under them
    (workers, job drivers). SIGTERM, then SIGKILL for what is left after 3 s: Ray 2.60's gcs_server
    and raylet do not exit on SIGTERM here (measured: still alive 23 s later), so a longer grace
    period would only be waiting."""
    import psutil

    ours: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if (marker is not None and marker in " ".join(proc.info["cmdline"] or [])) or (
                pgid is not None and os.getpgid(proc.pid) == pgid
            ):
                ours[proc.pid] = proc
                ours.update((child.pid, child) for child in proc.children(recursive=True))
        except (psutil.Error, ProcessLookupError):
            pass
    ours.pop(os.getpid(), None)
    for proc in ours.values():
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(list(ours.values()), timeout=3)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass


@pytest.fixture(scope="session")
def ray_processes():
    """The helpers of tests that start Ray clusters of their own (`ray start`), as a fixture: test
    modules cannot import conftest under --import-mode=importlib."""
    return SimpleNamespace(free_ports=free_ports, stop=stop_ray_processes)


def _wait_for_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout} s")


@pytest.fixture(scope="session", autouse=True)
def storage_retry_window():
    """The suite's storage retry window: 0 s (one attempt, with the S3 clients' own quick retries)
    unless ALLOYLM_STORAGE_RETRY_S is set. Tests that point S3 at a closed port expect a quick
    StorageError, not the 60 s default wait; tests/test_storage_outage.py sets its own windows.
    Autouse, so it is set before the session's Ray cluster starts and its workers inherit it."""
    os.environ.setdefault("ALLOYLM_STORAGE_RETRY_S", "0")
    yield os.environ["ALLOYLM_STORAGE_RETRY_S"]


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on a free loopback port; AWS_ENDPOINT_URL points every client at it."""
    port = free_port()
    moto = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
    proc = subprocess.Popen(
        [moto, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_port(port, proc, "moto_server")
        url = f"http://127.0.0.1:{port}"
        os.environ["AWS_ENDPOINT_URL"] = url
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        os.environ.pop("AWS_ENDPOINT_URL", None)


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh, empty bucket; returns its name."""
    import boto3

    name = f"alloylm-test-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint):
    """A real local Ray cluster with 2 CPUs, shared by the whole session, keeping one idle worker
    per CPU as `alloylm`'s own local cluster does (`cluster.keep_idle_workers`). The variable then
    stays in this process's environment: clusters that tests start with `ray start` after this one
    keep theirs too."""
    import ray

    from alloylm.cluster import keep_idle_workers

    cpus = 2
    keep_idle_workers(cpus)
    if ray.is_initialized():
        # A test that ran before this fixture's first use started Ray without it (Ray Data starts a
        # default local cluster when it finds none), so a file run alone failed here with "Maybe you
        # called ray.init twice"; the session's own cluster replaces that one.
        ray.shutdown()
    ray.init(
        num_cpus=cpus,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    try:
        yield ray
    finally:
        ray.shutdown()
