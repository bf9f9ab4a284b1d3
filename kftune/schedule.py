"""Scheduled runs on this machine: a cron loop, one run at a time, no catch-up (on a cluster: kftune.cluster)."""

from __future__ import annotations

import logging
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Callable

from kftune.config import KftuneError
from kftune.fileio import single_instance

log = logging.getLogger(__name__)


class ScheduleError(KftuneError):
    pass


def check_cron(cron: str) -> str:
    from croniter import croniter

    if len(cron.split()) != 5 or not croniter.is_valid(cron):
        raise ScheduleError(f"--cron {cron!r}: not a 5-field cron expression (minute hour day month weekday), "
                            f"e.g. '0 3 * * *' for 03:00 every day")
    return cron


def next_fire(cron: str, after: float) -> float:
    from croniter import croniter

    return croniter(cron, datetime.fromtimestamp(after)).get_next(float)


class Clock:
    """Wall time; tests pass their own to step through days in milliseconds."""

    now = staticmethod(time.time)
    sleep = staticmethod(time.sleep)


def run_schedule(cron: str, job: Callable[[], object], lock_path: str | Path, clock: Clock = Clock(),
                 max_runs: int | None = None) -> int:
    """Run `job` at every cron fire time, one at a time, until interrupted (or `max_runs` runs).

    Runs missed while a job was running, or while the machine slept, are skipped, never caught up:
    the next fire time is always computed from the current time. A failing job is logged and the
    schedule goes on. Returns the number of runs started.
    """
    check_cron(cron)
    runs = 0
    with single_instance(lock_path):
        log.info("schedule %r started (pid %d)", cron, os.getpid())
        due = next_fire(cron, clock.now())
        while max_runs is None or runs < max_runs:
            log.info("next run at %s", datetime.fromtimestamp(due).isoformat(timespec="seconds"))
            while (left := due - clock.now()) > 0:
                clock.sleep(min(left, 60))
            runs += 1
            log.info("tick %d: starting the run due at %s", runs, datetime.fromtimestamp(due).isoformat())
            try:
                result = job()
                log.info("tick %d: finished: %s", runs, result)
            except Exception as exc:  # the schedule outlives a failed run; the run recorded its own failure
                log.error("tick %d: run failed: %s", runs, exc)
            now = clock.now()
            following = next_fire(cron, now)
            skipped = 0
            probe = next_fire(cron, due)
            while probe < following:
                skipped, probe = skipped + 1, next_fire(cron, probe)
            if skipped:
                log.warning("skipped %d run(s) missed while the last one ran (no catch-up)", skipped)
            due = following
    return runs
