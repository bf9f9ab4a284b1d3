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

    def __init__(self, log_dir: str, max_queue: int, flush_seconds: float, file_rows: int, mask=None):
        """mask: applied to each text by the writer thread, off the request path (kftune.pii.mask), or None."""
        self.log_dir, self.max_queue, self.flush_seconds, self.file_rows = log_dir, max_queue, flush_seconds, file_rows
        self.mask = mask
        self.fs, self.root = _fs(log_dir)
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        # one list of rows per request, handed over under the lock; the writer wakes every flush_seconds, or
        # once file_rows are waiting (not per request: a wake-up per request cost the forward passes ~10%)
        self._pending: list[list[dict]] = []
        self._pending_rows = 0  # beyond max_queue, a request's rows are dropped
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
            if self._pending_rows + len(rows) > self.max_queue:
                self.dropped += len(rows)
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
        self._closing = True
        self._wake.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            self._wake.wait(self.flush_seconds)
            self._wake.clear()
            closing = self._closing  # read before taking the rows: what was appended before close() is in them
            with self._lock:
                taken, self._pending, self._pending_rows = self._pending, [], 0
            rows = [self._encoded(r) for request in taken for r in request]
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
            import pyarrow.parquet as pq

            table = pa.table({c: [r[c] for r in rows] for c in SCHEMA.names}, schema=SCHEMA)
            self.fs.makedirs(folder, exist_ok=True)
            if self.local:
                tmp = f"{folder}/.{name}.tmp"
                pq.write_table(table, tmp)
                os.replace(tmp, f"{folder}/{name}")
            else:
                with self.fs.open(f"{folder}/{name}", "wb") as f:
                    pq.write_table(table, f)
            self.written += len(rows)
        except Exception:  # noqa: BLE001 - a failed write loses these rows, not the server
            with self._lock:
                self.dropped += len(rows)
            log.exception("request log: could not write %d predictions to %s", len(rows), folder)


def read_request_log(log_dir: str, since: datetime | None = None):
    """Every logged prediction (a DataFrame with SCHEMA's columns), oldest first; `since` keeps time >= since.

    Only finished files are read (a file being written has a hidden temp name).
    """
    import pandas as pd
    import pyarrow.parquet as pq

    fs, root = _fs(log_dir)
    files = sorted(f for f in fs.glob(f"{root}/date=*/part-*.parquet"))
    if since is not None:
        since = (since if since.tzinfo else since.replace(tzinfo=timezone.utc)).astimezone(timezone.utc)
        files = [f for f in files if f.rsplit("date=", 1)[1][:10] >= f"{since:%Y-%m-%d}"]  # folders: UTC dates
    tables = []
    for f in files:
        with fs.open(f, "rb") as fh:
            tables.append(pq.read_table(fh, schema=SCHEMA))
    df = pa.concat_tables(tables).to_pandas() if tables else SCHEMA.empty_table().to_pandas()
    if since is not None:
        df = df[df["time"] >= pd.Timestamp(since)]
    return df.sort_values(["time", "request_id", "index"], kind="stable").reset_index(drop=True)
