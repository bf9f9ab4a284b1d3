"""The labelling queue, and labels back in as a new data version.

`queue`: from the champion's logged traffic (texts without feedback yet, one per distinct text):
- `random`: a uniform sample without replacement (`monitor.queue_random_share`), the only part whose
  labels estimate live accuracy without bias; flagged as such in the files;
- `drift`: the texts with the largest share of words never seen in the champion's training rows (the
  region the vocabulary drift test points at; `monitor.queue_drift_share`);
- `uncertain`: the least confident of the rest.
It writes queue.csv (fill in `label`), a Label Studio import file and its labelling config.

`import_labels`: a filled CSV or a Label Studio export; labels checked against the champion's label
set, texts already in the dataset dropped, the rest added through `kftune.data.add_batches` as a new
batch with provenance columns (source, request_id, index, sample, labeller, labelled_at), and every
label that names a logged prediction also stored as feedback (so live quality sees the random sample).
"""

from __future__ import annotations

import json
import logging
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from kftune.config import KftuneError, Params
from kftune.drift_tests import words
from kftune.fileio import spreadsheet_value

log = logging.getLogger(__name__)

RANDOM, DRIFT, UNCERTAIN = "random", "drift", "uncertain"
COLUMNS = ["request_id", "index", "text", "label", "sample", "labeller", "row"]  # read_labelled's
QUEUE_COLUMNS = ["request_id", "index", "time", "version", "sample", "unbiased", "predicted", "probability", "text",
                 "label", "labeller"]


class LabelError(KftuneError):
    pass


def _champion(params: Params, cache_dir) -> tuple[str, Path, pd.DataFrame, dict]:
    from kftune import registry
    from kftune.monitor.check import champion_files

    name = params.register.model_name
    version = registry.version_by_alias(name, registry.CHAMPION)
    if version is None:
        raise LabelError(f"{name} has no champion: the queue and the label import work on the champion's traffic "
                         f"and label set")
    folder, reference, card = champion_files(name, version, Path(cache_dir))
    return version, folder, reference, card


def oov_share(texts: pd.Series, vocabulary: set[str]) -> np.ndarray:
    def share(t):
        ws = words(t)
        return sum(w not in vocabulary for w in ws) / max(len(ws), 1)
    return np.array([share(t) for t in texts])


def select(candidates: pd.DataFrame, n: int, random_share: float, drift_share: float, vocabulary: set[str],
           seed: int, labelled=None) -> pd.DataFrame:
    """Pure selection: `candidates` (one row per prediction: text, probability, ...) -> the queue with `sample`.

    The random share is drawn uniformly over predictions, a text served twice twice as likely, so its labels
    estimate the accuracy of what was served; the chosen shares take each remaining text once, leaving out the
    rows where `labelled` (a boolean Series on candidates' index) is true: an earlier queue's drift or uncertain
    picks, which the random draw must still see or later random samples would lack the hard cases."""
    n = min(n, len(candidates))
    n_random = round(n * random_share)
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(candidates), size=n_random, replace=False)
    parts = [candidates.iloc[picked].assign(sample=RANDOM)]
    rest = candidates.drop(candidates.index[picked])
    if labelled is not None:
        rest = rest[~labelled.reindex(rest.index, fill_value=False)]
    rest = rest[~rest["text"].isin(parts[0]["text"])].drop_duplicates("text")
    n = min(n, n_random + len(rest))
    n_drift = min(round(n * drift_share), n - n_random)
    oov = pd.Series(oov_share(rest["text"], vocabulary), index=rest.index)
    drifted = rest.assign(_oov=oov)[oov > 0].sort_values(["_oov", "probability"], ascending=[False, True])
    parts.append(drifted.head(n_drift).drop(columns="_oov").assign(sample=DRIFT))
    rest = rest.drop(parts[-1].index)
    parts.append(rest.sort_values("probability").head(n - n_random - len(parts[-1])).assign(sample=UNCERTAIN))
    return pd.concat(parts)


def queue(log_dir: str, params: Params, n: int, out_dir: str | Path, since: datetime | None = None,
          cache_dir: str | Path = ".kftune/monitor") -> dict:
    """Write queue.csv, queue-labelstudio.json and label-config.xml into out_dir; return what was picked."""
    from kftune.fileio import atomic_dir, write_csv
    from kftune.monitor.feedback import read_feedback
    from kftune.pii import mask
    from kftune.serving.request_log import read_request_log

    cfg = params.monitor
    previous = Path(out_dir) / "queue.csv"
    if previous.is_file() and (filled := (read_labelled(previous)["label"] != "").sum()):
        raise LabelError(f"{previous}: {filled} label(s) filled in; a new queue would replace them: import them "
                         f"(kftune label import {previous}) and move the file, or choose another --out")
    version, _, reference, card = _champion(params, cache_dir)
    rows = read_request_log(log_dir, since=since)
    rows = rows[(rows["model"] == params.register.model_name) & (rows["version"] == version) & rows["label"].notna()]
    fb = read_feedback(log_dir)
    # out: predictions in the random sample already; out of the drift and uncertain shares only: an earlier queue's
    # picks. A correction sent to the API (sample "") counts for neither, or the random share would skip the wrong
    # answers users corrected and overrate the model.
    sample = dict(zip(zip(fb["request_id"], fb["index"]), fb["sample"]))
    drawn = pd.Series([sample.get(k, "") for k in zip(rows["request_id"], rows["index"])], index=rows.index,
                      dtype=object)
    rows, labelled = rows[drawn != RANDOM].reset_index(drop=True), (drawn[drawn != RANDOM] != "").reset_index(drop=True)
    if rows.empty:
        raise LabelError(f"no unlabelled predictions of {params.register.model_name} v{version} in {log_dir}"
                         f"{' since ' + str(since) if since else ''}")
    vocabulary = {w for t in reference[reference["split"] == "train"]["text"] for w in words(t)}
    picked = select(rows, n, cfg.queue_random_share, cfg.queue_drift_share, vocabulary, cfg.queue_seed, labelled)
    out = pd.DataFrame({"request_id": picked["request_id"], "index": picked["index"],
                        "time": picked["time"].astype(str), "version": picked["version"], "sample": picked["sample"],
                        "unbiased": picked["sample"] == RANDOM, "predicted": picked["label"],
                        "probability": picked["probability"].round(4), "text": picked["text"].map(mask),
                        "label": "", "labeller": ""})
    labels = card["labels"]
    tasks = [{"data": {"text": r.text, "request_id": r.request_id, "index": int(r.index), "sample": r.sample,
                       "unbiased": bool(r.unbiased)},
              "predictions": [{"model_version": str(version), "score": float(r.probability),
                               "result": [{"from_name": "label", "to_name": "text", "type": "choices",
                                           "value": {"choices": [r.predicted]}}]}]}
             for r in out.itertuples()]
    config = "<View>\n  <Text name=\"text\" value=\"$text\"/>\n  <Choices name=\"label\" toName=\"text\" " \
             "choice=\"single\">\n" + "".join(f"    <Choice value=\"{_xml(lbl)}\"/>\n" for lbl in labels) + \
             "  </Choices>\n</View>\n"
    with atomic_dir(out_dir) as tmp:
        write_csv(out[QUEUE_COLUMNS], tmp / "queue.csv")
        (tmp / "queue-labelstudio.json").write_text(json.dumps(tasks, indent=1, ensure_ascii=False), encoding="utf-8")
        (tmp / "label-config.xml").write_text(config, encoding="utf-8")
    counts = out["sample"].value_counts().to_dict()
    return {"version": version, "rows": len(out), "by_sample": counts, "candidates": len(rows), "labels": labels,
            "out_dir": str(out_dir)}


def _xml(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def read_labelled(path: str | Path, labeller: str = "") -> pd.DataFrame:
    """A filled queue.csv or a Label Studio JSON export -> request_id, index, text, label, sample, labeller, row."""
    path = Path(path)
    if not path.is_file():
        raise LabelError(f"{path}: no such file")
    if path.suffix.lower() == ".json":
        try:
            tasks = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise LabelError(f"{path}: not a Label Studio JSON export ({exc})") from None
        if not isinstance(tasks, list):
            raise LabelError(f"{path}: a Label Studio export is a JSON list of tasks")
        rows = []
        for i, t in enumerate(tasks):
            data = t.get("data", {}) if isinstance(t, dict) else {}
            done = [a for a in t.get("annotations", []) if not a.get("was_cancelled")] if isinstance(t, dict) else []
            choice, who = "", labeller
            if done:
                for res in done[-1].get("result", []):
                    choice = (res.get("value", {}).get("choices") or [""])[0]
                by = done[-1].get("completed_by")
                who = labeller or str(by.get("email", by.get("id", "")) if isinstance(by, dict) else by or "")
            rows.append({"request_id": str(data.get("request_id", "")), "index": data.get("index"),
                         "text": str(data.get("text", "")), "label": str(choice), "sample": str(data.get("sample", "")),
                         "labeller": who, "row": f"task {i}"})
        return _indexed(pd.DataFrame(rows, columns=COLUMNS), path)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (UnicodeDecodeError, pd.errors.ParserError, ValueError) as exc:
        raise LabelError(f"{path}: cannot be read as CSV ({exc})") from None
    missing = [c for c in ("text", "label") if c not in df.columns]
    if missing:
        raise LabelError(f"{path}: no column {', '.join(missing)} (columns: {', '.join(df.columns)})")
    for c in ("request_id", "index", "sample", "labeller"):
        if c not in df.columns:
            df[c] = ""
    df = df.map(spreadsheet_value)  # queue.csv was written spreadsheet-safe
    df["labeller"] = [x or labeller for x in df["labeller"]]
    df["row"] = [f"line {i}" for i in range(2, len(df) + 2)]
    return _indexed(df[COLUMNS], path)


def _indexed(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    """`index` as whole numbers (empty: 0); anything else is refused, naming the row: a wrong index would put
    the label on another text of the request."""
    from kftune.monitor.feedback import whole_number

    index = [whole_number(x) for x in df["index"]]
    bad = [f"{row}: {str(x)[:20]!r}" for row, x, i in zip(df["row"], df["index"], index) if i is None]
    if bad:
        raise LabelError(f"{path}: index is not a whole number ({'; '.join(bad[:10])}"
                         f"{' ...' if len(bad) > 10 else ''})")
    return df.assign(index=index)


def _dataset_texts(project_dir: Path, params: Params) -> set[str]:
    """The dataset's texts as import_labels compares them: normalised, PII masked (as label imports store them)."""
    from kftune.data import DATASET
    from kftune.pii import mask
    from kftune.tables import normalise, read_tables

    folder = project_dir / DATASET
    if not folder.is_dir() or not any(folder.iterdir()):
        return set()
    texts = read_tables(str(folder), params.ingest)[0]["text"].map(normalise)
    return set(texts if params.ingest.mask_pii else texts.map(mask))  # with mask_pii, read_tables masked them


def _store_feedback(df: pd.DataFrame, log_dir: str, model: str) -> tuple[int, int]:
    """Every label that names a logged prediction of `model` also becomes feedback (live quality's sample);
    returns (stored, naming no logged prediction)."""
    from kftune.monitor.feedback import logged_requests, unknown_requests, write_feedback

    rows = [{"request_id": r.request_id, "index": r.index, "label": r.label, "labeller": r.labeller,
             "source": "label-import", "sample": r.sample} for r in df[df["request_id"] != ""].itertuples()]
    unknown = {pos for pos, _ in unknown_requests(rows, logged_requests(log_dir, [r["request_id"] for r in rows],
                                                                        model))}
    return write_feedback(log_dir, [r for pos, r in enumerate(rows) if pos not in unknown]), len(unknown)


def import_labels(path: str | Path, params: Params, project_dir: str | Path, log_dir: str = "", labeller: str = "",
                  tag: str | None = None, push: bool = True, cache_dir: str | Path = ".kftune/monitor",
                  now: datetime | None = None) -> dict:
    """Check the labels, store them as feedback, add the texts the dataset lacks as a new data version (none
    new: no version, the run is still a success); see the module doc."""
    from kftune.data import add_batches
    from kftune.pii import mask
    from kftune.tables import normalise

    project_dir = Path(project_dir)
    version, _, _, card = _champion(params, cache_dir)
    labels = card["labels"]
    df = read_labelled(path, labeller)
    unlabelled = df["label"].str.strip() == ""
    # compared as stored: normalised and masked (two texts differing only in an e-mail address are one text)
    df = df[~unlabelled].assign(label=lambda d: d["label"].str.strip(), text=lambda d: d["text"].map(normalise)
                                .map(mask))
    if df.empty:
        raise LabelError(f"{path}: no labelled rows ({int(unlabelled.sum())} rows have an empty label)")
    unknown = df[~df["label"].isin(labels)]
    if len(unknown):
        listed = "; ".join(f"{r.row}: {r.label[:40]!r}" for r in unknown.head(10).itertuples())
        raise LabelError(f"{path}: {len(unknown)} label(s) not in champion v{version}'s label set {labels}: {listed}"
                         f"{' ...' if len(unknown) > 10 else ''}. Fix them (or retrain with the new label set first)")
    conflicts = df[df.duplicated("text", keep=False)].groupby("text")["label"].nunique()
    conflicts = conflicts[conflicts > 1]
    if len(conflicts):
        text = conflicts.index[0]
        rows = ", ".join(df[df["text"] == text]["row"])
        raise LabelError(f"{path}: the same text has different labels ({rows}): {text[:80]!r}; settle on one")
    # feedback first: it is keyed by (request_id, index), so storing it again on a re-run changes nothing, and
    # a failed dataset commit or push cannot lose it
    stored, unmatched = _store_feedback(df, log_dir, params.register.model_name) if log_dir else (0, 0)
    df = df.drop_duplicates("text")
    already = df["text"].isin(_dataset_texts(project_dir, params))
    new = df[~already]
    out = {"added": len(new), "dropped_existing": int(already.sum()), "unlabelled": int(unlabelled.sum()),
           "feedback": stored, "feedback_unmatched": unmatched, "commit": None, "files": [],
           "champion_version": version, "by_sample": new["sample"].value_counts().to_dict()}
    if new.empty:
        return out
    when = now or datetime.now(timezone.utc)
    batch = pd.DataFrame({params.ingest.text_column: new["text"], params.ingest.label_column: new["label"],
                          "source": "label-import",
                          "request_id": new["request_id"], "index": new["index"], "sample": new["sample"],
                          "labeller": new["labeller"], "labelled_at": when.isoformat(timespec="seconds"),
                          "champion_version": version})
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / f"labels-{when:%Y%m%dT%H%M%S}.csv"
        batch.to_csv(file, index=False)
        added = add_batches([str(file)], project_dir, params.ingest, tag=tag, push=push)
    return {**out, "commit": added["commit"], "files": added["files"]}
