"""Ray job entry point: `alloylm eval`.

    ray job submit --working-dir . -- python jobs/eval.py CONFIG [key.sub=value ...]
"""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("eval"))
