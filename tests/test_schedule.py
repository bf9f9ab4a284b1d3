"""The local scheduler: one run at a time, no catch-up, survives failures, one instance, stops on Ctrl-C."""

import logging
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta

import pytest

from kftune.cli import main
from kftune.cluster import kfp_cron
from kftune.fileio import Busy, single_instance
from kftune.schedule import run_schedule
from tests.conftest import ROOT


class FakeClock:
    """Simulated time: sleeping advances it instantly, so a day of schedule runs in milliseconds."""

    def __init__(self, start: datetime):
        self.t = start.timestamp()

    def now(self):
        return self.t

    def sleep(self, seconds):
        self.t += seconds


def test_runs_one_at_a_time_and_skips_missed_runs(tmp_path, caplog):
    clock = FakeClock(datetime(2026, 11, 22, 10, 30))
    started = []

    def slow_job():  # the first run takes 2.5 hours: the 12:00 and 13:00 runs are skipped, not queued
        started.append(datetime.fromtimestamp(clock.now()).strftime("%H:%M"))
        clock.t += 2.5 * 3600 if len(started) == 1 else 60

    with caplog.at_level(logging.INFO, logger="kftune.schedule"):
        assert run_schedule("0 * * * *", slow_job, tmp_path / "lock", clock, max_runs=3) == 3
    assert started == ["11:00", "14:00", "15:00"]
    assert "skipped 2 run(s)" in caplog.text and "next run at 2026-11-22T14:00:00" in caplog.text


@pytest.mark.parametrize("zone", ["UTC", "America/New_York", "Asia/Tokyo"])
def test_cron_hours_are_the_local_time_zone_s(zone, monkeypatch):
    from kftune.schedule import next_fire

    monkeypatch.setenv("TZ", zone)
    time.tzset()
    try:  # 21:30 local: the next '0 3 * * *' is 03:00 local tomorrow, not 03:00 UTC read as local
        fire = next_fire("0 3 * * *", datetime(2026, 12, 7, 21, 30).timestamp())
        assert datetime.fromtimestamp(fire) == datetime(2026, 12, 8, 3, 0)
    finally:
        monkeypatch.undo()
        time.tzset()


@pytest.mark.parametrize("start", [datetime(2026, 10, 24, 12), datetime(2026, 10, 25, 0, 30),
                                   datetime(2026, 3, 28, 12), datetime(2026, 3, 29, 0, 30)])
def test_a_daily_cron_keeps_its_hour_across_daylight_saving_changes(start, monkeypatch):
    """Berlin's clocks go back on 2026-10-25 and forward on 2026-03-29: 03:00 stays 03:00, once."""
    from kftune.schedule import next_fire

    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    try:
        fire = datetime.fromtimestamp(next_fire("0 3 * * *", start.timestamp()))
        assert (fire.date(), fire.hour, fire.minute) == (start.date() + timedelta(days=start.hour > 3), 3, 0)
    finally:
        monkeypatch.undo()
        time.tzset()


def test_the_hour_repeated_when_the_clocks_go_back_fires_a_daily_job_once_and_an_hourly_one_twice(monkeypatch):
    """Berlin repeats 02:00-03:00 on 2026-10-25: a job at 02:30 runs in the first pass only, as cron's does."""
    from kftune.schedule import next_fire

    def fires(cron: str, start: datetime, n: int) -> list[str]:
        out, t = [], start.timestamp()
        for _ in range(n):
            t = next_fire(cron, t)
            out.append(datetime.fromtimestamp(t).astimezone().isoformat(timespec="minutes"))
        return out

    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    try:
        assert fires("30 2 * * *", datetime(2026, 10, 24, 12), 2) == ["2026-10-25T02:30+02:00",
                                                                    "2026-10-26T02:30+01:00"]
        assert fires("30 2 * * *", datetime(2026, 10, 25, 2, 45), 1) == ["2026-10-26T02:30+01:00"]
        assert fires("0 * * * *", datetime(2026, 10, 25, 1, 30), 3) == ["2026-10-25T02:00+02:00",
                                                                       "2026-10-25T02:00+01:00",
                                                                       "2026-10-25T03:00+01:00"]
    finally:
        monkeypatch.undo()
        time.tzset()


def test_a_failing_run_does_not_stop_the_schedule(tmp_path, caplog):
    clock = FakeClock(datetime(2026, 11, 22, 2, 0))
    calls = []

    def job():
        calls.append(clock.now())
        if len(calls) == 1:
            raise RuntimeError("data repo unreachable")
        return "v2 promote"

    run_schedule("0 3 * * *", job, tmp_path / "lock", clock, max_runs=2)
    assert len(calls) == 2 and calls[1] - calls[0] == 24 * 3600
    assert "run failed: data repo unreachable" in caplog.text


def test_one_scheduler_at_a_time(tmp_path):
    with single_instance(tmp_path / "lock"):
        with pytest.raises(Busy, match=f"another kftune scheduler is running .*pid {os.getpid()}"):
            with single_instance(tmp_path / "lock"):
                pass
    with single_instance(tmp_path / "lock"):  # released on exit
        pass


def test_cron_is_checked_and_converted_for_kfp(capsys):
    assert kfp_cron("0 3 * * *") == "0 0 3 * * *"
    assert main(["schedule", "--cron", "3am daily"]) == 2
    assert "not a 5-field cron expression" in capsys.readouterr().err
    assert main(["schedule", "--cron", "0 3 31 2 *"]) == 2  # 31 February
    assert "--cron '0 3 31 2 *': never fires" in capsys.readouterr().err


def _as_from_a_background_shell():
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # what `cmd &` in a non-interactive shell hands its children


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_the_real_command_holds_the_lock_and_stops_cleanly_on_ctrl_c_or_sigterm(tmp_path, stop):
    cmd = [sys.executable, "-m", "kftune.cli", "--project-dir", str(tmp_path), "schedule", "--cron", "0 3 * * *",
           "--data", str(tmp_path / "data.csv"), "--params", str(ROOT / "params.yaml")]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=_as_from_a_background_shell)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / ".kftune" / "schedule.lock").exists() or not (
                tmp_path / ".kftune" / "schedule.lock").read_text():
            assert time.monotonic() < deadline and first.poll() is None, first.communicate()
            time.sleep(0.2)
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert second.returncode == 2 and "another kftune scheduler is running" in second.stderr
    finally:
        first.send_signal(stop)
        try:
            out, err = first.communicate(timeout=30)
        except subprocess.TimeoutExpired:  # never leave a scheduler running behind the suite
            first.kill()
            out, err = first.communicate()
            pytest.fail(f"the scheduler did not stop on {stop!r}: {err[-2000:]}")
    assert first.returncode == 0 and "scheduler stopped" in out
    assert "next run at" in err


def test_cluster_schedule_commands_need_a_reachable_host(capsys):
    assert main(["schedule", "--cron", "0 3 * * *", "--host", "http://127.0.0.1:9",
                 "--params", str(ROOT / "params.yaml")]) == 2
    assert "cannot reach Kubeflow Pipelines at http://127.0.0.1:9" in capsys.readouterr().err
    # --monitor with --host: a second recurring run, of the monitoring pipeline; its cron is checked first
    assert main(["schedule", "--cron", "0 3 * * *", "--host", "http://127.0.0.1:9", "--monitor", "*/15 * *"]) == 2
    assert "--cron '*/15 * *': not a 5-field cron" in capsys.readouterr().err
    assert main(["schedule", "--cron", "0 3 * * *", "--host", "http://127.0.0.1:9", "--monitor", "*/15 * * * *",
                 "--params", str(ROOT / "params.yaml")]) == 2
    assert "cannot reach Kubeflow Pipelines at http://127.0.0.1:9" in capsys.readouterr().err
    assert main(["schedule", "pause", "abc"]) == 2
    assert "pass --host URL" in capsys.readouterr().err


def test_two_tasks_each_on_its_own_cron_one_at_a_time(tmp_path, caplog):
    from kftune.schedule import Task, run_tasks

    clock = FakeClock(datetime(2026, 11, 22, 10, 50))
    started = []

    def job(name, minutes):
        def run():
            started.append(f"{name} {datetime.fromtimestamp(clock.now()):%H:%M}")
            clock.t += minutes * 60
        return run

    # the 11:00 retraining takes 40 minutes and waits for the check listed first (a tie); the 11:15 check, due
    # meanwhile, runs once it ends (late, once), the 11:30 one is skipped
    tasks = [Task("monitor", "*/15 * * * *", job("monitor", 1)), Task("retraining", "0 * * * *", job("retrain", 40))]
    with caplog.at_level(logging.INFO, logger="kftune.schedule"):
        assert run_tasks(tasks, tmp_path / "lock", clock, max_runs=6) == 6
    assert started == ["monitor 11:00", "retrain 11:01", "monitor 11:41", "monitor 11:45", "monitor 12:00",
                       "retrain 12:01"]
    assert "monitor: skipped 1 run(s)" in caplog.text and "retraining: skipped" not in caplog.text
