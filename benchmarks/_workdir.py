"""A kept `--workdir` for a benchmark: the benchmark deletes and rewrites folders inside it, so it
takes only an empty folder or one it marked as its own, never a folder with someone's files
(`--workdir .` in the repository would otherwise delete ./runs, the quickstart's storage)."""

from __future__ import annotations

from pathlib import Path

MARKER = ".alloylm-benchmark-workdir"


def claim_workdir(path: str, benchmark: str) -> Path:
    """`path`, created or checked, and marked as this benchmark's; SystemExit naming the problem."""
    workdir = Path(path).resolve()
    marker = workdir / MARKER
    if workdir.exists() and not workdir.is_dir():
        raise SystemExit(f"--workdir {workdir}: not a folder")
    if workdir.is_dir() and any(workdir.iterdir()) and not marker.exists():
        raise SystemExit(
            f"--workdir {workdir}: not empty and not a benchmark's folder (no {MARKER}); the benchmark "
            "deletes and rewrites folders in it, so give an empty or new folder (or, for a copy made for it, "
            f"create an empty {MARKER} file in the copy)"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"{benchmark}\n", encoding="utf-8")
    return workdir
