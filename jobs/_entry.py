"""Shared by the job scripts: run one `alloylm` command with the script's own arguments.

A Ray job runs `python` as found on the PATH of the Ray node that runs it. When that is not the
Python AlloyLM was installed into (e.g. `ray start` was run from a shell without the venv
activated), importing the library fails deep inside; this says so first, and what to do.
"""

from __future__ import annotations

import importlib.util
import os
import sys

# What `alloylm run` needs beyond the standard library, by import name.
REQUIRED = ("pydantic", "yaml", "fsspec", "s3fs", "pyarrow", "ray", "torch", "transformers")
EXIT_USAGE = 2


def missing_modules() -> list[str]:
    return [name for name in REQUIRED if importlib.util.find_spec(name) is None]


def run(command: str) -> int:
    missing = missing_modules()
    if missing:
        print(
            f"alloylm: the Python running this job ({sys.executable}) lacks {', '.join(missing)}: it is not the "
            "environment AlloyLM is installed in. Ray runs jobs with the `python` on the PATH of the shell that ran "
            "`ray start`. Activate the venv first (`source .venv/bin/activate`, then `ray start --head` and "
            "`ray job submit ...`), or name its Python in the job: `ray job submit --working-dir . -- "
            "/path/to/.venv/bin/python jobs/pipeline.py CONFIG`.",
            file=sys.stderr,
        )
        return EXIT_USAGE
    # `ray job submit --working-dir .` ships the repository; the library is under platform/.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, os.path.join(os.path.dirname(here), "platform"))
    from alloylm.cli import main

    return main([command, *sys.argv[1:]])
