"""Ray job entry point: `alloylm run`.

    ray job submit --working-dir . -- python jobs/pipeline.py CONFIG [key.sub=value ...]
"""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("run"))
