"""Where every artifact of a run lives: the one source of truth for paths under `<storage>/<experiment>/`.

    <run>/tokenizer/                     the run's tokenizer
    <run>/data/<name>/                   a prepared data set (and <name>.generation/ for teacher batches)
    <run>/stages/<name>/                 a stage's model (training or merge)
    <run>/checkpoints/<name>-<fp>/       Ray Train's checkpoints of one version of a training stage
    <run>/searches/<name>-<fp>/          Ray Tune's experiment of one version of a merge search
    <run>/eval/                          per-variant results and the comparison
    <run>/report/                        Markdown, HTML and plots

Code asks `RunLayout` for a path; nothing else joins run paths by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from alloylm.config import RunConfig


@dataclass(frozen=True)
class RunLayout:
    run: str  # <storage>/<experiment>, resolved (absolute path or s3:// URI)

    @classmethod
    def of(cls, config: RunConfig) -> RunLayout:
        return cls(config.run_uri)

    def _join(self, *parts: str) -> str:
        from alloylm import storage

        return storage.join(self.run, *parts)

    @property
    def tokenizer(self) -> str:
        return self._join("tokenizer")

    def dataset(self, name: str) -> str:
        return self._join("data", name)

    def generation(self, name: str) -> str:
        """Finished teacher batches of generated data set `name` (kept across attempts)."""
        return self._join("data", f"{name}.generation")

    def stage(self, name: str) -> str:
        return self._join("stages", name)

    @property
    def checkpoints_root(self) -> str:
        """Ray Train's storage path; each stage version is one Ray Train run named `<name>-<fp>` in it."""
        return self._join("checkpoints")

    def checkpoints(self, name: str, fp: str) -> str:
        return self._join("checkpoints", f"{name}-{fp}")

    def search(self, name: str, fp: str) -> str:
        """Ray Tune's experiment of one version of merge search `name`."""
        return self._join("searches", f"{name}-{fp}")

    def search_results(self, name: str) -> str:
        """The trials table, plots and Tune copy inside the search stage's artifact."""
        return self._join("stages", name, "search")

    @property
    def lease(self) -> str:
        """One writer per run (see alloylm.lease)."""
        return self._join(".lease")

    @property
    def eval(self) -> str:
        return self._join("eval")

    @property
    def comparison_table(self) -> str:
        return self._join("eval", "comparison.md")

    @property
    def validation_eval(self) -> str:
        """Every variant scored on the validation split: what "best" is chosen on."""
        return self._join("eval", "validation")

    @property
    def best(self) -> str:
        """The variant the validation comparison chose (`serve.model: best` serves it)."""
        return self._join("eval", "best.json")

    @property
    def report(self) -> str:
        return self._join("report")
