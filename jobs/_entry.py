"""Shared by the job scripts: run one `alloylm` command with the script's own arguments."""

from __future__ import annotations

import os
import sys


def run(command: str) -> int:
    # `ray job submit --working-dir .` ships the repository; the library is under platform/.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, os.path.join(os.path.dirname(here), "platform"))
    from alloylm.cli import main

    return main([command, *sys.argv[1:]])
