"""Batch prediction: a file of texts in, a file of predictions out, in input order, in bounded memory.

The input is read in chunks of `chunk_rows` rows (CSV/TSV, JSONL, Parquet; local or s3://); each
chunk is predicted in length-sorted, per-batch padded forward passes and written before the next
is read. Output columns: the input's, then `label`, `probability`, `probabilities` (every class;
a JSON object in CSV and Parquet) and `model_version`; for token classification `entities` (a JSON
list of {type, text, start, end, score}) instead of the label columns. The output appears whole or
not at all (written under a temp name, then renamed).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from kftune.serving.model import ServedModel, ServingError

log = logging.getLogger(__name__)

FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet"}


def file_format(path: str, given: str = "") -> str:
    if given:
        if given not in FORMATS.values():
            raise ServingError(f"format {given!r}: use one of {', '.join(sorted(set(FORMATS.values())))}")
        return given
    suffix = Path(path.split("?")[0]).suffix.lower()
    if suffix not in FORMATS:
        raise ServingError(f"{path}: cannot tell the format from {suffix or 'no extension'!r}; "
                           f"use .csv, .tsv, .jsonl or .parquet")
    return FORMATS[suffix]


def require_input(path: str) -> None:
    """The input file must exist (on disk or on an object store): checked before the model loads."""
    import fsspec

    try:
        fs, where = fsspec.core.url_to_fs(path)
        found = fs.isfile(where)
    except (OSError, ValueError) as exc:  # credentials, an unknown protocol
        raise ServingError(f"{path}: cannot read it: {type(exc).__name__}: {exc}") from None
    if not found:
        raise ServingError(f"{path}: no such file")


def _open(path: str, mode: str = "rb", **kwargs):
    import fsspec

    return fsspec.open(path, mode, **kwargs)


def count_rows(path: str, fmt: str) -> int | None:
    """Rows in the input, for the progress bar's ETA: exact for Parquet and JSONL, lines for local CSV."""
    import pyarrow.parquet as pq

    if fmt == "parquet":
        with _open(path) as f:
            return pq.ParquetFile(f).metadata.num_rows
    if "://" in path:
        return None
    with open(path, "rb") as f:
        lines = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    return max(0, lines - (fmt in ("csv", "tsv")))


def read_chunks(path: str, fmt: str, chunk_rows: int):
    """DataFrames of at most `chunk_rows` rows, in file order."""
    import pyarrow.parquet as pq

    try:
        if fmt == "parquet":
            with _open(path) as f:
                file = pq.ParquetFile(f)
                # a named index (`df.set_index("id").to_parquet()`) is a column of the input too; pandas stores
                # one of consecutive numbers as a range in the metadata only
                ranges = [c for c in (file.schema_arrow.pandas_metadata or {}).get("index_columns", [])
                          if isinstance(c, dict) and c.get("kind") == "range" and c.get("name") is not None]
                done = 0
                for batch in file.iter_batches(batch_size=chunk_rows):
                    df = batch.to_pandas(integer_object_nulls=True)  # ids over 2**53 with nulls stay exact
                    df = df if isinstance(df.index, pd.RangeIndex) else df.reset_index()
                    for r in ranges:
                        first = r["start"] + r["step"] * done
                        df.insert(0, r["name"], range(first, first + r["step"] * len(df), r["step"]))
                    done += len(df)
                    yield df
            return
        if fmt in ("csv", "tsv"):  # TSV without quote handling, as ingest reads it
            reader = pd.read_csv(path, sep="," if fmt == "csv" else "\t", chunksize=chunk_rows, dtype=str,
                                 keep_default_na=False,
                                 quoting=csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL)
            with reader:
                yield from reader
        else:
            yield from _jsonl_chunks(path, chunk_rows)
    except FileNotFoundError:
        raise ServingError(f"{path}: no such file") from None
    except pd.errors.EmptyDataError:
        raise ServingError(f"{path}: the file is empty (expected a header row and texts)") from None
    except (ValueError, pd.errors.ParserError, OSError) as exc:
        if isinstance(exc, ServingError):
            raise
        raise ServingError(f"{path}: cannot read it as {fmt}: {exc}") from None


def _jsonl_chunks(path: str, chunk_rows: int):
    """JSON Lines as read by json: a number stays what it was (pandas made an id column with a missing value
    floats, so 9007199254740995 came back as 9007199254740996.0)."""
    rows = []
    with _open(path, "rt", encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ServingError(f"{path}:{line_no}: not JSON ({exc})") from None
            if not isinstance(row, dict):
                raise ServingError(f"{path}:{line_no}: expected one JSON object per line, got {type(row).__name__}")
            rows.append(row)
            if len(rows) == chunk_rows:
                yield _objects(rows)
                rows = []
    if rows:
        yield _objects(rows)


def _objects(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows, dtype=object)
    return df.where(df.notna(), None)  # a key a row lacks: None, not NaN (a float, which made the column floats)


def answer_columns(served: ServedModel, answers: list[dict], fmt: str) -> dict[str, list]:
    as_text = fmt != "jsonl"  # CSV and Parquet get JSON strings: one column type whatever the content
    enc = (lambda v: json.dumps(v, ensure_ascii=False)) if as_text else (lambda v: v)  # noqa: E731
    if served.task == "token-classification":
        cols = {"entities": [enc(a["entities"]) for a in answers]}
    else:
        cols = {"label": [a["label"] for a in answers], "probability": [a["probability"] for a in answers],
                "probabilities": [enc(a["probabilities"]) for a in answers]}
    cols["model_version"] = [served.version] * len(answers)
    return cols


def _plain(value):
    """json.dumps's fallback: numpy arrays and scalars (Parquet list and struct columns) as JSON lists and numbers."""
    return value.tolist() if hasattr(value, "tolist") else str(value)


def _cells_as_json(df: pd.DataFrame) -> pd.DataFrame:
    """A CSV or TSV cell holding a list or a mapping (an input column of lists: Parquet, JSON Lines) as JSON text,
    not Python's repr (`['x' 'y']`)."""
    def cell(v):
        return json.dumps(v, ensure_ascii=False, default=_plain) if isinstance(v, (list, dict, np.ndarray)) else v

    columns = [c for c in df.columns if df[c].dtype == object]
    return df.assign(**{c: df[c].map(cell) for c in columns}) if columns else df


class _Writer:
    def __init__(self, path: Path, fmt: str):
        self.path, self.fmt, self.parquet, self.rows, self.columns = path, fmt, None, 0, None

    def write(self, df: pd.DataFrame) -> None:
        if self.fmt != "jsonl":  # a header or schema: every chunk in the first chunk's columns
            if self.columns is None:
                self.columns = list(df.columns)
            extra = [c for c in df.columns if c not in self.columns]
            if extra:
                raise ServingError(f"rows {self.rows + 1}-{self.rows + len(df)} have field(s) {extra} that the first "
                                   f"rows lack, which a {self.fmt} file's columns cannot hold; write JSON Lines")
            df = df.reindex(columns=self.columns)
        if self.fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pandas(df, preserve_index=False)
            if self.parquet is None:  # a column with no value in the first chunk: text, whatever comes later
                self.parquet = pq.ParquetWriter(str(self.path), pa.schema(
                    [f.with_type(pa.string()) if pa.types.is_null(f.type) else f for f in table.schema]))
            try:
                table = table.cast(self.parquet.schema)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as exc:
                raise ServingError(f"rows {self.rows + 1}-{self.rows + len(df)}: a column's type differs from the "
                                   f"first rows' ({exc}); write JSON Lines or CSV") from None
            self.parquet.write_table(table)
        elif self.fmt == "jsonl":
            with open(self.path, "a", encoding="utf-8") as f:
                for row in df.to_dict(orient="records"):  # a field a row lacks is null, not NaN (invalid JSON)
                    row = {k: None if isinstance(v, float) and v != v else v for k, v in row.items()}
                    f.write(json.dumps(row, ensure_ascii=False, default=_plain) + "\n")
        elif self.fmt == "tsv":  # no quoting, as kftune's readers read TSV: a tab or line break cannot be held
            df = _cells_as_json(df)
            bad = next(((i, c) for c in df.columns for i, v in enumerate(df[c]) if isinstance(v, str)
                        and any(ch in v for ch in "\t\n\r")), None)
            if bad:
                raise ServingError(f"row {self.rows + bad[0] + 1}: column {bad[1]!r} holds a tab or a line break, "
                                   f"which a TSV file cannot; write CSV or JSON Lines")
            df.to_csv(self.path, mode="a", header=self.rows == 0, index=False, sep="\t", quoting=csv.QUOTE_NONE)
        else:
            _cells_as_json(df).to_csv(self.path, mode="a", header=self.rows == 0, index=False)
        self.rows += len(df)

    def close(self) -> None:
        if self.parquet is not None:
            self.parquet.close()
            self.parquet = None


def predict_file(served: ServedModel, source: str, output: str, text_column: str = "text", chunk_rows: int = 10000,
                 batch_size: int = 32, input_format: str = "", output_format: str = "", progress: bool = True) -> dict:
    """Predict every row of `source` and write `output`; return counts and speed.

    Args:
        served: the loaded model version.
        source: CSV/TSV/JSONL/Parquet file, local or s3://.
        output: the predictions file (.csv, .tsv, .jsonl or .parquet; local or s3://).
        text_column: the column holding the texts.
        chunk_rows: rows held in memory at once.
        batch_size: texts per forward pass.
        input_format, output_format: override the format read from the file extensions.
    """
    from tqdm import tqdm

    in_fmt, out_fmt = file_format(source, input_format), file_format(output, output_format)
    require_input(source)
    remote = "://" in output
    if not remote and "://" not in source and Path(source).resolve() in (
            Path(output).resolve(), Path(output).resolve().with_name(f".{Path(output).name}.tmp")):
        raise ServingError(f"{output}: the output would overwrite the input; choose another file")
    total = count_rows(source, in_fmt) if progress else None
    out_dir = Path(tempfile.mkdtemp()) if remote else Path(output).resolve().parent
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{Path(output).name}.tmp"
    tmp.unlink(missing_ok=True)
    writer, start = _Writer(tmp, out_fmt), time.perf_counter()
    bar = tqdm(total=total, unit="texts", desc=f"{served.name} v{served.version}", disable=not progress,
               dynamic_ncols=True, smoothing=0.1)
    try:
        for chunk in read_chunks(source, in_fmt, chunk_rows):
            if text_column not in chunk.columns:
                columns = ", ".join(map(str, chunk.columns))
                raise ServingError(f"{source}: no column {text_column!r} (columns: {columns}); pass --text-column")
            texts = chunk[text_column].tolist()
            bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
            if bad is not None:
                raise ServingError(f"{source}: row {writer.rows + bad + 1}: {text_column!r} is "
                                   f"{type(texts[bad]).__name__} {texts[bad]!r}, not a text")
            answers = served.predict(texts, batch_size)
            found = answer_columns(served, answers, out_fmt)
            # an input column with an answer's name (a test file's true `label`) is kept, as input_<name>
            clash = [f"input_{c}" for c in found if c in chunk.columns and f"input_{c}" in chunk.columns]
            if clash:
                raise ServingError(f"{source}: columns {', '.join(c.removeprefix('input_') for c in clash)} and "
                                   f"{', '.join(clash)}: the first would be kept as the second; rename one")
            chunk = chunk.reset_index(drop=True).rename(columns={c: f"input_{c}" for c in found if c in chunk.columns})
            writer.write(chunk.assign(**found))
            bar.update(len(texts))
        writer.close()
        if writer.rows == 0:
            raise ServingError(f"{source}: no rows to predict")
        if remote:
            import fsspec

            fs, path = fsspec.core.url_to_fs(output)
            fs.put_file(str(tmp), path)
        else:
            os.replace(tmp, output)
    finally:
        bar.close()
        writer.close()
        tmp.unlink(missing_ok=True)
        if remote:
            shutil.rmtree(out_dir, ignore_errors=True)
    seconds = time.perf_counter() - start
    return {"rows": writer.rows, "seconds": round(seconds, 2),
            "texts_per_s": round(writer.rows / max(seconds, 1e-9), 1),
            "version": served.version, "precision": served.precision, "output": output}
