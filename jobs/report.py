"""Ray job entry point: `alloylm report`.

    ray job submit --working-dir . -- python jobs/report.py CONFIG [key.sub=value ...]
"""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("report"))
