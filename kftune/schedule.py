"""Scheduled runs on this machine: a cron loop, one run at a time, no catch-up (on a cluster: kftune.cluster)."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
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
    try:
        next_fire(cron, time.time())
    except Exception as exc:  # noqa: BLE001 - croniter's CroniterBadDateError: a date no month has
        raise ScheduleError(f"--cron {cron!r}: never fires ({exc})") from None
    return cron


def next_fire(cron: str, after: float) -> float:
    """The first fire time after `after` (Unix seconds), the cron read in the machine's local time zone.

    croniter reads a naive datetime as UTC, so the start is given with the local zone attached: the zone with its
    rules (`tzlocal`), not today's fixed offset, or a daily job would fire an hour off across a daylight-saving
    change. The night the clocks go back repeats an hour: a job at fixed hours fires in its first pass only, as
    cron's does (one whose hour field starts with '*' fires in both)."""
    from croniter import croniter
    from dateutil.tz import tzlocal

    fires = croniter(cron, datetime.fromtimestamp(after, tzlocal()))
    fire = fires.get_next(datetime)
    while fire.fold and not cron.split()[1].startswith("*"):  # fold 1: the second pass of a repeated hour
        fire = fires.get_next(datetime)
    return fire.timestamp()


class Clock:
    """Wall time; tests pass their own to step through days in milliseconds."""

    now = staticmethod(time.time)
    sleep = staticmethod(time.sleep)


@dataclass
class Task:
    """One job of the schedule: its name (for the log), its 5-field cron and the callable it runs."""

    name: str
    cron: str
    job: Callable[[], object]


def run_schedule(cron: str, job: Callable[[], object], lock_path: str | Path, clock: Clock = Clock(),
                 max_runs: int | None = None) -> int:
    """Run `job` at every cron fire time; see run_tasks."""
    return run_tasks([Task("run", cron, job)], lock_path, clock, max_runs)


def run_tasks(tasks: list[Task], lock_path: str | Path, clock: Clock = Clock(), max_runs: int | None = None) -> int:
    """Run each task at its cron's fire times, one run at a time, until interrupted (or `max_runs` runs).

    A task that came due while another ran starts as soon as that one ends (once; the first listed goes
    first on a tie). Its other fire times missed meanwhile, or while the machine slept, are skipped, never
    caught up: a task's next fire time is computed from the time its run ended. A failing run is logged
    and the schedule goes on. Returns the number of runs started.
    """
    for t in tasks:
        check_cron(t.cron)
    named = len(tasks) > 1
    runs = 0
    with single_instance(lock_path):
        log.info("schedule %s started (pid %d)", ", ".join(f"{t.name} {t.cron!r}" for t in tasks), os.getpid())
        start = clock.now()
        due = [next_fire(t.cron, start) for t in tasks]
        while max_runs is None or runs < max_runs:
            i = min(range(len(tasks)), key=lambda k: due[k])
            task, name = tasks[i], f"{tasks[i].name}: " if named else ""
            log.info("next run at %s%s", datetime.fromtimestamp(due[i]).isoformat(timespec="seconds"),
                     f" ({task.name})" if named else "")
            while (left := due[i] - clock.now()) > 0:
                clock.sleep(min(left, 60))
            runs += 1
            log.info("tick %d: %sstarting the run due at %s", runs, name, datetime.fromtimestamp(due[i]).isoformat())
            try:
                result = task.job()
                log.info("tick %d: %sfinished: %s", runs, name, result)
            except Exception as exc:  # the schedule outlives a failed run; the run recorded its own failure
                log.error("tick %d: %srun failed: %s", runs, name, exc)
            following = next_fire(task.cron, clock.now())
            skipped, probe = 0, next_fire(task.cron, due[i])
            while probe < following:
                skipped, probe = skipped + 1, next_fire(task.cron, probe)
            if skipped:
                log.warning("%sskipped %d run(s) missed while the last one ran (no catch-up)", name, skipped)
            due[i] = following
    return runs
