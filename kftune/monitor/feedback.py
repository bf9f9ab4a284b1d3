"""Feedback: correct labels for logged predictions, stored beside the request log, and live quality from them.

Layout: `<log_dir>/_feedback/part-<UTC time>-<pid>-<n>.parquet` (outside the request log's
`date=*` folders, so its readers never see it), each file written whole. One row per correction:
request_id, index (the text's position in its request), label, labeller, source (api, import,
label-import), sample (random, uncertain, drift, or empty when the text was not drawn by the
labelling queue), time received. The latest correction of a (request_id, index) wins.
"""

from __future__ import annotations

import itertools
import math
import os
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from kftune.config import KftuneError
from kftune.fileio import spreadsheet_value
from kftune.serving.request_log import _fs, write_table

FEEDBACK = "_feedback"
SCHEMA = pa.schema([("request_id", pa.string()), ("index", pa.int32()), ("label", pa.string()),
                    ("labeller", pa.string()), ("source", pa.string()), ("sample", pa.string()),
                    ("time", pa.timestamp("ms", tz="UTC"))])
RANDOM = "random"  # the labelling queue's uniform sample: the only feedback that estimates live accuracy
_parts = itertools.count()


class FeedbackError(KftuneError):
    pass


def whole_number(value) -> int | None:
    """A text's index as a file gives it: missing or empty -> 0; a whole number ≥ 0 (7, 7.0, "7", "7.0": a
    spreadsheet may have rewritten it) -> int; anything else -> None."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return 0
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if math.isnan(number) and not isinstance(value, str):
        return 0  # a JSON Lines row without `index`, beside rows with one
    return int(number) if math.isfinite(number) and number.is_integer() and number >= 0 else None


def write_feedback(log_dir: str, rows: list[dict]) -> int:
    """Append corrections (dicts with request_id, index, label and optionally labeller, source, sample)."""
    if not rows:
        return 0

    now = datetime.now(timezone.utc)
    full = [{"request_id": str(r["request_id"]), "index": int(r.get("index") or 0), "label": str(r["label"]),
             "labeller": str(r.get("labeller") or ""), "source": str(r.get("source") or "api"),
             "sample": str(r.get("sample") or ""), "time": r.get("time") or now} for r in rows]
    fs, root = _fs(log_dir)
    write_table(fs, f"{root}/{FEEDBACK}", f"part-{now:%Y%m%dT%H%M%S%f}-{os.getpid()}-{next(_parts):05d}.parquet",
                pa.Table.from_pylist(full, schema=SCHEMA))
    return len(full)


def read_feedback(log_dir: str):
    """Every correction, the latest per (request_id, index), as a DataFrame with SCHEMA's columns. Its `sample` is
    how a labelling queue drew that prediction: a later correction through the API ("") keeps it, and a prediction
    once drawn into the random sample stays there (live accuracy is estimated on that sample)."""
    import pyarrow.parquet as pq

    fs, root = _fs(log_dir)
    fs.invalidate_cache()  # s3fs keeps listings for a process's life: a long-running monitor would miss new labels
    tables = []
    for f in sorted(fs.glob(f"{root}/{FEEDBACK}/part-*.parquet")):
        with fs.open(f, "rb") as fh:
            tables.append(pq.read_table(fh, schema=SCHEMA))
    df = pa.concat_tables(tables).to_pandas() if tables else SCHEMA.empty_table().to_pandas()
    keys = ["request_id", "index"]
    df = df.sort_values("time", kind="stable")
    drawn = df[df["sample"] != ""].sort_values("sample", key=lambda s: s == RANDOM, kind="stable")
    drawn = drawn.drop_duplicates(keys, keep="last")[[*keys, "sample"]]  # random, else the latest queue's draw
    df = df.drop_duplicates(keys, keep="last").drop(columns="sample").merge(drawn, on=keys, how="left")
    return df.assign(sample=df["sample"].fillna(""))[SCHEMA.names].reset_index(drop=True)


def import_feedback(path: str, log_dir: str, labels: list[str] | None = None, labeller: str = "",
                    model: str | None = None) -> int:
    """Bulk corrections from a CSV/JSONL file with columns request_id, label and optionally index, labeller.

    Every row is checked first, including that the request log has its prediction (of `model`, if given; the
    error names the file and row); nothing is written unless all are good.
    """
    import pandas as pd

    try:
        df = pd.read_json(path, lines=True, dtype=False) if str(path).endswith((".jsonl", ".json")) else \
            pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as exc:
        raise FeedbackError(f"{path}: cannot be read ({exc})") from None
    df = df.astype(object).where(df.notna(), "")  # a JSON Lines row without a key its neighbours have: empty
    missing = [c for c in ("request_id", "label") if c not in df.columns]
    if missing:
        raise FeedbackError(f"{path}: no column {', '.join(missing)} (columns: {', '.join(map(str, df.columns))})")
    problems = []
    for i, r in enumerate(df.to_dict("records"), start=2):
        if not str(r["request_id"]).strip():
            problems.append(f"{path}:{i}: empty request_id")
        if labels is not None and str(r["label"]) not in labels:
            problems.append(f"{path}:{i}: label {str(r['label'])[:50]!r} is not one of the model's labels {labels}")
        if whole_number(r.get("index")) is None:
            problems.append(f"{path}:{i}: index {str(r['index'])[:20]!r} is not a whole number")
    if problems:
        raise FeedbackError("feedback not imported:\n  " + "\n  ".join(problems[:20]) +
                            (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""))
    rows = [{"request_id": spreadsheet_value(str(r["request_id"]).strip()), "index": whole_number(r.get("index")),
             "label": str(r["label"]), "labeller": str(r.get("labeller") or labeller), "source": "import",
             "sample": str(r.get("sample") or "")} for r in df.to_dict("records")]
    known = logged_requests(log_dir, [r["request_id"] for r in rows], model)
    problems = [f"{path}:{pos + 2}: {why}" for pos, why in unknown_requests(rows, known)]
    if problems:
        raise FeedbackError(f"feedback not imported: {len(problems)} row(s) name no prediction logged in {log_dir}"
                            f"{f' for {model}' if model else ''} (a correction needs the request id, and the "
                            f"text's index, that the answer carried):\n  " + "\n  ".join(problems[:20]) +
                            (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""))
    return write_feedback(log_dir, rows)


def logged_requests(log_dir: str, request_ids, model: str | None = None) -> dict[str, int]:
    """How many texts each of `request_ids` has in the request log's files (answered by `model`, if given);
    ids the log does not have are absent. Read one file at a time, newest first (a correction is mostly about a
    recent prediction), until every id is found: a server's lookup never holds months of log in memory. An id
    reused across files counts in its newest file that has it."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from kftune.serving.request_log import SCHEMA, log_files

    wanted = pa.array(sorted(set(map(str, request_ids))), pa.string())
    found: dict[str, int] = {}
    read: set[str] = set()
    for attempt in range(3):
        fs, files, _ = log_files(log_dir)
        try:
            for f in reversed(files):
                if f in read:
                    continue
                with fs.open(f, "rb") as fh:
                    t = pq.read_table(fh, schema=SCHEMA, columns=["request_id", "index", "model"])
                read.add(f)
                mask = pc.is_in(t["request_id"], value_set=wanted)
                if model is not None:
                    mask = pc.and_(mask, pc.equal(t["model"], model))
                here: dict[str, int] = {}
                for rid, i in zip(*(t.filter(mask)[c].to_pylist() for c in ("request_id", "index"))):
                    here[rid] = max(here.get(rid, 0), i + 1)
                found.update({rid: n for rid, n in here.items() if rid not in found})
                if len(found) == len(wanted):
                    break
            return found
        except FileNotFoundError:  # compacted meanwhile: list again, the compacted file holds its rows
            if attempt == 2:
                raise
    return found


def unknown_requests(rows: list[dict], known: dict[str, int]) -> list[tuple[int, str]]:
    """(position, why) for each correction that names no logged prediction: an id not in `known` (request id ->
    number of texts), or an index past its request's texts."""
    out = []
    for pos, r in enumerate(rows):
        rid, i, n = r["request_id"], int(r.get("index") or 0), known.get(r["request_id"])
        if n is None:
            out.append((pos, f"request_id {rid[:64]!r} is not in the request log"))
        elif i >= n:
            out.append((pos, f"index {i}: request {rid[:64]!r} had {n} text(s)"))
    return out


def check_logged(rows: list[dict], recent: dict[str, int], log_dir: str, model: str) -> list[tuple[int, str]]:
    """The server's check: ids it answered lately (`recent`, not all written yet), else the log's files."""
    # one get per id: the server's event loop may evict an id between a membership test and a read
    known = {r["request_id"]: n for r in rows if (n := recent.get(r["request_id"])) is not None}
    missing = [r["request_id"] for r in rows if r["request_id"] not in known]
    if missing:
        known.update(logged_requests(log_dir, missing, model))
    return unknown_requests(rows, known)


def joined(requests, feedback):
    """Logged predictions that have a correction: the request log's columns plus `true_label`, `sample`.

    Request ids come from clients, which may reuse one: a correction goes, once, to the latest prediction logged
    under its (request_id, index) at or before the correction (the latest of all where none is: a replay's
    predictions carry their clients' clocks). So `requests` is every prediction read, of every version: filter the
    result by window or version, never the input."""
    keys = ["request_id", "index"]
    fb = feedback.rename(columns={"label": "true_label", "time": "feedback_time"})
    both = requests.merge(fb[[*keys, "true_label", "sample", "labeller", "feedback_time"]], on=keys)
    before = both["time"] <= both["feedback_time"]
    both = both[before | ~before.groupby([both[k] for k in keys]).transform("any")]
    return both.sort_values("time", kind="stable").drop_duplicates(keys, keep="last").drop(columns="feedback_time")


def wilson(successes: int, n: int, level: float) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion."""
    from scipy.stats import norm

    if n == 0:
        return (0.0, 1.0)
    z = norm.ppf(0.5 + level / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half)))  # rounding: the bounds hold p


def macro_f1(y_true, y_pred, labels: list[str]) -> float:
    """kftune.metrics.macro_f1 of label names over `labels`; a name outside them counts as a wrong answer."""
    from kftune.metrics import confusion, matrix_macro_f1

    ids, other = {lbl: i for i, lbl in enumerate(labels)}, len(labels)
    cm = confusion([ids.get(v, other) for v in y_true], [ids.get(v, other) for v in y_pred], other + 1)
    return matrix_macro_f1(cm, other)


def live_quality(rows, labels: list[str], level: float, seed: int = 0, resamples: int = 1000) -> dict:
    """Accuracy (Wilson interval) and macro-F1 (bootstrap percentile interval) of the served predictions on
    the random-sample feedback only: the other samples were chosen for being hard or drifted."""
    rnd = rows[rows["sample"] == RANDOM]
    n = len(rnd)
    if n == 0:
        return {"n": 0}
    correct = int((rnd["label"] == rnd["true_label"]).sum())
    y, p = rnd["true_label"].tolist(), rnd["label"].tolist()
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(resamples, n))
    ya, pa_ = np.array(y), np.array(p)
    boot = np.sort([macro_f1(ya[i], pa_[i], labels) for i in idx])
    lo, hi = wilson(correct, n, level)
    tail = (1 - level) / 2
    return {"n": n, "accuracy": correct / n, "accuracy_low": lo, "accuracy_high": hi,
            "macro_f1": macro_f1(y, p, labels), "macro_f1_low": float(np.quantile(boot, tail)),
            "macro_f1_high": float(np.quantile(boot, 1 - tail)), "level": level}
