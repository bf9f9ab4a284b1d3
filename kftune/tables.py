"""Labelled tables: readers (CSV/TSV/JSONL/Parquet, CoNLL, S3), cleaning, the stable hash split, data cards."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import unicodedata
from collections import Counter
from pathlib import Path

import pandas as pd

from kftune.config import IngestConfig, KftuneError
from kftune.fileio import atomic_dir, file_sha256, reading, write_json

log = logging.getLogger(__name__)

READERS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
SPLITS = ("train", "validation", "test")


class DataError(KftuneError, ValueError):
    """The input data cannot be used; the message names the file, column or label."""


def _bad_byte_line(path: Path, encoding: str) -> int:
    raw = path.read_bytes()
    try:
        raw.decode(encoding)
    except UnicodeDecodeError as exc:
        return raw[: exc.start].count(b"\n") + 1
    return 0


def _csv_line(path: Path, row: int, encoding: str) -> int:
    """The line a CSV file's data row `row` (0-based) starts on: a quoted field may hold line breaks."""
    import csv

    with open(path, newline="", encoding=reading(encoding)) as f:
        reader, start, at = csv.reader(f), 1, -1  # -1: the header
        for record in reader:
            if record:  # pandas skips blank lines
                if at == row:
                    return start
                at += 1
            start = reader.line_num + 1
    return start


def _read_one(path: Path, cfg: IngestConfig) -> pd.DataFrame:
    kind = READERS[path.suffix.lower()]
    try:
        if kind == "parquet":
            df = pd.read_parquet(path)
        elif kind == "jsonl":
            df = pd.read_json(path, lines=True, dtype=False, encoding=reading(cfg.encoding))
        else:
            df = pd.read_csv(path, sep="\t" if kind == "tsv" else ",", encoding=reading(cfg.encoding), dtype=str,
                             keep_default_na=False, quoting=3 if kind == "tsv" else 0)
    except UnicodeDecodeError:
        raise DataError(f"{path}:{_bad_byte_line(path, cfg.encoding)}: not valid {cfg.encoding}; set ingest.encoding "
                        f"to the file's encoding (e.g. latin-1)") from None
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise DataError(f"{path}: cannot be read as {kind}: {exc}") from None
    for role, col in (("text", cfg.text_column), ("label", cfg.label_column)):
        if col not in df.columns:
            if len(df.columns) == 1 and ";" in str(df.columns[0]):
                raise DataError(f"{path}: one column {df.columns[0]!r}: the file is separated by ';' (a spreadsheet's "
                                f"export in some locales); save it comma-separated")
            raise DataError(f"{path}: no {role} column {col!r} (columns: {', '.join(map(str, df.columns))}); "
                            f"set ingest.{role}_column")
    if kind == "tsv":
        _check_tsv_rows(path, cfg)
    out = df[[cfg.text_column, cfg.label_column]].copy()
    out.columns = ["text", "label"]
    if "split" in df.columns:  # a user-given split (kftune.splits)
        from kftune.splits import read_column

        line = (lambda row: _csv_line(path, row, cfg.encoding)) if kind == "csv" else \
            (lambda row: row + 1 + (kind == "tsv"))  # a TSV row is one line (its rows are checked)
        out["split"] = read_column(df["split"], path, line)
        out["given_splits"] = ",".join(sorted(set(out["split"])))  # what this file gives (splits.assign)
    labels = out["label"]
    if pd.api.types.is_float_dtype(labels) and (labels.dropna() % 1 == 0).all():
        out["label"] = labels.astype("Int64")  # a gap in an int column turns 1 into 1.0; labels stay "1"
    out = out.astype(object).fillna("").astype(str)
    if cfg.mask_pii:  # on the normalised text: `555 123  4567` (two spaces) is a phone number too
        from kftune.pii import mask

        out["text"] = out["text"].map(lambda t: mask(normalise(t)))
    return out


def _check_tsv_rows(path: Path, cfg: IngestConfig) -> None:
    """TSV is read without quote handling (GLUE's files have unbalanced quotes), so a row shorter than the
    header, such as half of a text quoted across a line break, would be read as a row with an empty field."""
    width = None
    with open(path, encoding=reading(cfg.encoding), newline="") as lines:  # \n, \r, \r\n only, as pandas
        for number, line in enumerate(lines, start=1):
            if not line.strip("\r\n"):
                continue
            fields = line.count("\t") + 1
            width = width or fields
            if fields >= width:
                continue
            raise DataError(f"{path}:{number}: {fields} field(s), the header has {width} (TSV is read without "
                            f"quote handling, so a text quoted across a line break splits in two; write such texts "
                            f"as CSV)")


def _download_s3(uri: str, dest: Path) -> Path:
    import boto3  # the endpoint comes from AWS_ENDPOINT_URL, credentials from the environment

    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    try:
        s3 = boto3.client("s3")
        keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
                for o in page.get("Contents", []) if Path(o["Key"]).suffix.lower() in READERS
                and (prefix.endswith("/") or o["Key"] == prefix or o["Key"].startswith(f"{prefix}/") or not prefix)]
        # a folder-like prefix: s3://b/data/v1 is data/v1 or data/v1/..., never data/v10/...
        if not keys:
            raise DataError(f"{uri}: no {'/'.join(READERS)} objects under this prefix")
        for key in keys:
            target = dest / key
            target.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, key, str(target))
    except (BotoCoreError, ClientError) as exc:
        raise DataError(f"{uri}: cannot read from S3 (endpoint {os.environ.get('AWS_ENDPOINT_URL', 'AWS')}): "
                        f"{exc}") from None
    return dest


def list_files(source: str | Path, suffixes=tuple(READERS), any_single_file: bool = False) -> list[Path]:
    """The data files behind `source` (a file or a folder), sorted; fail if there are none.

    A folder contributes its files with one of `suffixes`; a single file must have one too, unless
    `any_single_file` (CoNLL files come as .txt, .annotated, ...).
    """
    path = Path(source)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_file():
        if not any_single_file and path.suffix.lower() not in suffixes:
            raise DataError(f"{path}: unsupported file type {path.suffix!r} (use {', '.join(suffixes)})")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
    if not files:
        raise DataError(f"{path}: folder has no {', '.join(suffixes)} files")
    return files


def read_tables(source: str, cfg: IngestConfig) -> tuple[pd.DataFrame, list[dict]]:
    """Read every table under `source` (local path or s3://bucket/prefix) into text/label columns."""
    remote = str(source).startswith("s3://")
    with tempfile.TemporaryDirectory() as tmp:
        files = list_files(_download_s3(source, Path(tmp)) if remote else source)
        frames = [_read_one(f, cfg) for f in files]
        bucket = str(source).removeprefix("s3://").partition("/")[0]
        sources = [{"file": f"s3://{bucket}/{f.relative_to(tmp)}" if remote else str(f),
                    "sha256": file_sha256(f), "rows": len(df)}
                   for f, df in zip(files, frames)]
    return pd.concat(frames, ignore_index=True), sources


def normalise(text: str) -> str:
    return " ".join(unicodedata.normalize("NFC", text).split())


def normalise_label(label: str) -> str:
    """A label as every reader takes it: NFC ("négatif" typed two ways is one label), no surrounding spaces."""
    return unicodedata.normalize("NFC", label).strip()


def split_settings(cfg: IngestConfig) -> dict:
    """What decides every row's split (mask_pii: the hash is of the masked text); a data version's splits are
    only comparable under the same settings."""
    return {"split_salt": cfg.split_salt, "mask_pii": cfg.mask_pii, "validation_fraction": cfg.validation_fraction,
            "test_fraction": cfg.test_fraction}


def split_of(text: str, salt: str, validation_fraction: float, test_fraction: float) -> str:
    """Stable split from the text alone, so a text keeps its split as the dataset grows."""
    digest = hashlib.sha256(f"{salt}\0{text}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    return "validation" if u < test_fraction + validation_fraction else "train"


WHY_DROPPED = {  # reason -> (texts, tagged sentences): what the data card says about each drop
    "empty": ("the text or the label is empty after whitespace normalisation",
              "a sentence without words"),
    "duplicate": ("the same text with the same label again (one copy is kept; every copy hashes to the same "
                  "split, so a repeat cannot leak between splits, it would only count that row several times "
                  "in the loss and the test score)",
                  "the same words with the same tags again, such as repeated datelines and score lines (one copy "
                  "is kept; every copy hashes to the same split, so a repeat cannot leak between splits, it "
                  "would only count boilerplate several times in the loss and the test score)"),
    "conflicting_labels": ("the same text with two or more labels: every copy is dropped, as no one label "
                           "is right for all of them (with given splits, a copy in a split of higher priority, "
                           "test first, is kept)",
                           "the same words tagged two or more ways: every copy is dropped (with given splits, a "
                           "copy in a split of higher priority, test first, is kept)"),
}


def clean(df: pd.DataFrame, reasons: dict | None = None, tagged: bool = False) -> tuple[pd.DataFrame, dict[str, int]]:
    """Normalise whitespace; drop empty rows, exact duplicates and texts with conflicting labels.

    Returns the rows kept and the count per reason; `reasons`, if given, is filled with what each nonzero
    reason means and up to three of its rows (the data card's `drop_reasons`).
    """
    drops: dict[str, int] = {}
    df = df.assign(text=df["text"].map(normalise), label=df["label"].map(normalise_label))
    for reason in WHY_DROPPED:
        if reason == "empty":
            mask = (df["text"] == "") | (df["label"] == "")
        elif reason == "duplicate":
            mask = df.duplicated(["text", "label"])
        elif "split" in df.columns:  # given splits: a text's copy in the split of higher priority (test first)
            from kftune.splits import PRIORITY  # is kept; a conflict inside one split drops every copy

            rank = df["split"].map(PRIORITY)
            lower = rank > rank.groupby(df["text"]).transform("min")
            mask = lower | df[~lower]["text"].duplicated(keep=False).reindex(df.index, fill_value=False)
        else:
            mask = df["text"].duplicated(keep=False)
        drops[reason] = int(mask.sum())
        if reasons is not None and drops[reason]:
            examples = [{"text": t[:200], "label": lbl[:200]} for t, lbl in df[mask][["text", "label"]].head(3).values]
            reasons[reason] = {"rows": drops[reason], "why": WHY_DROPPED[reason][tagged], "examples": examples}
        df = df[~mask]
    return df.reset_index(drop=True), drops


def quantiles(values: pd.Series) -> dict[str, float]:
    q = values.quantile([0.5, 0.9, 0.99])
    return {"min": int(values.min()), "p50": float(q[0.5]), "p90": float(q[0.9]), "p99": float(q[0.99]),
            "max": int(values.max())}


def check_labels(df: pd.DataFrame, cfg: IngestConfig, source: str, min_labels: int = 2) -> list[str]:
    """The label set: ingest.labels if configured (every row must use one), else the sorted labels seen.
    A dataset needs two labels; one batch added to it may have one (`min_labels`)."""
    if cfg.labels:
        allowed = {unicodedata.normalize("NFC", lbl) for lbl in cfg.labels}
        unknown = Counter(lbl for lbl in df["label"] if lbl not in allowed)
        if unknown:
            listed = ", ".join(f"{k!r} ({n} rows)" for k, n in unknown.most_common(5))
            raise DataError(f"{source}: column {cfg.label_column!r} has labels outside ingest.labels "
                            f"{cfg.labels}: {listed}")
    present = df["label"].nunique()
    if present < min_labels:
        raise DataError(f"{source}: column {cfg.label_column!r} has {present} distinct label(s); need at least "
                        f"{min_labels}")
    return [unicodedata.normalize("NFC", lbl) for lbl in cfg.labels] if cfg.labels else sorted(df["label"].unique())


def load_rows(source: str, cfg: IngestConfig, split_files: dict[str, str] | None = None) -> tuple[pd.DataFrame, dict]:
    """Read, clean and validate every row under `source` (or of `split_files`, split name -> file); add each
    row's split: the hash of its text, or the one given by a `split` column or by the file it came from.

    Returns the rows (text, label, split) and what the data card says about reading them.
    """
    from kftune import splits

    if split_files:
        splits.check_files(split_files)
        parts = {name: read_tables(path, cfg) for name, path in split_files.items()}
        raw = pd.concat([df.assign(split=name) for name, (df, _) in parts.items()], ignore_index=True)
        sources = [dict(s, split=name) for name, (_, files) in parts.items() for s in files]
        source = ", ".join(split_files.values())
    else:
        raw, sources = read_tables(source, cfg)
    given = "split" in raw.columns
    if given and raw["split"].isna().any():
        raise DataError(f"{source}: some files have a 'split' column and some do not; give every file one")
    reasons: dict = {}
    df, drops = clean(splits.by_priority(raw) if given else raw, reasons)  # a repeated text keeps its test copy
    if df.empty:
        raise DataError(f"{source}: no usable rows after cleaning ({len(raw)} read; dropped {drops})")
    labels = check_labels(df, cfg, source)
    # a split a file does not give is hashed out of that file's train rows: another file's test rows must not
    # pull earlier rows out of the test split they were hashed into
    present = [set(g.split(",")) for g in df["given_splits"]] if given and not split_files else None
    # the splits some train rows are hashed into: those their own file does not give
    hashed = {x for gives, split in zip(present, df["split"]) if split == "train" for x in SPLITS
              if x not in gives} if present else None
    df["split"] = splits.assign(df["text"], df["split"].tolist() if given else None, cfg, present)
    trained = sorted(df.loc[df["split"] == "train", "label"].unique())
    if len(trained) < 2:  # nothing to tell apart: fine-tuning and the TF-IDF baseline would learn one answer
        raise DataError(f"{source}: the train split has {len(trained)} distinct label(s) {trained} of {labels}; a "
                        f"classifier needs at least 2 in train: add rows of the others (they went to validation or "
                        f"test)")
    info = {"sources": sources, "rows_read": len(raw), "dropped": drops, "drop_reasons": reasons, "labels": labels,
            "split_salt": cfg.split_salt, "split": split_settings(cfg),
            "warnings": drop_warnings(raw, df, drops) + untrained_labels(df, labels)}
    if given:
        info["split_given"] = splits.card("files" if split_files else "column 'split'", set(raw["split"]), hashed)
    return df, info


def drop_warnings(raw: pd.DataFrame, kept: pd.DataFrame, drops: dict[str, int]) -> list[str]:
    """Say loudly (log and data card) when cleaning threw most of the data away."""
    out = []
    if len(kept) < 0.5 * len(raw):
        why = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in drops.items() if n)
        out.append(f"only {len(kept)} of {len(raw)} rows are usable ({why}); a duplicate is an exact repeat "
                   f"of (text, label), a conflict the same text with two labels")
    for w in out:
        log.warning("ingest: %s", w)
    return out


def untrained_labels(df: pd.DataFrame, labels: list[str]) -> list[str]:
    """Say (log and data card) when a label has no training row: the model cannot learn it."""
    trained = set(df[df["split"] == "train"]["label"])
    missing = [lbl for lbl in labels if lbl not in trained]
    out = [f"label(s) {', '.join(repr(m) for m in missing[:10])} have no training row (only "
           f"{int(df['label'].isin(missing).sum())} rows, all in validation or test): the model cannot learn them; "
           f"add rows"] if missing else []
    for w in out:
        log.warning("ingest: %s", w)
    return out


def content_sha256(df: pd.DataFrame) -> str:
    """SHA-256 of the (text, label) pairs, independent of row and file order."""
    content = hashlib.sha256()
    for text, label in sorted(zip(df["text"], df["label"])):
        content.update(f"{text}\t{label}\n".encode())
    return content.hexdigest()


def describe(df: pd.DataFrame) -> dict:
    """Rows, label distribution and text lengths per split, for the data card."""
    return {
        "rows": {s: int((df["split"] == s).sum()) for s in SPLITS},
        "label_distribution": {s: {lbl: int(n) for lbl, n in df[df["split"] == s]["label"].value_counts().items()}
                               for s in SPLITS},
        "text_length_chars": quantiles(df["text"].str.len()),
        "text_length_words": quantiles(df["text"].str.split().str.len()),
        "sha256": content_sha256(df),
    }


def require_splits(df: pd.DataFrame, source: str) -> None:
    for name in SPLITS:
        if not (df["split"] == name).any():
            hint = ("lower ingest.validation_fraction and ingest.test_fraction" if name == "train"
                    else f"raise ingest.{name}_fraction")
            raise DataError(f"{source}: the {name} split is empty with {len(df)} rows; add data or {hint}")


def write_dataset(out_dir: str | Path, df: pd.DataFrame, card: dict, extra: dict[str, pd.DataFrame] = {},
                  columns: tuple[str, ...] = ("text", "label")) -> None:
    """{split}.parquet from df's split column, any extra tables as {name}.parquet, and data_card.json."""
    with atomic_dir(out_dir) as tmp:
        for name in SPLITS:
            df[df["split"] == name][list(columns)].reset_index(drop=True).to_parquet(tmp / f"{name}.parquet")
        for name, part in extra.items():
            part.reset_index(drop=True).to_parquet(tmp / f"{name}.parquet")
        write_json(tmp / "data_card.json", card)


NER_SUFFIXES = (".conll", ".iob", ".iob2", ".bio", ".jsonl", ".json")


def read_sentences(source: str, cfg: IngestConfig) -> tuple[pd.DataFrame, dict]:
    """Token classification: every sentence under `source` (CoNLL or JSONL) as text, tokens, tags and label
    (the tags joined, so that `clean` can drop duplicates and conflicts); bad lines fail with file:line."""
    from kftune import ner
    from kftune.pii import mask_tokens

    files = list_files(source, NER_SUFFIXES, any_single_file=True)
    allowed = set(cfg.labels) or None
    rows, repairs, sources = [], 0, []
    for f in files:
        try:
            sentences = (ner.read_jsonl(f, cfg.encoding) if f.suffix.lower() in (".jsonl", ".json")
                         else ner.read_conll(f, cfg.conll_tag_column, cfg.encoding))
            for s in sentences:
                repairs += ner.check_tags(s, f"{f}:{s.line}", cfg.bio_repair, allowed)
        except ner.NerDataError as exc:
            raise DataError(str(exc)) from None
        except UnicodeDecodeError:
            raise DataError(f"{f}:{_bad_byte_line(f, cfg.encoding)}: not valid {cfg.encoding}; set ingest.encoding") from None
        if not sentences:
            raise DataError(f"{f}: no sentences (expected one token per line, blank lines between sentences)")
        sources.append({"file": str(f), "sha256": file_sha256(f), "rows": len(sentences)})
        for s in sentences:
            tokens = mask_tokens(s.tokens) if cfg.mask_pii else s.tokens
            rows.append((" ".join(tokens), " ".join(s.tags), tokens, s.tags))
    df = pd.DataFrame(rows, columns=["text", "label", "tokens", "tags"])
    return df, {"sources": sources, "bio_repairs": repairs}


def load_sentences(source: str | None, cfg: IngestConfig,
                   split_files: dict[str, str] | None = None) -> tuple[pd.DataFrame, dict]:
    """Token classification's `load_rows`: every sentence under `source` (or of `split_files`), cleaned, with its
    split (the hash of its words, or the file it came from; a split not given is hashed out of train).

    Returns the rows (text, label = the tags joined, tokens, tags, split) and what the data card says
    about reading them; `labels` is the tag set (ingest.labels, or O + B-/I- of every type seen).
    """
    from kftune import ner, splits

    if split_files:
        splits.check_files(split_files)
        parts = {name: read_sentences(path, cfg) for name, path in split_files.items()}
        raw = splits.by_priority(pd.concat([df.assign(split=name) for name, (df, _) in parts.items()],
                                           ignore_index=True))  # a sentence in two splits keeps its test copy
        info = {"sources": [dict(s, split=name) for name, (_, i) in parts.items() for s in i["sources"]],
                "bio_repairs": sum(i["bio_repairs"] for _, i in parts.values()),
                "split_given": splits.card("files", set(split_files))}
        source = ", ".join(split_files.values())
    else:
        raw, info = read_sentences(source, cfg)
    reasons: dict = {}
    df, drops = clean(raw, reasons, tagged=True)  # on the joined text (the split and duplicate key)
    if df.empty:
        raise DataError(f"{source}: no usable sentences ({len(raw)} read; dropped {drops})")
    df["split"] = splits.assign(df["text"], df["split"].tolist() if split_files else None, cfg)
    tags = list(cfg.labels) or ner.tag_set([t for ts in df["tags"] for t in ts])
    return df, {**info, "task": "token-classification", "rows_read": len(raw), "dropped": drops,
                "drop_reasons": reasons, "labels": tags,
                "split_salt": cfg.split_salt, "split": split_settings(cfg)}


def describe_sentences(df: pd.DataFrame) -> dict:
    """Token classification's `describe`: sentences, words, tag and entity counts per split."""
    from kftune import ner

    part = {s: df[df["split"] == s] for s in SPLITS}
    return {
        "rows": {s: len(p) for s, p in part.items()},
        "tokens": {s: int(p["tokens"].map(len).sum()) for s, p in part.items()},
        "label_distribution": {s: dict(sorted(Counter(t for ts in p["tags"] for t in ts).items()))
                               for s, p in part.items()},
        "entities": {s: ner.entity_counts([ner.Sentence(list(k), list(t), 0) for k, t in zip(p["tokens"], p["tags"])])
                     for s, p in part.items()},
        "sentence_length_words": quantiles(df["tokens"].map(len)),
        "sha256": content_sha256(df),
    }
