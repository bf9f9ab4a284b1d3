"""Both pipelines task by task in the component image, against the MLflow image on PostgreSQL with S3 artifacts.

Run by `make test-containers`, which installs and starts Docker and builds the images first; `make test`
skips this module. Everything listens on 127.0.0.1 and every container uses the host network.
"""

import json
import os
import secrets
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

if not os.environ.get("KFTUNE_CONTAINER_TESTS"):
    pytest.skip("needs Docker and the built images: run `make test-containers`", allow_module_level=True)

from tests.conftest import BIN, free_port, subword_texts, wait_for  # noqa: E402

pytestmark = pytest.mark.slow
IMAGE = os.environ.get("IMAGE", "kftune:0.1.0")
MLFLOW_IMAGE = os.environ.get("MLFLOW_IMAGE", "kftune-mlflow:3.17.2")
MODEL = "kftune-containers"
SETTINGS = ["model.name=bert-tiny", "finetune.max_steps=60", "finetune.batch_size=16", "finetune.learning_rate=1e-3",
            "finetune.eval_every_steps=30", "finetune.bf16=false", "finetune.checkpoint_every_steps=0",
            "tokenize.max_length=32", f"register.model_name={MODEL}"]


TRAINING_TASKS = ["settings_op", "ingest_op", "tokenize_op", "finetune_op", "evaluate_op", "register_op",
                  "promote_op"]


def task_of(record: dict) -> str:
    """The component function a task container ran (kfp's executor gets it as --function_to_execute)."""
    args = " ".join([*(record.get("Config", {}).get("Cmd") or []), *record.get("Args", [])]).split()
    return args[args.index("--function_to_execute") + 1] if "--function_to_execute" in args else "?"


def docker(*args, check=True) -> str:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True)
    if check and proc.returncode:
        raise AssertionError(f"docker {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout.strip()


class TaskContainers:
    """Every task container this test's runs start, seen through `docker events` and inspected while it runs."""

    def __init__(self, project: Path):
        self.seen: list[dict] = []
        self.on_start = None  # called with each container's inspect record
        self.proc = subprocess.Popen(
            ["docker", "events", "--format", "{{json .}}", "--filter", "type=container", "--filter", "event=start",
             "--filter", f"label=kftune.project={project}"], stdout=subprocess.PIPE, text=True)
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self):
        for line in self.proc.stdout:
            cid = json.loads(line)["id"]
            found = subprocess.run(["docker", "inspect", cid], capture_output=True, text=True)
            record = json.loads(found.stdout)[0] if found.returncode == 0 else {"Id": cid, "gone": True}
            self.seen.append(record)
            if self.on_start:
                self.on_start(record)

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture
def stack(postgres, tmp_path):  # noqa: F811
    """moto's S3 on 127.0.0.1, the MLflow image as a server on it (PostgreSQL backend, S3 artifacts);
    yields the environment a user would export, with sentinel credentials, and removes everything after."""
    import boto3
    from moto.server import ThreadedMotoServer

    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    s3.start()
    endpoint = "http://127.0.0.1:%d" % s3.get_host_and_port()[1]
    token = secrets.token_hex(8)
    creds = {"AWS_ACCESS_KEY_ID": f"AKIAKFTUNE{token.upper()}", "AWS_SECRET_ACCESS_KEY": f"kftune-secret-{token}",
             "AWS_DEFAULT_REGION": "us-east-1", "MLFLOW_S3_ENDPOINT_URL": endpoint}
    bucket = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=creds["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
    bucket.create_bucket(Bucket="mlflow")
    port, name = free_port(), f"kftune-test-mlflow-{token}"
    backend = postgres.replace("postgresql://", "postgresql+psycopg://")
    # no --serve-artifacts: tasks write the model to S3 themselves, with the credentials they were given
    docker("run", "-d", "--name", name, "--network", "host", *[f"-e{k}" for k in creds], MLFLOW_IMAGE,
           "mlflow", "server", "--backend-store-uri", backend, "--default-artifact-root", "s3://mlflow/artifacts",
           "--no-serve-artifacts", "--host", "127.0.0.1", "--port", str(port), "--workers", "1")
    env = {**os.environ, **creds, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}", "HF_HUB_OFFLINE": "1"}
    # (docker run -e NAME takes the value from this process's environment, not the command line)
    os.environ.update(creds)
    try:
        server = subprocess.Popen(["docker", "wait", name], stdout=subprocess.DEVNULL)
        wait_for(f"http://127.0.0.1:{port}/health", server, seconds=120)
        yield env, bucket, name, tmp_path / "proj"
    finally:
        log = docker("logs", name, check=False) + subprocess.run(["docker", "logs", name], capture_output=True,
                                                                 text=True).stderr
        (tmp_path / "mlflow-server.log").write_text(log)
        docker("rm", "-f", name, check=False)
        for cid in docker("ps", "-aq", "--filter", f"label=kftune.project={tmp_path / 'proj'}", check=False).split():
            docker("rm", "-f", cid, check=False)
        for k in creds:
            os.environ.pop(k, None)
        s3.stop()


def kftune(env, project, *args, background=False, settings=()):
    cmd = [f"{BIN}/kftune", "--project-dir", str(project), *args, "--runner", "docker", "--image", IMAGE,
           *[a for s in [*SETTINGS, *settings] for a in ("-S", s)]]
    if background:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    print(f"{args[0]} in containers: {time.monotonic() - t0:.0f} s")
    return proc.stdout + proc.stderr


def test_pipelines_run_task_by_task_in_the_image(stack):
    import mlflow

    env, bucket, server, project = stack
    project.mkdir()
    for i in range(3):
        subword_texts(900, seed=20 + i).to_csv(project / f"batch{i}.csv", index=False)
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    client = mlflow.MlflowClient()
    image_id = docker("image", "inspect", "-f", "{{.Id}}", IMAGE)
    watch = TaskContainers(project)
    logs = []
    try:
        # 1. training, every task in a container: a champion with its lineage
        logs.append(kftune(env, project, "run", "--data", str(project / "batch0.csv")))
        champion = client.get_model_version_by_alias(MODEL, "champion")
        tags = champion.tags
        assert tags["kftune.data_sha256"] and tags["kftune.data_path"].endswith("batch0.csv")
        assert tags["kftune.run_id"] and "kftune.params_hash" in tags, tags
        run = client.get_run(tags["kftune.run_id"])
        assert run.data.tags["kftune.git_commit"] == tags["kftune.git_commit"]
        keys = [o["Key"] for o in bucket.list_objects_v2(Bucket="mlflow", MaxKeys=1000).get("Contents", [])]
        assert any(k.endswith("model.safetensors") for k in keys), "the register task wrote the model to S3"

        training = list(watch.seen)
        tasks = sorted(task_of(c) for c in training)
        assert tasks == sorted(TRAINING_TASKS), tasks  # settings, ingest .. promote: one container each
        for c in training:
            assert not c.get("gone"), f"container {c['Id']} was gone before it could be inspected"
            assert c["Image"] == image_id, f"task container {c['Id'][:12]} ran {c['Image']}, not {IMAGE}"
            assert c["HostConfig"]["NetworkMode"] == "host"
            assert c["Config"]["User"] in ("1000:1000", "1000"), c["Config"]["User"]
            container_env = dict(e.split("=", 1) for e in c["Config"]["Env"])
            for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_URI"):
                assert container_env.get(k) == env[k], f"{k} did not reach task {c['Id'][:12]} as a variable"
        run_dir = next((project / "local_outputs").glob("kftune-training-*"))
        written = [p for p in run_dir.rglob("*") if p.is_file()]
        assert written and {p.stat().st_uid for p in written} == {1000}, \
            "every task output was written by the image's non-root user (uid 1000), not by root on the host"

        # 2. a fine-tune task killed mid-run: the champion stays, nothing half-registered. Its fine-tune is
        # given far more steps than it can finish before the kill, however fast the machine.
        before = {v.version for v in client.search_model_versions(f"name='{MODEL}'")}
        killed, running = threading.Event(), []

        def kill_finetune(record):
            if "finetune_op" in " ".join(record.get("Args", [])) and not killed.is_set():
                time.sleep(8)
                running.append(docker("inspect", "-f", "{{.State.Running}}", record["Id"], check=False) == "true")
                docker("kill", record["Id"], check=False)
                killed.set()

        watch.on_start = kill_finetune
        proc = kftune(env, project, "run", "--data", str(project / "batch1.csv"), background=True,
                      settings=["finetune.max_steps=1000000", "finetune.early_stopping_patience=0"])
        out = proc.communicate(timeout=600)[0]
        logs.append(out)
        watch.on_start = None
        assert killed.is_set() and running == [True] and proc.returncode != 0, out
        assert "fine-tune" in out, out
        assert client.get_model_version_by_alias(MODEL, "champion").version == champion.version
        assert {v.version for v in client.search_model_versions(f"name='{MODEL}'")} == before
        # the task's MLflow run names the host command as its owner (KFTUNE_OWNER_PID), which closed it
        import socket

        owned = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                   f"tags.`kftune.owner` = '{socket.gethostname()}:{proc.pid}'")
        assert owned and all(r.info.status == "FAILED" and r.data.tags.get("kftune.status") == "failed"
                             for r in owned), [(r.info.status, r.data.tags.get("kftune.owner")) for r in owned]

        # 2b. Ctrl-C of the command during fine-tune: the detached task container is stopped with it
        started = threading.Event()
        watch.on_start = lambda record: "finetune_op" in " ".join(record.get("Args", [])) and started.set()
        proc = kftune(env, project, "run", "--data", str(project / "batch1.csv"), background=True,
                      settings=["finetune.max_steps=1000000", "finetune.early_stopping_patience=0"])
        assert started.wait(300), "the fine-tune container never started"
        time.sleep(5)
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=120)[0]
        logs.append(out)
        watch.on_start = None
        assert proc.returncode == 130 and "kftune: interrupted" in out, out
        assert docker("ps", "-q", "--filter", f"label=kftune.project={project}") == "", "a task container still runs"
        assert client.get_model_version_by_alias(MODEL, "champion").version == champion.version
        assert {v.version for v in client.search_model_versions(f"name='{MODEL}'")} == before

        # 3. the next run proceeds: one retraining cycle in containers
        logs.append(kftune(env, project, "retrain", "--data", str(project / "batch2.csv"), "--force"))
        after = client.get_model_version_by_alias(MODEL, "champion")
        versions = {v.version for v in client.search_model_versions(f"name='{MODEL}'")}
        assert len(versions) == len(before) + 1, "the retraining cycle registered its challenger"
        assert after.tags.get("kftune.data_sha256"), after.tags
        assert all(c["Image"] == image_id for c in watch.seen if not c.get("gone"))
    finally:
        watch.close()

    # 4. the credentials travelled as variables only: not in the image, its history, or any log
    sentinels = [env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]]
    history = docker("history", "--no-trunc", IMAGE) + docker("image", "inspect", IMAGE)
    logs += [p.read_text(errors="replace") for p in (project / "local_outputs").glob("*.log")]
    logs.append(docker("logs", server, check=False))
    for s in sentinels:
        assert s not in history, "a credential is in the image's history or config"
        assert not any(s in log for log in logs), "a credential was written to a log"
        saved = subprocess.run(f"docker save {IMAGE} | grep -c -a -F '{s}'", shell=True, capture_output=True,
                               text=True)
        assert saved.stdout.strip() == "0", f"a credential is inside the image's layers ({saved.stdout.strip()})"


def test_every_module_imports_in_the_image():
    """The image's install holds the whole package (a missing subpackage once passed every subprocess test)."""
    script = ("import importlib, pkgutil, kftune, components, pipelines\n"
              "for pkg in (kftune, components, pipelines):\n"
              "    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
              "        if not m.name.endswith('__main__'):\n"
              "            importlib.import_module(m.name)\n"
              "print('ok', kftune.hardware.allocator())")
    assert docker("run", "--rm", "--network", "host", "-e", "HF_HUB_OFFLINE=1", IMAGE, "python", "-c", script) \
        == "ok tcmalloc", "every module imports, under the image's preloaded tcmalloc"
