"""Ray job entry point: `alloylm train`.

    ray job submit --working-dir . -- python jobs/train.py CONFIG STAGE [key.sub=value ...]
"""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("train"))
