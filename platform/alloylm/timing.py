"""Where a step's wall time went: consecutive phases on one process's monotonic clock.

Training stages record theirs in the manifest's `breakdown` (`alloylm.train`), data sets too
(`alloylm.data.prepare`), so that a run shows where its time went, not only how long it took.
"""

from __future__ import annotations

import time


class PhaseClock:
    """Seconds spent in consecutive phases of one process, on its monotonic clock."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.monotonic()

    def lap(self, phase: str) -> None:
        """The time since the previous lap goes to `phase`."""
        now = time.monotonic()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._last
        self._last = now

    def split(self, before: str, after: str, *, at: float | None) -> None:
        """The time since the previous lap, cut at the monotonic time `at` (None: all of it is `after`)."""
        now = time.monotonic()
        cut = min(max(at if at is not None else self._last, self._last), now)
        self.seconds[before] = self.seconds.get(before, 0.0) + cut - self._last
        self.seconds[after] = self.seconds.get(after, 0.0) + now - cut
        self._last = now

    def rounded(self, digits: int = 3) -> dict[str, float]:
        return {phase: round(seconds, digits) for phase, seconds in self.seconds.items()}
