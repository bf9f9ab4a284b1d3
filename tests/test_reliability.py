"""What happens when things go wrong: a dead tracking server, Ctrl-C, kill -9, hostile data. Real processes."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from mlflow import MlflowClient

from kftune.cli import main
from kftune.tracking import owner_where, sweep_dead_runs

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


def test_a_runner_error_that_is_not_a_step_failure_still_ends_the_runs(tmp_path, params, mlflow_store, monkeypatch):
    """kfp's DockerRunner raises docker's own errors (an engine that went away), not RuntimeError."""
    import mlflow

    import kftune.cluster
    from kftune.local import run_pipeline
    from kftune.tracking import experiment_id, owner

    def pipeline(which):
        def compiled(*args, **kwargs):
            def run(**arguments):  # what a step's run carries; an explicit experiment: this worker's active one
                # may be another test's, in another store
                with mlflow.start_run(experiment_id=experiment_id(params.register.experiment),
                                      tags={"kftune.owner": owner()}):
                    raise ConnectionResetError("the engine went away")
            return run
        return compiled

    monkeypatch.setattr(kftune.cluster, "pipeline_factory", pipeline)
    with pytest.raises(ConnectionResetError):
        run_pipeline("training", params, tmp_path, data_path="x")
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.status == "FAILED"
    assert "ConnectionResetError: the engine went away" in run.data.tags["kftune.failure"]


def test_a_second_ctrl_c_during_the_clean_up_is_held_until_it_is_done():
    from kftune.local import signals_held

    previous = signal.getsignal(signal.SIGINT)
    with signals_held():
        os.kill(os.getpid(), signal.SIGINT)  # ignored: stopping the steps goes on
        time.sleep(0.05)
    assert signal.getsignal(signal.SIGINT) is previous


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
    assert run.data.tags["kftune.owner_where"] == owner_where()


def test_a_run_owned_in_another_pid_namespace_is_not_judged_by_this_ones_pids(mlflow_store):
    """A kftune command in a container on the host network has this host's name and its own pids."""
    import mlflow

    gone, experiment = _dead_pid(), mlflow.set_experiment("owners").experiment_id  # this test's store
    with mlflow.start_run(experiment_id=experiment, tags={"kftune.owner": f"{socket.gethostname()}:{gone}",
                                                          "kftune.owner_where": "4026532000.another-boot"}) as elsewhere:
        pass
    with mlflow.start_run(experiment_id=experiment, tags={"kftune.owner": f"{socket.gethostname()}:{gone}",
                                                          "kftune.owner_where": owner_where()}) as here:
        pass
    client = mlflow.MlflowClient()
    for run in (elsewhere, here):
        client.update_run(run.info.run_id, "RUNNING")
    assert sweep_dead_runs() == [here.info.run_id]
    assert client.get_run(elsewhere.info.run_id).info.status == "RUNNING"


def test_a_retried_cluster_task_closes_the_run_its_evicted_attempt_left_running(mlflow_store, params, monkeypatch):
    """An evicted pod cannot end its run, and no sweep here can judge another pod's pid; the task's next attempt
    (same KFP task id) closes it. Another task's run and a task id KFP did not fill in are left alone."""
    import mlflow

    from kftune.tracking import start_run

    client = mlflow.MlflowClient()
    monkeypatch.setenv("KFTUNE_OWNER_WHERE", "pod-a-namespace")
    evicted = start_run(params, "job-1", task_id="0b5e6f3a-task-finetune")
    other_task = start_run(params, "job-1", task_id="77c1d2aa-task-other")
    assert sweep_dead_runs() == [] and client.get_run(evicted).info.status == "RUNNING"
    monkeypatch.setenv("KFTUNE_OWNER_WHERE", "pod-b-namespace")
    retry = start_run(params, "job-1", task_id="0b5e6f3a-task-finetune")
    closed = client.get_run(evicted)
    assert closed.info.status == "KILLED" and "an earlier attempt of this pipeline task" in closed.data.tags["kftune.failure"]
    assert client.get_run(retry).info.status == "RUNNING" and client.get_run(other_task).info.status == "RUNNING"
    unfilled = start_run(params, "job-1", task_id="{{$.pipeline_task_uuid}}")
    assert "kftune.kfp_task_id" not in client.get_run(unfilled).data.tags
    assert client.get_run(retry).info.status == "RUNNING"


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


# --- S3, a full disk, a corrupted champion ------------------------------------------------------

def _fake_aws(monkeypatch, endpoint: str) -> None:
    for k, v in {"AWS_ACCESS_KEY_ID": "kftune", "AWS_SECRET_ACCESS_KEY": "kftune-secret",
                 "AWS_DEFAULT_REGION": "us-east-1", "MLFLOW_S3_ENDPOINT_URL": endpoint}.items():
        monkeypatch.setenv(k, v)


def test_a_dead_s3_endpoint_fails_in_seconds_naming_the_endpoint_and_the_bucket(tmp_path, params, monkeypatch,
                                                                                capsys):
    from tests.conftest import free_port

    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    _fake_aws(monkeypatch, endpoint)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params.to_dict()))
    for args, env in (([ "--data", "s3://kftune-data/batch-000.csv"], {}),
                      (["--data", "unused.csv"], {"KFTUNE_ARTIFACT_ROOT": "s3://kftune-mlflow/artifacts"})):
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        started = time.monotonic()
        assert main(["--project-dir", str(tmp_path), "run", *args, "--params", str(tmp_path / "params.yaml")]) == 2
        took = time.monotonic() - started
        err = capsys.readouterr().err
        bucket = "kftune-mlflow" if env else "kftune-data"
        assert took < 30 and f"cannot reach S3 bucket '{bucket}' at {endpoint}" in err, (took, err)
        print(f"dead S3 ({bucket}): failed in {took:.1f} s")
    assert not (tmp_path / "local_outputs").exists(), "no step started"


def test_pre_flight_reaches_a_live_s3_and_names_a_missing_bucket(tmp_path, params, mlflow_store, monkeypatch):
    from moto.server import ThreadedMotoServer

    from kftune.config import KftuneError
    from kftune.local import check_dependencies

    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    s3.start()
    try:
        host, port = s3.get_host_and_port()
        _fake_aws(monkeypatch, f"http://{host}:{port}")
        import boto3

        boto3.client("s3", endpoint_url=f"http://{host}:{port}").create_bucket(Bucket="kftune-data")
        check_dependencies(tmp_path, params, "s3://kftune-data/batch-000.csv")  # reachable: passes
        monkeypatch.setenv("KFTUNE_ARTIFACT_ROOT", "s3://no-such-bucket/mlflow")
        with pytest.raises(KftuneError, match=rf"cannot reach S3 bucket 'no-such-bucket' at http://{host}:{port}"):
            check_dependencies(tmp_path, params, "s3://kftune-data/batch-000.csv")
    finally:
        s3.stop()


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MiB tmpfs: a disk that fills up."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}): needs root with CAP_SYS_ADMIN")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _fill(folder, leave: int) -> None:
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    with open(folder / "filler", "wb") as f:
        f.write(b"\0" * max(free - leave, 0))


def test_a_project_on_a_full_disk_is_refused_before_any_step(small_disk, params, subword_csv, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the project's own sqlite store, on the small disk
    monkeypatch.delenv("KFTUNE_ARTIFACT_ROOT", raising=False)
    (small_disk / "params.yaml").write_text(yaml.safe_dump(params.to_dict()))
    assert main(["--project-dir", str(small_disk), "run", "--data", str(subword_csv), "--params",
                 str(small_disk / "params.yaml")]) == 2
    err = capsys.readouterr().err
    assert f"{small_disk}: " in err and "MiB free, the run needs about" in err and "free some space" in err, err
    assert not (small_disk / "local_outputs").exists(), "no step started"


def test_a_disk_filling_up_during_register_leaves_no_partial_model_and_no_pending_version(
        prepared, params, mlflow_store, small_disk, monkeypatch):
    """The registry's artifacts on a disk with room for the run's small files but not for the model."""
    import dataclasses
    import shutil

    import mlflow

    from kftune.steps.evaluate import evaluate
    from kftune.steps.finetune import finetune
    from kftune.steps.register import register
    from kftune.tracking import close_runs
    from tests.conftest import with_changes

    monkeypatch.setenv("KFTUNE_ARTIFACT_ROOT", small_disk.as_uri())
    finetune(prepared / "tokenized", prepared / "model", params.model.name, with_changes(params.finetune, max_steps=20))
    evaluate(prepared / "data", prepared / "model", prepared / "eval", params.evaluate)
    # what a register writes there, measured once with room: the run's files, then the model's
    probe = dataclasses.replace(params, register=with_changes(params.register, model_name="disk-probe",
                                                              experiment="disk-probe"))
    register(prepared / "data", prepared / "model", prepared / "eval", prepared / "gate-probe", probe)
    pages = {"run": 0, "model": 0}
    for f in (p for p in small_disk.rglob("*") if p.is_file()):
        pages["model" if "/models/" in str(f) else "run"] += -(-f.stat().st_size // 4096) * 4096
    shutil.rmtree(small_disk / "disk-probe")
    _fill(small_disk, leave=pages["run"] + pages["model"] // 2)  # the run's files fit, half the model does
    with pytest.raises(OSError) as failed:
        register(prepared / "data", prepared / "model", prepared / "eval", prepared / "gate", params)
    assert "No space left on device" in str(failed.value)
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name(params.register.experiment).experiment_id])
    pending = client.search_logged_models([run.info.experiment_id])
    print(f"disk full during register: {len(pending)} unfinished logged model(s), partial files "
          f"{sorted(p.name for p in small_disk.rglob('*') if p.is_file() and '/models/' in str(p))}")
    close_runs("FAILED", f"step register failed: {failed.value}")  # what the command does when a step fails
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FAILED" and "No space left on device" in run.data.tags["kftune.failure"]
    assert client.search_model_versions(f"name='{params.register.model_name}'") == [], "no version left"
    assert client.search_logged_models([run.info.experiment_id]) == [], f"no unfinished model left: {pending}"
    partial = [p for p in small_disk.rglob("*") if p.is_file() and "/models/" in str(p)]
    assert partial == [], f"partial model files left: {partial}"
    assert mlflow.get_tracking_uri() == mlflow_store


def test_a_corrupted_champion_names_the_version_and_the_file(project):
    """A truncated model.safetensors behind `champion`: a retraining stops at resolve, naming v1 and the file."""
    from kftune import registry
    from kftune.config import load_params
    from kftune.data import DATASET, add_batches
    from kftune.steps.resolve import resolve
    from tests.conftest import subword_texts

    from kftune.steps.evaluate import evaluate
    from kftune.steps.finetune import finetune
    from kftune.steps.register import register
    from kftune.steps.tokenize import tokenize

    params = load_params(project / "params.yaml", ["retrain.cooldown_hours=0", "finetune.max_steps=10"])
    root = project.parent
    for i in (0, 1):
        subword_texts(300, seed=i).to_csv(root / f"b{i}.csv", index=False)
    add_batches([str(root / "b0.csv")], project, params.ingest, tag="b0")
    resolve(str(project / DATASET), root / "r0", root / "c0", params)
    tokenize(root / "r0", root / "tok", params.model.name, params.tokenize)
    finetune(root / "tok", root / "model", params.model.name, params.finetune)
    evaluate(root / "r0", root / "model", root / "eval", params.evaluate)
    version = register(root / "r0", root / "model", root / "eval", root / "gate", params).version
    registry.promote(params.register.model_name, version, "the champion whose file will break")
    add_batches([str(root / "b1.csv")], project, params.ingest, tag="b1")
    mv = MlflowClient().get_model_version(params.register.model_name, version)
    location = MlflowClient().get_logged_model(registry.logged_model_id(mv)).artifact_location
    (weights,) = Path(location.removeprefix("file://")).rglob("model.safetensors")
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    proc = subprocess.run([sys.executable, "-m", "kftune.cli", "--project-dir", str(project), "retrain", "-S",
                           "retrain.cooldown_hours=0"], cwd=project, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()
    message = "\n".join(last[-3:])
    print(f"corrupted champion: {message}")
    assert "step resolve failed" in message and f"v{version}" in message, message
    assert f"{weights.relative_to(Path(location.removeprefix('file://')))}" in message, message
    assert "Traceback" not in proc.stderr
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name(f"{params.register.experiment}-retraining").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"] and f"v{version}" in runs[0].data.tags["kftune.failure"]
