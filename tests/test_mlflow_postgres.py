"""MLflow for real: a tracking server on PostgreSQL with artifacts on S3 (moto), the pipeline against it."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest

from kftune import registry
from kftune.local import run_local
from tests.conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, proc: subprocess.Popen, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(url)


@pytest.fixture
def postgres():
    """A throw-away PostgreSQL server on 127.0.0.1 (Debian's package, installed if missing)."""
    found = subprocess.run([str(ROOT / "infra" / "scripts" / "ensure-postgres.sh")], capture_output=True, text=True)
    if found.returncode:
        pytest.skip(f"no PostgreSQL server: {found.stderr.strip()}")
    bindir = Path(found.stdout.strip())
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []  # initdb refuses root
    home = Path(tempfile.mkdtemp(prefix="kftune-pg-"))
    if as_user:
        shutil.chown(home, "postgres", "postgres")
    data, port = home / "data", free_port()
    subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-U", "mlflow", "-A", "trust"],
                   check=True, capture_output=True)
    subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-w", "-l", str(home / "log"), "-o",
                    f"-p {port} -k {home} -c listen_addresses=127.0.0.1", "start"], check=True, capture_output=True)
    try:
        subprocess.run([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow", "mlflow"],
                       check=True, capture_output=True)
        yield f"postgresql://mlflow@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def mlflow_server(postgres, tmp_path, monkeypatch):
    from moto.server import ThreadedMotoServer

    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    s3.start()
    host, s3_port = s3.get_host_and_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "minio", "AWS_SECRET_ACCESS_KEY": "minio-secret",
           "AWS_DEFAULT_REGION": "us-east-1", "MLFLOW_S3_ENDPOINT_URL": f"http://{host}:{s3_port}"}
    import boto3

    bucket = boto3.client("s3", endpoint_url=env["MLFLOW_S3_ENDPOINT_URL"], aws_access_key_id="minio",
                          aws_secret_access_key="minio-secret", region_name="us-east-1")
    bucket.create_bucket(Bucket="mlflow")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", postgres, "--artifacts-destination",
         "s3://mlflow/artifacts", "--serve-artifacts", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env=env, stdout=open(tmp_path / "mlflow.log", "w"), stderr=subprocess.STDOUT)
    try:
        wait_for(f"http://127.0.0.1:{port}/health", server)
        uri = f"http://127.0.0.1:{port}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL"):
            monkeypatch.delenv(k, raising=False)  # the pipeline reaches artifacts only through the server
        mlflow.set_tracking_uri(uri)
        yield uri, bucket
    finally:
        server.terminate()
        server.wait(timeout=30)
        s3.stop()


def test_pipeline_against_mlflow_on_postgres_and_s3(mlflow_server, params, subword_csv, tmp_path):
    uri, bucket = mlflow_server
    decision = run_local(str(subword_csv), params, tmp_path)
    assert decision["decision"] == "promote"
    name = params.register.model_name
    assert registry.version_by_alias(name, registry.CHAMPION) == decision["version"]
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    predictions = model.predict(["the group said gainoku today", "market droptrkr report"])
    assert list(predictions["label"]) == ["positive", "negative"]
    keys = [o["Key"] for o in bucket.list_objects_v2(Bucket="mlflow", MaxKeys=1000).get("Contents", [])]
    assert any(k.endswith("model.safetensors") for k in keys), "artifacts are proxied to the S3 store"
    assert not (tmp_path / "mlflow.db").exists(), "nothing fell back to the embedded sqlite store"
