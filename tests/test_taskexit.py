"""A kfp task ends right after its outputs are written, with its exit handlers and threads finished first; a
failing task still fails; outside a task process nothing changes."""

import pytest
from kfp import dsl, local

from kftune.taskexit import skip_teardown


@dsl.component
def finishing_task(marker_dir: str) -> str:
    import atexit
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    from kftune.taskexit import skip_teardown

    assert skip_teardown(), "a kfp task process"
    atexit.register(lambda: Path(marker_dir, "exit-handler-ran").write_text("yes"))

    def late_write():
        time.sleep(0.5)
        Path(marker_dir, "thread-finished").write_text("yes")

    threading.Thread(target=late_write).start()  # not a daemon: the interpreter would wait for it
    # idle non-daemon workers of a pool still referenced, as MLflow's S3 artifact uploads leave them: only
    # threading's exit callbacks stop them
    globals()["pool"] = ThreadPoolExecutor(2)
    globals()["pool"].submit(time.sleep, 0.1)
    return "the output"


@dsl.component
def failing_task() -> str:
    from kftune.taskexit import skip_teardown

    skip_teardown()
    raise ValueError("this task fails")


def test_a_task_ends_after_its_outputs_exit_handlers_and_threads(tmp_path):
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"),
               raise_on_error=True)
    task = finishing_task(marker_dir=str(tmp_path))
    assert task.output == "the output"
    assert (tmp_path / "exit-handler-ran").read_text() == "yes"
    assert (tmp_path / "thread-finished").read_text() == "yes"

    with pytest.raises(RuntimeError, match="failing-task"):
        failing_task()


def test_outside_a_task_process_nothing_changes():
    from kfp.dsl.executor import Executor

    before = Executor.write_executor_output
    assert skip_teardown() is False and Executor.write_executor_output is before
