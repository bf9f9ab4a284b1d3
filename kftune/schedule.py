"""Scheduled runs: a local cron loop (one run at a time, no catch-up) or a KFP recurring run."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)


class ScheduleError(RuntimeError):
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


@contextlib.contextmanager
def single_instance(lock_path: str | Path, what: str = "scheduler"):
    """Hold an exclusive lock while the block runs; a second holder refuses to start."""
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise ScheduleError(f"another kftune {what} is running (lock {lock_path}, "
                                f"pid {f.read().strip() or '?'}); wait for it or stop it first") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


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


def kfp_cron(cron: str) -> str:
    """KFP's recurring runs take a 6-field cron with seconds first."""
    return f"0 {check_cron(cron)}"


def schedule_on_cluster(host: str, params, cron: str, arguments: dict[str, str], experiment: str = "kftune") -> str:
    """Create a KFP recurring run of the retraining pipeline: max_concurrency=1, no catch-up. Returns its id."""
    import tempfile

    from kftune.runner import compile_pipeline, kfp_client

    client = kfp_client(host)
    exp = client.create_experiment(experiment)  # returns the existing one if there is one
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(params, Path(tmp) / "pipeline.yaml", "retraining")
        job = client.create_recurring_run(
            experiment_id=exp.experiment_id, job_name=f"kftune-retraining-{params.register.model_name}",
            cron_expression=kfp_cron(cron), max_concurrency=1, no_catchup=True, params=arguments,
            pipeline_package_path=str(package))
    return job.recurring_run_id


def manage_on_cluster(host: str, action: str, recurring_run_id: str = "") -> list[dict]:
    """list | pause | resume | delete KFP recurring runs."""
    from kftune.runner import kfp_client

    client = kfp_client(host)
    if action == "list":
        runs = client.list_recurring_runs(page_size=100).recurring_runs or []
        return [{"id": r.recurring_run_id, "name": r.display_name, "status": r.status,
                 "cron": r.trigger.cron_schedule.cron if r.trigger and r.trigger.cron_schedule else ""} for r in runs]
    if not recurring_run_id:
        raise ScheduleError(f"schedule {action} needs the recurring run's id (see `kftune schedule list`)")
    {"pause": client.disable_recurring_run, "resume": client.enable_recurring_run,
     "delete": client.delete_recurring_run}[action](recurring_run_id)
    return [{"id": recurring_run_id, "action": action}]
