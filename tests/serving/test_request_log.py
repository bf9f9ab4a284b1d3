"""The request log: rows written whole, read back in order and by time; a full queue drops and counts."""

import json
import time
from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest

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


DAY = 86400
T0 = datetime(2026, 3, 1, 12, tzinfo=timezone.utc).timestamp()  # day 0 of a four-day log


def four_days(log_dir, file_rows=3):
    """Ten requests a day on days 0-3, written three rows per file."""
    log = RequestLog(str(log_dir), max_queue=1000, flush_seconds=60, file_rows=file_rows)
    answer = {"label": "pos", "probability": 0.9, "probabilities": {"neg": 0.1, "pos": 0.9}}
    for day in range(4):
        for i in range(10):
            log.append(records(f"d{day}-{i}", served(), [f"text {day} {i}"], [answer], at=T0 + day * DAY + i))
    log.close()


def test_closed_days_are_compacted_into_one_file_and_every_row_is_read_once(tmp_path):
    from kftune.monitor.feedback import logged_requests
    from kftune.serving.request_log import compact_request_log

    log_dir = tmp_path / "log"
    four_days(log_dir)
    before = read_request_log(str(log_dir))
    parts = {p.name: p.read_bytes() for p in (log_dir / "date=2026-03-01").glob("part-*.parquet")}
    assert len(before) == 40 and len(parts) == 4

    # checked on day 3: days 0 and 1 are closed (2 and more days old), days 2 and 3 are not
    assert compact_request_log(str(log_dir), T0 + 3 * DAY) == {"compacted": 2, "files": 8, "deleted": 0,
                                                                "failed": []}
    assert [len(list((log_dir / f"date=2026-03-0{d + 1}").glob("*.parquet"))) for d in range(4)] == [1, 1, 4, 4]
    assert next((log_dir / "date=2026-03-01").glob("*.parquet")).name.startswith("compact-2026-03-01-")
    pd.testing.assert_frame_equal(read_request_log(str(log_dir)), before)

    # a compaction stopped before deleting what it merged: those files are not read twice, and go next time
    for name, data in parts.items():
        (log_dir / "date=2026-03-01" / name).write_bytes(data)
    pd.testing.assert_frame_equal(read_request_log(str(log_dir)), before)
    assert logged_requests(str(log_dir), ["d0-1", "d3-9"]) == {"d0-1": 1, "d3-9": 1}
    assert compact_request_log(str(log_dir), T0 + 3 * DAY) == {"compacted": 0, "files": 0, "deleted": 0,
                                                                "failed": []}
    assert len(list((log_dir / "date=2026-03-01").glob("*.parquet"))) == 1

    # a late row for a compacted day (a replay): merged with the compacted file at the next check
    late = RequestLog(str(log_dir), max_queue=10, flush_seconds=60, file_rows=10)
    late.append(records("late", served(), ["late text"], [{"label": "neg", "probability": 0.7,
                                                           "probabilities": {"neg": 0.7, "pos": 0.3}}], at=T0 + 99))
    late.close()
    assert compact_request_log(str(log_dir), T0 + 4 * DAY) == {"compacted": 2, "files": 6, "deleted": 0,
                                                                "failed": []}  # days 0 and 2
    after = read_request_log(str(log_dir))
    assert len(after) == 41 and after["request_id"].value_counts().max() == 1
    assert [len(list((log_dir / f"date=2026-03-0{d + 1}").glob("*.parquet"))) for d in range(4)] == [1, 1, 1, 4]


def test_retention_deletes_old_days_only_and_never_the_feedback(tmp_path):
    from kftune.serving.request_log import compact_request_log

    log_dir = tmp_path / "log"
    four_days(log_dir)
    (log_dir / "_feedback").mkdir()
    (log_dir / "_feedback" / "part-1.parquet").write_bytes(b"kept")
    assert compact_request_log(str(log_dir), T0 + 3 * DAY, retention_days=1) == {"compacted": 0, "files": 0,
                                                                                 "deleted": 2, "failed": []}
    assert sorted(read_request_log(str(log_dir))["request_id"].str[:2].unique()) == ["d2", "d3"]
    assert sorted(p.name for p in log_dir.iterdir()) == ["_feedback", "date=2026-03-03", "date=2026-03-04"]


def test_two_compactions_of_one_day_at_once_never_double_a_row(tmp_path):
    """One check merged parts 1-2 while another, which also saw part 3, merged 1-3; neither deleted yet."""
    import fsspec

    from kftune.serving.request_log import compact_request_log, write_compacted

    log_dir = tmp_path / "log"
    four_days(log_dir)
    before = read_request_log(str(log_dir))
    folder = log_dir / "date=2026-03-01"
    parts = sorted(str(p) for p in folder.glob("part-*.parquet"))
    fs = fsspec.filesystem("file")
    first, second = write_compacted(fs, str(folder), "2026-03-01", parts[:2]), \
        write_compacted(fs, str(folder), "2026-03-01", parts[:3])
    assert first != second and write_compacted(fs, str(folder), "2026-03-01", parts[:2]) == first
    assert not list(folder.glob(".*")), "no temporary file left"
    pd.testing.assert_frame_equal(read_request_log(str(log_dir)), before)
    compact_request_log(str(log_dir), T0 + 3 * DAY)
    assert [p.name for p in folder.iterdir()] == [next(folder.glob("compact-*")).name]
    pd.testing.assert_frame_equal(read_request_log(str(log_dir)), before)


def test_a_clock_in_the_future_deletes_and_compacts_nothing_new(tmp_path):
    from kftune.serving.request_log import compact_request_log

    log_dir = tmp_path / "log"
    now = datetime.now(timezone.utc).timestamp()
    log = RequestLog(str(log_dir), max_queue=10, flush_seconds=60, file_rows=1)
    answer = {"label": "pos", "probability": 0.9, "probabilities": {"neg": 0.1, "pos": 0.9}}
    log.append(records("today", served(), ["a", "b"], [answer] * 2, at=now))
    log.close()
    assert compact_request_log(str(log_dir), now + 30 * DAY, retention_days=7) == {
        "compacted": 0, "files": 0, "deleted": 0, "failed": []}  # e.g. `kftune monitor --now` a month ahead
    assert len(read_request_log(str(log_dir))) == 2


def test_a_compaction_that_fails_midway_on_an_object_store_leaves_the_day_as_it_was():
    """fsspec's memory:// stands in for S3: a file object store whose close saves what was written, even after
    an error. A source that cannot be read must not leave a compacted file that lists it (its sources would be
    deleted at the next check)."""
    import fsspec

    from kftune.serving.request_log import compact_request_log

    log_dir = "memory://compaction-failure/log"
    four_days(log_dir)
    fs = fsspec.filesystem("memory")
    folder = "/compaction-failure/log/date=2026-03-01"
    parts = sorted(fs.glob(f"{folder}/part-*.parquet"))
    good = {p: fs.cat(p) for p in parts[:-1]}
    fs.pipe(parts[-1], b"not parquet")  # e.g. a file cut short by a crashed writer
    out = compact_request_log(log_dir, T0 + 3 * DAY)
    assert out["compacted"] == 1 and out["failed"] and out["failed"][0].startswith("2026-03-01: ")
    assert sorted(fs.ls(folder, detail=False)) == parts, "no compacted file, no temporary file, every part kept"
    assert {p: fs.cat(p) for p in parts[:-1]} == good
    fs.rm("/compaction-failure", recursive=True)


@pytest.mark.parametrize("where", ["local", "memory"])
def test_temporary_files_that_a_killed_compaction_left_go_once_an_hour_old(tmp_path, where):
    """A hidden .tmp file is what a killed compaction or writer leaves; a fresh one may be a write under way."""
    import os

    import fsspec

    from kftune.serving.request_log import compact_request_log

    log_dir = str(tmp_path / "log") if where == "local" else f"memory://stale-tmp-{tmp_path.name}/log"
    four_days(log_dir)
    fs, root = fsspec.core.url_to_fs(log_dir)
    old, fresh = f"{root}/date=2026-03-01/.compact-a.parquet.123-abc.tmp", f"{root}/date=2026-03-02/.part-b.parquet.tmp"
    feedback = f"{root}/_feedback/.part-c.parquet.tmp"  # kftune.monitor.feedback writes there
    fs.makedirs(f"{root}/_feedback", exist_ok=True)
    fs.pipe(feedback, b"cut short")
    fs.pipe(old, b"cut short")
    fs.pipe(fresh, b"being written")
    hour_ago = time.time() - 3700
    if where == "local":
        for f in (old, feedback):
            os.utime(f, (hour_ago, hour_ago))
    else:
        for f in (old, feedback):
            fs.store[f].modified = datetime.fromtimestamp(hour_ago, tz=timezone.utc)
    before = read_request_log(log_dir)
    assert compact_request_log(log_dir, T0 + 3 * DAY)["failed"] == []
    assert not fs.exists(old) and not fs.exists(feedback) and fs.exists(fresh)
    pd.testing.assert_frame_equal(read_request_log(log_dir), before)
    if where == "memory":
        fs.rm(root.split("/log")[0], recursive=True)


def test_rows_still_unwritten_when_close_gives_up_are_counted_as_dropped(tmp_path, monkeypatch):
    import threading

    from kftune.serving import request_log

    release = threading.Event()
    real = request_log.write_table
    monkeypatch.setattr(request_log, "write_table", lambda *a: release.wait(10) and real(*a))  # a slow object store
    log = RequestLog(str(tmp_path / "log"), max_queue=100, flush_seconds=60, file_rows=2)
    answer = {"label": "pos", "probability": 0.9, "probabilities": {"neg": 0.1, "pos": 0.9}}
    log.append(records("r1", served(), ["a", "b", "c"], [answer] * 3))
    log.close(timeout=0.3)
    assert log.written == 0 and log.dropped == 3, "every prediction is written or counted"
    release.set()


def test_a_failed_write_is_tried_again_and_only_what_never_lands_is_counted_dropped(tmp_path, monkeypatch):
    """An object store down for a while (or a full disk): the rows wait and are written at a later flush; those
    still unwritten when the server stops are dropped, counted, and reported to the metric."""
    from kftune.serving import request_log

    real, calls = request_log.write_table, []

    def down_twice(*args):
        calls.append(args[1])
        if len(calls) <= 2:
            raise OSError("503 Slow Down")
        return real(*args)

    monkeypatch.setattr(request_log, "write_table", down_twice)
    reported = []
    log = RequestLog(str(tmp_path / "log"), max_queue=100, flush_seconds=0.05, file_rows=1000, on_drop=reported.append)
    answer = {"label": "pos", "probability": 0.9, "probabilities": {"neg": 0.1, "pos": 0.9}}
    log.append(records("r1", served(), ["a", "b", "c"], [answer] * 3))
    deadline = time.monotonic() + 10
    while log.written < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    log.append(records("r2", served(), ["d"], [answer]))
    log.close()
    assert log.write_failures == 2 and log.written == 4 and log.dropped == 0 and reported == []
    assert sorted(read_request_log(str(tmp_path / "log"))["text"]) == ["a", "b", "c", "d"]

    monkeypatch.setattr(request_log, "write_table", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    log = RequestLog(str(tmp_path / "full"), max_queue=5, flush_seconds=0.05, file_rows=1000, on_drop=reported.append)
    log.append(records("r3", served(), ["e", "f", "g"], [answer] * 3))
    time.sleep(0.2)  # failed a few times: the three rows still take room in the queue
    assert log.backlog == 3 and log.append(records("r4", served(), ["h", "i", "j"], [answer] * 3)) == 3
    log.close()
    assert log.written == 0 and log.dropped == 6 and reported == [3, 3]


def test_a_feedback_lookup_reads_the_newest_files_first_and_stops_once_it_has_every_id(tmp_path):
    """The server looks up ids older than its memory in the files: one file at a time, newest first, so a
    correction of a recent prediction never reads the months behind it (here an older day is unreadable)."""
    from kftune.monitor.feedback import logged_requests

    log_dir = tmp_path / "log"
    four_days(log_dir)
    for old in (log_dir / "date=2026-03-01").glob("part-*.parquet"):
        old.write_bytes(b"not parquet: reading this file fails")
    assert logged_requests(str(log_dir), ["d3-9", "d2-0"]) == {"d3-9": 1, "d2-0": 1}
    with pytest.raises(Exception, match="Parquet magic bytes"):  # an id not there: every file is read
        logged_requests(str(log_dir), ["d3-9"], model="another model")
