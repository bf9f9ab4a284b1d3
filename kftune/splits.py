"""User-given splits: a `split` column, or one file per split (`kftune step ingest --train/--validation/--test`).

The hash split (kftune.tables.split_of) stays the default. A given split is honoured as is; a split the user
did not give (say no validation file) is hashed out of the given train rows with ingest's fractions (with a
`split` column: per file, so a later batch that gives test rows moves no earlier row out of test). A text
in two splits is kept only in the one a test set lives in: test, then validation, then train, so a golden
test set is never thinned by a leak from train.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from kftune.config import IngestConfig
from kftune.tables import SPLITS, DataError, split_of

COLUMN = "split"
ALIASES = {"train": "train", "validation": "validation", "valid": "validation", "dev": "validation", "test": "test"}
PRIORITY = {"test": 0, "validation": 1, "train": 2}  # who keeps a text found in two splits


def read_column(values: pd.Series, path, line) -> pd.Series:
    """A file's split column as train/validation/test; a missing or unknown value fails with its file:line
    (`line`: data row -> the file line it starts on)."""
    names = values.astype(object).fillna("").astype(str).str.strip().str.lower()
    bad = ~names.isin(list(ALIASES))
    if bad.any():
        row = int(bad.to_numpy().argmax())
        raise DataError(f"{path}:{line(row)}: split {values.iloc[row]!r} is not train, validation (or "
                        f"dev) or test; in a file with a {COLUMN!r} column every row needs one")
    return names.map(ALIASES)


def by_priority(df: pd.DataFrame) -> pd.DataFrame:
    """Rows ordered test, validation, train, so that cleaning's keep-first keeps a repeated text in its test copy."""
    return df.iloc[np.argsort(df[COLUMN].map(PRIORITY).to_numpy(), kind="stable")]


def assign(texts, given, cfg: IngestConfig, present: list[set] | None = None) -> list[str]:
    """Every row's split: the hash of its text, or the given split with any split not given hashed out of train.

    present: per row, the splits its file gives (a `split` column); None: the splits given anywhere (split files).
    """
    if given is None:
        return [split_of(t, cfg.split_salt, cfg.validation_fraction, cfg.test_fraction) for t in texts]
    present = present or [set(given)] * len(given)
    out = []
    for text, split, gives in zip(texts, given, present):
        if split == "train":
            hashed = split_of(text, cfg.split_salt, cfg.validation_fraction, cfg.test_fraction)
            split = hashed if hashed not in gives else "train"
        out.append(split)
    return out


def card(given_by, given: set[str], hashed: set[str] | None = None) -> dict:
    """What the data card says about a given split; `hashed`: the splits train rows were hashed into (default:
    those given nowhere), which a `split` column decides per file."""
    hashed = {s for s in SPLITS if s not in given} if hashed is None else hashed
    return {"given_by": given_by, "given": [s for s in SPLITS if s in given],
            "hashed_from_train": [s for s in SPLITS if s in hashed]}


def read_golden(path: str, cfg: IngestConfig, task: str) -> pd.DataFrame:
    """register.golden_test: every labelled row (or tagged sentence) of the file, as the gate scores them."""
    from kftune.tables import normalise, normalise_label, read_sentences, read_tables

    if task == "token-classification":
        return read_sentences(path, cfg)[0]
    df, _ = read_tables(path, cfg)
    df = df.assign(text=df["text"].map(normalise), label=df["label"].map(normalise_label))
    return df[(df["text"] != "") & (df["label"] != "")].reset_index(drop=True)


def check_golden(golden: pd.DataFrame, labels: list[str], path: str) -> None:
    """register.golden_test must have rows, each with a label (tag) the model predicts, for the gate to score
    both sides on it: checked before anything is registered."""
    tagged = "tags" in golden.columns
    if golden.empty:
        raise DataError(f"register.golden_test={path}: no labelled {'sentences' if tagged else 'rows'}")
    unknown = sorted(({t for ts in golden["tags"] for t in ts} if tagged else set(golden["label"])) - set(labels))
    if unknown:
        raise DataError(f"register.golden_test={path}: {'tags' if tagged else 'labels'} {unknown[:10]} are not "
                        f"among the model's {labels}")


def check_files(splits: dict[str, str]) -> None:
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown:
        raise DataError(f"split files for {unknown}: only train, validation and test can be given")
    if "train" not in splits:
        raise DataError("given split files need a train file (--train); validation and test may be hashed out of it")
