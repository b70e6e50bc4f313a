"""`alloylm.warm`: DeepSpeed's CPU op is built once, by one ninja, whatever PATH a process has."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import ninja

from alloylm.warm import use_package_ninja

CACHE = os.path.join(sys.prefix, "torch-extensions")  # the Makefile's: .venv/torch-extensions


def test_the_package_ninja_comes_first_on_path(monkeypatch, tmp_path):
    other = tmp_path / "bin"
    other.mkdir()
    (other / "ninja").write_text("#!/bin/sh\nexit 1\n")
    (other / "ninja").chmod(0o755)
    monkeypatch.setenv("PATH", os.pathsep.join([str(other), ninja.BIN_DIR, "/usr/bin"]))
    assert use_package_ninja() == ninja.BIN_DIR
    assert shutil.which("ninja") == os.path.join(ninja.BIN_DIR, "ninja")
    assert os.environ["PATH"].split(os.pathsep) == [ninja.BIN_DIR, str(other), "/usr/bin"]  # nothing lost, no duplicate


def test_warm_never_runs_another_ninja_and_leaves_the_op_up_to_date_for_the_package_one(tmp_path):
    """A `ninja` first on PATH that is not the package's (a system 1.11 here, whose build log
    hashes commands differently) is never run: with it, warm would rebuild the op, and every Ray
    Train worker started with the other PATH would rebuild it again."""
    other = tmp_path / "bin"
    other.mkdir()
    called = tmp_path / "called"
    (other / "ninja").write_text(f"#!/bin/sh\ntouch {called}\nexit 1\n")
    (other / "ninja").chmod(0o755)
    env = {**os.environ, "PATH": os.pathsep.join([str(other), os.environ.get("PATH", "")])}
    env.setdefault("TORCH_EXTENSIONS_DIR", CACHE)
    done = subprocess.run([sys.executable, "-m", "alloylm.warm"], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert not called.exists()
    build = os.path.join(env["TORCH_EXTENSIONS_DIR"], "deepspeed_shm_comm")
    dry = subprocess.run([os.path.join(ninja.BIN_DIR, "ninja"), "-n", "-C", build], capture_output=True, text=True, timeout=60)
    assert "no work to do" in dry.stdout, dry.stdout + dry.stderr
