"""A pipeline task's process ends as soon as its outputs are written, without Python's interpreter teardown.

A task imports torch, transformers and MLflow; after the kfp executor has written the task's outputs, Python's
teardown of those modules took 0.5-2 s per task (the fine-tune task: 1.3 s; about 6 s of a `make run`, in
which each task is its own process, as it is its own pod on a cluster). `skip_teardown()`, called first in a
task, makes the executor end the process right after writing the outputs, once every non-daemon thread has
finished and every exit handler (MLflow's flushes, logging's) has run, in the order of a normal exit. A task
that fails never reaches that point: it exits through Python's normal path, with its error and exit status.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading

EXECUTOR_MAIN = "kfp.dsl.executor_main"  # what kfp.local and a cluster's task container run: python -m ...


def skip_teardown() -> bool:
    """In a kfp task process, end it with exit status 0 right after its outputs are written; elsewhere (a test,
    the CLI) do nothing. Returns whether it applies."""
    if getattr(getattr(sys.modules.get("__main__"), "__spec__", None), "name", None) != EXECUTOR_MAIN:
        return False
    from kfp.dsl.executor import Executor

    write = Executor.write_executor_output
    if getattr(write, "ends_process", False):
        return True

    def write_then_exit(self, *args, **kwargs):
        path = write(self, *args, **kwargs)
        logging.getLogger(__name__).info("outputs written (%s); ending the task without interpreter teardown", path)
        # what the interpreter's own shutdown does, in its order: threading's exit callbacks (they stop
        # concurrent.futures' idle workers), then it waits for non-daemon threads, then the atexit handlers
        threading._shutdown()
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    write_then_exit.ends_process = True
    Executor.write_executor_output = write_then_exit
    return True
