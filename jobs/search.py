"""Ray job entry point: `alloylm search` (one merge search stage).

    ray job submit --working-dir . -- python jobs/search.py CONFIG STAGE [key.sub=value ...]
"""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("search"))
