"""Progress of long work as log lines with elapsed time and ETA: the same in a terminal and in kfp.local's
piped output (a progress bar turns itself off when stdout is not a terminal; a log line does not)."""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}:{s:02d}"


class Progress:
    """`what: done/total unit, elapsed m:ss, ETA m:ss`, at most every `every` seconds, and once at the end."""

    def __init__(self, what: str, total: int, unit: str, every: float = 10.0, clock=time.monotonic, logger=log):
        self.what, self.total, self.unit, self.every, self.clock, self.logger = what, total, unit, every, clock, logger
        self.done, self.started = 0, clock()
        self._said = self.started

    def update(self, n: int) -> None:
        self.done += n
        now = self.clock()
        if self.done >= self.total or now - self._said >= self.every:
            self._said = now
            self.logger.info("%s", self.line())

    def line(self) -> str:
        elapsed = self.clock() - self.started
        eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        return (f"{self.what}: {self.done}/{self.total} {self.unit}, {_clock(elapsed)} elapsed, "
                f"ETA {_clock(eta)}")
