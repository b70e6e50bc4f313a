"""Build once what DeepSpeed would otherwise compile on first use (run by `make setup`).

    TORCH_EXTENSIONS_DIR=.venv/torch-extensions python -m alloylm.warm   # as `make setup` runs it

On a CPU machine DeepSpeed JIT-compiles its shared-memory communication op (about a minute on
2 cores) the first time a training job starts; doing it here, into a cache folder that survives
reruns, keeps that cost out of every job and test. On GPU machines nothing is compiled here.

Every process that may compile (this one, each Ray Train worker) first puts the `ninja` of this
Python environment ahead of any other on PATH (`use_package_ninja`): torch runs whichever `ninja`
PATH finds, and two ninja releases keep their build logs with different command hashes (1.11
MurmurHash, 1.12+ rapidhash), so a shell without the venv on PATH and a Ray job with it took
turns rebuilding the op (27 s each time, measured on 2 cores) in the one shared cache folder.
"""

from __future__ import annotations

import os
import sys
import time


def use_package_ninja() -> str | None:
    """Put the folder of the `ninja` Python package's binary first on this process's PATH (and
    return it), so that the DeepSpeed ops this process compiles are built, and found up to date,
    by one ninja whatever PATH the process was started with; None (PATH unchanged) where the
    package or its binary is missing."""
    try:
        import ninja
    except ImportError:
        return None
    folder = getattr(ninja, "BIN_DIR", None)
    if not folder or not os.access(os.path.join(folder, "ninja"), os.X_OK):
        return None
    rest = [entry for entry in os.environ.get("PATH", "").split(os.pathsep) if entry and entry != folder]
    os.environ["PATH"] = os.pathsep.join([folder, *rest])
    return folder


def warm_deepspeed() -> str:
    from deepspeed.accelerator import get_accelerator

    use_package_ninja()

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        return f"accelerator {accelerator.device_name()}: nothing to build"
    started = time.monotonic()
    module = accelerator.create_op_builder("ShareMemCommBuilder").load(verbose=False)
    return f"DeepSpeed shm comm op ready in {time.monotonic() - started:.1f} s: {module.__file__}"


def main() -> int:
    if not os.environ.get("TORCH_EXTENSIONS_DIR"):
        print("alloylm.warm: set TORCH_EXTENSIONS_DIR to a lasting cache folder first", file=sys.stderr)
        return 2
    print(warm_deepspeed())
    return 0


if __name__ == "__main__":
    sys.exit(main())
