"""The request log: every served prediction, appended to rotating Parquet files, for monitoring.

Layout: `<log_dir>/date=YYYY-MM-DD/part-<UTC time>-<pid>-<n>.parquet` (the rows' UTC date), a local
folder or s3://bucket/prefix. A file appears whole (local: written under a hidden temp name, then renamed;
S3: an object exists only once its upload completes). A new file starts every `log_flush_seconds`
of traffic or `log_file_rows` predictions, so readers can take finished files at any time.

One row per text (SCHEMA):

| column | type | meaning |
|---|---|---|
| request_id | string | the request's id (X-Request-ID or V2 `id` if given, else the server's: a random prefix per start and a counter) |
| index | int32 | position of the text in its request |
| time | timestamp[ms, UTC] | when the answer was computed |
| model | string | registered model name |
| version | string | model version that answered |
| precision | string | fp32, bf16 or int8 |
| task | string | sequence-classification or token-classification |
| text | string | the input text |
| label | string | predicted label (null for token classification) |
| probability | float64 | the predicted label's probability (null for token classification) |
| labels | list<string> | every class, in the model's order |
| probabilities | list<float64> | every class's probability, in `labels` order (empty for token classification) |
| entities | string | token classification: JSON list of {type, text, start, end, score}; else null |

Compaction (`compact_request_log`, run by each monitoring check): a day folder two or more days old is merged
into one `compact-<day>-<digest>.parquet` whose footer lists the files it holds (SOURCES), which are then deleted.
Readers skip any file a compacted file lists, so rows are never read twice, even while the sources outlive it
for a moment; a reader whose file vanished under it lists the folder again. With `monitor.log_retention_days`
> 0, day folders older than that are deleted. A hidden `.tmp` file that a killed writer or compaction left is
deleted once it is an hour old.

Writes go through a bounded queue (`max_queue` rows) drained by one thread: a request whose rows do not fit
is dropped whole and counted (`dropped`); a request never waits. The writer masks PII (when asked) and writes
every `flush_seconds`, or as soon as `file_rows` are waiting.
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import os
import threading
import time
from datetime import datetime, timezone

import pyarrow as pa

log = logging.getLogger(__name__)

SCHEMA = pa.schema([
    ("request_id", pa.string()), ("index", pa.int32()), ("time", pa.timestamp("ms", tz="UTC")),
    ("model", pa.string()), ("version", pa.string()), ("precision", pa.string()), ("task", pa.string()),
    ("text", pa.string()), ("label", pa.string()), ("probability", pa.float64()),
    ("labels", pa.list_(pa.string())), ("probabilities", pa.list_(pa.float64())), ("entities", pa.string()),
])
RECENT_IDS = 100_000  # request ids kept in memory, so feedback can name a prediction not yet in a file
SOURCES = b"kftune.sources"  # footer key of a compacted file: JSON list of the file names it holds
STALE_TMP_SECONDS = 3600  # a hidden .tmp file this old in the log was left by a writer or compaction that was killed
COMPACT_AFTER_DAYS = 2  # a day folder this many UTC days old is closed: no server writes there any more (a replay's
# rows, which carry the client's time, may still land there: the next check merges them in)


def records(request_id: str, served, texts: list[str], answers: list[dict], at: float | None = None) -> list[dict]:
    """Request-log rows for one request's answers."""
    at = datetime.fromtimestamp(at or time.time(), tz=timezone.utc)
    out = []
    for i, (text, a) in enumerate(zip(texts, answers)):
        ner = "entities" in a
        out.append({"request_id": request_id, "index": i, "time": at, "model": served.name, "version": served.version,
                    "precision": served.precision, "task": served.task, "text": text,
                    "label": None if ner else a["label"], "probability": None if ner else a["probability"],
                    "labels": served.labels,
                    "probabilities": [] if ner else [a["probabilities"][lbl] for lbl in served.labels],
                    "entities": a["entities"] if ner else None})  # encoded by the writer (SCHEMA: JSON text)
    return out


def _fs(log_dir: str):
    import fsspec

    fs, root = fsspec.core.url_to_fs(log_dir)
    return fs, root.rstrip("/")


class RequestLog:
    """Append predictions to Parquet files off the request path; `close()` writes what is left."""

    def __init__(self, log_dir: str, max_queue: int, flush_seconds: float, file_rows: int, mask=None,
                 on_drop=None):
        """mask: applied to each text by the writer thread, off the request path (kftune.pii.mask), or None.
        on_drop: called with the number of rows each time some are dropped (the queue full, or unwritten at close).

        A write that fails (the object store down, a full disk) is tried again at each flush; its rows count against
        max_queue meanwhile, so an outage drops the newest predictions once the queue is full, never the server."""
        self.log_dir, self.max_queue, self.flush_seconds, self.file_rows = log_dir, max_queue, flush_seconds, file_rows
        self.mask, self.on_drop = mask, on_drop or (lambda n: None)
        self.fs, self.root = _fs(log_dir)
        # one list of rows per request, handed over under the lock; the writer wakes every flush_seconds, or
        # once file_rows are waiting (not per request: a wake-up per request cost the forward passes ~10%)
        self._pending: list[list[dict]] = []
        self._pending_rows = 0  # beyond max_queue, a request's rows are dropped
        self._in_flight = 0  # rows the writer took and has not written (or failed to) yet
        self._retry: list[dict] = []  # encoded rows whose write failed: the next flush tries them first
        self.write_failures = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = False
        self.dropped = 0
        self.written = 0
        self._parts = itertools.count()
        self.recent: collections.OrderedDict[str, int] = collections.OrderedDict()  # request id -> texts, newest last
        self._thread = threading.Thread(target=self._run, name="kftune-request-log", daemon=True)
        self._thread.start()

    def append(self, rows: list[dict]) -> int:
        """Queue one request's rows without waiting, all or none; return how many were dropped because the
        queue had no room for them."""
        with self._lock:
            if self.backlog + len(rows) > self.max_queue:
                self.dropped += len(rows)
                self.on_drop(len(rows))
                return len(rows)
            self._pending.append(rows)
            self._pending_rows += len(rows)
            full = self._pending_rows >= self.file_rows
        if full:
            self._wake.set()
        for row in rows:
            rid = row["request_id"]
            self.recent[rid] = max(self.recent.get(rid, 0), row["index"] + 1)
            self.recent.move_to_end(rid)
        while len(self.recent) > RECENT_IDS:  # older ids are looked up in the files (feedback.logged_requests)
            self.recent.popitem(last=False)
        return 0

    def close(self, timeout: float = 30) -> None:
        """Write what is queued; after `timeout` seconds (a slow object store) what is still unwritten is counted
        as dropped and said, since the process is about to end."""
        self._closing = True
        self._wake.set()
        self._thread.join(timeout)
        with self._lock:
            lost = self.backlog if self._thread.is_alive() else len(self._retry)
            self.dropped += lost
        if lost:
            self.on_drop(lost)
            log.error("request log: %d predictions not written %s; counted as dropped", lost,
                      f"within {timeout:g}s of closing" if self._thread.is_alive() else "when the server stopped")

    @property
    def backlog(self) -> int:
        """Rows waiting to be written: queued, being written, or to be tried again."""
        return self._pending_rows + self._in_flight + len(self._retry)

    def _run(self) -> None:
        while True:
            self._wake.wait(self.flush_seconds)
            self._wake.clear()
            closing = self._closing  # read before taking the rows: what was appended before close() is in them
            with self._lock:
                taken, self._pending, self._pending_rows = self._pending, [], 0
                retry, self._retry = self._retry, []
                self._in_flight = len(retry) + sum(map(len, taken))
            rows = retry + [self._encoded(r) for request in taken for r in request]
            for at in range(0, len(rows), self.file_rows):
                self._write(rows[at : at + self.file_rows])
            if closing:
                return

    def _encoded(self, row: dict) -> dict:
        """The row as written: its text and each entity's text masked (when asked; an entity's start and end
        still count characters of the text the model saw), its entities as JSON text."""
        mask = self.mask or (lambda text: text)
        entities = row["entities"]
        if entities is not None:
            entities = json.dumps([{**e, "text": mask(e["text"])} for e in entities], ensure_ascii=False)
        return {**row, "text": mask(row["text"]), "entities": entities}

    def _write(self, rows: list[dict]) -> None:
        """One file per UTC date of the rows' times (a replay's rows carry the client's time), so a reader's
        `since` can skip whole folders."""
        days: dict[str, list[dict]] = {}
        for r in rows:
            days.setdefault(f"{r['time'].astimezone(timezone.utc):%Y-%m-%d}", []).append(r)
        for day, part in days.items():
            self._write_file(f"{self.root}/date={day}", part)

    def _write_file(self, folder: str, rows: list[dict]) -> None:
        now = datetime.now(timezone.utc)
        name = f"part-{now:%Y%m%dT%H%M%S%f}-{os.getpid()}-{next(self._parts):05d}.parquet"
        try:
            write_table(self.fs, folder, name, pa.table({c: [r[c] for r in rows] for c in SCHEMA.names}, schema=SCHEMA))
            self.written += len(rows)
        except Exception as exc:  # noqa: BLE001 - tried again at the next flush; the server goes on
            with self._lock:
                self._retry += rows
                self.write_failures += 1
            log.error("request log: could not write %d predictions to %s (%s: %s); trying again in %gs", len(rows),
                      folder, type(exc).__name__, exc, self.flush_seconds)
        finally:
            with self._lock:
                self._in_flight -= len(rows)


def log_files(log_dir: str, day_from: str = "") -> tuple[object, list[str], list[str]]:
    """(filesystem, the request log's files to read, oldest day first, the files that a compacted file already
    holds and that are still there): part and compacted files of the days >= day_from ('YYYY-MM-DD').

    A compacted file holds what its footer lists (SOURCES) and, when two compactions of a day ran at once, a
    compacted file whose list is part of its own."""
    import pyarrow.parquet as pq

    fs, root = _fs(log_dir)
    fs.invalidate_cache()  # s3fs keeps listings for a process's life: other processes' files would be missed
    files = sorted(f for f in fs.glob(f"{root}/date=*/part-*.parquet") + fs.glob(f"{root}/date=*/compact-*.parquet")
                   if f.rsplit("date=", 1)[1][:10] >= day_from)
    folders: dict[str, list[str]] = {}
    for f in files:
        folders.setdefault(f.rsplit("/", 1)[0], []).append(f)
    held = set()
    for folder, group in folders.items():
        if len(group) < 2:  # a file alone holds nothing that is still there
            continue
        sources = {}
        for f in (f for f in group if f.rsplit("/", 1)[1].startswith("compact-")):
            with fs.open(f, "rb") as fh:
                sources[f] = {f"{folder}/{n}" for n in json.loads((pq.read_schema(fh).metadata or {}).get(SOURCES, b"[]"))}
        for f, names in sources.items():
            held |= names | {g for g, other in sources.items() if other < names}
    return fs, [f for f in files if f not in held], [f for f in files if f in held]


def read_log_tables(log_dir: str, columns: list[str] | None = None, day_from: str = "") -> list:
    """The Arrow tables of the request log's files (days >= day_from, 'YYYY-MM-DD'); listed again if a
    compaction removes a file while it is read."""
    import pyarrow.parquet as pq

    for attempt in range(3):
        try:
            fs, files, _ = log_files(log_dir, day_from)
            tables = []
            for f in files:
                with fs.open(f, "rb") as fh:
                    tables.append(pq.read_table(fh, schema=SCHEMA, columns=columns))
            return tables
        except FileNotFoundError:
            if attempt == 2:
                raise


def write_compacted(fs, folder: str, day: str, files: list[str]) -> str:
    """Write the rows of `files` (one day folder's) as one compacted file listing them in its footer, streamed
    file by file; return its name. Named by what it holds: two compactions of the same files write one file.

    Written under a hidden temporary name (readers list part-* and compact-* only) and renamed once whole: a
    file object store's close uploads what was written even after an error, and a cut-short file listing all
    its sources would have them deleted."""
    import hashlib
    import uuid

    import pyarrow.parquet as pq

    names = sorted(f.rsplit("/", 1)[1] for f in files)
    name = f"compact-{day}-{hashlib.sha256(chr(10).join(names).encode()).hexdigest()[:16]}.parquet"
    tmp = f"{folder}/.{name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    try:
        with fs.open(tmp, "wb") as out, pq.ParquetWriter(out, SCHEMA.with_metadata(
                {SOURCES: json.dumps(names).encode()})) as writer:
            for f in files:
                with fs.open(f, "rb") as fh:
                    writer.write_table(pq.read_table(fh, schema=SCHEMA))
    except BaseException:
        _remove(fs, tmp)
        raise
    if _is_local(fs):
        os.replace(tmp, f"{folder}/{name}")
    else:
        fs.mv(tmp, f"{folder}/{name}")  # S3: a copy, then the delete; the final name appears whole or not at all
    return name


def compact_request_log(log_dir: str, now: float, retention_days: int = 0) -> dict:
    """Merge each closed day folder (COMPACT_AFTER_DAYS old) with more than one file into one compacted file, then
    delete the merged files; with retention_days > 0, delete the day folders older than that. Ages count from
    the earlier of `now` (Unix seconds: a replay's clock) and the real clock, so a clock in the future deletes
    nothing. Returns {"compacted": days merged, "files": files merged, "deleted": days deleted, "failed": [day:
    why]}; a day that fails is left as it was."""
    today = datetime.fromtimestamp(min(now, time.time()), tz=timezone.utc).date()
    fs, files, merged = log_files(log_dir)
    for f in merged:  # a compaction stopped between writing its file and deleting what it holds
        _remove(fs, f)
    _remove_stale_tmp(fs, _fs(log_dir)[1])
    by_day: dict[str, list[str]] = {}
    for f in files:
        by_day.setdefault(f.rsplit("date=", 1)[1][:10], []).append(f)
    out = {"compacted": 0, "files": 0, "deleted": 0, "failed": []}
    for day, day_files in sorted(by_day.items()):
        try:
            age = (today - datetime.strptime(day, "%Y-%m-%d").date()).days
        except ValueError:  # not a folder the log writes
            continue
        folder = day_files[0].rsplit("/", 1)[0]
        try:
            if retention_days > 0 and age > retention_days:
                fs.rm(folder, recursive=True)
                out["deleted"] += 1
            elif age >= COMPACT_AFTER_DAYS and len(day_files) > 1:
                write_compacted(fs, folder, day, day_files)
                for f in day_files:
                    _remove(fs, f)
                out["compacted"] += 1
                out["files"] += len(day_files)
        except Exception as exc:  # noqa: BLE001 - one bad day must not stop the others; the next check retries
            out["failed"].append(f"{day}: {type(exc).__name__}: {exc}")
    return out


def _remove_stale_tmp(fs, root: str) -> None:
    """Delete the hidden temporary files (write_compacted's, write_table's) that a killed process left; a fresh
    one may belong to a write under way."""
    # the day folders and kftune.monitor.feedback's folder
    for f in fs.glob(f"{root}/date=*/.*.tmp") + fs.glob(f"{root}/_feedback/.*.tmp"):
        try:
            if time.time() - fs.modified(f).timestamp() > STALE_TMP_SECONDS:
                _remove(fs, f)
        except (FileNotFoundError, NotImplementedError):  # gone meanwhile; a store that has no modified time
            pass


def write_table(fs, folder: str, name: str, table) -> None:
    """One Parquet file, seen whole or not at all: on a local disk written under a hidden name and renamed; on an
    object store serialised first and uploaded in one put (a file object's close would upload a half-written
    file after an error)."""
    import pyarrow.parquet as pq

    fs.makedirs(folder, exist_ok=True)
    if _is_local(fs):
        tmp = f"{folder}/.{name}.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, f"{folder}/{name}")
    else:
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf)
        fs.pipe_file(f"{folder}/{name}", buf.getvalue().to_pybytes())


def _is_local(fs) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def _remove(fs, path: str) -> None:
    try:
        fs.rm(path)
    except FileNotFoundError:  # another compaction removed it first
        pass


def read_request_log(log_dir: str, since: datetime | None = None):
    """Every logged prediction (a DataFrame with SCHEMA's columns), oldest first; `since` keeps time >= since.

    Only finished files are read (a file being written has a hidden temp name), each row once (log_files).
    """
    import pandas as pd

    if since is not None:
        since = (since if since.tzinfo else since.replace(tzinfo=timezone.utc)).astimezone(timezone.utc)
    tables = read_log_tables(log_dir, day_from=f"{since:%Y-%m-%d}" if since is not None else "")  # UTC dates
    df = pa.concat_tables(tables).to_pandas() if tables else SCHEMA.empty_table().to_pandas()
    if since is not None:
        df = df[df["time"] >= pd.Timestamp(since)]
    return df.sort_values(["time", "request_id", "index"], kind="stable").reset_index(drop=True)
