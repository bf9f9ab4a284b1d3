"""What happens when things go wrong: a dead tracking server, Ctrl-C, kill -9, hostile data. Real processes."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import yaml
from mlflow import MlflowClient

from kftune.cli import main
from kftune.tracking import sweep_dead_runs

pytestmark = pytest.mark.slow


def test_a_dead_tracking_server_fails_in_seconds_naming_the_uri(tmp_path, params, subword_csv, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params.to_dict()))
    started = time.monotonic()
    assert main(["--project-dir", str(tmp_path), "run", "--data", str(subword_csv),
                 "--params", str(tmp_path / "params.yaml")]) == 2
    assert time.monotonic() - started < 30
    assert "cannot reach the MLflow tracking server at http://127.0.0.1:1" in capsys.readouterr().err
    assert not (tmp_path / "local_outputs").exists(), "no step started"


def _start_run(tmp_path, params, data, **popen):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params.to_dict()))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "kftune.cli", "--project-dir", str(tmp_path), "run", "--data",
                             str(data), "--params", str(tmp_path / "params.yaml")], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def _wait_for_fine_tune(proc) -> None:
    for line in proc.stdout:
        if line.strip().startswith("fine-tune ..."):
            return
    pytest.fail(f"the run ended before fine-tune: {proc.communicate()}")


def _wait_for_its_run(tmp_path) -> None:
    deadline = time.monotonic() + 120
    while not [r for r in _runs(tmp_path) if r.data.tags.get("kftune.owner")]:
        assert time.monotonic() < deadline, "the fine-tune step never opened its MLflow run"
        time.sleep(1)
    time.sleep(2)


def _runs(tmp_path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_ctrl_c_during_a_run_stops_every_step_and_marks_the_run_killed(tmp_path, params, subword_csv, monkeypatch):
    slow = params.to_dict()
    slow["finetune"]["max_steps"] = 5000  # still training when the signal comes
    from kftune.config import params_from_dict

    proc = _start_run(tmp_path, params_from_dict(slow), subword_csv)
    _wait_for_fine_tune(proc)
    _wait_for_its_run(tmp_path)
    children = psutil.Process(proc.pid).children(recursive=True)
    assert children, "the fine-tune step runs in a child process"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "Traceback" not in err and "kftune: interrupted" in err
    gone, alive = psutil.wait_procs(children, timeout=5)
    assert not alive, f"steps still running after the command exited: {alive}"
    (run,) = [r for r in _runs(tmp_path) if r.data.tags.get("kftune.owner")]
    assert run.info.status == "KILLED" and run.data.tags["kftune.status"] == "killed"
    assert "interrupted" in run.data.tags["kftune.failure"]


def test_a_run_left_running_by_kill_9_is_marked_killed_by_the_next_command(tmp_path, params, subword_csv):
    from kftune.config import params_from_dict

    slow = params.to_dict()
    slow["finetune"]["max_steps"] = 5000
    proc = _start_run(tmp_path, params_from_dict(slow), subword_csv, start_new_session=True)
    _wait_for_fine_tune(proc)
    _wait_for_its_run(tmp_path)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole command and its steps, as on a power loss
    proc.communicate(timeout=30)
    (run,) = [r for r in _runs(tmp_path) if r.data.tags.get("kftune.owner")]
    assert run.info.status == "RUNNING", "nothing could close it"
    assert sweep_dead_runs() == [run.info.run_id]
    (run,) = [r for r in _runs(tmp_path) if r.data.tags.get("kftune.owner")]
    assert run.info.status == "KILLED" and "is gone" in run.data.tags["kftune.failure"]
