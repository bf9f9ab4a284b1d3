"""Progress lines with elapsed time and ETA, and the quiet console passing them through from kfp.local."""

import io
import logging

from kftune.console import StepConsole
from kftune.progress import Progress


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_progress_says_elapsed_and_eta_every_few_seconds_and_at_the_end(caplog):
    clock = Clock()
    p = Progress("evaluate: test split", 1000, "texts", every=10, clock=clock)
    with caplog.at_level(logging.INFO, logger="kftune.progress"):
        clock.now = 5
        p.update(100)  # too soon: nothing said
        clock.now = 20
        p.update(300)
        clock.now = 25
        p.update(600)  # the end is always said
    assert [r.getMessage() for r in caplog.records] == [
        "evaluate: test split: 400/1000 texts, 0:20 elapsed, ETA 0:30",
        "evaluate: test split: 1000/1000 texts, 0:25 elapsed, ETA 0:00"]


def test_the_console_shows_progress_of_any_step_from_piped_kfp_output(tmp_path):
    clock, terminal = Clock(), io.StringIO()
    console = StepConsole(tmp_path / "run.log", terminal, clock=clock)
    console.write("Executing task 'evaluate-op'\n")
    console.write("[KFP Executor 2026-01-01 00:00:00,000 INFO]: evaluate: test split: 512/1000 texts, 0:10 "
                  "elapsed, ETA 0:09\n")
    clock.now = 12
    console.write("Task 'evaluate-op' finished with status SUCCESS\n")
    console.close()
    shown = terminal.getvalue().splitlines()
    assert shown[0] == "  evaluate ..."
    assert shown[1] == "    evaluate: test split: 512/1000 texts, 0:10 elapsed, ETA 0:09"
    assert shown[2].startswith("  evaluate done in 12.0 s")


def test_a_failed_steps_root_cause_keeps_its_message_list(tmp_path):
    console = StepConsole(tmp_path / "run.log", io.StringIO())
    console.write("Executing task 'settings-op'\n")
    console.write("Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n")
    console.write("kftune.config.ConfigError: invalid settings in pipeline inputs:\n"
                  "  - finetune.epochs: must be >= 0\n  - drift.alpha: missing\n")
    console.write("Task 'settings-op' finished with status FAILURE\n")
    assert console.failed_step() == "settings"
    assert console.root_cause() == ("kftune.config.ConfigError: invalid settings in pipeline inputs:\n"
                                    "  - finetune.epochs: must be >= 0\n  - drift.alpha: missing")


def test_the_console_shows_a_step_counting_its_parts(tmp_path):
    terminal = io.StringIO()
    console = StepConsole(tmp_path / "run.log", terminal, clock=Clock())
    console.write("Executing task 'register-op'\n")
    console.write("[KFP Executor 2026-01-01 00:00:00,000 INFO]: register: 2/4 parts (run, model, gate, card), "
                  "0:40 elapsed, ETA 0:40\n")
    console.close()
    assert terminal.getvalue().splitlines()[1] == "    register: 2/4 parts (run, model, gate, card), 0:40 elapsed, ETA 0:40"
