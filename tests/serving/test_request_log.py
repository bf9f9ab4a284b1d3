"""The request log: rows written whole, read back in order and by time; a full queue drops and counts."""

import json
from datetime import datetime, timedelta, timezone

import pandas as pd

from kftune.serving.model import ServedModel
from kftune.serving.request_log import SCHEMA, RequestLog, read_request_log, records


def served(task="sequence-classification"):
    return ServedModel("m", "3", task, ["neg", "pos"], model=None, tokenizer=None, precision="int8")


def test_rows_round_trip_with_the_documented_schema(tmp_path):
    log = RequestLog(str(tmp_path / "log"), max_queue=100, flush_seconds=60, file_rows=3)
    answers = [{"label": "pos", "probability": 0.9, "probabilities": {"neg": 0.1, "pos": 0.9}}] * 2
    log.append(records("r1", served(), ["a", "b"], answers))
    log.append(records("r2", served(), ["c", "d"], answers))
    spans = [{"type": "per", "text": "Ann", "start": 0, "end": 3, "score": 0.8}]
    log.append(records("r3", served("token-classification"), ["Ann said"], [{"entities": spans}]))
    log.close()
    files = sorted((tmp_path / "log").glob("date=*/part-*.parquet"))
    assert len(files) == 2, "a new file every log_file_rows rows"
    df = read_request_log(str(tmp_path / "log"))
    assert list(df.columns) == SCHEMA.names
    assert list(df["text"]) == ["a", "b", "c", "d", "Ann said"] and list(df["index"]) == [0, 1, 0, 1, 0]
    assert df["probabilities"][0].tolist() == [0.1, 0.9] and df["version"].eq("3").all()
    assert pd.isna(df["label"][4]) and df["entities"][4] == '[{"type": "per", "text": "Ann", "start": 0, "end": 3, ' \
                                                           '"score": 0.8}]'
    assert len(read_request_log(str(tmp_path / "log"), since=datetime.now(timezone.utc) + timedelta(days=1))) == 0
    assert len(read_request_log(str(tmp_path / "log"), since=datetime.now(timezone.utc) - timedelta(hours=1))) == 5
    assert len(read_request_log(str(tmp_path / "missing"))) == 0


def test_a_full_queue_drops_and_counts_instead_of_blocking(tmp_path):
    log = RequestLog(str(tmp_path / "log"), max_queue=5, flush_seconds=60, file_rows=1000)
    rows = records("r", served(), ["x"] * 20000, [{"label": "neg", "probability": 0.6,
                                                  "probabilities": {"neg": 0.6, "pos": 0.4}}] * 20000)
    dropped = log.append(rows)
    log.close()
    assert dropped > 0 and log.dropped == dropped
    assert log.written + log.dropped == 20000 == log.written + dropped
    assert len(read_request_log(str(tmp_path / "log"))) == log.written


def test_masking_covers_entities_and_folders_follow_the_rows_utc_dates(tmp_path):
    from kftune.pii import mask

    log = RequestLog(str(tmp_path / "log"), max_queue=100, flush_seconds=60, file_rows=100, mask=mask)
    spans = [{"type": "per", "text": "Ann", "start": 0, "end": 3, "score": 0.8},
             {"type": "misc", "text": "ann@example.com", "start": 12, "end": 27, "score": 0.7}]
    log.append(records("r1", served("token-classification"), ["Ann mailed ann@example.com"], [{"entities": spans}]))
    replayed = datetime(2030, 1, 2, 23, 30, tzinfo=timezone.utc).timestamp()  # a replay's client time, ahead
    answers = [{"label": "pos", "probability": 0.9, "probabilities": {"neg": 0.1, "pos": 0.9}}]
    log.append(records("r2", served(), ["late"], answers, at=replayed))
    log.close()
    df = read_request_log(str(tmp_path / "log"))
    assert df["text"][0] == "Ann mailed <EMAIL>" and "ann@example.com" not in df["entities"][0]
    assert [e["text"] for e in json.loads(df["entities"][0])] == ["Ann", "<EMAIL>"]
    assert (tmp_path / "log" / "date=2030-01-02").is_dir()
    # one minute before the replayed row, written in UTC+23:00 (already 2030-01-03 there): the row is found
    since = datetime(2030, 1, 3, 22, 29, tzinfo=timezone(timedelta(hours=23)))
    assert read_request_log(str(tmp_path / "log"), since=since)["request_id"].tolist() == ["r2"]
