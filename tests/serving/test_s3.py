"""S3 (moto's server on 127.0.0.1, the endpoint-URL code path MinIO uses): the request log and batch prediction."""

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

from kftune.config import load_params
from kftune.serving.batch import predict_file
from kftune.serving.model import load_version
from kftune.serving.request_log import RequestLog, read_request_log, records
from tests.conftest import ROOT, subword_texts, use_mlflow_store
from tests.serving.conftest import CLASSIFIER


@pytest.fixture
def s3(monkeypatch):
    import boto3
    import fsspec
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    for k, v in {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test",
                 "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    fsspec.filesystem("s3").clear_instance_cache()  # no client for another endpoint left from earlier
    client = boto3.client("s3")
    client.create_bucket(Bucket="logs")
    yield client
    server.stop()


def test_request_log_and_batch_prediction_on_s3(s3, serve_store, monkeypatch):
    log = RequestLog("s3://logs/serve", max_queue=100, flush_seconds=60, file_rows=2)
    from kftune.serving.model import ServedModel

    served = ServedModel("m", "1", "sequence-classification", ["neg", "pos"], None, None)
    answer = {"label": "pos", "probability": 0.7, "probabilities": {"neg": 0.3, "pos": 0.7}}
    log.append(records("r1", served, ["a", "b", "c"], [answer] * 3))
    log.close()
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="logs", Prefix="serve/")["Contents"]]
    assert len(keys) == 2 and all(k.startswith("serve/date=") and k.endswith(".parquet") for k in keys)
    assert read_request_log("s3://logs/serve")["text"].tolist() == ["a", "b", "c"]

    use_mlflow_store(serve_store, monkeypatch)
    model = load_version(CLASSIFIER, "1", load_params(ROOT / "params.yaml", ["serve.precision=fp32"]).serve)
    s3.put_object(Bucket="logs", Key="in/texts.jsonl",
                  Body=subword_texts(12, seed=4).to_json(orient="records", lines=True).encode())
    import tempfile

    made = []
    monkeypatch.setattr(tempfile, "mkdtemp", lambda real=tempfile.mkdtemp: made.append(real()) or made[-1])
    out = predict_file(model, "s3://logs/in/texts.jsonl", "s3://logs/out/predictions.parquet", chunk_rows=5,
                       progress=False)
    assert out["rows"] == 12
    assert len(made) == 1 and not Path(made[0]).exists(), "the local staging folder is removed"
    body = s3.get_object(Bucket="logs", Key="out/predictions.parquet")["Body"].read()
    import io

    got = pd.read_parquet(io.BytesIO(body))
    assert got["text"].tolist() == subword_texts(12, seed=4)["text"].tolist() and got["model_version"].eq("1").all()


def test_request_log_compaction_and_retention_on_s3(s3, monkeypatch):
    from datetime import datetime, timezone

    from kftune.serving import request_log
    from kftune.serving.model import ServedModel
    from kftune.serving.request_log import compact_request_log

    t0 = datetime(2026, 3, 1, 12, tzinfo=timezone.utc).timestamp()
    served = ServedModel("m", "1", "sequence-classification", ["neg", "pos"], None, None)
    answer = {"label": "pos", "probability": 0.7, "probabilities": {"neg": 0.3, "pos": 0.7}}
    log = RequestLog("s3://logs/compaction", max_queue=100, flush_seconds=60, file_rows=2)
    for day in range(3):
        log.append(records(f"r{day}", served, ["a", "b", "c"], [answer] * 3, at=t0 + day * 86400))
    log.close()
    before = read_request_log("s3://logs/compaction")
    s3.put_object(Bucket="logs", Key="compaction/date=2026-03-02/.compact-x.parquet.1-ab.tmp", Body=b"cut short")
    monkeypatch.setattr(request_log, "STALE_TMP_SECONDS", -60)  # moto's objects are all new: every .tmp is stale
    assert compact_request_log("s3://logs/compaction", t0 + 3 * 86400, retention_days=2) == {
        "compacted": 1, "files": 2, "deleted": 1, "failed": []}
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="logs", Prefix="compaction/")["Contents"])
    assert [k.split("/")[1] for k in keys] == ["date=2026-03-02", "date=2026-03-03", "date=2026-03-03"]
    assert keys[0].split("/")[2].startswith("compact-2026-03-02-")
    pd.testing.assert_frame_equal(read_request_log("s3://logs/compaction"), before[before["request_id"] != "r0"]
                                  .reset_index(drop=True))


def test_a_reader_sees_files_other_processes_wrote_after_its_first_read(s3):
    """s3fs keeps a folder's listing for the life of the process unless told otherwise."""
    import io

    import pyarrow.parquet as pq

    from kftune.serving.model import ServedModel
    from kftune.serving.request_log import SCHEMA

    served = ServedModel("m", "1", "sequence-classification", ["neg", "pos"], None, None)
    answer = {"label": "pos", "probability": 0.7, "probabilities": {"neg": 0.3, "pos": 0.7}}
    log = RequestLog("s3://logs/shared", max_queue=100, flush_seconds=60, file_rows=10)
    log.append(records("mine", served, ["a"], [answer]))
    log.close()
    first = read_request_log("s3://logs/shared")
    folder = s3.list_objects_v2(Bucket="logs", Prefix="shared/")["Contents"][0]["Key"].rsplit("/", 1)[0]
    other = pa.table({c: [r[c] for r in records("theirs", served, ["b"], [answer])] for c in SCHEMA.names},
                     schema=SCHEMA)
    body = io.BytesIO()
    pq.write_table(other, body)
    s3.put_object(Bucket="logs", Key=f"{folder}/part-99999999T999999999999-1-00000.parquet", Body=body.getvalue())
    assert first["request_id"].tolist() == ["mine"]
    assert sorted(read_request_log("s3://logs/shared")["request_id"]) == ["mine", "theirs"]


def test_feedback_written_by_another_process_is_read(s3):
    """A long-running monitor reads the labels that the server's /feedback wrote since its last check."""
    import io

    import pyarrow.parquet as pq

    from kftune.monitor.feedback import SCHEMA, read_feedback, write_feedback

    write_feedback("s3://logs/fb", [{"request_id": "mine", "label": "pos"}])
    assert read_feedback("s3://logs/fb")["request_id"].tolist() == ["mine"]
    body = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([{"request_id": "theirs", "index": 0, "label": "neg", "labeller": "",
                                          "source": "api", "sample": "", "time": pd.Timestamp.now(tz="UTC")}],
                                        schema=SCHEMA), body)
    key = next(o["Key"] for o in s3.list_objects_v2(Bucket="logs", Prefix="fb/")["Contents"])
    s3.put_object(Bucket="logs", Key=f"{key.rsplit('/', 1)[0]}/part-99999999T999999999999-1-00000.parquet",
                  Body=body.getvalue())
    assert sorted(read_feedback("s3://logs/fb")["request_id"]) == ["mine", "theirs"]


def test_monitoring_checks_of_one_s3_log_wait_for_each_other(s3):
    """Two checks at once would both send an alert's change; the second waits for the first's lease."""
    import threading
    import time

    from kftune.monitor.check import one_check_at_a_time

    spans, alone = [], []

    def check():
        with one_check_at_a_time("s3://logs/serve") as held:
            alone.append(held)
            start = time.monotonic()
            time.sleep(0.5)
            spans.append((start, time.monotonic()))

    threads = [threading.Thread(target=check) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    (a_start, a_end), (b_start, _) = sorted(spans)
    assert len(spans) == 2 and b_start >= a_end, spans
    assert alone == [True, True], "each check knows it excludes the others (it may close their dead runs)"
    assert "Contents" not in s3.list_objects_v2(Bucket="logs", Prefix="serve/_monitor/"), "the lease is released"


def test_an_s3_lease_that_stops_changing_is_taken_over_and_a_beating_one_is_not(s3, caplog):
    import threading
    import time

    import fsspec

    from kftune.fileio import s3_lease

    fs = fsspec.filesystem("s3")
    s3.put_object(Bucket="logs", Key="lease", Body=b'{"holder": "a pod that was killed"}')
    start = time.monotonic()
    with s3_lease(fs, "logs/lease", "check", stale_after=0.6, poll=0.05):
        waited = time.monotonic() - start
    assert 0.6 <= waited < 5 and "took over the lease logs/lease" in caplog.text

    released, acquired = [], []

    def live_holder():  # holds for 5 stale_after periods, its heartbeat rewriting the object
        with s3_lease(fs, "logs/lease", "check", stale_after=0.4, poll=0.05):
            time.sleep(2.0)
            released.append(time.monotonic())

    holder = threading.Thread(target=live_holder)
    holder.start()
    time.sleep(0.2)
    with s3_lease(fs, "logs/lease", "check", stale_after=0.4, poll=0.05):
        acquired.append(time.monotonic())
    holder.join(10)
    assert acquired[0] >= released[0], "a live holder's lease was taken"
    assert "lost the lease" not in caplog.text


def test_a_store_that_refuses_conditional_writes_runs_the_check_without_a_lease(s3, monkeypatch, caplog):
    """A check then does not exclude others, so it must not close runs another check may still own."""
    import fsspec
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    from kftune.fileio import s3_lease

    fs = fsspec.filesystem("s3")
    real = fs.call_s3

    def no_conditions(method, *args, **kwargs):
        if "IfNoneMatch" in kwargs or "IfMatch" in kwargs:
            raise translate_boto_error(ClientError({"Error": {"Code": "NotImplemented", "Message": "conditional"},
                                                    "ResponseMetadata": {"HTTPStatusCode": 501}}, "PutObject"))
        return real(method, *args, **kwargs)

    monkeypatch.setattr(fs, "call_s3", no_conditions)
    with s3_lease(fs, "logs/lease", "check") as held:
        assert held is False
    assert "refuses conditional writes" in caplog.text
    assert "Contents" not in s3.list_objects_v2(Bucket="logs", Prefix="lease")


def test_a_lost_conditional_write_is_told_from_other_s3_errors_without_s3fs_condition_field():
    """MinIO's 412 carries no <Condition>, so s3fs raises a plain OSError, not FileExistsError; AWS answers
    two conditional writes at once with 409. Both mean "another holder"; a 403 does not."""
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    from kftune.fileio import _s3_conflict

    def error(status: int, code: str):
        return translate_boto_error(ClientError({"Error": {"Code": code, "Message": code},
                                                 "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject"))

    minio = error(412, "PreconditionFailed")
    assert not isinstance(minio, FileExistsError) and _s3_conflict(minio)
    assert _s3_conflict(error(409, "ConditionalRequestConflict"))
    assert not _s3_conflict(error(403, "AccessDenied"))
