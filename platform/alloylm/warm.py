"""Build once what DeepSpeed would otherwise compile on first use (run by `make setup`).

    TORCH_EXTENSIONS_DIR=~/.cache/alloylm/torch_extensions python -m alloylm.warm

On a CPU machine DeepSpeed JIT-compiles its shared-memory communication op (about a minute on
2 cores) the first time a training job starts; doing it here, into a cache folder that survives
reruns, keeps that cost out of every job and test. On GPU machines nothing is compiled here.
"""

from __future__ import annotations

import os
import sys
import time


def warm_deepspeed() -> str:
    from deepspeed.accelerator import get_accelerator

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
