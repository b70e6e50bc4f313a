"""Ray job entry point: `alloylm merge` (one fixed merge stage).

    ray job submit --working-dir . -- python jobs/merge.py CONFIG STAGE [key.sub=value ...]
"""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("merge"))
