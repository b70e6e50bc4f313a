"""`make mutation`: mutmut 3 over the modules where AlloyLM's decisions live, run with the fast
unit tests (no Ray cluster, no training), and a killed/total score per module.

    .venv/bin/python .ci/mutation.py                       # every module of [tool.mutmut] only_mutate
    .venv/bin/python .ci/mutation.py merge/space.py        # some of them
    .venv/bin/python .ci/mutation.py --scores-only         # print the scores of the last run again

Why a staging folder: mutmut 3 names a mutated function after its file's path with only a leading
`src/` dropped, and puts only `./`, `src/` and `source/` of its copy on sys.path. Run on this
repository it would call platform/alloylm/x.py `platform.alloylm.x`, while the tests import
`alloylm.x`, and stop ("tests recorded trampoline hits but none match any mutant key"). So each
module runs in build/mutation/<module>/, a copy laid out as `src/alloylm` + the tests of the
module's package (tests mirror the library: alloylm/merge/space.py -> tests/merge/) +
pyproject.toml, whose `[tool.mutmut]` section (read there by mutmut) says what is mutated.
One module at a time: each finished module keeps its score even if a later one is cut short.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = REPO / "build" / "mutation"
# mutmut's exit codes of a mutant's test run (mutmut.stats.status_by_exit_code): these count as
# caught. "no tests" counts against the score: no fast test reaches that code.
_KILLED = {1: "killed", 3: "killed", 36: "timeout", 24: "timeout", -24: "timeout", 152: "timeout", 255: "timeout", 37: "caught by type check"}
_STATUS = {0: "survived", 5: "no tests", 33: "no tests", None: "not checked", 34: "skipped", -11: "segfault", -9: "segfault"}


def _settings() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["mutmut"]


def _tests_of(path: str, settings: dict) -> list[str]:
    """The configured fast test files of `path`'s package (src/alloylm/merge/x.py -> tests/merge/test_*.py listed).

    Files, not folders: tests/<package>/ also holds the Ray and training tests, which mutmut must not run.
    """
    package = path.split("/")[2]
    return [t for t in settings["pytest_add_cli_args_test_selection"] if t.startswith(f"tests/{package}/")]


def _stage(path: str, settings: dict) -> Path:
    """build/mutation/<module>/: src/alloylm, the tests of its package (and conftest.py), pyproject.toml."""
    stage = STAGES / _module_name(path)
    shutil.rmtree(stage, ignore_errors=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "platform" / "alloylm", stage / "src" / "alloylm", ignore=ignore)
    (stage / "tests").mkdir(parents=True)
    shutil.copy2(REPO / "tests" / "conftest.py", stage / "tests" / "conftest.py")
    # Some fast tests read the shipped configs (tests/serve/test_best.py: configs/quickstart.yaml).
    shutil.copytree(REPO / "configs", stage / "configs", ignore=ignore)
    tests = _tests_of(path, settings)
    if not tests:
        sys.exit(f"{path}: no test folder tests/{path.split('/')[2]} in [tool.mutmut] pytest_add_cli_args_test_selection")
    for selected in tests:
        (stage / selected).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / selected, stage / selected)
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    text = re.sub(r"(?m)^only_mutate = \[[^\]]*\]", f"only_mutate = {json.dumps([path])}", text)
    text = re.sub(r"(?m)^pytest_add_cli_args_test_selection = \[[^\]]*\]", f"pytest_add_cli_args_test_selection = {json.dumps(tests)}", text)
    (stage / "pyproject.toml").write_text(text, encoding="utf-8")
    return stage


def _module_name(path: str) -> str:
    return path.removeprefix("src/").removesuffix(".py").replace("/", ".")


def _selected(settings: dict, wanted: list[str]) -> list[str]:
    """The only_mutate paths matching `wanted` (suffixes like merge/space.py), all when empty."""
    paths = settings["only_mutate"]
    if not wanted:
        return paths
    chosen = [p for p in paths if any(p.endswith(w) or fnmatch.fnmatch(p, w) for w in wanted)]
    missing = [w for w in wanted if not any(p.endswith(w) or fnmatch.fnmatch(p, w) for p in paths)]
    if missing:
        sys.exit(f"not among [tool.mutmut] only_mutate ({', '.join(paths)}): {', '.join(missing)}")
    return chosen


def _scores(paths: list[str]) -> list[dict]:
    rows = []
    for path in paths:
        meta = STAGES / _module_name(path) / "mutants" / (path + ".meta")
        if not meta.exists():
            rows.append({"module": _module_name(path), "total": 0, "killed": 0, "counts": {}, "survivors": [], "ran": False})
            continue
        exit_codes = json.loads(meta.read_text(encoding="utf-8"))["exit_code_by_key"]
        counts: dict[str, int] = {}
        survivors = []
        for key, code in sorted(exit_codes.items()):
            status = _KILLED.get(code) or _STATUS.get(code, "suspicious")
            counts[status] = counts.get(status, 0) + 1
            if code not in _KILLED:
                survivors.append(f"{key}: {status}")
        killed = sum(1 for code in exit_codes.values() if code in _KILLED)
        rows.append({"module": _module_name(path), "total": len(exit_codes), "killed": killed, "counts": counts, "survivors": survivors, "ran": True})
    return rows


def _print(rows: list[dict]) -> None:
    width = max(len(r["module"]) for r in rows)
    print(f"\n{'module':<{width}}  killed/total  score  (other outcomes)")
    for r in rows:
        if not r["ran"]:
            print(f"{r['module']:<{width}}  not run")
            continue
        score = f"{100 * r['killed'] / r['total']:5.1f}%" if r["total"] else "   -  "
        others = ", ".join(f"{n} {s}" for s, n in sorted(r["counts"].items()) if s != "killed")
        print(f"{r['module']:<{width}}  {r['killed']:>6}/{r['total']:<5}  {score}  {others}")
    print(f"\nSurviving mutants: `cd {STAGES.relative_to(REPO)}/<module> && mutmut show <name>` shows one; all in {(STAGES / 'scores.json').relative_to(REPO)}.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", help="only these of only_mutate (path suffixes, e.g. merge/space.py)")
    parser.add_argument("--max-children", type=int, default=2, help="mutants tested in parallel")
    parser.add_argument("--scores-only", action="store_true", help="print the scores of the last run, run nothing")
    args = parser.parse_args(argv)
    settings = _settings()
    paths = _selected(settings, args.modules)
    failed = 0
    if not args.scores_only:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the mutated copy only
        # The console script, not `python -m mutmut`: mutmut warns that the latter re-executes its main module.
        mutmut = str(Path(sys.executable).parent / "mutmut")
        for path in paths:
            stage = _stage(path, settings)
            command = [mutmut, "run", "--max-children", str(args.max_children)]
            print("$", " ".join(command), f"(in {stage.relative_to(REPO)})", flush=True)
            status = subprocess.run(command, cwd=stage, env=env, check=False).returncode
            if status != 0:
                print(f"mutmut run exited with {status} for {path}", file=sys.stderr)
                failed = status
    rows = _scores(settings["only_mutate"])  # every module: those not run (yet) say so
    (STAGES / "scores.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    _print(rows)
    return failed


if __name__ == "__main__":
    sys.exit(main())
