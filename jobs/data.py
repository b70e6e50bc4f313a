"""Ray job entry point: `alloylm data`.

    ray job submit --working-dir . -- python jobs/data.py CONFIG [key.sub=value ...]
"""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("data"))
