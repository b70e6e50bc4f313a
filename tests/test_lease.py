"""alloylm.lease: one writer per run, on local storage and on S3 (moto's server), with real processes.

The faults are caused for real: a holder process is SIGKILLed, and its lease is taken over only
once its heartbeat is older than the TTL; a live holder's lease is never taken.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from alloylm.lease import LeaseHeldError, RunLease

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")


@pytest.fixture(params=["local", "s3"])
def run_uri(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "runs" / "exp")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/runs/exp"


def test_second_writer_fails_at_once_naming_the_holder(run_uri):
    first = RunLease(run_uri, "run", ttl=60)
    with first.held():
        second = RunLease(run_uri, "train", ttl=60)
        with pytest.raises(LeaseHeldError) as error:
            second.acquire()
        message = str(error.value)
        assert f"pid {os.getpid()}" in message and "`alloylm run`" in message and "since" in message
        assert run_uri in message and "--wait" in message
    # Released: the next writer gets it.
    with RunLease(run_uri, "train", ttl=60).held() as again:
        assert again.holder().command == "train"
    assert RunLease(run_uri, "x").holder() is None  # released means gone


HOLDER = """
import sys, time
sys.path.insert(0, {platform!r})
from alloylm.lease import RunLease
RunLease({uri!r}, "train", ttl={ttl}).acquire()
print("held", flush=True)
time.sleep(3600)
"""


def test_a_killed_holder_is_taken_over_only_after_the_ttl(run_uri, caplog):
    ttl = 3.0
    code = HOLDER.format(platform=str(REPO / "platform"), uri=run_uri, ttl=ttl)
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    killed_at = time.time()
    taker = RunLease(run_uri, "run", ttl=60)
    live = taker.try_acquire()
    assert live is not None and live.pid == holder.pid  # just killed: its heartbeat is still fresh
    with caplog.at_level(logging.WARNING, logger="alloylm.lease"):
        while taker.try_acquire() is not None:
            time.sleep(0.25)
    assert time.time() - live.heartbeat_at > ttl  # taken only once the heartbeat was older than the TTL
    assert time.time() >= killed_at
    assert any("took over" in r.getMessage() and f"pid {holder.pid}" in r.getMessage() for r in caplog.records)
    assert taker.holder().owner != live.owner and taker.holder().pid == os.getpid()
    taker.release()


def test_a_live_holder_keeps_its_lease_past_the_ttl(run_uri):
    ttl = 1.0  # renewed every 0.25 s
    holder = RunLease(run_uri, "run", ttl=ttl)
    with holder.held():
        first = holder.holder()
        time.sleep(3 * ttl)
        other = RunLease(run_uri, "train", ttl=ttl)
        held_by = other.try_acquire()
        assert held_by is not None and held_by.owner == first.owner
        assert held_by.heartbeat_at > first.heartbeat_at  # renewed while we slept
        assert not holder.lost


def test_on_s3_a_heartbeats_age_is_the_servers_not_the_readers_clock(s3_bucket, monkeypatch):
    """A reader whose clock runs an hour ahead (or behind) of the holder's: by its own clock the
    live holder's heartbeat looks an hour old (its lease would be taken) or from the future (a
    dead holder's lease would be kept an hour). S3 gives the age itself (Date less LastModified)."""
    import types

    from alloylm import lease as lease_module

    uri = f"s3://{s3_bucket}/runs/skew"
    holder = RunLease(uri, "run", ttl=20)
    with holder.held():
        for skew in (3600.0, -3600.0):
            monkeypatch.setattr(lease_module, "time", types.SimpleNamespace(time=lambda skew=skew: time.time() + skew, sleep=time.sleep))
            reader = RunLease(uri, "train", ttl=20)
            held_by = reader.try_acquire()
            assert held_by is not None and held_by.owner == holder.holder().owner, skew  # live: kept
            assert 0 <= held_by.seconds_since_heartbeat() < 20 and "last heartbeat" in reader._held_error(held_by).args[0]
            monkeypatch.undo()


def test_a_lease_file_that_is_json_but_no_object_is_unreadable_and_taken_over(tmp_path):
    lease = RunLease(str(tmp_path / "exp"), "run", ttl=60)
    os.makedirs(tmp_path / "exp")
    (tmp_path / "exp" / ".lease").write_text("[]")
    assert lease.try_acquire() is None and lease.holder().owner == lease._owner
    lease.release()


def test_wait_starts_when_the_holder_finishes(tmp_path):
    uri = str(tmp_path / "exp")
    holder = RunLease(uri, "run", ttl=60)
    holder.acquire()
    released_at = []
    timer = threading.Timer(1.0, lambda: (released_at.append(time.time()), holder.release()))
    timer.start()
    waiter = RunLease(uri, "train", ttl=60)
    waiter.acquire(wait=True, poll=0.1)
    acquired_at = time.time()
    timer.join()
    assert released_at and acquired_at >= released_at[0]
    assert waiter.holder().command == "train"
    waiter.release()


def test_writing_commands_take_the_lease_and_reading_ones_do_not(tmp_path):
    from alloylm.config import load_config

    config = load_config(QUICKSTART, [f"storage={tmp_path}"])
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with RunLease(config.run_uri, "run", ttl=60).held():
        assert (tmp_path / "quickstart" / ".lease").is_file()
        for command in (["train", QUICKSTART, "base"], ["data", QUICKSTART], ["run", QUICKSTART]):
            done = subprocess.run([sys.executable, "-m", "alloylm.cli", *command, f"storage={tmp_path}"], capture_output=True, text=True, env=env)
            assert done.returncode == 1, (command, done.stderr[-2000:])
            assert "another process is writing to this run" in done.stderr and f"pid {os.getpid()}" in done.stderr, done.stderr[-2000:]
            assert "Ray instance" not in done.stderr, (command, done.stderr[-2000:])  # refused at once, before a cluster starts
        done = subprocess.run([sys.executable, "-m", "alloylm.cli", "validate", QUICKSTART, f"storage={tmp_path}"], capture_output=True, text=True)
        assert done.returncode == 0
    assert not (tmp_path / "quickstart" / "stages").exists()  # nothing was trained by the refused commands


def test_a_single_command_that_lost_its_lease_fails_naming_it(tmp_path, monkeypatch, capsys):
    """`alloylm run` stops starting steps when its heartbeat finds the lease taken over; the
    one-step writers (data, train, merge, search, eval) ended with exit 0 regardless."""
    from alloylm import cli
    from alloylm.config import load_config

    config = load_config(QUICKSTART, [f"storage={tmp_path}"])
    acquire = RunLease.acquire

    def acquire_then_lose(self, *args, **kwargs):  # as the heartbeat marks it when another writer took over
        acquire(self, *args, **kwargs)
        self.lost = True

    monkeypatch.setattr(RunLease, "acquire", acquire_then_lose)
    monkeypatch.setattr(cli, "_eval", lambda config: {"evaluated": "written"})
    assert cli.main(["eval", QUICKSTART, f"storage={tmp_path}"]) == 1
    captured = capsys.readouterr()
    assert "the run's lease was lost while `alloylm eval` ran" in captured.err and '"written"' in captured.out


def test_a_lease_read_before_its_content_is_not_taken_over(tmp_path, monkeypatch):
    """A lease file is created empty and then written: a second writer reading it in between took
    it for an unreadable (stale) lease, replaced it, and both ran as its holder."""
    uri = str(tmp_path / "exp")
    first, second = RunLease(uri, "run", ttl=60), RunLease(uri, "train", ttl=60)
    path = os.path.join(uri, ".lease")
    seen: list = []
    racer = threading.Thread(target=lambda: seen.append(second.try_acquire()))
    real_open = os.open

    def open_then_race(name, *args, **kwargs):
        fd = real_open(name, *args, **kwargs)
        if name == path and not racer.is_alive() and not seen:  # the file exists, still empty
            racer.start()
            racer.join(timeout=1.0)  # it reads it now; a takeover waits for the creator's lock
        return fd

    monkeypatch.setattr(os, "open", open_then_race)
    first.acquire()
    racer.join(timeout=30)
    try:
        assert seen and seen[0] is not None and seen[0].command == "run", seen  # the first writer's lease
        assert first.holder().command == "run" and first.holder().owner == seen[0].owner
    finally:
        first.release()
        second.release()
