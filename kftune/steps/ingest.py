"""ingest: read labelled texts (or tagged sentences), clean them, split by a stable hash, write a data card."""

from __future__ import annotations

import logging
from pathlib import Path

from kftune.config import IngestConfig
from kftune.tables import describe, describe_sentences, load_rows, load_sentences, require_splits, write_dataset

log = logging.getLogger(__name__)


def _ingest_tokens(source: str | None, out_dir: str | Path, cfg: IngestConfig, lineage: dict | None,
                   split_files: dict[str, str] | None) -> dict:
    df, info = load_sentences(source, cfg, split_files)
    source = source or ", ".join(split_files.values())
    require_splits(df, source)
    card = {**info, **describe_sentences(df), "lineage": lineage or {"data_path": str(source)}}
    write_dataset(out_dir, df, card, columns=("text", "tokens", "tags"))
    log.info("ingest: %d sentences -> %s; %d BIO repairs; dropped %s", info["rows_read"], card["rows"],
             info["bio_repairs"], info["dropped"])
    return card


def ingest(source: str, out_dir: str | Path, cfg: IngestConfig, lineage: dict | None = None,
           task: str = "sequence-classification", split_files: dict[str, str] | None = None) -> dict:
    """Read, clean, validate and split labelled texts (or, for token classification, tagged sentences).

    Args:
        source: a CSV/TSV/JSONL/Parquet file, a folder of them, or s3://bucket/prefix; for
            token classification a CoNLL or JSONL file, or a folder of them.
        out_dir: folder to write train/validation/test.parquet and data_card.json into.
        cfg: the `ingest` section of params.yaml.
        lineage: where the data came from (repo, revision, commit, DVC md5), kept in the data card.
        task: params.task.
        split_files: given splits instead of `source` and the hash split: split name -> file (train
            needed; a split not given is hashed out of train). A `split` column in `source` is honoured too.

    Returns:
        The data card.
    """
    if task == "token-classification":
        return _ingest_tokens(source, out_dir, cfg, lineage, split_files)
    df, info = load_rows(source, cfg, split_files)
    source = source or ", ".join(split_files.values())
    require_splits(df, source)
    card = {**info, **describe(df), "task": task, "lineage": lineage or {"data_path": str(source)}}
    write_dataset(out_dir, df, card)
    log.info("ingest: %s rows -> %s; dropped %s", info["rows_read"], card["rows"], info["dropped"])
    return card
