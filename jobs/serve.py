"""Ray job entry point: `alloylm serve` (blocks until stopped).

    ray job submit --working-dir . -- python jobs/serve.py CONFIG [key.sub=value ...]
"""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("serve"))
