"""Saving a benchmark's figures to `benchmarks/results/<name>.json`: atomically (a crash leaves the
last complete file, never half of one), and, for a run that measured only some parts, keeping the
parts of the last file it did not measure, marked as carried over."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def save_results(path: str | Path, result: dict[str, Any], *, keep_from_last: tuple[str, ...] = ()) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if keep_from_last and path.exists():
        try:
            last = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            last = {}
        kept = [key for key in keep_from_last if key not in result and key in last]
        result = {**result, **{key: last[key] for key in kept}}
        if kept:
            result["carried_over_from_the_last_run"] = kept
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(json.dumps(result, indent=1) + "\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
