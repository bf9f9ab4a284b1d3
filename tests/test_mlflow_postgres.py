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
from tests.conftest import free_port, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


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
